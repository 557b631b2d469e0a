"""What to look for in a PACS: study-level matching keys, accession numbers and series rules.

A query runs in two steps, as a radiologist would browse: studies that match the keys (a date
range, an accession number), then every series of those studies. Every series found is recorded:
the ones the series rules turn away (another modality, another body part) with the reason, so a
run says what it did not look at and why.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ctcovid.dicom.uids import valid_uid
from ctcovid.errors import ConfigError, PacsError

logger = logging.getLogger(__name__)

# Study-level return keys: the identity of a study and what a data team filters on.
STUDY_RETURN_KEYS = (
    "StudyInstanceUID",
    "PatientID",
    "AccessionNumber",
    "StudyDate",
    "ModalitiesInStudy",
)
SERIES_RETURN_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
_DATE_RANGE = re.compile(r"^(\d{8})?-?(\d{8})?$")


@dataclass(frozen=True)
class StudyMatch:
    """A study the PACS answered with."""

    study_instance_uid: str
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""


@dataclass(frozen=True)
class SeriesMatch:
    """A series of a matched study, as the PACS describes it (before anything is retrieved)."""

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = ""
    modality: str = ""
    series_description: str = ""
    body_part: str = ""
    n_instances: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.study_instance_uid, self.series_instance_uid)


def _check_key(keyword: str, value: str) -> tuple[str, str]:
    if not value:
        # PS3.4 C.2.2.2.1: an empty value is a universal match, so "StudyDate=" (a value lost
        # by the shell, say) would list every study of the archive.
        raise ConfigError(
            f"--query {keyword}=: an empty value matches every study; give a value or leave "
            "the key out"
        )
    if tag_for_keyword(keyword) is None:
        raise ConfigError(
            f"--query {keyword}={value}: {keyword!r} is not a DICOM keyword (e.g. StudyDate, "
            "PatientID, StudyDescription)"
        )
    if dictionary_VR(keyword) == "DA" and not _DATE_RANGE.match(value):
        raise ConfigError(
            f"--query {keyword}={value}: dates are YYYYMMDD or a range YYYYMMDD-YYYYMMDD"
        )
    if keyword in ("QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID"):
        raise ConfigError(f"--query {keyword}=...: set by ctcovid, not a filter")
    return keyword, value


@dataclass(frozen=True)
class StudyQuery:
    """Study-level matching keys and, optionally, a list of accession numbers.

    With accession numbers, one study query is made per accession number (each with the keys);
    without, one query with the keys. ``modalities`` also goes to the study query as
    ModalitiesInStudy, which most archives match, so studies without CT are never listed.
    """

    keys: tuple[tuple[str, str], ...] = ()
    accessions: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ("CT",)

    @classmethod
    def parse(
        cls,
        items: Sequence[str],
        *,
        accessions_file: Path | None = None,
        modalities: Sequence[str] = ("CT",),
    ) -> StudyQuery:
        """Parse ``KEY=VALUE`` items (DICOM keywords) and an accession file (one per line)."""
        keys = []
        for item in items:
            for part in item.split(","):
                if not part.strip():
                    continue
                keyword, sep, value = part.partition("=")
                if not sep:
                    raise ConfigError(f"--query takes KEY=VALUE. Received: {part!r}.")
                keys.append(_check_key(keyword.strip(), value.strip()))
        accessions: list[str] = []
        if accessions_file is not None:
            try:
                text = accessions_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"{accessions_file}: cannot read accession numbers ({exc})"
                ) from exc
            for line_no, line in enumerate(text.splitlines(), start=1):
                value = line.split("#", 1)[0].strip()
                if not value:
                    continue
                if len(value) > 16 or "\\" in value or "*" in value or "?" in value:
                    raise ConfigError(
                        f"{accessions_file}: line {line_no}: {value!r} is not an AccessionNumber "
                        "(at most 16 characters, no wildcards)"
                    )
                accessions.append(value)
            if not accessions:
                raise ConfigError(f"{accessions_file}: no accession number in the file")
        mods = tuple(m.strip().upper() for m in modalities if m.strip())
        if not mods:
            raise ConfigError("--modality needs at least one modality, e.g. CT")
        return cls(tuple(keys), tuple(dict.fromkeys(accessions)), mods)

    def study_queries(self) -> list[dict[str, str]]:
        """The matching keys of each study-level query to make."""
        base = dict(self.keys)
        base.setdefault("ModalitiesInStudy", "\\".join(self.modalities))
        if not self.accessions:
            return [base]
        return [base | {"AccessionNumber": acc} for acc in self.accessions]

    def to_dict(self) -> dict[str, object]:
        return {
            "keys": [list(k) for k in self.keys],
            "accessions": list(self.accessions),
            "modalities": list(self.modalities),
        }


@dataclass(frozen=True)
class SeriesRules:
    """Which series of a matched study are retrieved; patterns are shell-style, case-insensitive.

    A series is retrieved when its modality is one of ``modalities`` and, where patterns are
    given, its BodyPartExamined matches one of ``body_parts`` and its SeriesDescription one of
    ``descriptions``. Everything else is recorded as skipped with the rule it failed.
    """

    modalities: tuple[str, ...] = ("CT",)
    body_parts: tuple[str, ...] = ()
    descriptions: tuple[str, ...] = field(default=())

    def reason(self, series: SeriesMatch) -> str:
        """Why ``series`` is not retrieved, or ``""`` when it is."""
        if series.modality not in self.modalities:
            # Worded as the folder ingest words it, so both sources give the same rows.
            return f"modality {series.modality or 'missing'} is not {'/'.join(self.modalities)}"
        if self.body_parts and not _matches(series.body_part, self.body_parts):
            return (
                f"BodyPartExamined {series.body_part!r} matches none of "
                f"{', '.join(self.body_parts)}"
            )
        if self.descriptions and not _matches(series.series_description, self.descriptions):
            return (
                f"SeriesDescription {series.series_description!r} matches none of "
                f"{', '.join(self.descriptions)}"
            )
        return ""

    def to_dict(self) -> dict[str, object]:
        return {
            "modalities": list(self.modalities),
            "body_parts": list(self.body_parts),
            "descriptions": list(self.descriptions),
        }


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value.upper(), p.upper()) for p in patterns)


class Archive(Protocol):
    """A PACS that ctcovid reads from: DIMSE (``dimse.py``) or DICOMweb (``dicomweb.py``).

    Implementations only query and retrieve; they never store, change or delete anything.
    ``retrieve_series`` writes every instance of one series into ``dest`` through ``write``
    (the bounded cache) and returns the number of instances written.
    """

    def describe(self) -> str: ...

    def identity(self) -> str:
        """What a resumed run must find again (``dicom://HOST:PORT:AET`` or the base URL)."""
        ...

    def find_studies(self, keys: dict[str, str]) -> list[StudyMatch]: ...

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]: ...

    def retrieve_series(self, series: SeriesMatch, write: InstanceWriter) -> int: ...


