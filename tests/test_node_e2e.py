"""The node as users run it: ``ctcovid listen`` as a process, real PACS peers, kill -9, TLS.

Each node start loads TensorFlow and the model in its worker process, which is the slow part;
the default run starts the node three times.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from lxml import etree
from node_helpers import (
    NODE_AET,
    PACS_AET,
    WORKER_READY_SECONDS,
    NodeProcess,
    Orthanc,
    free_port,
    make_test_ca,
    require_tool,
    storescp,
    storescu,
    wait_for,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, CTImageStorage

from ctcovid.node.jobs import SENT
from ctcovid.node.store import Store

pytestmark = pytest.mark.network

# Worker start plus classification of a 12-slice series on a busy machine.
SR_SECONDS = WORKER_READY_SECONDS + 180


def ct_files(studies_root: Path, study: str) -> list[Path]:
    return sorted(p for p in (studies_root / study / "ct").iterdir() if p.is_file())


def series_states(store_dir: Path) -> dict[str, tuple[str, int]]:
    store = Store(store_dir)
    try:
        return {r.series_instance_uid: (r.state, r.attempts) for r in store.jobs.list_series()}
    finally:
        store.close()


@pytest.fixture
def node_factory(tmp_path: Path, tiny_model_dir: Path) -> Iterator:
    nodes: list[NodeProcess] = []

    def start(store: Path, *args: str) -> NodeProcess:
        node = NodeProcess(store, tiny_model_dir, tmp_path / f"node{len(nodes)}.log",
                           "--port", "0", "--stable-seconds", "2", *args)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.close()


def test_orthanc_sends_a_study_and_gets_the_sr_back_in_the_same_study(
    tmp_path: Path, studies_root: Path, node_factory
):
    require_tool("Orthanc")
    orthanc_dicom_port = free_port()
    audit_log = tmp_path / "audit.log"
    node = node_factory(tmp_path / "store", "--peer", f"127.0.0.1:{orthanc_dicom_port}:ORTHANC",
                        "--audit-file", str(audit_log))
    orthanc = Orthanc(tmp_path / "orthanc", node.port, dicom_port=orthanc_dicom_port)
    try:
        files = ct_files(studies_root, "study_000")
        study_ids = {orthanc.upload(path)["ParentStudy"] for path in files}
        assert len(study_ids) == 1
        (study_id,) = study_ids

        job = orthanc.request("POST", "/modalities/ctcovid/store", study_id.encode())

        assert job is not None  # Orthanc answers once the C-STOREs are done
        sr_series = wait_for(
            lambda: [s for s in orthanc.get(f"/studies/{study_id}/series")
                     if s["MainDicomTags"].get("Modality") == "SR"],
            SR_SECONDS, "the SR to arrive in Orthanc", interval=2.0,
        )
        assert len(sr_series) == 1 and len(sr_series[0]["Instances"]) == 1
        tags = orthanc.get(f"/instances/{sr_series[0]['Instances'][0]}/simplified-tags")
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID
        assert tags["PatientID"] == source.PatientID
        assert tags["SOPClassUID"] == Comprehensive3DSRStorage
        assert str(source.PatientName) not in node.text()  # logs carry UIDs, never names
    finally:
        orthanc.close()
    assert node.terminate() == 0  # SIGTERM: stop accepting, finish, exit 0
    # The worker got the same SIGTERM: its exit is a stop, never a death to alert on.
    assert "event=worker_died" not in node.text() and "worker_restart" not in node.text()
    # The audit trail: start, the study received from Orthanc, the SR sent to it, stop.
    schema = etree.RelaxNG(etree.parse(str(Path(__file__).with_name("audit_message.rng"))))
    lines = audit_log.read_text().splitlines()
    docs = [etree.fromstring(line.encode()) for line in lines]
    assert all(schema.validate(doc) for doc in docs), schema.error_log
    events = [
        (d.find("EventIdentification/EventID").get("csd-code"),
         d.find("EventIdentification").get("EventActionCode"))
        for d in docs
    ]
    assert events == [("110100", "E"), ("110104", "C"), ("110104", "R"), ("110100", "E")]
    assert all(source.StudyInstanceUID in lines[i] and "ORTHANC" in lines[i] for i in (1, 2))
    assert str(source.PatientName) not in audit_log.read_text()


def test_kill_9_after_receive_with_pacs_down_delivers_exactly_one_sr_later(
    tmp_path: Path, studies_root: Path, node_factory
):
    pacs_port = free_port()
    store_dir = tmp_path / "store"
    args = ("--peer", f"127.0.0.1:{pacs_port}:{PACS_AET}", "--retry-seconds", "1",
            "--max-attempts", "30")
    files = ct_files(studies_root, "study_001")
    first = node_factory(store_dir, *args)

    sent = storescu(first.port, files)
    first.kill9()  # right after the last instance, well within stable_seconds

    assert sent.returncode == 0, sent.stderr
    assert Store(store_dir).jobs.count_instances() == len(files)
    second = node_factory(store_dir, *args)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    wait_for(lambda: series_states(store_dir).get(series_uid, ("", 0))[1] >= 1,
             SR_SECONDS, "a first, failed send to the stopped PACS", interval=1.0)
    with storescp(tmp_path / "pacs", pacs_port):
        wait_for(lambda: series_states(store_dir)[series_uid][0] == SENT, 120,
                 "the retried send", interval=0.5)
        time.sleep(3)  # room for a wrong second delivery to show up
    received = list((tmp_path / "pacs").iterdir())

    assert len(received) == 1
    sr = pydicom.dcmread(received[0])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    assert "event=worker_waiting_for_lock" not in second.text()  # no orphaned worker
    assert "event=send_retry" in second.text()
    assert second.terminate() == 0


@pytest.mark.slow
def test_kill_9_after_receive_with_pacs_up_delivers_exactly_one_sr(
    tmp_path: Path, studies_root: Path, node_factory
):
    pacs_port = free_port()
    store_dir = tmp_path / "store"
    files = ct_files(studies_root, "study_002")
    with storescp(tmp_path / "pacs", pacs_port):
        first = node_factory(store_dir, "--peer", f"127.0.0.1:{pacs_port}:{PACS_AET}")
        assert storescu(first.port, files).returncode == 0
        first.kill9()
        second = node_factory(store_dir, "--peer", f"127.0.0.1:{pacs_port}:{PACS_AET}")
        wait_for(lambda: list((tmp_path / "pacs").iterdir()), SR_SECONDS, "the SR")
        time.sleep(5)
        assert len(list((tmp_path / "pacs").iterdir())) == 1
        assert second.terminate() == 0


@pytest.mark.slow
def test_tls_on_both_sides(tmp_path: Path, studies_root: Path, node_factory):
    pki = make_test_ca(tmp_path / "pki")
    received: list[str] = []
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    server_context.load_cert_chain(str(pki["cert"]), str(pki["key"]))
    server_context.verify_mode = ssl.CERT_REQUIRED
    pacs = AE(ae_title=PACS_AET)
    pacs.add_supported_context(Comprehensive3DSRStorage)
    server = pacs.start_server(
        ("127.0.0.1", 0), block=False, ssl_context=server_context,
        evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.dataset.Modality) or 0)],
    )
    try:
        node = node_factory(
            tmp_path / "store", "--peer", f"127.0.0.1:{server.server_address[1]}:{PACS_AET}",
            "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
            "--tls-ca", str(pki["ca"]),
        )
        client_context = ssl.create_default_context(cafile=str(pki["ca"]))
        client_context.load_cert_chain(str(pki["cert"]), str(pki["key"]))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET,
                             tls_args=(client_context, "localhost"))
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(pydicom.dcmread(p)).Status)
                    for p in ct_files(studies_root, "study_003")]
        assoc.release()
        assert set(statuses) == {0}
        wait_for(lambda: received, SR_SECONDS, "the SR over TLS")
        assert received == ["SR"]
        assert node.terminate() == 0
    finally:
        server.shutdown()
