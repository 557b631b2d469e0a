"""Decompression bombs for the tests: small files that declare images too large to decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, generate_uid

BOMB_SIZE = 30000  # 30000 x 30000 x 16 bit: 1.7 GiB per frame, from a codestream of ~50 bytes


def jpeg_ls_bomb(size: int = BOMB_SIZE) -> bytes:
    """A valid JPEG-LS codestream of a 16 x 16 image whose frame header claims size x size."""
    import jpeg_ls

    code = bytearray(jpeg_ls.encode(np.zeros((16, 16), np.uint16)))
    sof = code.find(b"\xff\xf7")  # SOF55: marker, length (2), precision (1), Y (2), X (2)
    code[sof + 5 : sof + 7] = size.to_bytes(2, "big")
    code[sof + 7 : sof + 9] = size.to_bytes(2, "big")
    return bytes(code)


def write_bomb_series(sources: list[Path], out: Path, size: int = BOMB_SIZE) -> str:
    """Copies of ``sources`` as a new series whose every frame is a JPEG-LS bomb; its UID.

    The headers agree with the codestream (Rows = Columns = ``size``), so nothing but the
    decoder's allocation stops it.
    """
    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    code = jpeg_ls_bomb(size)
    for i, src in enumerate(sources):
        ds = pydicom.dcmread(src)
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = encapsulate([code])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"bomb_{i:03d}.dcm", enforce_file_format=True)
    return series_uid
