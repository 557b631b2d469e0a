"""What an SR or heatmap takes from its source series' header, so that PACS files it right.

A derived object files into the source study under the source patient: it copies the Patient,
Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study modules in full
(every attribute the source has, ``ctcovid.dicom.modules``), keeps the source's character set
(PS3.3 C.12.1.1.2) and time zone, and names the source series in its own series.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import logging
import re
from typing import Any

from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import Dataset

from ctcovid.dicom.modules import COPIED_KEYWORDS, REPORT_HEADER_KEYWORDS
from ctcovid.report.uids import header_fingerprint
from ctcovid.results import ScanResult

logger = logging.getLogger(__name__)

#: SeriesNumber of the SR reporting source series n is SR_SERIES_NUMBER + n, of its
#: heatmaps HEATMAP_SERIES_NUMBER + n and of its result cards CARD_SERIES_NUMBER + n, for
#: 0 <= n < SERIES_NUMBER_SPAN. A source without a
#: SeriesNumber in that range gets n from a hash of its SeriesInstanceUID instead.
SR_SERIES_NUMBER = 900000
HEATMAP_SERIES_NUMBER = 950000
CARD_SERIES_NUMBER = 850000
SERIES_NUMBER_SPAN = 50000

_LO_MAX_CHARS = 64
_TIMEZONE = re.compile(r"^([+-])(\d\d)([0-5]\d)$")
_MAX_OFFSET = datetime.timedelta(hours=14)  # PS3.5 Table 6.2-1: -1200 to +1400


def copy_source_modules(target: Dataset, source: Dataset) -> list[str]:
    """Copy every attribute of the patient and study modules that ``source`` has into ``target``.

    Returns the keywords copied. Values are copied as they are (sequences deeply), so they keep
    their meaning; ``target`` must carry the source's character set (``source_character_set``).
    """
    copied = []
    for keyword in COPIED_KEYWORDS:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
            copied.append(keyword)
    return copied


def source_character_set(source: Dataset) -> Any:
    """The source's SpecificCharacterSet value as it is (``None`` when it has none).

    Kept verbatim: ``\\ISO 2022 IR 87`` (an empty first value, PS3.3 C.12.1.1.2) means the
    default repertoire with code extensions, and writing the patient's name back in another
    set could change what a PACS matches on.
    """
    if "SpecificCharacterSet" not in source:
        return None
    value = source["SpecificCharacterSet"].value
    if not value:
        return None
    return copy.deepcopy(value)


def apply_character_set(target: Dataset, source: Dataset) -> None:
    """Give ``target`` the source's character set (or none, the default repertoire)."""
    value = source_character_set(source)
    if value is None:
        if "SpecificCharacterSet" in target:
            del target.SpecificCharacterSet
    else:
        target.SpecificCharacterSet = value


def fit_long_string(text: str, character_set: Any) -> str:
    """``text`` cut to what a LO value holds: 64 characters, and 64 bytes once encoded."""
    text = text[:_LO_MAX_CHARS].rstrip()
    encodings = convert_encodings(character_set or "ISO_IR 6")
    while text and len(encode_string(text, encodings)) > _LO_MAX_CHARS:
        text = text[:-1].rstrip()
    return text


