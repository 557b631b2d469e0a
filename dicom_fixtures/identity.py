"""Patient/study identity and deterministic UIDs for the fixtures."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from pydicom.uid import UID

__all__ = ["StudyIdentity", "make_identity", "make_uid"]


# Fixed namespace for name-based UUIDs, so UIDs depend only on the parts.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "ctcovid-fixtures")


def make_uid(*parts: object) -> UID:
    """Deterministic ``2.25.x`` UID derived from ``parts``.

    The same parts always give the same UID, so a seed reproduces a data set
    byte for byte. ``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its
    entropy sources and returns a random UUID, so the UID is built here from a
    name-based (SHA-1, version 5) UUID instead, as ISO/IEC 9834-8 allows.
    """
    name = "\x1f".join(repr(p) for p in parts)
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study level attributes shared by every series of a study."""

    patient_name: str
    patient_id: str
    study_instance_uid: str
    accession: str
    study_date: str = "20200315"  # DICOM DA, YYYYMMDD
    study_time: str = "101500"  # DICOM TM, HHMMSS
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    study_id: str = "1"
    study_description: str = "CT CHEST"
    referring_physician: str = "REFERRER^FIXTURE"

    @property
    def frame_of_reference_uid(self) -> str:
        """One frame of reference per study, so localizer and axial series share it."""
        return make_uid(self.study_instance_uid, "frame-of-reference")


def make_identity(seed: int, index: int) -> StudyIdentity:
    """Deterministic synthetic identity for study ``index`` of data set ``seed``."""
    date = dt.date(2020, 3, 1) + dt.timedelta(days=(seed * 7 + index) % 700)
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=(seed * 131 + index * 977) % 20000)
    return StudyIdentity(
        patient_name=f"FIXTURE^PATIENT{index:03d}",
        patient_id=f"FX{seed:04d}{index:04d}",
        study_instance_uid=make_uid("ctcovid-fixtures", seed, index, "study"),
        accession=f"A{seed:03d}{index:05d}",
        study_date=date.strftime("%Y%m%d"),
        study_time=f"{8 + index % 10:02d}{(index * 7) % 60:02d}00",
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_sex="MF"[index % 2],
        study_id=str(index + 1),
    )
