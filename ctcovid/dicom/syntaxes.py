"""The transfer syntaxes whose pixel data the ingest decodes here.

A syntax is listed when pydicom has a decoder for it with a plugin installed *and* this project
has verified it on a real file (``tests/test_dicom.py``). Deflated syntaxes are left out: inflating
a stream is unbounded work before any check can run. HTJ2K is left out until a fixture proves it.
The DICOM node accepts exactly this set, so a sender falls back to a syntax that decodes.
"""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

NATIVE_TRANSFER_SYNTAXES = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
)
VERIFIED_TRANSFER_SYNTAXES = NATIVE_TRANSFER_SYNTAXES | {
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
}


# Syntaxes whose pixel data may have lost information (PS3.5 8.2; JPEG 2000 "Lossy or
# Lossless" is counted as lossy: nothing in the syntax says which it was).
LOSSY_TRANSFER_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}
)


def _decodable() -> frozenset[UID]:
    out = set()
    for uid in VERIFIED_TRANSFER_SYNTAXES:
        try:
            if get_decoder(uid).is_available:
                out.add(uid)
        except (NotImplementedError, ValueError):
            continue
    return frozenset(out)


DECODABLE_TRANSFER_SYNTAXES: frozenset[UID] = _decodable()