def _source_series_number(source: Dataset) -> int | None:
    try:
        value = source.get("SeriesNumber")
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def series_number_offset(source: Dataset) -> int:
    """n of the SeriesNumber rule: the source's SeriesNumber, else a hash of its series UID."""
    number = _source_series_number(source)
    if number is not None and 0 <= number < SERIES_NUMBER_SPAN:
        return number
    uid = str(source.get("SeriesInstanceUID", ""))
    digest = hashlib.sha256(f"ctcovid-series-number\x1f{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SERIES_NUMBER_SPAN


def sr_series_number(source: Dataset) -> int:
    """SeriesNumber of the SR for the source series: ``SR_SERIES_NUMBER`` + n."""
    return SR_SERIES_NUMBER + series_number_offset(source)


def heatmap_series_number(source: Dataset) -> int:
    """SeriesNumber of the heatmap Secondary Captures: ``HEATMAP_SERIES_NUMBER`` + n."""
    return HEATMAP_SERIES_NUMBER + series_number_offset(source)


def card_series_number(source: Dataset) -> int:
    """SeriesNumber of the result cards: ``CARD_SERIES_NUMBER`` + n."""
    return CARD_SERIES_NUMBER + series_number_offset(source)


def stack_text(result: ScanResult) -> str:
    """The chosen stack of the result in a few words ('' when the result names none)."""
    stack = getattr(result, "stack", None)
    if not stack:
        return ""
    if isinstance(stack, str):
        return stack
    if isinstance(stack, dict):
        fields = stack
    elif dataclasses.is_dataclass(stack) and not isinstance(stack, type):
        fields = dataclasses.asdict(stack)
    else:
        fields = getattr(stack, "__dict__", {})
    parts = []
    kernel = fields.get("kernel") or fields.get("convolution_kernel")
    if kernel:
        parts.append(str(kernel) if isinstance(kernel, str) else "/".join(map(str, kernel)))
    thickness = fields.get("slice_thickness_mm", fields.get("slice_thickness"))
    if thickness not in (None, ""):
        try:
            parts.append(f"{float(thickness):g} mm")
        except (TypeError, ValueError):
            parts.append(str(thickness))
    return " ".join(parts) if parts else str(stack)


def series_description(prefix: str, source: Dataset, result: ScanResult) -> str:
    """``prefix`` naming the source series: its number, description and chosen stack.

    For example ``"ctcovid COVID-19 of series 3 Lung 1.0 B70f [B70f 1 mm]"``, cut to fit a LO.
    """
    number = _source_series_number(source)
    text = prefix + (f" of series {number}" if number is not None else " of series")
    description = str(source.get("SeriesDescription", "") or "").strip()
    if description:
        text += f" {description}"
    stack = stack_text(result)
    if stack:
        text += f" [{stack}]"
    return fit_long_string(text, source_character_set(source))


def source_time_zone(source: Dataset) -> datetime.timezone | None:
    """The time zone the source states in TimezoneOffsetFromUTC (``None`` if none or invalid)."""
    value = str(source.get("TimezoneOffsetFromUTC", "") or "").strip()
    if not value:
        return None
    match = _TIMEZONE.match(value)
    offset = None
    if match is not None:
        sign, hours, minutes = match.groups()
        offset = datetime.timedelta(hours=int(hours), minutes=int(minutes))
        offset = -offset if sign == "-" else offset
    if offset is None or not -_MAX_OFFSET <= offset <= _MAX_OFFSET:
        logger.warning(
            "Source SOP instance %s: TimezoneOffsetFromUTC (0008,0201) %r is not a valid &ZZXX "
            "offset; the report states no time zone and its own times are local.",
            source.get("SOPInstanceUID", "?"),
            value,
        )
        return None
    return datetime.timezone(offset)


def apply_time_zone(target: Dataset, source: Dataset, now: datetime.datetime | None = None) -> None:
    """Write ContentDate/Time and InstanceCreationDate/Time in the source's time zone.

    TimezoneOffsetFromUTC (SOP Common) applies to every date and time of a dataset, the copied
    StudyDate and StudyTime included, so the target states the source's offset and its own
    times are written in it. Without an offset in the source nothing changes.
    """
    zone = source_time_zone(source)
    if zone is None:
        return
    moment = (now or datetime.datetime.now(datetime.UTC)).astimezone(zone)
    date, time = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")
    target.TimezoneOffsetFromUTC = str(source.TimezoneOffsetFromUTC).strip()
    target.InstanceCreationDate, target.InstanceCreationTime = date, time
    if "ContentDate" in target or "ContentTime" in target:
        target.ContentDate, target.ContentTime = date, time


_REQUEST_COPIED = (
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyInstanceUID",
    "ReferencedStudySequence",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence",
    "ReasonForTheRequestedProcedure",
    "ReasonForRequestedProcedureCodeSequence",
)
# Type 2 attributes of a Referenced Request Sequence item (PS3.3 C.17.2, Table C.17-2a) that the
# Request Attributes Sequence of the source cannot supply: present and empty.
_REQUEST_TYPE_2 = (
    "ReferencedStudySequence",
    "AccessionNumber",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence",
)


def referenced_requests(source: Dataset) -> list[Dataset]:
    """ReferencedRequestSequence items for the requests the source series fulfils.

    Built from the source's RequestAttributesSequence (General Series): one item per request,
    with the study's UID and accession number where the request does not state its own.
    """
    items = []
    for request in source.get("RequestAttributesSequence") or []:
        item = Dataset()
        for keyword in _REQUEST_COPIED:
            if keyword in request:
                item[keyword] = copy.deepcopy(request[keyword])
        if not item.get("StudyInstanceUID"):
            item.StudyInstanceUID = source.StudyInstanceUID
        if "AccessionNumber" not in item and "AccessionNumber" in source:
            item.AccessionNumber = source.AccessionNumber
            if "IssuerOfAccessionNumberSequence" in source:
                item.IssuerOfAccessionNumberSequence = copy.deepcopy(
                    source.IssuerOfAccessionNumberSequence
                )
        for keyword in _REQUEST_TYPE_2:
            if keyword not in item:
                setattr(item, keyword, [] if keyword.endswith("Sequence") else "")
        items.append(item)
    return items


def source_context(source: Dataset) -> str:
    """Fingerprint of what a derived object takes from the source header (for its UID)."""
    return header_fingerprint(source, REPORT_HEADER_KEYWORDS)
