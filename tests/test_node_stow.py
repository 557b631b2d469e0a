"""The node delivering SRs by STOW-RS: a real Orthanc with its DICOMweb plugin on loopback, the
real listener and worker (tiny model) in this process, and ``ctcovid queue --retry``."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_helpers import (
    Orthanc,
    ct_files,
    free_port,
    orthanc_with_dicomweb,
    put,
    run_until_idle,
    study_of_instance_in_orthanc,
)
from pynetdicom import AE
from typer.testing import CliRunner

from ctcovid.cli.main import app
from ctcovid.errors import ConfigError
from ctcovid.node.config import NodeConfig, load_config
from ctcovid.node.jobs import CLASSIFIED, FAILED, SENT
from ctcovid.node.store import Store
from ctcovid.node.worker import Worker

pytestmark = pytest.mark.network

USER = ("ctcovid", "not-a-real-secret")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pytest.importorskip("dicomweb_client", reason="pip install 'ctcovid[dicomweb]'")
    server = orthanc_with_dicomweb(tmp_path_factory.mktemp("orthanc"), basic_auth=USER)
    yield server
    server.close()


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "stow-auth"
    path.write_text(f"Basic {USER[0]}:{USER[1]}\n")
    path.chmod(0o600)
    return path


def make_worker(store: Path, classifier, **settings) -> Worker:
    defaults = {"stable_seconds": 0, "retry_seconds": 0, "min_free_mb": 0,
                "network_timeout_seconds": 10}
    config = NodeConfig(store=store, **(defaults | settings))
    return Worker(config, Store(config.store), classifier)


def c_store(port: int, files: list[Path]) -> list[int]:
    """C-STORE ``files`` to the node over one real association; the statuses."""
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="CTCOVID")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def test_series_stored_to_the_node_ends_sent_with_its_sr_in_its_study_in_orthanc(
    tmp_path: Path, studies_root: Path, classifier, orthanc: Orthanc, auth_file: Path
):
    from ctcovid.node.scp import Listener

    worker = make_worker(tmp_path / "store", classifier, stow=orthanc.dicomweb_url,
                         stow_auth_file=auth_file)
    listener = Listener(
        NodeConfig(store=worker.config.store, host="127.0.0.1", port=0, min_free_mb=0),
        Store(worker.config.store),
    )
    listener.start()
    files = ct_files(studies_root, "study_000")
    try:
        statuses = c_store(listener.port, files)
        run_until_idle(worker)
    finally:
        listener.stop(drain_seconds=5)
        listener.store.close()

    assert set(statuses) == {0}
    (record,) = worker.store.jobs.list_series()
    assert (record.state, record.attempts, record.reason) == (SENT, 1, "")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert study_of_instance_in_orthanc(orthanc, record.sr_sop_instance_uid) == study


def test_listen_with_stow_flags_delivers_the_sr_into_its_study(
    tmp_path: Path, studies_root: Path, tiny_model_dir: Path, orthanc: Orthanc, auth_file: Path
):
    """``ctcovid listen --stow URL --stow-auth-file FILE`` as a process, fed by dcmtk's storescu."""
    from node_helpers import WORKER_READY_SECONDS, NodeProcess, storescu, wait_for

    node = NodeProcess(tmp_path / "store", tiny_model_dir, tmp_path / "node.log", "--port", "0",
                       "--stable-seconds", "1", "--min-free-mb", "0",
                       "--stow", orthanc.dicomweb_url, "--stow-auth-file", str(auth_file))
    try:
        node.wait_worker_ready()
        files = ct_files(studies_root, "study_003")  # no other test files its SR in Orthanc
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: "event=sr_sent" in node.text(), WORKER_READY_SECONDS,
                 "the SR to be sent by STOW-RS")
        code = node.terminate(timeout=60)
    finally:
        node.close()

    assert code == 0
    assert f"peer=stow-rs {orthanc.dicomweb_url}" in node.text()
    assert USER[1] not in node.text()  # the credentials are never logged
    store = Store(tmp_path / "store")
    (record,) = store.jobs.list_series()
    store.close()
    assert record.state == SENT
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert study_of_instance_in_orthanc(orthanc, record.sr_sop_instance_uid) == study


