"""Judge each series (usable for classification or not, and why) and order its slices."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ctcovid.config import IngestConfig
from ctcovid.dicom.scan import ScanReport, iter_files, scan_files
from ctcovid.dicom.types import CT_STORAGE_CLASSES, Instance, Series, SliceRef
from ctcovid.errors import InvalidInputError

logger = logging.getLogger(__name__)

# A series failing only this rule can still be converted (``ctcovid preprocess``); the slice
# minimum belongs to classification.
TOO_FEW_SLICES = "too few slices"


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row direction x column direction (PS3.3 C.7.6.2.1.1)."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else normal


def _frame_positions(inst: Instance) -> list[tuple[float, float, float] | None]:
    """ImagePositionPatient of each frame of an instance (one entry for a single-frame image)."""
    if inst.number_of_frames <= 1 and "PerFrameFunctionalGroupsSequence" not in inst.header:
        return [inst.image_position]
    per_frame = inst.header.get("PerFrameFunctionalGroupsSequence") or []
    positions: list[tuple[float, float, float] | None] = []
    for i in range(inst.number_of_frames):
        pos = None
        if i < len(per_frame):
            plane = per_frame[i].get("PlanePositionSequence")
            if plane and "ImagePositionPatient" in plane[0]:
                pos = tuple(float(v) for v in plane[0].ImagePositionPatient)
        positions.append(pos)  # type: ignore[arg-type]
    return positions


def order_slices(series: Series) -> tuple[list[SliceRef], str, list[str]]:
    """Order the slices of a series along the slice normal (feet to head for axial CT).

    Position is ImagePositionPatient projected on the normal of ImageOrientationPatient. Only when
    a position or the orientation is missing do we fall back to InstanceNumber, and say so.
    Returns the slices, the ordering used ("position" | "instance_number") and warnings.
    """
    warnings: list[str] = []
    orientation = series.instances[0].image_orientation
    candidates: list[tuple[Instance, int, tuple[float, float, float] | None]] = []
    for inst in series.instances:
        for i, pos in enumerate(_frame_positions(inst)):
            candidates.append((inst, i, pos))
    if orientation is not None and all(pos is not None for _, _, pos in candidates):
        normal = slice_normal(orientation)
        refs = [
            SliceRef(inst, i, float(np.dot(np.asarray(pos), normal))) for inst, i, pos in candidates
        ]
        refs.sort(key=lambda r: (r.z_mm, r.instance.instance_number or 0, r.frame_index))
        z = np.array([r.z_mm for r in refs])
        if len(z) > 1:
            n_same = int(np.sum(np.diff(z) < 1e-3))
            if n_same:
                warnings.append(
                    f"Series {series.series_instance_uid}: {n_same} slice(s) share a position "
                    "with another slice"
                )
        return refs, "position", warnings
    lacking = next((inst for inst, _, pos in candidates if pos is None), series.instances[0])
    what = (
        "ImageOrientationPatient (0020,0037)"
        if orientation is None
        else ("ImagePositionPatient (0020,0032)")
    )
    warnings.append(
        f"Series {series.series_instance_uid}: instance {lacking.sop_instance_uid} lacks {what}; "
        "slices ordered by InstanceNumber instead"
    )
    refs = [SliceRef(inst, i, None) for inst, i, _ in candidates]
    refs.sort(key=lambda r: (r.instance.instance_number or 0, r.frame_index))
    return refs, "instance_number", warnings


def _axial_angle_deg(orientation: Sequence[float]) -> float:
    normal = slice_normal(orientation)
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


def unusable_reason(series: Series, config: IngestConfig) -> str:
    """Why a series cannot be classified, or ``""`` when it can (slice order must be known)."""
    first = series.instances[0]
    if series.modality != "CT":
        return f"modality {series.modality or 'missing'} is not CT"
    classes = {inst.sop_class_uid for inst in series.instances}
    if not classes <= set(CT_STORAGE_CLASSES):
        return f"SOP class {', '.join(sorted(classes))} is not CT or Enhanced CT Image Storage"
    if any("LOCALIZER" in inst.image_type for inst in series.instances):
        return "ImageType is LOCALIZER (scout image)"
    if first.image_orientation is None:
        return "lacks ImageOrientationPatient (0020,0037)"
    angle = _axial_angle_deg(first.image_orientation)
    if angle > config.axial_tolerance_deg:
        return (
            f"not axial: slice normal is {angle:.1f} degrees from the patient's z axis "
            f"(tolerance {config.axial_tolerance_deg:g})"
        )
    for attr, label in (
        ("rows", "Rows"),
        ("columns", "Columns"),
        ("pixel_spacing", "PixelSpacing"),
        ("image_orientation", "ImageOrientationPatient"),
    ):
        values = {getattr(inst, attr) for inst in series.instances}
        if len(values) > 1:
            return f"inconsistent {label} across instances: {sorted(map(str, values))[:4]}"
        if None in values and attr != "image_orientation":
            return f"lacks {label}"
    if series.n_slices < config.min_slices:
        return f"{TOO_FEW_SLICES}: {series.n_slices} (at least {config.min_slices} needed)"
    return ""


def assess(series: Series, config: IngestConfig) -> Series:
    """Order the slices of ``series`` and set its usability and reason, in place."""
    series.slices, series.ordering, warnings = order_slices(series)
    series.warnings.extend(warnings)
    if series.duplicates:
        series.warnings.append(
            f"Series {series.series_instance_uid}: {series.duplicates} duplicate instance(s) "
            "(same SOPInstanceUID) counted once"
        )
    series.reason = unusable_reason(series, config)
    series.usable = not series.reason
    return series


def scan(path: Path | str, config: IngestConfig | None = None) -> ScanReport:
    """Scan a file or folder tree: every series found, assessed, and the skipped files."""
    config = config or IngestConfig()
    root = Path(path)
    if not root.exists():
        raise InvalidInputError(f"{root}: no such file or folder")
    report = scan_files(list(iter_files(root)))
    for series in report.series:
        assess(series, config)
    return report


def convertible(series: Series) -> bool:
    """True when a series can be turned into slices (usable, or short of slices only)."""
    return series.usable or series.reason.startswith(TOO_FEW_SLICES)


def select_series(
    report: ScanReport, source: Path | str, *, for_classification: bool = True
) -> Series:
    """The one CT series of a folder to work on; an ``InvalidInputError`` naming the candidates.

    With ``for_classification=False`` a short CT series is accepted (preprocessing converts it).
    """
    accept = (lambda s: s.usable) if for_classification else convertible
    candidates = [s for s in report.series if accept(s)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        if not report.series:
            detail = f"{len(report.bad_files)} file(s) skipped" if report.bad_files else "empty"
            raise InvalidInputError(f"{source}: no DICOM series found ({detail})")
        reasons = "; ".join(
            f"{s.series_instance_uid} ({s.modality}, {s.n_instances} instances): {s.reason}"
            for s in report.series
        )
        raise InvalidInputError(f"{source}: no usable CT series. Found: {reasons}")
    names = ", ".join(
        f"{s.series_instance_uid} ({s.n_slices} slices, {s.series_description or 'no description'})"
        for s in candidates
    )
    raise InvalidInputError(
        f"{source}: {len(candidates)} usable CT series, pass one series folder: {names}"
    )


def load_series(
    path: Path | str, config: IngestConfig | None = None, *, for_classification: bool = True
) -> Series:
    """Scan ``path`` and return its one usable CT series (see :func:`select_series`)."""
    config = config or IngestConfig()
    report = scan(path, config)
    series = select_series(report, path, for_classification=for_classification)
    for bad in report.bad_files:
        series.warnings.append(f"skipped {bad.path}: {bad.reason}")
    return series