class IncompleteRetrievalError(PacsError):
    """The archive delivered fewer instances of a series than it announced (an image-level
    C-FIND, or QIDO-RS's NumberOfSeriesRelatedInstances): the series is not judged as if whole.
    """

    def __init__(self, message: str, *, delivered: int, announced: int):
        super().__init__(message)
        self.delivered = delivered
        self.announced = announced


class InstanceWriter(Protocol):
    """Where a retrieval puts an instance: ``write(sop_instance_uid, data)``.

    ``data`` is the encoded file, as bytes or as the path of a spooled file that the writer
    takes over (moves into place), so a large instance never has to be held in memory.
    """

    def __call__(self, sop_instance_uid: str, data: bytes | Path) -> None: ...


# -- every match checked against the query ---------------------------------------------------------

# Keys whose absence from a match is tolerated: ModalitiesInStudy is optional matching in many
# archives, and every series is judged by its own Modality afterwards (``SeriesRules``).
_MAY_BE_ABSENT = frozenset({"ModalitiesInStudy"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_PADDING = " \x00"


def returned_values(match: Dataset | Mapping[str, Any], keyword: str) -> list[str]:
    """The values of ``keyword`` in a match: a C-FIND identifier or a QIDO-RS DICOM JSON object.

    Person names come back as their alphabetic form; absent or empty attributes as ``[]``.
    Only DICOM's padding (spaces, NUL) is stripped: a UID with a newline stays invalid.
    """
    if isinstance(match, Dataset):
        element = match.get(keyword)
        items = list(element) if isinstance(element, MultiValue) else [element]
        return [str(v).strip(_PADDING) for v in items if v is not None and str(v).strip(_PADDING)]
    tag = tag_for_keyword(keyword)
    item = match.get(f"{tag:08X}") if tag is not None else None
    out = []
    for value in (item or {}).get("Value") or []:
        if isinstance(value, dict):  # a person name: {"Alphabetic": ...}
            value = value.get("Alphabetic", "")
        if value is not None and str(value).strip(_PADDING):
            out.append(str(value).strip(_PADDING))
    return out


def first_value(match: Dataset | Mapping[str, Any], keyword: str) -> str:
    """The first value of ``keyword`` in a match (see :func:`returned_values`), or ``""``."""
    values = returned_values(match, keyword)
    return values[0] if values else ""


def study_match(uid: str, match: Dataset | Mapping[str, Any]) -> StudyMatch:
    """The :class:`StudyMatch` of an accepted study-level match (see :func:`accept_match`)."""
    return StudyMatch(
        study_instance_uid=uid,
        patient_id=first_value(match, "PatientID"),
        accession_number=first_value(match, "AccessionNumber"),
        study_date=first_value(match, "StudyDate"),
    )


def series_match(study: StudyMatch, uid: str, match: Dataset | Mapping[str, Any]) -> SeriesMatch:
    """The :class:`SeriesMatch` of an accepted series-level match of ``study``."""
    n = first_value(match, "NumberOfSeriesRelatedInstances")
    return SeriesMatch(
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=uid,
        patient_id=study.patient_id,
        modality=first_value(match, "Modality"),
        series_description=first_value(match, "SeriesDescription"),
        body_part=first_value(match, "BodyPartExamined"),
        n_instances=int(n) if n.isdigit() else None,
    )


def _single_matches(vr: str, wanted: str, value: str) -> bool:
    """PS3.4 C.2.2.2: range, wildcard or single value matching of one value."""
    if vr in _RANGE_VRS and "-" in wanted:
        low, _, high = wanted.partition("-")
        value = value.replace(".", "").replace(":", "")
        # A bound covers every value it is a prefix of ("20200301" covers the whole day).
        return (not low or value[: len(low)] >= low) and (not high or value[: len(high)] <= high)
    if vr == "PN":  # case-insensitive, trailing empty components ignored
        wanted, value = wanted.upper().rstrip("^ "), value.upper().rstrip("^ ")
    if "*" in wanted or "?" in wanted:
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wanted)
        return re.fullmatch(pattern, value, flags=re.DOTALL) is not None
    if vr in ("DA", "TM", "DT"):
        value = value.replace(".", "").replace(":", "")
    return value == wanted


def query_mismatch(keys: Mapping[str, str], match: Dataset | Mapping[str, Any]) -> str:
    """Why ``match`` does not satisfy the matching ``keys``, or ``""`` when it does.

    Archives are not trusted to apply every key: one that ignores ``PatientID`` would otherwise
    feed other patients' studies into a run, and their SRs into those patients' records. So each
    key is checked again here, on what the archive returned, as PS3.4 C.2.2.2 defines matching:
    ``\\``-separated alternatives, ``*``/``?`` wildcards, ``A-B`` ranges of dates and times,
    person names case-insensitive. A key the match does not carry fails: what cannot be checked
    is not trusted (except ``ModalitiesInStudy``, which each series' Modality answers later).
    Empty keys are universal matches.
    """
    for keyword, wanted in keys.items():
        alternatives = [w.strip() for w in wanted.split("\\") if w.strip()]
        if not alternatives:
            continue
        values = returned_values(match, keyword)
        if not values:
            if keyword in _MAY_BE_ABSENT:
                continue
            return f"{keyword} not returned (asked for {wanted!r})"
        vr = dictionary_VR(keyword) if tag_for_keyword(keyword) is not None else ""
        if not any(_single_matches(vr, w, v) for w in alternatives for v in values):
            returned = "\\".join(values)
            return f"{keyword} {returned!r} does not match {wanted!r}"
    return ""


def accept_match(
    keys: Mapping[str, str],
    match: Dataset | Mapping[str, Any],
    *,
    uid_keyword: str,
    source: str,
) -> str:
    """The match's UID when it is valid and satisfies ``keys``; ``""`` (and a warning) if not.

    The single check that every archive applies to every match before it becomes a
    :class:`StudyMatch` or :class:`SeriesMatch`: the UID must be one that may become part of a
    path or a URL (:func:`~ctcovid.dicom.uids.valid_uid`), and the match must satisfy every
    matching key (:func:`query_mismatch`). A dropped match is logged with the source, the UID
    and the attribute, never silently lost.
    """
    uids = returned_values(match, uid_keyword)
    uid = uids[0] if uids else ""
    if not valid_uid(uid):
        logger.warning(
            "%s: a match with %s %s dropped: not a valid UID", source, uid_keyword, repr(uid)[:80]
        )
        return ""
    why = query_mismatch(keys, match)
    if why:
        logger.warning(
            "%s: %s %s dropped: %s; the archive did not apply the key",
            source,
            uid_keyword,
            uid,
            why,
        )
        return ""
    return uid


@dataclass(frozen=True)
class HeldInstance:
    """An instance an archive holds in one series, with its InstanceNumber (None if absent)."""

    sop_instance_uid: str
    instance_number: int | None


def held_instances(
    study_instance_uid: str,
    series_instance_uid: str,
    matches: Sequence[Dataset | Mapping[str, Any]],
    source: str,
) -> list[HeldInstance]:
    """The instances of an image-level search (C-FIND or QIDO-RS) of one series, each match
    checked (:func:`accept_match`: a valid SOP Instance UID, the study and series asked for)."""
    keys = {"StudyInstanceUID": study_instance_uid, "SeriesInstanceUID": series_instance_uid}
    out = []
    for match in matches:
        # The study and series may be in a QIDO-RS URL path and not repeated in the answer.
        present = {k: v for k, v in keys.items() if returned_values(match, k)}
        uid = accept_match(present, match, uid_keyword="SOPInstanceUID", source=source)
        if not uid:
            continue
        number = first_value(match, "InstanceNumber")
        out.append(HeldInstance(uid, int(number) if number.lstrip("+-").isdigit() else None))
    return out
