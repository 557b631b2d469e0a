"""STOW-RS (PS3.18 10.5): store DICOM files in a DICOMweb service; batch and the node use it.

The client comes from :func:`ctcovid.net.dicomweb.make_client` (verified TLS, credentials from
the environment or a file). A refusal that sending again cannot change raises
:class:`StowRefused`: an HTTP 4xx answer other than 408 and 429 (409 Conflict is how a service
says it refused the instance), or a FailedSOPSequence whose reason is not "out of resources" or
"processing failure". A 409 is first checked against the archive: a resend of an instance that
an earlier, abandoned request did store is answered 409, and when a QIDO-RS search finds the
instance (same SOP Instance UID, in its study) it counts as delivered. Anything else (5xx, 408,
429, a refused or lost connection, a timeout, TLS) raises a plain
:class:`~ctcovid.errors.PacsError`, worth retrying. Messages carry the HTTP status and reason and
the DICOM failure reason, never the response body (which may echo patient data).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom

from ctcovid.dicom.uids import check_uid
from ctcovid.errors import PacsError

logger = logging.getLogger(__name__)

# Statuses that may pass: request timeout, too early, too many requests (PS3.18 8.2 and RFC 9110).
RETRYABLE_HTTP = frozenset({408, 425, 429})
# FailureReason values that may pass: processing failure (0x0110), out of resources (0xA7xx).
PROCESSING_FAILURE = 0x0110
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
REFERENCED_SOP_INSTANCE_UID = "00081155"


class StowRefused(PacsError):
    """The service refused the instance for a reason that sending it again will not change."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


def _transient_failure(reason: int | None) -> bool:
    return reason is None or reason == PROCESSING_FAILURE or 0xA700 <= reason <= 0xA7FF


def _failures_in_json(content: bytes) -> list[tuple[str, int | None]]:
    """``(SOP Instance UID, FailureReason)`` of each FailedSOPSequence item of a DICOM JSON body."""
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return []
    if isinstance(body, list):
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return []
    items = (body.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        uid = ((item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or ["?"])[0]
        reason = ((item.get(FAILURE_REASON) or {}).get("Value") or [None])[0]
        out.append((str(uid), int(reason) if isinstance(reason, int) else None))
    return out


def _describe_failure(uid: str, reason: int | None) -> str:
    shown = f"0x{reason:04X}" if reason is not None else "not given"
    return f"SOP instance {uid} refused, failure reason {shown}"


def stow_error(url: str, what: str, exc: Exception) -> PacsError:
    """The error for a failed STOW-RS request: :class:`StowRefused` when it is final."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if not status:
        return PacsError(f"{url}: {what} failed ({type(exc).__name__}: {exc})")
    phrase = str(getattr(response, "reason", "") or "").strip()
    detail = f"HTTP {status}" + (f" {phrase}" if phrase else "")
    failures = _failures_in_json(getattr(response, "content", b"") or b"")
    if failures:
        detail += "; " + _describe_failure(*failures[0])
    message = f"{url}: {what} failed ({detail})"
    if 400 <= int(status) < 500 and int(status) not in RETRYABLE_HTTP:
        return StowRefused(message, http_status=int(status))
    return PacsError(message)


def stow(client: Any, url: str, paths: Sequence[Path]) -> None:
    """STOW-RS the DICOM files at ``paths`` through ``client`` (a ``DICOMwebClient``).

    Raises
    ------
    StowRefused
        When the service refused an instance for good (see the module docstring).
    PacsError
        When the request failed in a way that may pass, or an instance was refused for want
        of resources.
    """
    datasets = [pydicom.dcmread(p) for p in paths]
    what = f"STOW-RS of {len(datasets)} instance(s)"
    try:
        response = client.store_instances(datasets)
    except Exception as exc:
        error = stow_error(url, what, exc)
        if getattr(error, "http_status", None) == 409 and all(
            already_stored(client, url, ds) for ds in datasets
        ):
            logger.info("event=stow_already_stored url=%s instances=%d", url, len(datasets))
            return
        raise error from exc
    failed = list(getattr(response, "FailedSOPSequence", []) or [])
    if failed:
        item = failed[0]
        reason = item.get("FailureReason")
        reason = int(reason) if reason is not None else None
        message = f"{url}: STOW-RS " + _describe_failure(
            str(item.get("ReferencedSOPInstanceUID", "?")), reason
        )
        if _transient_failure(reason):
            raise PacsError(message)
        raise StowRefused(message)


def already_stored(client: Any, url: str, ds: pydicom.Dataset) -> bool:
    """Whether the service holds ``ds``'s SOP instance in ``ds``'s study (a QIDO-RS search).

    The answer is checked, not trusted: a service that ignores the filter and lists other
    instances does not make this one delivered. Any failure of the search is a "no".
    """
    from ctcovid.net.query import returned_values

    try:
        study = check_uid(str(ds.StudyInstanceUID), "StudyInstanceUID")
        sop = check_uid(str(ds.SOPInstanceUID), "SOPInstanceUID")
        found = client.search_for_instances(
            study_instance_uid=study,
            fields=["SOPInstanceUID"],
            search_filters={"SOPInstanceUID": sop},
        )
    except Exception as exc:  # an invalid UID, or the search failed: not known to be stored
        logger.warning("%s: cannot check whether SOP instance is stored (%s)", url, exc)
        return False
    for item in found or []:
        if sop in returned_values(item, "SOPInstanceUID"):
            studies = returned_values(item, "StudyInstanceUID")
            if not studies or study in studies:
                return True
    return False
