"""Matches from a DIMSE archive are checked against the query keys, as DICOMweb ones are.

A pynetdicom C-FIND SCP on 127.0.0.1 that answers every study it holds, whatever the keys ask
for: an archive that ignores PatientID.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from ctcovid.net.dimse import DimseArchive
from ctcovid.net.peers import Peer

STUDIES = [("1.2.1", "P1"), ("1.2.2", "P2"), ("1.2.3", "P1"), ("1.2/../4", "P1")]
SERIES = [("1.2.1", "1.2.1.1"), ("1.2.2", "1.2.2.1"), ("1.2.1", "1.2.1.x")]


@pytest.fixture
def ignoring_archive() -> Iterator[Peer]:
    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        if event.identifier.QueryRetrieveLevel == "SERIES":
            # Every series it holds, whatever study the identifier names.
            for study, series in SERIES:
                match = Dataset()
                match.QueryRetrieveLevel = "SERIES"
                match.StudyInstanceUID = study
                match.SeriesInstanceUID = series
                match.Modality = "CT"
                yield 0xFF00, match
            yield 0x0000, None
            return
        for uid, patient in STUDIES:  # every study, whatever the identifier asks for
            match = Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = uid
            match.PatientID = patient
            match.ModalitiesInStudy = ["CT"]
            yield 0xFF00, match
        yield 0x0000, None

    ae = AE(ae_title="IGNORING")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield Peer("127.0.0.1", server.server_address[1], "IGNORING")
    finally:
        server.shutdown()


def test_a_dimse_archive_that_ignores_patient_id_feeds_in_no_other_patient(
    ignoring_archive: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    archive = DimseArchive(ignoring_archive, calling_ae_title="CTCOVID", timeout_seconds=10)
    with caplog.at_level(logging.WARNING):
        found = archive.find_studies({"PatientID": "P1", "ModalitiesInStudy": "CT"})
    # 1.2.2 is another patient's; "1.2/../4" is not a UID that may become a path.
    assert [s.study_instance_uid for s in found] == ["1.2.1", "1.2.3"]
    assert "StudyInstanceUID 1.2.2 dropped: PatientID 'P2' does not match 'P1'" in caplog.text


def test_a_dimse_archive_that_ignores_the_study_key_gives_only_that_studys_series(
    ignoring_archive: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    from ctcovid.net.query import StudyMatch

    archive = DimseArchive(ignoring_archive, calling_ae_title="CTCOVID", timeout_seconds=10)
    with caplog.at_level(logging.WARNING):
        found = archive.find_series(StudyMatch("1.2.1", patient_id="P1"))
    # 1.2.2.1 is another study's series; "1.2.1.x" is not a UID.
    assert [s.series_instance_uid for s in found] == ["1.2.1.1"]
    assert "SeriesInstanceUID 1.2.2.1 dropped: StudyInstanceUID '1.2.2'" in caplog.text


def test_an_empty_query_value_is_refused_for_every_archive() -> None:
    from ctcovid.errors import ConfigError
    from ctcovid.net.query import StudyQuery

    with pytest.raises(ConfigError, match="StudyDate=: an empty value matches every study"):
        StudyQuery.parse(["StudyDate="])
