"""The DICOM services this node speaks: SOP classes, transfer syntaxes in our order of
preference, and the status codes it answers with (PS3.4 B.2.3, PS3.7 C).

One table for the listener, the SR sender, the PACS client and the conformance statement.
"""

from __future__ import annotations

from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from ctcovid.dicom import DECODABLE_TRANSFER_SYNTAXES
from ctcovid.dicom.syntaxes import LOSSY_TRANSFER_SYNTAXES

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC211
STATUS_PROCESSING_FAILURE = 0x0110

#: What the listener answers a C-STORE with, and why (the conformance statement's table; the
#: handlers in ``ctcovid.node.scp`` return exactly these codes).
STORE_STATUSES: dict[int, tuple[str, str]] = {
    STATUS_SUCCESS: (
        "Success",
        "stored: the file fsynced and renamed into the store, recorded in the job database",
    ),
    STATUS_OUT_OF_RESOURCES: (
        "Refused: Out of Resources",
        "below the free-space floor (min_free_mb), a disk or database error, or a data set "
        "larger than max_instance_mb (received to disk up to that size, the rest dropped)",
    ),
    STATUS_DATASET_MISMATCH: (
        "Error: Data Set does not match SOP Class",
        "no pixel data, a SOP Instance, Study or Series Instance UID missing, or SOP Class/"
        "Instance UID differing from the request's Affected SOP Class/Instance UID",
    ),
    STATUS_CANNOT_UNDERSTAND: (
        "Error: Cannot understand",
        "the data set could not be parsed, or holds more elements than the parser may read",
    ),
    STATUS_INVALID_UID: (
        "Error: Cannot understand (invalid UID)",
        "a UID of the request or the data set is not a valid UID; nothing is written",
    ),
    STATUS_PROCESSING_FAILURE: (
        "Failure: Processing failure",
        "anything unexpected in the handler (logged with its traceback)",
    ),
}

STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
VERIFICATION = "1.2.840.10008.1.1"
MIB = 1024 * 1024
# The node accepts exactly the transfer syntaxes the ingest decodes
# (ctcovid.dicom.DECODABLE_TRANSFER_SYNTAXES: a decoder installed and verified on a real file), so
# a sender falls back to one that decodes; Deflated syntaxes are not among them (a few hundred KiB
# of deflate inflate without bound). pynetdicom accepts, from one proposed context, the first
# syntax in *our* order: Explicit VR first keeps the VRs of private elements, which Implicit VR
# (the library's first) would lose.
_PREFERRED_ORDER = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
DEFLATED_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
TRANSFER_SYNTAXES = [
    *(uid for uid in _PREFERRED_ORDER if uid in DECODABLE_TRANSFER_SYNTAXES),
    *sorted(set(DECODABLE_TRANSFER_SYNTAXES) - set(_PREFERRED_ORDER)),
]
LOSSLESS_TRANSFER_SYNTAXES = [
    uid for uid in TRANSFER_SYNTAXES if uid not in LOSSY_TRANSFER_SYNTAXES
]
LOSSY_DECODABLE_SYNTAXES = [uid for uid in TRANSFER_SYNTAXES if uid in LOSSY_TRANSFER_SYNTAXES]
