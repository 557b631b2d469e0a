"""Decode pixel data to Hounsfield units, frame by frame for enhanced multi-frame CT.

Compressed transfer syntaxes (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) decode through pydicom's
pixel backends with the pylibjpeg plugins installed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless, RLELossless

from ctcovid.dicom.types import Instance, SliceRef
from ctcovid.errors import InvalidInputError

# Decoders measured fastest here for these syntaxes (CharLS about 2x libjpeg for JPEG-LS; the
# compiled RLE decoder several times pydicom's numpy one). pydicom's own choice is the fallback.
PREFERRED_PLUGINS = {
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    RLELossless: "pylibjpeg",
}


def _rescale_item(inst: Instance, frame_index: int) -> Dataset:
    """The dataset holding the Modality LUT / rescale that applies to one frame.

    Single-frame CT carries RescaleSlope/Intercept at the top level; enhanced CT carries them in
    PixelValueTransformationSequence, per frame or shared (PS3.3 C.7.6.16.2.9).
    """
    header = inst.header
    if "RescaleSlope" in header or "ModalityLUTSequence" in header:
        return header
    for groups_kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = header.get(groups_kw)
        if not groups:
            continue
        group = groups[frame_index] if groups_kw.startswith("PerFrame") else groups[0]
        if groups_kw.startswith("PerFrame") and frame_index >= len(groups):
            continue
        transform = group.get("PixelValueTransformationSequence")
        if transform and "RescaleSlope" in transform[0]:
            return transform[0]
    return header


def to_hu(stored: np.ndarray, inst: Instance, frame_index: int = 0) -> np.ndarray:
    """Stored values of one frame -> Hounsfield units (float32) through the modality LUT.

    The usual linear rescale is applied in float32 (exact for 16-bit stored values with integer
    slope and intercept, and half the memory traffic of pydicom's float64); a Modality LUT
    Sequence goes through :func:`pydicom.pixels.apply_modality_lut`.
    """
    item = _rescale_item(inst, frame_index)
    if "ModalityLUTSequence" in item:
        return np.asarray(apply_modality_lut(stored, item), np.float32)
    slope = float(item.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    hu = stored.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


def _pixel_array(ds: Dataset) -> np.ndarray:
    """Decode with the preferred plugin for the syntax, else with pydicom's default choice."""
    plugin = PREFERRED_PLUGINS.get(ds.file_meta.get("TransferSyntaxUID", ""))
    if plugin:
        try:
            return pixel_array(ds, decoding_plugin=plugin)
        except Exception:  # plugin missing or unable: pydicom's default choice decides
            pass
    return pixel_array(ds)


def _decode(inst: Instance) -> np.ndarray:
    """All frames of an instance as stored values, shape (frames, rows, cols)."""
    try:
        ds = pydicom.dcmread(inst.path)
    except Exception as exc:
        raise InvalidInputError(f"{inst.path}: unreadable: {type(exc).__name__}: {exc}") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InvalidInputError(
            f"{inst.path}: instance {inst.sop_instance_uid} lacks PixelData (7FE0,0010)"
        )
    try:
        arr = _pixel_array(ds)
    except Exception as exc:
        raise InvalidInputError(
            f"{inst.path}: instance {inst.sop_instance_uid}: cannot decode pixel data "
            f"(transfer syntax {inst.transfer_syntax_uid}): {type(exc).__name__}: {exc}"
        ) from exc
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise InvalidInputError(
            f"{inst.path}: instance {inst.sop_instance_uid}: expected grayscale pixel data, "
            f"got array shape {arr.shape}"
        )
    return arr


def iter_hu(
    slices: Sequence[SliceRef], errors: list[str] | None = None
) -> Iterator[tuple[SliceRef, np.ndarray]]:
    """Decode ``slices`` in order, yielding each with its HU image (float32, rows x cols).

    Each instance is decoded once even when several frames come from it. A slice whose file cannot
    be decoded is skipped and its reason appended to ``errors`` (raised when ``errors`` is None).
    """
    cache_uid: str | None = None
    cache: np.ndarray | None = None
    failed: set[str] = set()
    for ref in slices:
        inst = ref.instance
        if inst.sop_instance_uid in failed:
            continue
        if inst.sop_instance_uid != cache_uid:
            try:
                cache = _decode(inst)
            except InvalidInputError as exc:
                if errors is None:
                    raise
                errors.append(str(exc))
                failed.add(inst.sop_instance_uid)
                continue
            cache_uid = inst.sop_instance_uid
        assert cache is not None
        if ref.frame_index >= cache.shape[0]:
            msg = (
                f"{inst.path}: instance {inst.sop_instance_uid} has {cache.shape[0]} frame(s), "
                f"frame {ref.frame_number} missing"
            )
            if errors is None:
                raise InvalidInputError(msg)
            errors.append(msg)
            continue
        yield ref, to_hu(cache[ref.frame_index], inst, ref.frame_index)


def decode_instance_hu(inst: Instance) -> np.ndarray:
    """All frames of one instance in HU, shape (frames, rows, cols)."""
    stored = _decode(inst)
    return np.stack([to_hu(stored[i], inst, i) for i in range(stored.shape[0])])
