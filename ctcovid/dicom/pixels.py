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

import os
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, JPEGLSLossless, JPEGLSNearLossless, RLELossless

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

    Raises
    ------
    InvalidInputError
        The per-frame functional groups have no item for this frame. PS3.3 C.7.6.16 requires
        one per frame; falling back to the shared groups would apply a rescale that may not be
        this frame's, so the instance is refused instead.
    """
    header = inst.header
    if "RescaleSlope" in header or "ModalityLUTSequence" in header:
        return header
    for groups_kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = header.get(groups_kw)
        if not groups:
            continue
        if groups_kw.startswith("PerFrame"):
            if frame_index >= len(groups):
                raise InvalidInputError(
                    f"{inst.path}: instance {inst.sop_instance_uid}: "
                    f"PerFrameFunctionalGroupsSequence (5200,9230) has {len(groups)} item(s), "
                    f"none for frame {frame_index + 1} of {inst.number_of_frames}; "
                    "cannot find the frame's rescale"
                )
            group = groups[frame_index]
        else:
            group = groups[0]
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


_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def _native_layout(inst: Instance) -> tuple[np.dtype, tuple[int, int, int], int] | None:
    """Dtype (in the file's byte order), shape and byte count of an instance's native pixel data,
    when its header alone says how to read it; ``None`` when pydicom's decoder must decide."""
    header = inst.header
    if (
        inst.transfer_syntax_uid not in NATIVE_TRANSFER_SYNTAXES
        or inst.pixel_data_offset is None
        or inst.pixel_data_length is None
        or inst.file_size is None
        or inst.file_mtime_ns is None
        or not inst.rows
        or not inst.columns
        or header.get("PhotometricInterpretation") not in _MONOCHROME
        or header.get("SamplesPerPixel") != 1
        or header.get("PixelRepresentation") not in (0, 1)
    ):
        return None
    bits_allocated = header.get("BitsAllocated")
    bits_stored = header.get("BitsStored")
    if bits_allocated not in (8, 16, 32) or not isinstance(bits_stored, int):
        return None
    if not 1 <= bits_stored <= bits_allocated:
        return None
    little = inst.transfer_syntax_uid != ExplicitVRBigEndian
    if not little and bits_allocated == 8:  # 8-bit big endian may be swapped OW: pydicom's job
        return None
    kind = "i" if header.PixelRepresentation == 1 else "u"
    dtype = np.dtype(f"{'<' if little else '>'}{kind}{bits_allocated // 8}")
    shape = (inst.number_of_frames, inst.rows, inst.columns)
    return dtype, shape, int(np.prod(shape)) * dtype.itemsize


def read_native(inst: Instance) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Native pixel data read at the offset the header scan recorded, without parsing the file a
    second time: stored values (frames, rows, cols) and the padding mask, as :func:`_decode`.

    Gives exactly what pydicom's native decoder gives (values in native byte order, unused high
    bits cleared or sign-extended when BitsStored < BitsAllocated). Returns ``None`` whenever
    anything differs from what the scan saw (the file changed, the element is not where it was,
    fewer bytes than declared): the full read then decides, with its own errors.
    """
    layout = _native_layout(inst)
    if layout is None:
        return None
    dtype, shape, n_bytes = layout
    assert inst.pixel_data_offset is not None and inst.pixel_data_length is not None
    if inst.pixel_data_length < n_bytes:
        return None
    implicit, little = inst.header.original_encoding
    if implicit is None or little is None:
        return None
    order: Literal["little", "big"] = "little" if little else "big"
    try:
        with open(inst.path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            if (stat.st_size, stat.st_mtime_ns) != (inst.file_size, inst.file_mtime_ns):
                return None
            fh.seek(inst.pixel_data_offset)
            head = fh.read(12)
            if len(head) < 8 or int.from_bytes(head[0:2], order) != 0x7FE0:
                return None
            if int.from_bytes(head[2:4], order) != 0x0010:
                return None
            if implicit:
                length, value_offset = int.from_bytes(head[4:8], order), 8
            elif head[4:6] in (b"OB", b"OW") and len(head) == 12:
                length, value_offset = int.from_bytes(head[8:12], order), 12
            else:
                return None
            if length != inst.pixel_data_length:
                return None
            fh.seek(inst.pixel_data_offset + value_offset)
            data = bytearray(n_bytes)
            if fh.readinto(data) != n_bytes:
                return None
    except OSError:
        return None
    raw = np.frombuffer(data, dtype).reshape(shape)
    stored = raw.astype(dtype.newbyteorder("="))
    bits_allocated, bits_stored = dtype.itemsize * 8, int(inst.header.BitsStored)
    if bits_stored < bits_allocated:  # as pydicom: the unused high bits mean nothing
        shift = bits_allocated - bits_stored
        np.left_shift(stored, shift, out=stored)
        np.right_shift(stored, shift, out=stored)
    # The undecoded words, unsigned, for padding written in the high bits (as _raw_words).
    words = raw.view(f"{dtype.str[0]}u{dtype.itemsize}") if dtype.itemsize <= 2 else None
    return stored, padding_mask(stored, inst.header, words)


def _decode(inst: Instance) -> tuple[np.ndarray, np.ndarray | None]:
    """All frames of an instance as stored values, shape (frames, rows, cols), and the padding
    mask (same shape, ``None`` when no pixel is padding).

    Native pixel data is read straight from where the header scan found it (one parse per
    file); anything else goes through pydicom.
    """
    native = read_native(inst)
    if native is not None:
        return native
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


def frame_hu(
    stored: np.ndarray, mask: np.ndarray | None, inst: Instance, frame_index: int
) -> np.ndarray:
    """One frame of decoded stored values (from :func:`read_native`) in HU, padding as air."""
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
        yield ref, frame_hu(cache, mask, inst, ref.frame_index)


def decode_instance_hu(inst: Instance) -> np.ndarray:
    """All frames of one instance in HU, shape (frames, rows, cols), padding as air."""
    stored, mask = _decode(inst)
    return np.stack([frame_hu(stored, mask, inst, i) for i in range(stored.shape[0])])
