"""Deterministic UIDs for everything the report module produces.

PACS keep the first copy of a SOP Instance UID (PS3.3 C.12.1.1.1, PS3.5 9), so the same UID must
mean the same content and any change of content must get a new UID. Every UID is therefore
derived, never drawn at random:

- a **SOP Instance UID** (SR or heatmap Secondary Capture) from what the instance states: the
  result as canonical JSON (``ScanResult.to_json_dict()``: evidence UIDs, the probability at its
  stated precision, slice counts, threshold, label, key slices, window, slice policy, ingest
  settings, model name, version, device UID and runtime, and any field added later) without the
  keys in ``NON_CONTENT_KEYS`` (raw floats, timings, notes), :data:`REPORT_SCHEMA_VERSION`, the
  report's own options and a fingerprint of the source header it copies. Not the ctcovid
  version: a release that states the same thing states it with the same UID. A resend of the
  same result is harmless; a corrected result is a new instance. That UID is revision 1's;
  revision n > 1 of the same content derives from it, n and the predecessor's SOP Instance UID
  (:func:`sr_revision_uid`), so whoever builds revision n of one result over one predecessor
  (the node, batch, from the result or from the revision-1 file) builds the same UID.
- a **Series Instance UID** from the source study and series and the model's *name* only, so
  that every revision of one result sits in one series, whichever version, weights or runtime
  (int8 after fp32, say) computed it;
- the **Tracking UID** of the finding from the same three, the same across revisions;
- a **result card** (``ctcovid.report.card``) from the SR it accompanies: its SOP Instance UID
  from the SR's (which already digests the result, the revision and the source header) and
  :data:`CARD_LAYOUT_VERSION`, its series like the SR's series from study, series and model
  name, so each revision of the SR has its own card and every card of one result shares a
  series.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from collections.abc import Sequence as AbcSequence
from typing import Any

from pydicom.dataset import Dataset

from ctcovid.results import ScanResult
from ctcovid.scans import stated_text

# The UUID-derived root of PS3.5 B.2: "2.25." followed by a 128-bit integer in decimal.
_ROOT = "2.25."
_SEPARATOR = "\x1f"  # cannot occur in a UID or a version string, so parts never run together

#: The layout of what the report states. Bump it when the same result comes to be stated
#: differently (a new content item, another precision), never for a release that does not.
REPORT_SCHEMA_VERSION = "1"

#: The layout of the result card: bump it when the card comes to show the same result otherwise.
CARD_LAYOUT_VERSION = "1"

#: Result keys that the report does not state: how long it took, free-text notes for people
#: (they name files, whose names differ between the node, batch and classify), and the raw
#: floats below the stated precision (they move with thread counts, CPUs and runtimes).
NON_CONTENT_KEYS = frozenset(
    {"seconds", "warnings", "slice_probabilities", "probability_covid_raw"}
)


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
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise ValueError(f"revision must be an integer >= 1. Received: revision={revision!r}.")


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays as plain values; anything else by its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def result_fingerprint(result: ScanResult) -> str:
    """SHA-256 (hex) of what the result states: its JSON without ``NON_CONTENT_KEYS``, the
    probability as its stated text, and :data:`REPORT_SCHEMA_VERSION`.

    Canonical JSON (sorted keys, no spaces), so the same result always gives the same
    fingerprint and fields added to ``ScanResult`` later take part without a change here.
    """
    content = {k: v for k, v in result.to_json_dict().items() if k not in NON_CONTENT_KEYS}
    content["probability_covid"] = stated_text(result.probability_covid)
    content["report_schema_version"] = REPORT_SCHEMA_VERSION
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _element_text(value: Any) -> Any:
    """A data element's value as JSON-ready text: sequences item by item, bytes by digest."""
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, Dataset):
        return _dataset_items(value)
    if isinstance(value, AbcSequence) and not isinstance(value, str):
        return [_element_text(v) for v in value]  # pydicom's Sequence and MultiValue
    return str(value)


def _dataset_items(ds: Dataset) -> list[Any]:
    return [[f"{elem.tag:08X}", elem.VR, _element_text(elem.value)] for elem in ds]


