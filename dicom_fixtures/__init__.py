"""Synthetic chest-CT DICOM fixtures for tests, demos and benchmarks."""

import logging

from .identity import StudyIdentity, make_identity, make_uid
from .phantom import HU_MAX, HU_MIN, Phantom, chest_phantom
from .studies import (
    LABEL_NEGATIVE,
    LABEL_POSITIVE,
    StudyInfo,
    StudySpec,
    generate_studies,
    lung_window_uint8,
    write_cov19_layout,
    write_labelled_dicom,
    write_study,
)
from .writer import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    MANUFACTURER,
    MR_IMAGE_STORAGE,
    TRANSFER_SYNTAXES,
    available_transfer_syntaxes,
    hu_to_stored,
    write_ct_series,
    write_junk,
    write_localizer,
    write_mr_series,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "HU_MAX",
    "HU_MIN",
    "LABEL_NEGATIVE",
    "LABEL_POSITIVE",
    "MANUFACTURER",
    "MR_IMAGE_STORAGE",
    "TRANSFER_SYNTAXES",
    "Phantom",
    "StudyIdentity",
    "StudyInfo",
    "StudySpec",
    "available_transfer_syntaxes",
    "chest_phantom",
    "generate_studies",
    "hu_to_stored",
    "lung_window_uint8",
    "make_identity",
    "make_uid",
    "write_cov19_layout",
    "write_ct_series",
    "write_junk",
    "write_labelled_dicom",
    "write_localizer",
    "write_mr_series",
    "write_study",
]
