"""The DICOMweb client held to the listener's standard, against small servers on 127.0.0.1.

Each server is a stdlib ``http.server`` in a thread that misbehaves in one way a real archive
may: a page cap, a key it ignores, an invalid UID, a deflated or oversized part, a trickle, a
409 to a resend. Every loop in the servers is bounded, so a client that does not end still lets
the test end.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from ctcovid.dicom import DECODABLE_TRANSFER_SYNTAXES
from ctcovid.errors import ConfigError, PacsError
from ctcovid.net.query import SeriesMatch, SeriesRules, StudyQuery, query_mismatch

pytest.importorskip("dicomweb_client", reason="pip install 'ctcovid[dicomweb]'")

from ctcovid.net.dicomweb import DicomWebArchive, HttpAuth, make_client

BOUNDARY = "ctcovid-test-boundary"


# -- a small DICOMweb server ----------------------------------------------------------------------


def study_json(uid: str, patient_id: str) -> dict[str, Any]:
    return {
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00100020": {"vr": "LO", "Value": [patient_id]},
        "00080061": {"vr": "CS", "Value": ["CT"]},
        "00080020": {"vr": "DA", "Value": ["20200301"]},
    }


def series_json(study_uid: str, series_uid: str) -> dict[str, Any]:
    return {
        "0020000D": {"vr": "UI", "Value": [study_uid]},
        "0020000E": {"vr": "UI", "Value": [series_uid]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00201209": {"vr": "IS", "Value": [3]},
    }


@dataclass
class FakeArchive:
    """What the server holds and how it misbehaves; ``requests`` records what it was asked."""

    studies: list[dict[str, Any]] = field(default_factory=list)
    page_cap: int = 1000
    applies_patient_id: bool = True
    wado: Callable[[http.server.BaseHTTPRequestHandler], None] | None = None
    stow_status: int = 200
    instances: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def qido_studies(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        found = self.studies
        if self.applies_patient_id and "PatientID" in query:
            wanted = query["PatientID"][0]
            found = [s for s in found if s["00100020"]["Value"][0] == wanted]
        offset = int(query.get("offset", ["0"])[0])
        limit = min(int(query.get("limit", ["1000"])[0]), self.page_cap)
        return found[offset : offset + limit]


@pytest.fixture
def server() -> Iterator[tuple[FakeArchive, str]]:
    archive = FakeArchive()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, body: Any, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            archive.requests.append(("GET", self.path, dict(self.headers)))
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            path = parts.path.strip("/").split("/")
            if path == ["studies"]:
                return self._json(archive.qido_studies(query))
            if len(path) == 3 and path[0] == "studies" and path[2] == "series":
                study = next(s for s in archive.studies if s["0020000D"]["Value"][0] == path[1])
                return self._json(study.get("series", []) if int(
                    query.get("offset", ["0"])[0]) == 0 else [])
            if len(path) == 3 and path[2] == "instances":
                wanted = query.get("SOPInstanceUID", [""])[0]
                return self._json([i for i in archive.instances
                                   if i["00080018"]["Value"][0] == wanted])
            if len(path) == 4 and path[2] == "series" and archive.wado is not None:
                return archive.wado(self)
            self._json([], 404)

        def do_POST(self) -> None:
            archive.requests.append(("POST", self.path, dict(self.headers)))
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._json({}, archive.stow_status)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield archive, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def dicom_file(syntax: str = ExplicitVRLittleEndian, sop: str | None = None) -> bytes:
    """A small CT-like PS3.10 file in ``syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.ImageComments = "x" * 4096
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    out = b""
    for data in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def send_multipart(body: bytes, *, piece_bytes: int = 1000) -> Callable[[Any], None]:
    """A WADO-RS answer of ``body``, written in small pieces (parts straddle reads)."""

    def wado(handler: Any) -> None:
        handler.send_response(200)
        handler.send_header(
            "Content-Type",
            f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        )
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for start in range(0, len(body), piece_bytes):
            handler.wfile.write(body[start : start + piece_bytes])
            handler.wfile.flush()

    return wado


SERIES = SeriesMatch("1.2.3", "1.2.3.4", modality="CT")