def header_fingerprint(source: Dataset, keywords: Iterable[str]) -> str:
    """SHA-256 (hex) of the source attributes named by ``keywords`` that the report copies."""
    items = []
    for keyword in keywords:
        if keyword in source:
            elem = source[keyword]
            items.append([keyword, elem.VR, _element_text(elem.value)])
    text = json.dumps(items, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sr_series_uid(study_instance_uid: str, series_instance_uid: str, model_name: str) -> str:
    """The SR series of one source series and model name: the same for every revision."""
    return derive_uid("ctcovid-sr-series", study_instance_uid, series_instance_uid, model_name)


def sr_revision_uid(first_uid: str, revision: int, predecessor_sop_instance_uid: str | None) -> str:
    """The SOP Instance UID of revision ``revision`` of the SR whose revision 1 is ``first_uid``.

    Revision 1 is ``first_uid`` itself and has no predecessor; a later revision derives from
    the content (``first_uid``), its number and the SR it replaces.

    Raises
    ------
    ValueError
        If the revision is not an integer >= 1, or the predecessor is missing for a later
        revision or given for revision 1.
    """
    _check_revision(revision)
    if revision == 1:
        if predecessor_sop_instance_uid:
            raise ValueError(
                f"Revision 1 has no predecessor. Received: {predecessor_sop_instance_uid}."
            )
        return first_uid
    if not predecessor_sop_instance_uid:
        raise ValueError(f"Revision {revision} must name the SR it replaces.")
    return derive_uid("ctcovid-sr-revision", first_uid, str(revision), predecessor_sop_instance_uid)


def sr_sop_instance_uid(
    result: ScanResult,
    revision: int = 1,
    *,
    context: Iterable[str] = (),
    predecessor_sop_instance_uid: str | None = None,
) -> str:
    """The SR's SOP Instance UID: what the result states and ``context`` (revision 1), then
    :func:`sr_revision_uid` for a later revision.

    ``context`` carries what else shapes the document (report options, the source header's
    fingerprint); callers pass the same texts for the same document.
    """
    _check_revision(revision)
    first = derive_uid("ctcovid-sr", "1", result_fingerprint(result), *context)
    return sr_revision_uid(first, revision, predecessor_sop_instance_uid)


def sr_uids(
    result: ScanResult,
    revision: int = 1,
    *,
    context: Iterable[str] = (),
    predecessor_sop_instance_uid: str | None = None,
) -> tuple[str, str]:
    """Return ``(series_instance_uid, sop_instance_uid)`` of the SR reporting ``result``."""
    series_uid = sr_series_uid(
        result.study_instance_uid, result.series_instance_uid, result.model.name
    )
    sop_uid = sr_sop_instance_uid(
        result,
        revision,
        context=context,
        predecessor_sop_instance_uid=predecessor_sop_instance_uid,
    )
    return series_uid, sop_uid


def tracking_uid(study_instance_uid: str, series_instance_uid: str, model_name: str) -> str:
    """Tracking Unique Identifier of the COVID-19 finding: the same across revisions."""
    return derive_uid("ctcovid-tracking", study_instance_uid, series_instance_uid, model_name)


def heatmap_uids(
    result: ScanResult,
    revision: int,
    slice_indices: list[int],
    pixel_digests: list[str],
    *,
    context: Iterable[str] = (),
) -> tuple[str, list[str]]:
    """Return the Secondary Capture series UID and one SOP Instance UID per heatmap.

    The series depends on the source study, series and the model's name only; each instance on
    the result's content, the revision, its slice, its pixels (``pixel_digests``, one per slice)
    and ``context``.
    """
    _check_revision(revision)
    if len(slice_indices) != len(pixel_digests):
        raise ValueError(
            f"Got {len(pixel_digests)} pixel digests for {len(slice_indices)} slice indices."
        )
    series_uid = derive_uid(
        "ctcovid-heatmap-series",
        result.study_instance_uid,
        result.series_instance_uid,
        result.model.name,
    )
    fingerprint = result_fingerprint(result)
    context = tuple(context)
    sop_uids = [
        derive_uid(
            "ctcovid-heatmap",
            str(revision),
            fingerprint,
            str(index),
            digest,
            *context,
        )
        for index, digest in zip(slice_indices, pixel_digests, strict=True)
    ]
    return series_uid, sop_uids


def card_series_uid(study_instance_uid: str, series_instance_uid: str, model_name: str) -> str:
    """The result card series of one source series and model name: the same for every revision."""
    return derive_uid("ctcovid-card-series", study_instance_uid, series_instance_uid, model_name)


def card_sop_instance_uid(sr_sop_instance_uid: str) -> str:
    """The SOP Instance UID of the result card that goes with the SR ``sr_sop_instance_uid``.

    One card per SR: the SR's UID digests what the result states, the revision and the source
    header, so a revised or corrected result gets a new card, and whoever holds the SR (the node,
    batch from its revision-1 file) finds or rebuilds its card by this UID.
    """
    return derive_uid("ctcovid-card", CARD_LAYOUT_VERSION, sr_sop_instance_uid)
