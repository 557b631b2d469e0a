"""Decode pixel data to Hounsfield units, frame by frame for enhanced multi-frame CT.

Compressed transfer syntaxes (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) decode through pydicom's
pixel backends with the pylibjpeg plugins installed, after each frame's codestream dimensions
are checked against Rows and Columns (:func:`ctcovid.dicom.limits.check_codestreams`).

Pixel padding (PS3.3 C.7.5.1.1.2) becomes air: pixels whose *stored* value equals
PixelPaddingValue, or lies between it and PixelPaddingRangeLimit, are set to -1000 HU after the
modality LUT, per frame. Left as they are, they become a fake structure (-3024 HU discs, or a
bright ring when the padding sits in bits above BitsStored).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless, RLELossless

from ctcovid.dicom.limits import check_codestreams
from ctcovid.dicom.syntaxes import NATIVE_TRANSFER_SYNTAXES
from ctcovid.dicom.types import Instance, SliceRef
from ctcovid.errors import InvalidInputError

PADDING_HU = -1000.0  # air: what a scanner's padding stands for

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


def _normalised(value: int, bits_allocated: int, signed: bool) -> int:
    """A padding value as the ``bits_allocated``-bit integer it stands for (read as US or SS)."""
    full = 1 << bits_allocated
    value %= full
    return value - full if signed and value >= full // 2 else value


def _sign_extended(value: int, bits_stored: int, signed: bool) -> int:
    """The value pydicom's decoders give for a word whose low ``bits_stored`` bits are ``value``."""
    value &= (1 << bits_stored) - 1
    if signed and value >= 1 << (bits_stored - 1):
        value -= 1 << bits_stored
    return value


def padding_mask(
    stored: np.ndarray, header: Dataset, raw: np.ndarray | None = None
) -> np.ndarray | None:
    """Pixels that are padding (PS3.3 C.7.5.1.1.2), compared on stored values; ``None`` if none.

    Parameters
    ----------
    stored
        Decoded stored values (pydicom masks them to BitsStored and sign-extends signed data).
    header
        The dataset holding PixelPaddingValue, PixelPaddingRangeLimit, BitsAllocated, BitsStored
        and PixelRepresentation.
    raw
        The undecoded words of native pixel data, same shape as ``stored``: when the padding value
        lies outside the BitsStored range (padding written in the high bits), it is compared with
        the whole word, so that a body pixel sharing its low bits is not taken for padding.
    """
    if header.get("PixelPaddingValue") is None:
        return None
    signed = int(header.get("PixelRepresentation") or 0) == 1
    bits_allocated = int(header.get("BitsAllocated") or 16)
    bits_stored = int(header.get("BitsStored") or bits_allocated)
    values = [_normalised(int(header.PixelPaddingValue), bits_allocated, signed)]
    if header.get("PixelPaddingRangeLimit") is not None:
        values.append(_normalised(int(header.PixelPaddingRangeLimit), bits_allocated, signed))
    low_stored = -(1 << (bits_stored - 1)) if signed else 0
    high_stored = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
    in_range = all(low_stored <= v <= high_stored for v in values)
    if not in_range and raw is not None:
        lo, hi = min(values), max(values)
        words = raw.astype(np.int64)
        if signed:
            words = np.where(
                words >= 1 << (bits_allocated - 1), words - (1 << bits_allocated), words
            )
        mask = (words >= lo) & (words <= hi)
    else:  # compressed data keeps only the stored bits: compare those
        ext = [_sign_extended(v, bits_stored, signed) for v in values] if not in_range else values
        lo, hi = min(ext), max(ext)
        mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def _raw_words(ds: Dataset, shape: tuple[int, ...]) -> np.ndarray | None:
    """The undecoded words of native 8/16-bit pixel data, or ``None``."""
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    bits = int(ds.get("BitsAllocated") or 16)
    if syntax not in NATIVE_TRANSFER_SYNTAXES or bits not in (8, 16) or "PixelData" not in ds:
        return None
    dtype = np.dtype("u1") if bits == 8 else np.dtype(">u2" if syntax.endswith(".2.2") else "<u2")
    count = int(np.prod(shape))
    data = ds.PixelData
    if len(data) < count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype, count).reshape(shape)


def _pixel_array(ds: Dataset) -> np.ndarray:
    """Decode with the preferred plugin for the syntax, else with pydicom's default choice."""
    plugin = PREFERRED_PLUGINS.get(ds.file_meta.get("TransferSyntaxUID", ""))
    if plugin:
        try:
            return pixel_array(ds, decoding_plugin=plugin)
        except Exception:  # plugin missing or unable: pydicom's default choice decides
            pass
    return pixel_array(ds)


def _decode(inst: Instance) -> tuple[np.ndarray, np.ndarray | None]:
    """All frames of an instance as stored values, shape (frames, rows, cols), and the padding
    mask (same shape, ``None`` when no pixel is padding)."""
    try:
        ds = pydicom.dcmread(inst.path)
    except Exception as exc:
        raise InvalidInputError(f"{inst.path}: unreadable: {type(exc).__name__}: {exc}") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InvalidInputError(
            f"{inst.path}: instance {inst.sop_instance_uid} lacks PixelData (7FE0,0010)"
        )
    check_codestreams(ds, inst)
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
    return arr, padding_mask(arr, ds, _raw_words(ds, arr.shape))


def _frame_hu(
    stored: np.ndarray, mask: np.ndarray | None, inst: Instance, frame_index: int
) -> np.ndarray:
    hu = to_hu(stored[frame_index], inst, frame_index)
    if mask is not None:
        hu[mask[frame_index]] = PADDING_HU
    return hu


def iter_hu(
    slices: Sequence[SliceRef], errors: list[str] | None = None
) -> Iterator[tuple[SliceRef, np.ndarray]]:
    """Decode ``slices`` in order, yielding each with its HU image (float32, rows x cols).

    Each instance is decoded once even when several frames come from it. A slice whose file cannot
    be decoded is skipped and its reason appended to ``errors`` (raised when ``errors`` is None).
    """
    cache_uid: str | None = None
    cache: np.ndarray | None = None
    mask: np.ndarray | None = None
    failed: set[str] = set()
    for ref in slices:
        inst = ref.instance
        if inst.sop_instance_uid in failed:
            continue
        if inst.sop_instance_uid != cache_uid:
            try:
                cache, mask = _decode(inst)
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
        yield ref, _frame_hu(cache, mask, inst, ref.frame_index)


def decode_instance_hu(inst: Instance) -> np.ndarray:
    """All frames of one instance in HU, shape (frames, rows, cols), padding as air."""
    stored, mask = _decode(inst)
    return np.stack([_frame_hu(stored, mask, inst, i) for i in range(stored.shape[0])])