def test_stow_to_a_dead_port_retries_then_fails_and_queue_retry_sends_it(
    tmp_path: Path, studies_root: Path, classifier, orthanc: Orthanc, auth_file: Path
):
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    worker = make_worker(tmp_path / "store", classifier, stow=dead, max_attempts=3)
    for path in ct_files(studies_root, "study_001"):
        put(worker.store, path)

    worker.step()  # classify, then the first send
    (first,) = worker.store.jobs.list_series()
    run_until_idle(worker)
    (record,) = worker.store.jobs.list_series()

    assert (first.state, first.attempts) == (CLASSIFIED, 1)  # retried, not failed at once
    assert "ConnectionError" in first.reason and dead in first.reason
    assert (record.state, record.attempts) == (FAILED, 3)
    assert "sending the SR failed 3 time(s)" in record.reason and dead in record.reason
    worker.store.close()

    retried = CliRunner().invoke(
        app, ["queue", "--store", str(tmp_path / "store"), "--json",
              "--retry", record.series_instance_uid])
    assert retried.exit_code == 0, retried.output
    assert json.loads(retried.stdout)["series"][0]["state"] == CLASSIFIED
    fixed = make_worker(tmp_path / "store", classifier, stow=orthanc.dicomweb_url,
                        stow_auth_file=auth_file)
    run_until_idle(fixed)
    (sent,) = fixed.store.jobs.list_series()
    assert sent.state == SENT
    assert study_of_instance_in_orthanc(orthanc, sent.sr_sop_instance_uid) == \
        sent.study_instance_uid


def test_a_stow_refused_with_401_fails_at_once_with_the_http_status(
    tmp_path: Path, studies_root: Path, classifier, orthanc: Orthanc,
    monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CTCOVID_STOW_AUTH", "Basic ctcovid:wrong-password")
    worker = make_worker(tmp_path / "store", classifier, stow=orthanc.dicomweb_url,
                         max_attempts=5)
    for path in ct_files(studies_root, "study_002"):
        put(worker.store, path)

    run_until_idle(worker)

    (record,) = worker.store.jobs.list_series()
    assert (record.state, record.attempts) == (FAILED, 1)
    assert "HTTP 401 Unauthorized" in record.reason and "cannot help" in record.reason
    assert "wrong-password" not in record.reason


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every POST with the class's status and body (a STOW-RS service that refuses)."""

    status = 503
    body = b""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        else:  # chunked upload: read to the end of the chunks
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                self.rfile.read(size + 2)
                if size == 0:
                    break
        self.send_response(self.status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def answering_service() -> Iterator[type[_Answer]]:
    handler = type("Handler", (_Answer,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "reason_code", "state", "expected"),
    [
        (503, None, CLASSIFIED, "HTTP 503 Service Unavailable"),
        (429, None, CLASSIFIED, "HTTP 429 Too Many Requests"),
        (409, 0xA900, FAILED, "HTTP 409 Conflict; SOP instance 2.25.9 refused, failure reason "
                              "0xA900"),
    ],
)
def test_5xx_and_429_are_retried_and_409_fails_at_once_with_the_reason(
    tmp_path: Path, studies_root: Path, classifier, answering_service, status: int,
    reason_code: int | None, state: str, expected: str
):
    answering_service.status = status
    if reason_code is not None:
        answering_service.body = json.dumps({"00081198": {"vr": "SQ", "Value": [{
            "00081155": {"vr": "UI", "Value": ["2.25.9"]},
            "00081197": {"vr": "US", "Value": [reason_code]}}]}}).encode()
    worker = make_worker(tmp_path / "store", classifier, stow=answering_service.url,
                         max_attempts=3, retry_seconds=600, max_retry_seconds=600)
    for path in ct_files(studies_root, "study_003"):
        put(worker.store, path)
    before = time.time()

    run_until_idle(worker)

    (record,) = worker.store.jobs.list_series()
    assert (record.state, record.attempts) == (state, 1)
    assert expected in record.reason
    if state == CLASSIFIED:
        assert record.next_try == pytest.approx(before + 600, abs=60)  # backing off


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"peer": "pacs:104:PACS", "stow": "https://vna.example/dicom-web"}, "not both"),
        ({"stow": "https://user:secret@vna.example/dicom-web"}, "CTCOVID_STOW_AUTH"),
        ({"stow": "vna.example/dicom-web"}, "http"),
        ({"stow_auth_file": "auth"}, "needs stow"),
    ],
)
def test_bad_stow_settings_are_refused_with_the_setting_named(settings: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_dict({"store": "s", **settings})


def test_stow_is_read_from_toml_and_the_flag_wins(tmp_path: Path):
    toml = tmp_path / "node.toml"
    toml.write_text('[node]\nstore = "data"\nstow = "https://vna.example/dicom-web/"\n'
                    'stow_auth_file = "secret/stow"\n')

    from_file = load_config(toml, {})
    flagged = load_config(toml, {"stow": "https://other.example/dicomweb"})

    assert from_file.stow == "https://vna.example/dicom-web"
    assert from_file.stow_auth_file == tmp_path / "secret" / "stow"  # relative to the file
    assert from_file.sr_destination == "stow-rs https://vna.example/dicom-web"
    assert flagged.stow == "https://other.example/dicomweb"


def test_listen_with_stow_and_peer_exits_1_naming_both(tmp_path: Path):
    result = CliRunner().invoke(app, ["listen", "--store", str(tmp_path / "store"), "--peer",
                                      "pacs:104:PACS", "--stow", "https://vna.example/dicom-web"])
    assert result.exit_code == 1
    assert "not both" in result.output
