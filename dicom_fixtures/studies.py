"""Whole synthetic studies and labelled data sets on disk."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .identity import StudyIdentity, make_identity, make_uid
from .phantom import chest_phantom
from .writer import write_ct_series, write_junk, write_localizer, write_mr_series

logger = logging.getLogger(__name__)

__all__ = [
    "LABEL_NEGATIVE",
    "LABEL_POSITIVE",
    "StudyIdentity",
    "StudyInfo",
    "StudySpec",
    "generate_studies",
    "lung_window_uint8",
    "write_cov19_layout",
    "write_labelled_dicom",
    "write_study",
]

LABEL_POSITIVE = "covid"
LABEL_NEGATIVE = "non-covid"


@dataclass(frozen=True)
class StudySpec:
    """What to put in one synthetic study."""

    positive: bool
    n_slices: int = 24
    size: int = 128
    transfer_syntax: str = "explicit"
    signed: bool = True
    rescale_slope: float = 1.0
    # None: 0 for signed, -1024 for unsigned storage.
    rescale_intercept: float | None = None
    shuffle_names: bool = False
    reverse_instance_numbers: bool = False
    enhanced: bool = False
    add_localizer: bool = False
    add_mr_series: bool = False
    # Junk files (text, truncated, no pixel data, duplicate, empty) in the CT folder.
    add_junk: bool = False
    nodules: bool = False
    consolidation: bool = False
    lung_margin_slices: int = 0
    pixel_spacing_mm: tuple[float, float] = (0.7, 0.7)
    slice_thickness_mm: float = 1.25

    @property
    def label(self) -> str:
        return LABEL_POSITIVE if self.positive else LABEL_NEGATIVE


@dataclass
class StudyInfo:
    """What :func:`write_study` wrote.

    ``hu`` and ``lesion_mask`` are the phantom arrays (slices by increasing z)
    kept for tests and evaluation; they are never serialised.
    """

    study_dir: Path
    study_instance_uid: str
    ct_series_instance_uid: str
    label: str
    patient_id: str
    ct_dir: Path
    paths: list[Path]
    spec: StudySpec
    lesion_mask: np.ndarray = field(repr=False)
    hu: np.ndarray = field(repr=False)
    localizer_path: Path | None = None
    mr_paths: list[Path] = field(default_factory=list)
    junk: dict[str, Path] = field(default_factory=dict)

    def manifest_entry(self, root: Path | None = None) -> dict[str, str]:
        """JSON-ready summary; ``study_dir`` is relative to ``root`` if given."""
        study_dir = self.study_dir.relative_to(root) if root is not None else self.study_dir
        return {
            "study_dir": study_dir.as_posix(),
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.ct_series_instance_uid,
            "label": self.label,
            "patient_id": self.patient_id,
        }


def write_study(out_dir: Path, spec: StudySpec, *, seed: int, index: int = 0) -> StudyInfo:
    """Write one study: CT series in ``out_dir/ct``, optional extras beside it.

    The localizer goes to ``out_dir/localizer`` and the MR series to
    ``out_dir/mr``. Same (spec, seed, index) gives byte-identical files.
    """
    out_dir = Path(out_dir)
    identity = make_identity(seed, index)
    rng = np.random.default_rng([seed, index])
    phantom = chest_phantom(
        spec.n_slices,
        spec.size,
        positive=spec.positive,
        rng=rng,
        nodules=spec.nodules,
        consolidation=spec.consolidation,
        lung_margin_slices=spec.lung_margin_slices,
    )
    series_uid = make_uid(identity.study_instance_uid, "ct-series")
    ct_dir = out_dir / "ct"
    paths = write_ct_series(
        phantom.hu,
        ct_dir,
        study=identity,
        series_instance_uid=series_uid,
        pixel_spacing_mm=spec.pixel_spacing_mm,
        slice_thickness_mm=spec.slice_thickness_mm,
        transfer_syntax=spec.transfer_syntax,
        signed=spec.signed,
        rescale_slope=spec.rescale_slope,
        rescale_intercept=spec.rescale_intercept,
        shuffle_names=spec.shuffle_names,
        reverse_instance_numbers=spec.reverse_instance_numbers,
        enhanced=spec.enhanced,
        rng=np.random.default_rng([seed, index, 1]),
    )
    info = StudyInfo(
        study_dir=out_dir,
        study_instance_uid=identity.study_instance_uid,
        ct_series_instance_uid=series_uid,
        label=spec.label,
        patient_id=identity.patient_id,
        ct_dir=ct_dir,
        paths=paths,
        spec=spec,
        lesion_mask=phantom.lesion_mask,
        hu=phantom.hu,
    )
    if spec.add_localizer:
        info.localizer_path = write_localizer(
            out_dir / "localizer",
            identity,
            hu=phantom.hu,
            pixel_spacing_mm=spec.pixel_spacing_mm[1],
            slice_spacing_mm=spec.slice_thickness_mm,
        )
    if spec.add_mr_series:
        info.mr_paths = write_mr_series(out_dir / "mr", identity)
    if spec.add_junk:
        info.junk = write_junk(ct_dir, paths[len(paths) // 2])
    return info


def _varied_spec(i: int, n_slices: int, size: int) -> dict[str, Any]:
    """Deterministic mix of storage options and findings for study ``i``."""
    positive = i % 2 == 0
    j = i // 2  # index within the class, so both classes see every option
    signed, slope, intercept = [
        (True, 1.0, 0.0),
        (False, 1.0, -1024.0),
        (True, 0.5, -1024.0),
        (False, 0.5, -1024.0),
    ][j % 4]
    return {
        "positive": positive,
        "n_slices": n_slices,
        "size": size,
        "signed": signed,
        "rescale_slope": slope,
        "rescale_intercept": intercept,
        "nodules": (not positive) and j % 2 == 1,
        "consolidation": positive and j % 2 == 1,
        "shuffle_names": i % 3 == 2,
        "reverse_instance_numbers": i % 4 == 3,
    }


def _check_overrides(overrides: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"unknown StudySpec fields: {sorted(unknown)}")


def generate_studies(
    out: Path,
    n_studies: int,
    *,
    seed: int = 0,
    n_slices: int = 24,
    size: int = 128,
    **spec_overrides: Any,
) -> list[StudyInfo]:
    """Write ``out/study_NNN/...`` plus ``out/manifest.json``.

    Studies alternate positive/negative (even indices positive) with a mix of
    signed/unsigned storage, rescale slopes, nodules on some negatives,
    consolidation on some positives, shuffled names and reversed instance
    numbers. ``spec_overrides`` (StudySpec fields) apply to every study.
    The manifest lists ``study_dir`` relative to ``out``.
    """
    _check_overrides(spec_overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for i in range(n_studies):
        kwargs = _varied_spec(i, n_slices, size) | spec_overrides
        infos.append(write_study(out / f"study_{i:03d}", StudySpec(**kwargs), seed=seed, index=i))
    manifest = [info.manifest_entry(out) for info in infos]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %d studies to %s", n_studies, out)
    return infos


def lung_window_uint8(hu: np.ndarray, window: tuple[float, float] = (-600.0, 1500.0)) -> np.ndarray:
    """Map HU to uint8 with a (centre, width) window, clipping outside it."""
    centre, width = window
    scaled = (hu.astype(np.float32) - (centre - width / 2.0)) / width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def write_cov19_layout(
    out: Path,
    *,
    n_per_class: int,
    n_slices: int = 12,
    size: int = 128,
    seed: int = 0,
    split: str = "train",
    window: tuple[float, float] = (-600.0, 1500.0),
) -> list[Path]:
    """Write a COV19-CT-DB style JPEG tree.

    Layout is ``out/split/{covid,non-covid}/ct_scan_N/K.jpg`` with K = 0..n_slices-1
    in increasing z, each an 8-bit grayscale lung-windowed slice (JPEG quality 95).

    Returns
    -------
    list of pathlib.Path
        The ``ct_scan_N`` folders, covid first.
    """
    out = Path(out)
    scans = []
    for c, positive in enumerate((True, False)):
        label = LABEL_POSITIVE if positive else LABEL_NEGATIVE
        for n in range(n_per_class):
            rng = np.random.default_rng([seed, c, n, 2])
            phantom = chest_phantom(
                n_slices,
                size,
                positive=positive,
                rng=rng,
                nodules=not positive and n % 2 == 1,
                consolidation=positive and n % 2 == 1,
            )
            scan_dir = out / split / label / f"ct_scan_{n}"
            scan_dir.mkdir(parents=True, exist_ok=True)
            for k, img in enumerate(lung_window_uint8(phantom.hu, window)):
                Image.fromarray(img).save(scan_dir / f"{k}.jpg", quality=95)
            scans.append(scan_dir)
    return scans


def write_labelled_dicom(
    out: Path, *, n_per_class: int, seed: int = 0, **spec: Any
) -> list[StudyInfo]:
    """Write ``out/{covid,non-covid}/study_NNN/...`` DICOM studies.

    ``spec`` holds StudySpec fields (except ``positive``) applied to all studies.
    """
    if "positive" in spec:
        raise TypeError("positive is set per class")
    _check_overrides(spec)
    out = Path(out)
    infos = []
    for i in range(2 * n_per_class):
        s = StudySpec(positive=i % 2 == 0, **spec)
        infos.append(write_study(out / s.label / f"study_{i:03d}", s, seed=seed, index=i))
    return infos
