"""Split a series into stacks (one per reconstruction), judge each, and choose one to classify.

A SeriesInstanceUID may hold several reconstructions: two kernels at the same positions, thin and
thick slices, repeated acquisitions, a reformat or a projection. Averaging their slices would
classify something no scanner made, so they are split by

- what kind of image it is (:func:`ctcovid.dicom.limits.kind_reason`: non-HU, projection, colour),
- ImageType, ConvolutionKernel, SliceThickness and ImageOrientationPatient (within
  :data:`ORIENTATION_TOLERANCE`),
- AcquisitionNumber, only where acquisitions repeat the same positions (separate volumes);
  acquisitions side by side along z (step-and-shoot) stay one volume.

Localizers are dropped before (a scout inside an axial series does not spoil it). Each stack is
judged on its own; the stack classified is chosen among the usable ones by ``stack_rule``
(:func:`rule_key`), and the others are named in the series' warnings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ctcovid.config import IngestConfig
from ctcovid.dicom.limits import bounds_reason, kind_reason
from ctcovid.dicom.types import Instance, SliceRef, Stack

# Direction cosines equal within this (about 0.06 degrees) are the same orientation: values
# written with a few digits less or more must not split or reject a series.
ORIENTATION_TOLERANCE = 1e-3
SPACING_TOLERANCE_MM = 1e-3
# A step between neighbouring slices above this factor of the median step is a gap.
GAP_FACTOR = 1.5
TOO_FEW_SLICES = "too few slices"
_MAX_LISTED = 5


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row direction x column direction (PS3.3 C.7.6.2.1.1)."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else normal


def same_orientation(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """Orientations equal within :data:`ORIENTATION_TOLERANCE` (both missing counts as equal)."""
    if a is None or b is None:
        return a is None and b is None
    return max(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True)) <= (
        ORIENTATION_TOLERANCE
    )


def axial_angle_deg(orientation: Sequence[float]) -> float:
    """Angle between the slice normal and the patient's z axis."""
    normal = slice_normal(orientation)
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


def frame_positions(inst: Instance) -> list[tuple[float, float, float] | None]:
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


def frame_orientations(inst: Instance) -> list[tuple[float, ...] | None]:
    """ImageOrientationPatient of each frame of an enhanced instance (per frame, else shared)."""
    shared = inst.header.get("SharedFunctionalGroupsSequence") or []
    shared_plane = shared[0].get("PlaneOrientationSequence") if shared else None
    default = (
        tuple(float(v) for v in shared_plane[0].ImageOrientationPatient)
        if shared_plane and "ImageOrientationPatient" in shared_plane[0]
        else inst.image_orientation
    )
    per_frame = inst.header.get("PerFrameFunctionalGroupsSequence") or []
    out: list[tuple[float, ...] | None] = []
    for i in range(inst.number_of_frames):
        plane = per_frame[i].get("PlaneOrientationSequence") if i < len(per_frame) else None
        if plane and "ImageOrientationPatient" in plane[0]:
            out.append(tuple(float(v) for v in plane[0].ImageOrientationPatient))
        else:
            out.append(default)
    return out


def _gap_warnings(z: np.ndarray, name: str) -> list[str]:
    steps = np.diff(z)
    distinct = steps[steps > 1e-3]
    if len(distinct) < 2:
        return []
    median = float(np.median(distinct))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if not len(gaps):
        return []
    listed = ", ".join(
        f"{steps[i]:.2f} mm between z={z[i]:.2f} and z={z[i + 1]:.2f}" for i in gaps[:_MAX_LISTED]
    )
    more = f" and {len(gaps) - _MAX_LISTED} more" if len(gaps) > _MAX_LISTED else ""
    return [
        f"{name}: {len(gaps)} gap(s) larger than {GAP_FACTOR:g} x the median spacing "
        f"({median:.2f} mm): {listed}{more}"
    ]


