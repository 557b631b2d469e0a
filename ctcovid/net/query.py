"""What to look for in a PACS: study-level matching keys, accession numbers and series rules.

A query runs in two steps, as a radiologist would browse: studies that match the keys (a date
range, an accession number), then every series of those studies. Every series found is recorded:
the ones the series rules turn away (another modality, another body part) with the reason, so a
run says what it did not look at and why.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom.datadict import dictionary_VR, tag_for_keyword

from ctcovid.errors import ConfigError

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


class InstanceWriter(Protocol):
    """Where a retrieval puts an instance: ``write(sop_instance_uid, data)``.

    ``data`` is the encoded file, as bytes or as the path of a spooled file that the writer
    takes over (moves into place), so a large instance never has to be held in memory.
    """

    def __call__(self, sop_instance_uid: str, data: bytes | Path) -> None: ...