class Written:
    """An InstanceWriter that keeps what it was given."""

    def __init__(self) -> None:
        self.instances: dict[str, bytes] = {}

    def __call__(self, sop_instance_uid: str, data: bytes) -> None:
        self.instances[sop_instance_uid] = data


# -- QIDO-RS: paging and checking the matches ---------------------------------------------------


def test_qido_pages_past_a_server_page_cap_until_an_empty_page(server) -> None:
    archive, url = server
    archive.studies = [study_json(f"1.2.{i}", "P1") for i in range(25)]
    archive.page_cap = 10
    found = DicomWebArchive(url).find_studies({})
    assert sorted(s.study_instance_uid for s in found) == sorted(f"1.2.{i}" for i in range(25))


def test_an_archive_that_ignores_patient_id_feeds_no_other_patient_into_the_batch(
    server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ctcovid.batch.sources import PacsSource

    archive, url = server
    archive.applies_patient_id = False
    for i, patient in enumerate(["P1", "P2", "P1", "P3"]):
        study = study_json(f"1.2.{i}", patient)
        study["series"] = [series_json(f"1.2.{i}", f"1.2.{i}.1")]
        archive.studies.append(study)
    source = PacsSource(DicomWebArchive(url), StudyQuery.parse(["PatientID=P1"]), SeriesRules(),
                        cache_bytes=10**6, pause_seconds=0.0)
    with caplog.at_level(logging.WARNING):
        source.plan(tmp_path, resume=False)
    assert {(e.study_instance_uid, e.patient_id) for e in source.entries()} == {
        ("1.2.0", "P1"), ("1.2.2", "P1")}
    assert "StudyInstanceUID 1.2.1 dropped: PatientID 'P2' does not match 'P1'" in caplog.text


def test_a_study_match_whose_uid_is_not_a_uid_never_becomes_a_match(server) -> None:
    archive, url = server
    archive.studies = [study_json("1.2.3", "P1"), study_json("1.2/../../etc", "P1")]
    found = DicomWebArchive(url).find_studies({"PatientID": "P1"})
    assert [s.study_instance_uid for s in found] == ["1.2.3"]


def test_a_series_of_another_study_is_dropped(server) -> None:
    archive, url = server
    study = study_json("1.2.3", "P1")
    study["series"] = [series_json("1.2.3", "1.2.3.1"), series_json("9.9.9", "9.9.9.1")]
    archive.studies = [study]
    from ctcovid.net.query import StudyMatch

    found = DicomWebArchive(url).find_series(StudyMatch("1.2.3", "P1"))
    assert [s.series_instance_uid for s in found] == ["1.2.3.1"]


@pytest.mark.parametrize(
    ("keys", "returned", "mismatch"),
    [
        ({"PatientID": "P1"}, {"PatientID": "P1"}, ""),
        ({"PatientID": "P1"}, {"PatientID": "P10"}, "PatientID 'P10' does not match 'P1'"),
        ({"PatientID": "P1"}, {}, "PatientID not returned (asked for 'P1')"),
        ({"PatientID": "P*"}, {"PatientID": "P10"}, ""),
        ({"PatientID": "P?"}, {"PatientID": "P10"}, "PatientID 'P10' does not match 'P?'"),
        ({"StudyDate": "20200301-20200331"}, {"StudyDate": "20200315"}, ""),
        ({"StudyDate": "20200301-"}, {"StudyDate": "20200229"},
         "StudyDate '20200229' does not match '20200301-'"),
        ({"AccessionNumber": "A1\\A2"}, {"AccessionNumber": "A2"}, ""),
        ({"PatientName": "doe^j*"}, {"PatientName": "DOE^JOHN"}, ""),
        ({"ModalitiesInStudy": "CT"}, {"ModalitiesInStudy": ["SR", "CT"]}, ""),
        ({"ModalitiesInStudy": "CT"}, {}, ""),  # each series' Modality answers it later
        ({"ModalitiesInStudy": "CT"}, {"ModalitiesInStudy": ["MR"]},
         "ModalitiesInStudy 'MR' does not match 'CT'"),
        ({"PatientID": ""}, {"PatientID": "P2"}, ""),  # universal match
    ],
)
def test_query_mismatch_applies_dicom_matching_to_what_the_archive_returned(
    keys: dict[str, str], returned: dict[str, Any], mismatch: str
) -> None:
    ds = Dataset()
    for keyword, value in returned.items():
        setattr(ds, keyword, value)
    assert query_mismatch(keys, ds) == mismatch
    # The same verdict on the DICOM JSON of a QIDO-RS answer.
    assert query_mismatch(keys, ds.to_json_dict()) == mismatch


# -- credentials and TLS --------------------------------------------------------------------------


def test_credentials_over_plain_http_to_another_host_are_refused() -> None:
    with pytest.raises(ConfigError, match="unencrypted over plain HTTP; use https://"):
        make_client("http://pacs.example.org/dicom-web", HttpAuth("Bearer", "token"))


def test_credentials_over_plain_http_to_loopback_are_allowed() -> None:
    client = make_client("http://127.0.0.1:8042/dicom-web", HttpAuth("Bearer", "token"))
    assert client._session.headers["Authorization"] == "Bearer token"


def test_a_url_with_credentials_is_refused_without_showing_the_password() -> None:
    with pytest.raises(ConfigError, match="carries credentials") as info:
        make_client("https://alice:s3cret-pw@pacs.example.org/dicom-web", None)
    assert "s3cret-pw" not in str(info.value)
    assert "pacs.example.org/dicom-web" in str(info.value)


def test_ca_file_wins_over_requests_ca_bundle(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ca_file = tmp_path / "hospital-ca.pem"
    ca_file.write_text("not read in this test\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "other-ca.pem"))
    url = "https://pacs.example.org/dicom-web"
    session = make_client(url, None, ca_file=ca_file)._session
    # What requests will verify the server against, for a request as the client makes it.
    settings = session.merge_environment_settings(url + "/studies", {}, None, None, None)
    assert settings["verify"] == str(ca_file)


def test_netrc_does_not_replace_the_configured_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import requests

    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example.org login mallory password other\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    url = "https://pacs.example.org/dicom-web"
    session = make_client(url, HttpAuth("Bearer", "ours"))._session
    prepared = session.prepare_request(requests.Request("GET", url + "/studies"))
    assert prepared.headers["Authorization"] == "Bearer ours"


def test_batch_stow_makes_one_request_per_attempt(server, tmp_path: Path) -> None:
    from ctcovid.net.sender import SendSettings, sr_sender

    archive, url = server
    archive.stow_status = 503
    path = tmp_path / "sr.dcm"
    path.write_bytes(dicom_file())
    with pytest.raises(PacsError, match="HTTP 503"):
        sr_sender(SendSettings.stow_rs(url)).send(path)
    assert [r[0] for r in archive.requests] == ["POST"]


# -- WADO-RS --------------------------------------------------------------------------------------


def test_wado_writes_every_instance_of_a_multipart_answer(server) -> None:
    archive, url = server
    files = [dicom_file() for _ in range(3)]
    archive.wado = send_multipart(multipart(files), piece_bytes=777)
    written = Written()
    assert DicomWebArchive(url).retrieve_series(SERIES, written) == 3
    assert sorted(written.instances.values()) == sorted(files)
    for sop, data in written.instances.items():
        assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == sop


def test_wado_that_brings_fewer_instances_than_qido_announced_is_incomplete(server) -> None:
    import dataclasses

    from ctcovid.net.query import IncompleteRetrievalError

    archive, url = server
    archive.wado = send_multipart(multipart([dicom_file() for _ in range(2)]))
    announced = dataclasses.replace(SERIES, n_instances=3)
    with pytest.raises(IncompleteRetrievalError, match="delivered 2 of the 3") as caught:
        DicomWebArchive(url).retrieve_series(announced, Written())
    assert (caught.value.delivered, caught.value.announced) == (2, 3)


def test_wado_asks_only_for_the_syntaxes_the_ingest_decodes(server) -> None:
    archive, url = server
    archive.wado = send_multipart(multipart([dicom_file()]))
    DicomWebArchive(url).retrieve_series(SERIES, Written())
    accept = archive.requests[-1][2]["Accept"]
    asked = {item.split("transfer-syntax=")[1].split(";")[0].strip()
             for item in accept.split(",")}
    assert asked == set(DECODABLE_TRANSFER_SYNTAXES)
    assert DeflatedExplicitVRLittleEndian not in asked and "*" not in asked


def test_a_deflated_wado_part_is_refused_unparsed(server, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    archive, url = server
    deflated = dicom_file(DeflatedExplicitVRLittleEndian)
    archive.wado = send_multipart(multipart([dicom_file(), deflated]))

    def no_inflating(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the deflated data set was parsed")

    monkeypatch.setattr("zlib.decompress", no_inflating)
    monkeypatch.setattr("zlib.decompressobj", no_inflating)
    written = Written()
    with pytest.raises(PacsError, match=f"transfer syntax {DeflatedExplicitVRLittleEndian} "
                                        r"\(Deflate.*refused unparsed"):
        DicomWebArchive(url).retrieve_series(SERIES, written)
    assert len(written.instances) == 1  # the part before it; the series fails as a whole


def test_a_wado_part_over_the_instance_cap_is_refused(server) -> None:
    archive, url = server
    archive.wado = send_multipart(multipart([dicom_file()]))
    with pytest.raises(PacsError, match="instance 1 is larger than 2000 bytes; refused"):
        DicomWebArchive(url, max_instance_bytes=2000).retrieve_series(SERIES, Written())


def test_a_trickling_wado_server_ends_at_the_deadline(server) -> None:
    archive, url = server
    stopped = threading.Event()

    def trickle(handler: Any) -> None:
        handler.send_response(200)
        handler.send_header(
            "Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        handler.end_headers()
        body = multipart([dicom_file()])
        try:
            for byte in body[:300]:  # a byte every 0.1 s: half a minute at most
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:
            stopped.set()  # the client hung up

    archive.wado = trickle
    with pytest.raises(PacsError, match=r"WADO-RS series 1\.2\.3\.4 did not finish within 1\.5 s"):
        DicomWebArchive(url, timeout_seconds=10, deadline_seconds=1.5).retrieve_series(
            SERIES, Written())
    assert stopped.wait(5)  # and the connection was closed


# -- STOW-RS: a resend answered 409 --------------------------------------------------------------


def stow_one(url: str, tmp_path: Path, sop: str) -> None:
    from ctcovid.net.stow import stow

    path = tmp_path / f"{sop}.dcm"
    path.write_bytes(dicom_file(sop=sop))
    stow(make_client(url, None), url, [path])


def test_a_resend_answered_409_counts_as_delivered_when_the_archive_holds_the_uid(
    server, tmp_path: Path
) -> None:
    archive, url = server
    archive.stow_status = 409
    archive.instances = [{"00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]},
                          "0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]
    stow_one(url, tmp_path, "1.2.3.4.5")  # no error: delivered
    asked = [r[1].split("?")[0] for r in archive.requests]
    assert asked == ["/studies", "/studies/1.2.3/instances"]


def test_a_409_for_an_instance_the_archive_does_not_hold_is_refused(server, tmp_path: Path
                                                                    ) -> None:
    from ctcovid.net.stow import StowRefused

    archive, url = server
    archive.stow_status = 409
    archive.instances = [{"00080018": {"vr": "UI", "Value": ["1.2.3.4.6"]}}]
    with pytest.raises(StowRefused, match="HTTP 409"):
        stow_one(url, tmp_path, "1.2.3.4.5")


def test_a_deflated_retrieved_file_is_judged_without_inflating_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever retrieval put it in the cache (a C-GET may negotiate Deflate), the batch's main
    process reads only its file meta information."""
    from ctcovid.batch.index import SeriesEntry
    from ctcovid.batch.sources import judge_retrieved
    from ctcovid.config import IngestConfig

    path = tmp_path / "1.2.3.4.5.dcm"
    path.write_bytes(dicom_file(DeflatedExplicitVRLittleEndian, sop="1.2.3.4.5"))

    def no_inflating(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the deflated data set was parsed")

    monkeypatch.setattr("zlib.decompress", no_inflating)
    monkeypatch.setattr("zlib.decompressobj", no_inflating)
    entry = SeriesEntry("1.2.3", "1.2.3.4", "P1", "CT", 1, 1, True, "", ())
    ready = judge_retrieved(entry, [path], IngestConfig())
    assert f"transfer syntax {DeflatedExplicitVRLittleEndian} (Deflate" in ready.error
