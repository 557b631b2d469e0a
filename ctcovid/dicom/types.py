"""Plain records for what the header scan finds: instances, series and ordered slices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_STORAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)


@dataclass
class Instance:
    """One DICOM file's header, as read without its pixel data."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    instance_number: int | None
    image_type: tuple[str, ...]
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, float, float, float, float, float] | None
    slice_thickness: float | None
    number_of_frames: int
    header: Dataset

    @property
    def is_enhanced(self) -> bool:
        return self.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE


@dataclass(frozen=True)
class SliceRef:
    """One 2D slice of a series: an instance and, for multi-frame instances, a frame (0-based)."""

    instance: Instance
    frame_index: int
    z_mm: float | None

    @property
    def sop_instance_uid(self) -> str:
        return self.instance.sop_instance_uid

    @property
    def frame_number(self) -> int:
        """1-based frame number as DICOM counts (ReferencedFrameNumber)."""
        return self.frame_index + 1


@dataclass(frozen=True)
class BadFile:
    """A file that the scan could not use, with the reason."""

    path: Path
    reason: str


@dataclass
class Series:
    """All instances of one SeriesInstanceUID, with its usability verdict and slice order."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    instances: list[Instance]
    usable: bool = False
    reason: str = ""
    slices: list[SliceRef] = field(default_factory=list)
    ordering: str = "position"  # "position" | "instance_number"
    duplicates: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def header(self) -> Dataset:
        """A representative header (patient, study and series modules) of the series."""
        return self.instances[0].header

    @property
    def n_instances(self) -> int:
        return len(self.instances)

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def series_description(self) -> str:
        return str(self.header.get("SeriesDescription", ""))

    @property
    def patient_id(self) -> str:
        return str(self.header.get("PatientID", ""))
