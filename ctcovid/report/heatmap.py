"""Heatmaps for people: class-activation maps blended over slices, as PNG or Secondary Capture.

The maps themselves come from the model; this module only colours them, and wraps the result in
DICOM Secondary Capture images that file into the source study next to the SR.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from ctcovid import __version__
from ctcovid.dicom.types import Instance, Series
from ctcovid.errors import ReportError
from ctcovid.report.equipment import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    add_algorithm_equipment,
)
from ctcovid.report.header import (
    apply_character_set,
    apply_time_zone,
    copy_source_modules,
    heatmap_series_number,
    series_description,
    source_context,
)
from ctcovid.report.uids import heatmap_uids
from ctcovid.results import ScanResult

logger = logging.getLogger(__name__)

HEATMAP_SERIES_DESCRIPTION = "ctcovid COVID-19 heatmaps"
DEFAULT_ALPHA = 0.4


def jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to a jet-like RGB colour (blue, cyan, yellow, red) in [0, 1]."""
    x = np.clip(values, 0.0, 1.0)[..., np.newaxis]
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)


def resize_cam(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a class-activation map from the feature grid to (height, width), bilinearly."""
    if cam.ndim != 2:
        raise ValueError(f"cam must be a 2D array. Received: shape={cam.shape}.")
    cam_image = Image.fromarray(np.nan_to_num(cam.astype(np.float32)), mode="F")
    return np.asarray(cam_image.resize((width, height), Image.Resampling.BILINEAR))


def overlay_rgb(
    slice_uint8: np.ndarray, cam: np.ndarray, *, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """Blend a class-activation map over a grey slice.

    Parameters
    ----------
    slice_uint8
        (H, W) uint8 lung-windowed slice.
    cam
        (h, w) map with values in [0, 1]; it is resized bilinearly to (H, W).
    alpha
        Weight of the colour map in the blend, in [0, 1].

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8 RGB image.
    """
    if slice_uint8.ndim != 2 or slice_uint8.dtype != np.uint8:
        raise ValueError(
            f"slice_uint8 must be a 2D uint8 array. Received: shape={slice_uint8.shape}, "
            f"dtype={slice_uint8.dtype}."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]. Received: alpha={alpha}.")
    cam_resized = resize_cam(cam, *slice_uint8.shape)
    grey = (slice_uint8.astype(np.float32) / 255.0)[..., np.newaxis]
    blended = (1.0 - alpha) * grey + alpha * jet(cam_resized)
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image encoded as PNG: pixels only, no text chunks."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            f"rgb must be an (H, W, 3) uint8 array. Received: shape={rgb.shape}, dtype={rgb.dtype}."
        )
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 image as PNG and return the path."""
    data = png_bytes(rgb)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _axis_letter(direction: Sequence[float]) -> str:
    """The patient direction (PS3.3 C.7.6.1.1.1) that a direction cosine points to most."""
    axis = int(np.argmax(np.abs(direction)))
    positive, negative = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return positive if direction[axis] > 0 else negative


def patient_orientation_of(instance: Instance) -> tuple[str, str]:
    """PatientOrientation (row, column) of an image drawn in the plane of ``instance``."""
    if instance.image_orientation is None:
        # The series reached the classifier as axial CT; say so rather than guess silently.
        logger.warning(
            "Instance %s has no ImageOrientationPatient; heatmap assumes axial (L, P).",
            instance.sop_instance_uid,
        )
        return "L", "P"
    row, column = instance.image_orientation[:3], instance.image_orientation[3:]
    return _axis_letter(row), _axis_letter(column)


def source_image_item(instance: Instance, frame_number: int) -> Dataset:
    """A SourceImageSequence item naming ``instance`` (and its frame, when multi-frame)."""
    item = Dataset()
    item.ReferencedSOPClassUID = instance.sop_class_uid
    item.ReferencedSOPInstanceUID = instance.sop_instance_uid
    if instance.number_of_frames > 1:
        item.ReferencedFrameNumber = frame_number
    return item


def build_heatmap_secondary_captures(
    overlays: Sequence[np.ndarray],
    series: Series,
    result: ScanResult,
    *,
    revision: int = 1,
    slice_indices: Sequence[int] | None = None,
) -> list[hd.sc.SCImage]:
    """Wrap heatmap overlays as Secondary Capture images in the source study.

    Parameters
    ----------
    overlays
        (H, W, 3) uint8 RGB images, as ``overlay_rgb`` makes them.
    series
        The source series (patient and study modules, referenced instances).
    result
        The result the heatmaps explain.
    revision
        As for ``build_sr``. Each image's SOP Instance UID derives from what the result states,
        the revision, its slice, its pixels and the source header.
    slice_indices
        For each overlay, its index into the result's per-slice lists; by default
        ``result.key_slice_indices`` in their order.

    Returns
    -------
    list[highdicom.sc.SCImage]
        One image per overlay, each referencing its source slice in SourceImageSequence.

    Raises
    ------
    ValueError
        If overlays and slice indices disagree in number, or an overlay is not RGB uint8.
    ReportError
        If a slice's instance is not in ``series``.
    """
    indices = list(result.key_slice_indices if slice_indices is None else slice_indices)
    if len(indices) != len(overlays):
        raise ValueError(
            f"Got {len(overlays)} overlays for {len(indices)} slice indices; they must pair up."
        )
    by_uid = {instance.sop_instance_uid: instance for instance in series.instances}
    source = series.header
    digests = [
        hashlib.sha256(np.ascontiguousarray(o).tobytes() + str(o.shape).encode()).hexdigest()
        for o in overlays
    ]
    series_uid, sop_uids = heatmap_uids(
        result, revision, indices, digests, context=(source_context(source),)
    )
    number_of_series = heatmap_series_number(source)
    description = series_description(HEATMAP_SERIES_DESCRIPTION, source, result)
    images = []
    for number, (overlay, index, sop_uid) in enumerate(
        zip(overlays, indices, sop_uids, strict=True), start=1
    ):
        if not 0 <= index < len(result.sop_instance_uids):
            raise ValueError(
                f"Slice index {index} is outside the {len(result.sop_instance_uids)} analysed "
                "slices."
            )
        if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
            raise ValueError(
                f"Overlay {number} must be an (H, W, 3) uint8 array. Received: "
                f"shape={overlay.shape}, dtype={overlay.dtype}."
            )
        instance = by_uid.get(result.sop_instance_uids[index])
        if instance is None:
            raise ReportError(
                f"Series {series.series_instance_uid}: instance {result.sop_instance_uids[index]} "
                "of a heatmap slice is not in the series."
            )
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=instance.header,
            pixel_array=overlay,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=number_of_series,
            sop_instance_uid=sop_uid,
            instance_number=number,
            manufacturer=MANUFACTURER,
            patient_orientation=patient_orientation_of(instance),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=description,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=f"ctcovid {__version__}",
            # As for the SR: the source's own SpecificCharacterSet is set below.
            specific_character_set=None,
        )
        apply_character_set(image, source)
        # The series' representative header, as for the SR, so both file alike.
        copy_source_modules(image, source)
        apply_time_zone(image, source)
        add_algorithm_equipment(image, result.model)
        image.SourceImageSequence = [source_image_item(instance, result.frame_numbers[index])]
        image.DerivationDescription = (
            f"Class activation map of {result.model.name} {result.model.version} over the "
            f"lung-windowed slice; slice probability {result.slice_probabilities[index]:.3f}"
        )
        image.BurnedInAnnotation = "NO"
        # An axial slice shows the whole chest, an unpaired body part, so Laterality (Type 2C,
        # required for paired parts) is rightly absent.
        image.BodyPartExamined = "CHEST"
        images.append(image)
    return images