def order_slices(instances: Sequence[Instance], name: str) -> tuple[list[SliceRef], str, list[str]]:
    """Order the slices of ``instances`` along the slice normal (feet to head for axial CT).

    Position is ImagePositionPatient projected on the normal of ImageOrientationPatient. Only when
    a position or the orientation is missing do we fall back to InstanceNumber, and say so. Gaps
    larger than :data:`GAP_FACTOR` times the median spacing are named with their positions.
    Returns the slices, the ordering used ("position" | "instance_number") and warnings.
    """
    warnings: list[str] = []
    if not instances:
        return [], "position", warnings
    orientation = instances[0].image_orientation
    candidates: list[tuple[Instance, int, tuple[float, float, float] | None]] = []
    for inst in instances:
        for i, pos in enumerate(frame_positions(inst)):
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
                warnings.append(f"{name}: {n_same} slice(s) share a position with another slice")
            warnings.extend(_gap_warnings(z, name))
        return refs, "position", warnings
    lacking = next((inst for inst, _, pos in candidates if pos is None), instances[0])
    what = (
        "ImageOrientationPatient (0020,0037)"
        if orientation is None
        else ("ImagePositionPatient (0020,0032)")
    )
    warnings.append(
        f"{name}: instance {lacking.sop_instance_uid} lacks {what}; "
        "slices ordered by InstanceNumber instead"
    )
    refs = [SliceRef(inst, i, None) for inst, i, _ in candidates]
    refs.sort(key=lambda r: (r.instance.instance_number or 0, r.frame_index))
    return refs, "instance_number", warnings


