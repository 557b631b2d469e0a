"""Deterministic UIDs for everything the report module produces.

A result sent twice must land as the same SOP instance, so that PACS stores it once: every UID is
derived from the source series, the model's device UID and the revision, never drawn at random.
"""

from __future__ import annotations

import hashlib

# The UUID-derived root of PS3.5 B.2: "2.25." followed by a 128-bit integer in decimal.
_ROOT = "2.25."
_SEPARATOR = "\x1f"  # cannot occur in a UID or a version string, so parts never run together


def derive_uid(*parts: str) -> str:
    """Return a valid DICOM UID that depends only on ``parts``.

    The first 128 bits of the SHA-256 of the parts become the integer after ``2.25.``, as
    PS3.5 B.2 allows for UUID-derived UIDs; the result has at most 44 characters.

    Raises
    ------
    ValueError
        If no part is given.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part.")
    digest = hashlib.sha256(_SEPARATOR.join(parts).encode("utf-8")).digest()
    return f"{_ROOT}{int.from_bytes(digest[:16], 'big')}"


def _check_revision(revision: int) -> None:
    if not isinstance(revision, int) or revision < 1:
        raise ValueError(f"revision must be an integer >= 1. Received: revision={revision!r}.")


def sr_uids(series_instance_uid: str, device_uid: str, revision: int) -> tuple[str, str]:
    """Return ``(series_instance_uid, sop_instance_uid)`` of the SR for one source series.

    The SR series depends on the source series and the model only, so that every revision of
    one result sits in one series; the SOP instance also depends on the revision.
    """
    _check_revision(revision)
    series_uid = derive_uid("ctcovid-sr-series", series_instance_uid, device_uid)
    sop_uid = derive_uid("ctcovid-sr", series_instance_uid, device_uid, str(revision))
    return series_uid, sop_uid


def tracking_uid(series_instance_uid: str, device_uid: str) -> str:
    """Tracking Unique Identifier of the COVID-19 finding: the same across revisions."""
    return derive_uid("ctcovid-tracking", series_instance_uid, device_uid)


def heatmap_uids(
    series_instance_uid: str, device_uid: str, revision: int, slice_indices: list[int]
) -> tuple[str, list[str]]:
    """Return the Secondary Capture series UID and one SOP instance UID per slice index."""
    _check_revision(revision)
    series_uid = derive_uid("ctcovid-heatmap-series", series_instance_uid, device_uid)
    sop_uids = [
        derive_uid("ctcovid-heatmap", series_instance_uid, device_uid, str(revision), str(i))
        for i in slice_indices
    ]
    return series_uid, sop_uids
