"""Results to the RIS: HL7 v2.5.1 ORU^R01 over MLLP to hl7apy's own MLLP server on loopback,
from the node's worker (real store, tiny model, real SR peer) and from batch."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import ct_files, make_test_ca, put, run_until_idle, wait_for
from typer.testing import CliRunner

from ctcovid.node.config import NodeConfig, Peer
from ctcovid.node.courier import HL7, RIS
from ctcovid.node.jobs import SENT, DeliveryState
from ctcovid.node.store import Store
from ctcovid.node.worker import Worker
from ctcovid.report.oru import message_control_id, parse_oru

pytestmark = pytest.mark.network

ORU_TYPE = "ORU^R01^ORU_R01"
JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"


class Ris:
    """hl7apy's MLLPServer as the RIS: records every message, answers as ``mode`` says
    (``AA``, ``AE`` with ``error_text``, or ``silent``: no answer until ``released``)."""

    def __init__(self, tls: dict[str, Path] | None = None) -> None:
        """``tls`` (``make_test_ca``'s files): MLLP over TLS only, and the sender must show a
        certificate signed by the same CA."""
        from hl7apy.mllp import AbstractHandler, MLLPServer

        ris = self

        class Handler(AbstractHandler):
            def reply(self) -> str:
                return ris.answer(self.incoming_message)

        self.mode = "AA"
        self.error_text = ""
        self.messages: list[str] = []
        self.released = threading.Event()
        self.server = MLLPServer("127.0.0.1", 0, {ORU_TYPE: (Handler,)}, timeout=30)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        if tls is not None:
            from ctcovid.net.tls import server_ssl_context

            context = server_ssl_context(cert=tls["cert"], key=tls["key"], ca=tls["ca"])
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, text: str) -> str:
        from hl7apy.core import Message

        self.messages.append(text)
        if self.mode == "silent":
            self.released.wait(60)
            raise ConnectionAbortedError("the RIS said nothing")  # the server closes
        incoming = parse_oru(text)
        ack = Message("ACK", version="2.5.1")
        ack.msh.msh_3 = "RIS"
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = "ACK" + incoming.msh.msh_10.value[:17]
        ack.msh.msh_11 = "P"
        ack.msh.msh_12 = "2.5.1"
        ack.msa.msa_1 = self.mode
        ack.msa.msa_2 = incoming.msh.msh_10.value
        if self.mode != "AA":
            err = ack.add_segment("ERR")
            err.err_3 = "204^Unknown key identifier^HL70357"
            err.err_4 = "E"
            err.err_8 = self.error_text
        return "\x0b" + ack.to_er7() + "\x1c\x0d"

    def control_ids(self) -> list[str]:
        return [parse_oru(m).msh.msh_10.value for m in self.messages]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ris() -> Iterator[Ris]:
    server = Ris()
    yield server
    server.close()


def make_worker(
    tmp_path: Path, classifier, ris: Ris, peer: Peer | None = None, **settings: Any
) -> Worker:
    config = NodeConfig(
        store=tmp_path / "store",
        peer=peer,
        hl7=ris.address,
        stable_seconds=0,
        retry_seconds=0,
        min_free_mb=0,
        hl7_sending_facility="HOSP",
        hl7_receiving_application="RIS",
        **settings,
    )
    audit = None
    if config.audit_file is not None:
        from ctcovid.node.auditing import NodeAudit

        audit = NodeAudit(config, deliver=False)
    return Worker(config, Store(config.store), classifier, audit=audit)


def the_delivery(worker: Worker):
    (delivery,) = worker.store.jobs.deliveries()
    assert (delivery.destination, delivery.kind) == (RIS, HL7)
    return delivery


def observations(message: Any) -> dict[str, Any]:
    """OBX segments of a parsed ORU by their OBX-3 code."""
    order = message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
    found = {}
    for group in order.ORU_R01_OBSERVATION:
        found[group.obx.obx_3.obx_3_1.value] = group.obx
    return found


def queue_json(store: Path, *args: str) -> dict[str, Any]:
    import json

    from ctcovid.cli.main import app

    result = CliRunner().invoke(app, ["queue", "--store", str(store), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_oru_reaches_the_ris_valid_and_states_the_sr(
    tmp_path: Path, studies_root: Path, classifier, ris: Ris
):
    worker = make_worker(
        tmp_path, classifier, ris, hl7_priority=("covid=S", "non-covid=R", "indeterminate=A")
    )
    files = ct_files(studies_root, "study_000")
    for path in files:
        put(worker.store, path)

    run_until_idle(worker)

    (record,) = worker.store.jobs.list_series()
    delivery = the_delivery(worker)
    assert delivery.state == DeliveryState.SENT
    assert ris.control_ids() == [message_control_id(record.sr_sop_instance_uid)]
    message = parse_oru(ris.messages[0])  # strict 2.5.1 validation
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    msh = message.msh
    assert (msh.msh_4.value, msh.msh_5.value, msh.msh_9.value, msh.msh_12.value) == (
        "HOSP",
        "RIS",
        ORU_TYPE,
        "2.5.1",
    )
    assert msh.msh_18.value == ""  # an ASCII-only message declares no character set
    pid = message.ORU_R01_PATIENT_RESULT.ORU_R01_PATIENT.pid
    assert pid.pid_3.cx_1.value == source.PatientID
    assert pid.pid_5.xpn_1.value == str(source.PatientName).split("^")[0]
    assert pid.pid_7.value == source.PatientBirthDate
    order = message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
    assert order.obr.obr_4.value == "24627-2^CT Chest^LN"
    assert order.obr.obr_25.value == "P"
    assert order.obr.obr_18.value == source.AccessionNumber
    priority = {"covid": "S", "non-covid": "R", "indeterminate": "A"}[record.label]
    assert order.orc.orc_7.tq_6.value == order.obr.obr_27.tq_6.value == priority
    obx = observations(message)
    evaluation = {"covid": "52101004", "non-covid": "272519000", "indeterminate": "82334004"}
    assert obx["840539006"].obx_2.value == "CWE"
    assert obx["840539006"].obx_5.value.split("^")[0] == evaluation[record.label]
    assert obx["840539006"].obx_8.value == ("A" if record.label == "covid" else "")
    assert obx["122157"].obx_2.value == "NM"
    assert float(obx["122157"].obx_5.value) == pytest.approx(record.probability_covid)
    assert float(obx["threshold"].obx_5.value) == classifier.artifact.threshold
    assert obx["111001"].obx_5.value == classifier.artifact.info.name
    assert obx["110180"].obx_5.value == source.StudyInstanceUID
    assert obx["sr_uid"].obx_5.value == record.sr_sop_instance_uid
    assert {o.obx_11.value for o in obx.values()} == {"P"}
    # ctcovid queue --json shows the delivery beside the series' job.
    (series,) = queue_json(worker.store.root)["series"]
    assert [(d["destination"], d["state"]) for d in series["deliveries"]] == [(RIS, "sent")]


def test_a_refused_oru_fails_with_the_ris_text_until_queue_retry(
    tmp_path: Path, studies_root: Path, classifier, ris: Ris
):
    ris.mode, ris.error_text = "AE", "No order for accession ACC-42"
    worker = make_worker(tmp_path, classifier, ris, audit_file=tmp_path / "audit.log")
    for path in ct_files(studies_root, "study_001"):
        put(worker.store, path)

    run_until_idle(worker)
    worker.step()  # nothing resends a refusal by itself

    delivery = the_delivery(worker)
    assert delivery.state == DeliveryState.FAILED
    assert "AE" in delivery.reason and "No order for accession ACC-42" in delivery.reason
    assert len(ris.messages) == 1
    (series,) = queue_json(worker.store.root)["series"]
    assert series["deliveries"][0]["state"] == "failed"

    ris.mode = "AA"
    out = queue_json(worker.store.root, "--retry", delivery.series_instance_uid)
    assert out["requeued"] == [delivery.series_instance_uid]
    run_until_idle(worker)

    assert the_delivery(worker).state == DeliveryState.SENT
    assert ris.control_ids() == [delivery.message_id] * 2  # the same message, sent again
    # Audited as Export (the ORU carries patient data out): the refusal, then the delivery.
    worker.audit.close()
    refused, sent = (tmp_path / "audit.log").read_text().splitlines()
    for line, outcome in ((refused, "8"), (sent, "0")):
        assert 'csd-code="110106"' in line and f'EventOutcomeIndicator="{outcome}"' in line
        assert f'UserID="mllp://{ris.address}"' in line
        assert delivery.study_instance_uid in line
    assert "No order for accession ACC-42" in refused


def test_a_silent_ris_is_retried_and_never_holds_up_the_sr(
    tmp_path: Path, studies_root: Path, classifier, ris: Ris, pacs
):
    peer, received = pacs
    ris.mode = "silent"
    worker = make_worker(
        tmp_path, classifier, ris, peer, network_timeout_seconds=1.0, send_deadline_seconds=2.0
    )
    for path in ct_files(studies_root, "study_002"):
        put(worker.store, path)

    worker.step()  # classifies, sends the SR, then tries the ORU once

    (record,) = worker.store.jobs.list_series()
    assert record.state == SENT and len(received) == 1
    delivery = the_delivery(worker)
    assert delivery.state == DeliveryState.PENDING
    assert delivery.attempts == 1 and "acknowledge" in delivery.reason

    ris.mode = "AA"
    ris.released.set()
    wait_for(lambda: the_delivery(worker).next_try <= time.time(), 10, "the backoff to pass")
    run_until_idle(worker)

    assert the_delivery(worker).state == DeliveryState.SENT
    assert ris.control_ids() == [delivery.message_id] * 2
    assert len(received) == 1


_SEND_DUE = """
import sys
from ctcovid.node.config import NodeConfig
from ctcovid.node.courier import Hl7Courier
from ctcovid.node.store import Store
config = NodeConfig(store=sys.argv[1], hl7=sys.argv[2], min_free_mb=0)
Hl7Courier(config, Store(config.store)).send_due()
"""


def test_kill_9_between_send_and_ack_repeats_the_same_message_at_most_once(
    tmp_path: Path, studies_root: Path, classifier, ris: Ris
):
    worker = make_worker(tmp_path, classifier, ris)
    for path in ct_files(studies_root, "study_003"):
        put(worker.store, path)
    worker.step(send=False)  # classified; its ORU queued
    assert the_delivery(worker).state == DeliveryState.PENDING

    ris.mode = "silent"
    sender = subprocess.Popen(
        [sys.executable, "-c", _SEND_DUE, str(worker.store.root), ris.address],
        env=dict(os.environ),
        start_new_session=True,
    )
    try:
        wait_for(lambda: ris.messages, 60, "the ORU to reach the RIS")
        os.kill(sender.pid, signal.SIGKILL)
        sender.wait(30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(30)
    assert the_delivery(worker).state == DeliveryState.PENDING  # no ACK: not delivered

    ris.mode = "AA"
    ris.released.set()
    run_until_idle(worker)
    run_until_idle(worker)

    delivery = the_delivery(worker)
    assert delivery.state == DeliveryState.SENT
    assert ris.control_ids() == [delivery.message_id] * 2  # at most twice, one result
    assert ris.messages[0] == ris.messages[1]


def test_a_revision_sends_a_corrected_oru(
    tmp_path: Path, studies_root: Path, classifier, ris: Ris, pacs
):
    peer, received = pacs
    worker = make_worker(tmp_path, classifier, ris, peer)
    files = ct_files(studies_root, "study_001")
    for path in files[:-1]:
        put(worker.store, path)
    run_until_idle(worker)
    put(worker.store, files[-1])
    run_until_idle(worker)

    assert len(received) == 2  # the SR and its revision
    first, corrected = (parse_oru(m) for m in ris.messages)
    statuses = [
        m.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION.obr.obr_25.value
        for m in (first, corrected)
    ]
    assert statuses == ["P", "C"]
    assert [observations(m)["sr_uid"].obx_5.value for m in (first, corrected)] == [
        str(sr.SOPInstanceUID) for sr in received
    ]
    assert first.msh.msh_10.value != corrected.msh.msh_10.value
    assert the_delivery(worker).sent_count == 2


def test_a_japanese_patient_name_arrives_intact_in_utf8(
    tmp_path: Path, studies_root: Path, classifier, ris: Ris
):
    worker = make_worker(tmp_path, classifier, ris)
    folder = tmp_path / "ct"
    folder.mkdir()
    for path in ct_files(studies_root, "study_000"):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = JAPANESE_NAME
        ds.save_as(folder / path.name)
        put(worker.store, folder / path.name)
    # The source really is encoded in ISO 2022 IR 87 (JIS X 0208 behind escape sequences).
    raw = (folder / path.name).read_bytes()
    assert b"\x1b$B" in raw and "山田".encode() not in raw

    run_until_idle(worker)

    assert the_delivery(worker).state == DeliveryState.SENT
    message = parse_oru(ris.messages[0])
    assert message.msh.msh_18.value == "UNICODE UTF-8"
    names = message.ORU_R01_PATIENT_RESULT.ORU_R01_PATIENT.pid.pid_5
    assert [(n.xpn_1.value, n.xpn_2.value, n.xpn_8.value) for n in names] == [
        ("Yamada", "Tarou", "A"),
        ("山田", "太郎", "I"),
        ("やまだ", "たろう", "P"),
    ]


def test_batch_sends_one_oru_per_series_fails_a_refusal_and_resumes(
    tmp_path: Path, studies_root: Path, tiny_model_dir: Path, classifier, ris: Ris
):
    import shutil

    from ctcovid.batch.job import run_batch
    from ctcovid.batch.options import BatchOptions
    from ctcovid.net.mllp import Endpoint, Hl7Settings, MllpSettings
    from ctcovid.report.oru import OruSettings

    archive = tmp_path / "archive"
    for study in ("study_000", "study_001"):
        shutil.copytree(studies_root / study / "ct", archive / study)
    destination = Hl7Settings(
        MllpSettings(Endpoint.parse(ris.address), timeout_seconds=5), OruSettings()
    )

    def run(resume: bool) -> dict[str, Any]:
        options = BatchOptions(
            archive,
            tmp_path / "out",
            tiny_model_dir,
            workers=0,
            resume=resume,
            destinations=(destination,),
            audit_file=tmp_path / "audit.log",
        )
        return run_batch(options, classifier=classifier)["sent"][str(destination)]

    ris.mode, ris.error_text = "AE", "Unknown patient"
    refused = run(resume=False)
    assert (refused["sent"], refused["failed"]) == (0, 2)
    assert all("Unknown patient" in e for e in refused["errors"])
    assert len(ris.messages) == 2  # a refusal is not retried within the run

    ris.mode = "AA"
    resumed = run(resume=True)
    assert (resumed["sent"], resumed["failed"]) == (2, 0)
    assert sorted(ris.control_ids()[2:]) == sorted(ris.control_ids()[:2])  # the same messages
    # Each ORU audited as an Export naming the RIS: two refused, then two delivered.
    exports = [
        line
        for line in (tmp_path / "audit.log").read_text().splitlines()
        if 'csd-code="110106"' in line and f'UserID="mllp://{ris.address}"' in line
    ]
    outcomes = [line.split('EventOutcomeIndicator="')[1][0] for line in exports]
    assert outcomes == ["8", "8", "0", "0"]
    for text in ris.messages[2:]:
        order = parse_oru(text).ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
        assert order.obr.obr_25.value == "P"

    run(resume=True)
    assert len(ris.messages) == 4  # every result delivered: nothing sent again


def test_an_acknowledgement_beyond_the_read_limit_is_an_error():
    """A receiver that answers without end is cut off at ``max_ack_bytes``, not read into
    memory without bound."""
    import socket

    from ctcovid.errors import PacsError
    from ctcovid.net.mllp import Endpoint, MllpSettings, send_message

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sent = threading.Event()

    def flood() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            with contextlib.suppress(OSError):  # the client hangs up, as it should
                conn.sendall(b"\x0bMSH|^~\\&|RIS" + b"x" * 1_000_000)
            sent.set()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    settings = MllpSettings(
        Endpoint("127.0.0.1", listener.getsockname()[1]), timeout_seconds=10, max_ack_bytes=4096
    )
    try:
        with pytest.raises(PacsError, match="exceeds 4096 bytes"):
            send_message(b"MSH|^~\\&|CTCOVID\r", "X1", settings)
    finally:
        thread.join(15)
        listener.close()
    assert sent.is_set()


def test_an_oru_over_tls_reaches_a_ris_that_requires_it(
    tmp_path: Path, studies_root: Path, classifier
):
    """hl7_tls: the ORU goes over TLS, the RIS's certificate verified against tls_ca and the
    node's certificate shown (this RIS refuses a sender without one)."""
    ca = make_test_ca(tmp_path / "ca")
    ris = Ris(tls=ca)
    try:
        worker = make_worker(
            tmp_path,
            classifier,
            ris,
            hl7_tls=True,
            tls_cert=ca["cert"],
            tls_key=ca["key"],
            tls_ca=ca["ca"],
        )
        assert str(worker.config.hl7_settings()).startswith("mllp+tls ")
        for path in ct_files(studies_root, "study_000"):
            put(worker.store, path)
        run_until_idle(worker)
        (record,) = worker.store.jobs.list_series()
        assert the_delivery(worker).state == DeliveryState.SENT
        assert ris.control_ids() == [message_control_id(record.sr_sop_instance_uid)]
    finally:
        ris.close()


def test_mllp_tls_refuses_a_ris_it_cannot_verify_and_plain_tcp_gets_no_ack(tmp_path: Path):
    """Against a TLS RIS: without its CA the handshake fails and says why (a send that may pass,
    retried); a plain-TCP sender gets no acknowledgement. Neither delivers anything."""
    from ctcovid.errors import PacsError
    from ctcovid.net.mllp import Endpoint, Hl7Refused, MllpSettings, send_message

    ca = make_test_ca(tmp_path / "ca")
    ris = Ris(tls=ca)
    try:
        endpoint = Endpoint("127.0.0.1", ris.port)
        unknown_ca = MllpSettings(endpoint, timeout_seconds=10, tls=True)  # the system's CAs
        with pytest.raises(PacsError, match=r"TLS handshake failed.*CERTIFICATE_VERIFY_FAILED"):
            send_message(b"MSH|^~\\&|CTCOVID\r", "X1", unknown_ca)
        plain = MllpSettings(endpoint, timeout_seconds=10)
        with pytest.raises(PacsError) as raised:
            send_message(b"MSH|^~\\&|CTCOVID\r", "X2", plain)
        assert not isinstance(raised.value, Hl7Refused)
        assert ris.messages == []
    finally:
        ris.close()


def test_hl7_tls_settings_are_checked_at_start(tmp_path: Path):
    from ctcovid.errors import ConfigError

    with pytest.raises(ConfigError, match="hl7_tls needs hl7"):
        NodeConfig(store=tmp_path / "store", hl7_tls=True)
    config = NodeConfig(
        store=tmp_path / "store",
        destination={
            "ris2": {
                "kind": "hl7",
                "address": "127.0.0.1:2575",
                "tls": True,
                "tls_ca": str(tmp_path / "ca.pem"),
            }
        },
    )
    (named,) = config.destinations
    assert (named.settings.tls, named.settings.tls_ca) == (True, tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=r"ca\.pem"):  # a CA that cannot be read stops the start
        named.settings.ssl_context()
    result = CliRunner().invoke(
        __import__("ctcovid.cli.main", fromlist=["app"]).app,
        ["batch", str(tmp_path), "--out", str(tmp_path / "out"), "--hl7-tls"],
    )
    assert result.exit_code != 0 and "--hl7-tls needs --hl7" in result.output