def _thickness_key(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _z_set(instances: Sequence[Instance], normal: np.ndarray) -> set[float]:
    return {
        round(float(np.dot(np.asarray(pos), normal)), 2)
        for inst in instances
        for pos in frame_positions(inst)
        if pos is not None
    }


def _split_acquisitions(group: list[Instance]) -> list[list[Instance]]:
    """Split by AcquisitionNumber only where acquisitions repeat positions (separate volumes)."""
    by_acq: dict[int | None, list[Instance]] = {}
    for inst in group:
        by_acq.setdefault(inst.acquisition_number, []).append(inst)
    orientation = group[0].image_orientation
    if len(by_acq) < 2 or orientation is None:
        return [group]
    normal = slice_normal(orientation)
    seen: set[float] = set()
    for members in by_acq.values():
        z = _z_set(members, normal)
        if z & seen:
            return list(by_acq.values())
        seen |= z
    return [group]


def split_stacks(instances: Sequence[Instance], config: IngestConfig) -> list[Stack]:
    """Group instances into stacks (see the module docstring); instances that declare more than
    they may (:func:`ctcovid.dicom.limits.bounds_reason`) are dropped for cause into their stack.
    """
    # (kind refusal, ImageType, ConvolutionKernel, SliceThickness, orientation cluster)
    groups: dict[tuple[str, tuple[str, ...], str, float | None, int], list[Instance]] = {}
    orientations: list[tuple[float, ...] | None] = []
    refused: dict[str, str] = {}
    for inst in instances:
        index = next(
            (k for k, o in enumerate(orientations) if same_orientation(o, inst.image_orientation)),
            None,
        )
        if index is None:
            orientations.append(inst.image_orientation)
            index = len(orientations) - 1
        key = (
            kind_reason(inst),
            inst.image_type,
            inst.convolution_kernel,
            _thickness_key(inst.slice_thickness),
            index,
        )
        groups.setdefault(key, []).append(inst)
        reason = bounds_reason(inst, config)
        if reason:
            refused[inst.sop_instance_uid] = reason
    stacks: list[Stack] = []
    for (kind, image_type, kernel, _, cluster), members in groups.items():
        kept = [i for i in members if i.sop_instance_uid not in refused]
        parts = _split_acquisitions(kept) if kept else [[]]
        for part in parts:
            acquisitions = {i.acquisition_number for i in part}
            # Dropped instances go with the acquisition they name (or the only part).
            dropped = [
                i
                for i in members
                if i.sop_instance_uid in refused
                and (len(parts) == 1 or i.acquisition_number in acquisitions)
            ]
            first = part[0] if part else members[0]
            stack = Stack(
                image_type=image_type,
                kernel=kernel,
                slice_thickness=first.slice_thickness,
                orientation=orientations[cluster],
                acquisition_number=first.acquisition_number if len(parts) > 1 else None,
                instances=part,
                reason=kind,
            )
            stack.dropped = [f"{i.path}: {refused[i.sop_instance_uid]}" for i in dropped]
            stack.n_slices_dropped = sum(
                i.number_of_frames if i.number_of_frames <= config.max_frames else 1
                for i in dropped
            )
            stacks.append(stack)
    return stacks


def _consistency_reason(instances: Sequence[Instance]) -> str:
    for attr, label in (("rows", "Rows"), ("columns", "Columns")):
        values = {getattr(inst, attr) for inst in instances}
        if len(values) > 1:
            return f"inconsistent {label} across instances: {sorted(map(str, values))[:4]}"
    spacings = [inst.pixel_spacing for inst in instances]
    if any(s is None for s in spacings):
        return "lacks PixelSpacing (0028,0030)"
    first = spacings[0]
    assert first is not None
    for s in spacings[1:]:
        assert s is not None
        if max(abs(a - b) for a, b in zip(s, first, strict=True)) > SPACING_TOLERANCE_MM:
            shown = sorted({str(v) for v in spacings})[:4]
            return f"inconsistent PixelSpacing across instances: {shown}"
    return ""


def _enhanced_orientation_reason(instances: Sequence[Instance]) -> str:
    for inst in instances:
        if not inst.is_enhanced and inst.number_of_frames <= 1:
            continue
        per_frame = frame_orientations(inst)
        first = per_frame[0] if per_frame else None
        for number, orientation in enumerate(per_frame, start=1):
            if not same_orientation(orientation, first):
                return (
                    f"instance {inst.sop_instance_uid}: frame {number} ImageOrientationPatient "
                    f"(0020,0037) {list(orientation or [])} differs from frame 1 "
                    f"{list(first or [])}"
                )
    return ""


def judge_stack(stack: Stack, name: str, config: IngestConfig) -> Stack:
    """Order the slices of ``stack`` and set its reason (``""`` when it can be classified)."""
    kept = stack.instances
    stack.slices, stack.ordering, stack.warnings = order_slices(kept, name)
    if stack.reason:  # not a CT slice in HU: the kind decides
        return stack
    if not kept:
        stack.reason = stack.dropped[0].split(": ", 1)[1] if stack.dropped else "no instances"
        return stack
    orientation = stack.orientation
    if orientation is None:
        stack.reason = "lacks ImageOrientationPatient (0020,0037)"
        return stack
    angle = axial_angle_deg(orientation)
    if angle > config.axial_tolerance_deg:
        stack.reason = (
            f"not axial: slice normal is {angle:.1f} degrees from the patient's z axis "
            f"(tolerance {config.axial_tolerance_deg:g})"
        )
        return stack
    stack.reason = _enhanced_orientation_reason(kept) or _consistency_reason(kept)
    if not stack.reason and stack.n_slices < config.min_slices:
        stack.reason = f"{TOO_FEW_SLICES}: {stack.n_slices} (at least {config.min_slices} needed)"
    return stack


def rule_key(stack: Stack, config: IngestConfig) -> tuple[object, ...]:
    """Sort key of ``config.stack_rule``: the smallest key is chosen.

    ``original``: ImageType ORIGINAL before DERIVED; ``thinnest`` / ``thickest``: stacks whose
    SliceThickness lies in [min_thickness_mm, max_thickness_mm] first, then the thinnest (or
    thickest); ``most``: most slices. Ties keep the order in which stacks were found.
    """
    parts: list[object] = []
    t = stack.slice_thickness
    in_range = t is not None and config.min_thickness_mm <= t <= config.max_thickness_mm
    for criterion in config.stack_criteria:
        if criterion == "original":
            parts.append(0 if stack.image_type[:1] == ("ORIGINAL",) else 1)
        elif criterion == "thinnest":
            parts.append((0 if in_range else 1, t if t is not None else math.inf))
        elif criterion == "thickest":
            parts.append((0 if in_range else 1, -t if t is not None else math.inf))
        elif criterion == "most":
            parts.append(-stack.n_slices)
    return tuple(parts)


def choose_stack(stacks: Sequence[Stack], config: IngestConfig) -> Stack | None:
    """The usable stack the rule prefers; else the convertible one (short of slices only)."""
    for accept in (
        lambda s: s.usable,
        lambda s: s.reason.startswith(TOO_FEW_SLICES),
    ):
        candidates = [s for s in stacks if accept(s)]
        if candidates:
            return min(candidates, key=lambda s: rule_key(s, config))
    return None
