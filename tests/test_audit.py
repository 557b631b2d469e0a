"""The audit trail (IHE ATNA): DICOM audit messages (PS3.15 A.5) to a file and to rsyslog.

Every message is validated against the schema of PS3.15 A.5.1 (``audit_message.rng``, the part
ctcovid uses). The Audit Record Repository is Debian's rsyslog with rsyslog-gnutls, run in the
foreground on 127.0.0.1 with a throwaway CA, receiving syslog over TLS (RFC 5425) and writing
each raw message to a file. The listener runs in this process; nothing loads the model.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from lxml import etree
from node_helpers import (
    NODE_AET,
    Orthanc,
    free_port,
    make_test_ca,
    put,
    storescu,
    study_of_instance_in_orthanc,
    wait_for,
)

from ctcovid import audit
from ctcovid.audit import AuditTrail, Participant
from ctcovid.batch.auditing import BatchAudit
from ctcovid.node.auditing import NodeAudit
from ctcovid.node.config import NodeConfig
from ctcovid.node.scp import Listener
from ctcovid.node.store import Store

SCHEMA = Path(__file__).with_name("audit_message.rng")
BOM = "\ufeff"


@pytest.fixture(scope="module")
def schema():
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def check_valid(schema, xml: str):
    doc = etree.fromstring(xml.encode())
    assert schema.validate(doc), f"{schema.error_log}\n{xml}"
    return doc


def event_id(doc) -> str:
    return doc.find("EventIdentification/EventID").get("csd-code")


# -- rsyslog, the Audit Record Repository ---------------------------------------------------------


class Rsyslog:
    """rsyslogd -n with imtcp over TLS (gtls) on 127.0.0.1; every raw message a line of
    ``received``."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("rsyslogd") is None:
            pytest.skip("rsyslogd is not installed (Debian packages rsyslog, rsyslog-gnutls)")
        self.folder = folder
        self.tls = make_test_ca(folder / "tls")
        self.port = free_port()
        self.received = folder / "received.log"
        self.conf = folder / "rsyslog.conf"
        self.pidfile = folder / "rsyslogd.pid"
        work = folder / "work"
        work.mkdir(exist_ok=True)
        self.conf.write_text(
            f'global(workDirectory="{work}" maxMessageSize="64k"\n'
            f'  DefaultNetstreamDriver="gtls"\n'
            f'  DefaultNetstreamDriverCAFile="{self.tls["ca"]}"\n'
            f'  DefaultNetstreamDriverCertFile="{self.tls["cert"]}"\n'
            f'  DefaultNetstreamDriverKeyFile="{self.tls["key"]}")\n'
            'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"\n'
            '  StreamDriver.AuthMode="anon")\n'
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="audit")\n'
            'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            'ruleset(name="audit") {\n'
            f'  action(type="omfile" file="{self.received}" template="raw")\n'
            "}\n"
        )
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"rsyslogd exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(self._listening, 20, "rsyslogd to listen", interval=0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def lines(self) -> list[str]:
        if not self.received.exists():
            return []
        return self.received.read_text(encoding="utf-8").splitlines()

    def messages(self) -> list[tuple[list[str], str]]:
        """(header fields, XML) of every message received: PRI+VERSION, TIMESTAMP, HOSTNAME,
        APP-NAME, PROCID, MSGID, STRUCTURED-DATA."""
        out = []
        for line in self.lines():
            parts = line.split(" ", 7)
            assert len(parts) == 8, line
            header, msg = parts[:7], parts[7]
            assert msg.startswith(BOM), msg[:20]
            out.append((header, msg[len(BOM) :]))
        return out


@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rsyslog]:
    server = Rsyslog(tmp_path_factory.mktemp("rsyslog"))
    yield server
    server.stop()


def wait_messages(server: Rsyslog, predicate, what: str, timeout: float = 20):
    def found():
        matches = [(h, x) for h, x in server.messages() if predicate(h, x)]
        return matches or None

    return wait_for(found, timeout, what, interval=0.1)


# -- the messages alone ---------------------------------------------------------------------------


def test_every_kind_of_message_is_valid_against_the_schema(schema, tmp_path: Path) -> None:
    me = Participant("CTCOVID", role=audit.ROLE_APPLICATION, address="node1")
    peer = Participant("MODALITY", requestor=True, address="10.0.0.7")
    messages = [
        audit.application_activity_message(me, "CTCOVID", started=True, user="ctcovid"),
        audit.application_activity_message(me, "CTCOVID", started=False),
        audit.security_alert_message(
            me, "CTCOVID", kind=audit.NODE_AUTHENTICATION, description="tls failed", peer=peer
        ),
        audit.security_alert_message(
            me,
            "CTCOVID",
            kind=audit.SECURITY_CONFIGURATION,
            description="allow_aet changed",
            outcome=audit.SUCCESS,
        ),
        audit.transfer_message(
            audit.BEGIN_TRANSFERRING,
            source=peer,
            destination=me,
            source_id="x",
            study_uid="1.2.3",
            patient_id="",
            sop_classes={},
            action="E",
        ),
        audit.transfer_message(
            audit.INSTANCES_TRANSFERRED,
            source=peer,
            destination=me,
            source_id="x",
            study_uid="1.2.3",
            patient_id='P\x00<&>"',
            sop_classes={"1.2.840.10008.5.1.4.1.1.2": 3},
            action="C",
            outcome=audit.MINOR_FAILURE,
            description="aborted",
        ),
        audit.query_message(
            me,
            peer,
            "x",
            query=b"\x08\x00\x52\x00",
            object_id="1.2.840.10008.5.1.4.1.2.2.1",
            transfer_syntax="1.2.840.10008.1.2.1",
        ),
        audit.query_message(
            me,
            peer,
            "x",
            query=b"StudyDate=20200101",
            object_id="https://vna/dicom-web/studies",
            id_type=audit.ID_URI,
        ),
        *(
            audit.oru_sent_message(
                me=me,
                ris="mllp+tls://ris.example.org:2575",
                source_id="x",
                study_uid="1.2.3",
                patient_id="P1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                failure=failure,
            )
            for failure in (None, "AE: No order for accession")
        ),
        audit.export_message(
            me,
            Participant("/srv/out/results.csv", role=audit.ROLE_DESTINATION_MEDIA),
            "x",
            patients=["P1", "P2"],
            studies=["1.2.3"],
        ),
    ]
    for xml in messages:
        assert "\n" not in xml
        check_valid(schema, xml)
    # A message the schema must refuse: the check is not vacuous.
    broken = messages[0].replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="3"')
    assert not schema.validate(etree.fromstring(broken.encode()))


def test_the_file_sink_appends_one_line_a_message_and_follows_a_rotation(
    schema, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail(source_id="CTCOVID", file=path)
    me = trail.me
    trail.emit(audit.application_activity_message(me, "CTCOVID", started=True))
    wait_for(lambda: path.exists() and path.read_text().count("\n") == 1, 10, "the first line")
    path.rename(tmp_path / "audit.log.1")  # logrotate: rename, the writer goes on
    trail.emit(audit.application_activity_message(me, "CTCOVID", started=False))
    trail.close()
    assert (tmp_path / "audit.log.1").read_text().count("\n") == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    doc = check_valid(schema, lines[0])
    assert doc.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"


def test_a_worker_sr_send_is_audited_through_the_shared_spool(
    schema, rsyslog: Rsyslog, tmp_path: Path, studies_root: Path
) -> None:
    """The worker's trail only writes spool files and the audit file; the node's delivers."""
    sr = sorted((studies_root / "study_000" / "ct").glob("*.dcm"))[0]
    ds = pydicom.dcmread(sr, stop_before_pixels=True)
    config = NodeConfig(
        store=tmp_path / "store",
        peer="127.0.0.1:11113:PACS",
        audit_file=tmp_path / "a.log",
        audit_syslog=rsyslog.endpoint,
        audit_ca=rsyslog.tls["ca"],
    )
    worker = NodeAudit(config, deliver=False)
    worker.sr_sent(sr)
    worker.close()
    assert len(list((tmp_path / "store" / "audit-spool").glob("*.msg"))) == 1
    node = NodeAudit(config, deliver=True)
    try:
        ((_header, xml),) = wait_messages(
            rsyslog,
            lambda h, x: str(ds.StudyInstanceUID) in x and "110104" in x,
            "the SR's Instances Transferred",
        )
    finally:
        node.close()
    doc = check_valid(schema, xml)
    roles = {
        p.find("RoleIDCode").get("csd-code"): p.get("UserID") for p in doc.iter("ActiveParticipant")
    }
    assert roles == {"110153": "CTCOVID", "110152": "PACS"}
    assert doc.find("EventIdentification").get("EventActionCode") == "R"
    assert (tmp_path / "a.log").read_text().count("\n") == 1
    assert not list((tmp_path / "store" / "audit-spool").glob("*.msg"))


def test_a_change_of_settings_between_starts_is_a_security_alert(schema, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    first = NodeConfig(store=tmp_path / "store", audit_file=log, allow_aet=("PACS",))
    changed = dataclasses.replace(first, allow_aet=("PACS", "ROUTER"), retry_seconds=5)
    for config in (first, changed, changed):  # the third start changes nothing
        node_audit = NodeAudit(config, deliver=True)
        node_audit.started()
        node_audit.stopped()
        node_audit.close()
    docs = [check_valid(schema, line) for line in log.read_text().splitlines()]
    kinds = [
        (event_id(d), d.find("EventIdentification/EventTypeCode").get("csd-code")) for d in docs
    ]
    start, stop = ("110100", "110120"), ("110100", "110121")
    assert kinds == [start, stop, start, ("110113", "110129"), stop, start, stop]
    assert docs[3].findtext("EventIdentification/EventOutcomeDescription") == (
        "settings changed since the last start: allow_aet, retry_seconds"
    )


def test_audit_settings_are_read_from_toml_and_bad_ones_name_the_setting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctcovid.cli.main import app
    from ctcovid.errors import ConfigError
    from ctcovid.node.config import load_config

    toml = tmp_path / "node.toml"
    toml.write_text(
        '[node]\nstore = "store"\naudit_file = "logs/audit.log"\n'
        'audit_syslog = "arr.example.org:6514"\naudit_ca = "arr-ca.pem"\n'
    )
    config = load_config(toml, {})
    assert (config.audit_file, config.audit_syslog, config.audit_ca) == (
        tmp_path / "logs" / "audit.log",
        "arr.example.org:6514",
        tmp_path / "arr-ca.pem",
    )
    with pytest.raises(ConfigError, match="audit_syslog must be HOST:PORT"):
        NodeConfig(store=tmp_path, audit_syslog="arr.example.org", audit_ca=tmp_path / "ca")
    with pytest.raises(ConfigError, match="audit_syslog needs audit_ca"):
        NodeConfig(store=tmp_path, audit_syslog="arr.example.org:6514")
    with pytest.raises(ConfigError, match=r"audit_file .*logs/audit\.log: cannot append"):
        NodeAudit(config, deliver=False)  # its folder does not exist
    (tmp_path / "arr-ca.pem").write_text("not a certificate\n")
    (tmp_path / "logs").mkdir()
    with pytest.raises(ConfigError, match=r"audit_ca .*arr-ca\.pem: cannot load it"):
        NodeAudit(config, deliver=False)
    result = CliRunner().invoke(
        app, ["batch", str(tmp_path), "--out", str(tmp_path / "out"), "--audit-syslog", "h:1"]
    )
    assert result.exit_code != 0 and "--audit-syslog needs --audit-ca" in result.output


# -- the node and the batch against rsyslog -----------------------------------------------------


BATCH_AET = "CTBATCH"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, studies_root: Path) -> Iterator[Orthanc]:
    """Orthanc holding study_001 (CT), taking SRs by C-STORE and C-FIND from ``BATCH_AET``."""
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        free_port(),
        extra_config={
            "DicomModalities": {
                "batch": {"AET": BATCH_AET, "Host": "127.0.0.1", "Port": 1, "AllowFind": True}
            },
            "DicomCheckModalityHost": False,
        },
    )
    for path in sorted((studies_root / "study_001" / "ct").glob("*.dcm")):
        server.upload(path)
    yield server
    server.close()


def _classified_series_with_sr(store: Store, folder: Path) -> pydicom.Dataset:
    """A small series in ``store``, classified without a model: its SR built and due to be
    sent, as the worker leaves it. Returns the SR."""
    from test_report import _ct_dataset, _result_for, _write_series

    from ctcovid.report import build_sr

    folder.mkdir()
    series = _write_series(folder, [_ct_dataset(i) for i in range(4)])
    for path in sorted(folder.glob("*.dcm")):
        put(store, path)
    store.jobs.promote_stable(0.0)
    record = store.jobs.claim_next()
    sr = build_sr(_result_for(series), series)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    path = store.files.sr_path(record.series_instance_uid, sr.SOPInstanceUID)
    store.files.write_file(path, buffer.getvalue())
    assert store.finish_classified(
        record,
        revision=1,
        sr_path=path,
        sr_sop_instance_uid=sr.SOPInstanceUID,
        probability_covid=0.9,
        label="covid",
        classify_seconds=1.0,
    )
    return sr


def test_node_and_batch_events_reach_the_repository(
    schema, rsyslog: Rsyslog, orthanc: Orthanc, tmp_path: Path, studies_root: Path
) -> None:
    """storescu sends a study, the worker sends an SR to Orthanc, a disallowed AE is refused and
    a batch run queries Orthanc by C-FIND: each event reaches rsyslog, valid, with no patient
    in any syslog header."""
    from ctcovid.batch.sources import PacsSource
    from ctcovid.net import SeriesRules, StudyQuery
    from ctcovid.net.dimse import DimseArchive
    from ctcovid.net.peers import Peer
    from ctcovid.node.worker import Worker

    files = sorted((studies_root / "study_001" / "ct").glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, patient_id = str(first.StudyInstanceUID), str(first.PatientID)
    patient_name = str(first.PatientName)
    assert patient_name and patient_id
    config = NodeConfig(
        store=tmp_path / "store",
        host="127.0.0.1",
        port=0,
        ae_title=NODE_AET,
        min_free_mb=0,
        allow_aet=("STORESCU",),
        peer=f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}",
        audit_file=tmp_path / "audit.log",
        audit_syslog=rsyslog.endpoint,
        audit_ca=rsyslog.tls["ca"],
    )
    node_audit = NodeAudit(config, deliver=True)
    listener = Listener(config, Store(config.store, min_free_mb=0), audit=node_audit)
    listener.start()
    try:
        node_audit.started()
        # The worker (its own process in a node, its own trail writing the shared spool).
        worker_store = Store(config.store, min_free_mb=0)
        sr = _classified_series_with_sr(worker_store, tmp_path / "series")
        worker_audit = NodeAudit(config, deliver=False)
        worker = Worker(config, worker_store, None, audit=worker_audit)
        try:
            assert worker.send_due()
        finally:
            worker.close()
            worker_store.close()
            worker_audit.close()
        assert study_of_instance_in_orthanc(orthanc, str(sr.SOPInstanceUID))
        # A study received, and an association refused.
        assert storescu(listener.port, files).returncode == 0
        assert storescu(listener.port, files[:1], calling="INTRUDER").returncode != 0
        ((_, sent_xml),) = wait_messages(
            rsyslog,
            lambda h, x: str(sr.StudyInstanceUID) in x and 'csd-code="110104"' in x,
            "Instances Transferred of the SR",
        )
        ((header, xml),) = wait_messages(
            rsyslog,
            lambda h, x: study_uid in x and 'csd-code="110104"' in x,
            "Instances Transferred of the study",
        )
        ((alert_header, alert_xml),) = wait_messages(
            rsyslog,
            lambda h, x: 'csd-code="110113"' in x and "INTRUDER" in x,
            "the Security Alert of the refused association",
        )
    finally:
        listener.stop(drain_seconds=5)
        listener.store.close()
        node_audit.stopped()
        node_audit.close()

    # The SR sent: this node the source, Orthanc the destination; the SR's study and patient.
    sent = check_valid(schema, sent_xml)
    roles = {
        p.find("RoleIDCode").get("csd-code"): (p.get("UserID"), p.get("NetworkAccessPointID"))
        for p in sent.iter("ActiveParticipant")
    }
    assert roles["110152"] == (orthanc.aet, "127.0.0.1") and roles["110153"][0] == NODE_AET
    assert sent.find("EventIdentification").get("EventActionCode") == "R"
    objects = {
        o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID")
        for o in sent.iter("ParticipantObjectIdentification")
    }
    assert objects == {"3": str(sr.StudyInstanceUID), "1": str(sr.PatientID)}
    # The study received: per SOP class the count, the sending AE and its address.
    doc = check_valid(schema, xml)
    assert header[3:6] == ["ctcovid", header[4], "IHE+RFC-3881"]
    assert header[0] == "<85>1"  # authpriv.notice, version 1
    sop = doc.find("ParticipantObjectIdentification/SOPClass")
    assert sop.get("UID") == str(first.SOPClassUID)
    assert sop.get("NumberOfInstances") == str(len(files))
    ids = {
        o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID")
        for o in doc.iter("ParticipantObjectIdentification")
    }
    assert ids == {"3": study_uid, "1": patient_id}
    source = [
        p for p in doc.iter("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110153"
    ]
    assert [(p.get("UserID"), p.get("NetworkAccessPointID")) for p in source] == [
        ("STORESCU", "127.0.0.1")
    ]
    # The refusal.
    alert = check_valid(schema, alert_xml)
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    assert alert.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert alert_header[0] == "<84>1"  # authpriv.warning

    # The batch side: a C-FIND of Orthanc, study then series level.
    out = tmp_path / "batch"
    out.mkdir()
    batch = BatchAudit(out, file=None, syslog=rsyslog.endpoint, ca=rsyslog.tls["ca"])
    try:
        source = PacsSource(
            DimseArchive(
                Peer("127.0.0.1", orthanc.dicom_port, orthanc.aet),
                calling_ae_title=BATCH_AET,
                timeout_seconds=10,
            ),
            StudyQuery.parse([f"PatientID={patient_id}"]),
            SeriesRules(),
            cache_bytes=10**8,
            pause_seconds=0.0,
        )
        source.audit = batch
        assert source.plan(out, resume=False).n_series == 1

        def batch_queries() -> list[str] | None:
            found = [x for _, x in rsyslog.messages() if BATCH_AET in x and "110112" in x]
            return found if len(found) >= 2 else None

        source.close()
        queries = wait_for(batch_queries, 20, "the study and series queries")
    finally:
        batch.close()
    docs = [check_valid(schema, x) for x in queries]
    asked = [
        base64.b64decode(d.find("ParticipantObjectIdentification/ParticipantObjectQuery").text)
        for d in docs
    ]
    assert [(b"STUDY" in q, b"SERIES" in q) for q in asked] == [(True, False), (False, True)]
    assert patient_id.encode() in asked[0] and study_uid.encode() in asked[1]
    assert {d.find("ParticipantObjectIdentification").get("ParticipantObjectID") for d in docs} == {
        "1.2.840.10008.5.1.4.1.2.2.1"
    }
    archive = [
        (p.get("UserID"), p.get("UserIsRequestor")) for p in docs[0].iter("ActiveParticipant")
    ]
    assert archive == [(BATCH_AET, "true"), (orthanc.aet, "false")]

    # Never a patient's name or ID in a syslog header; every message valid.
    everything = rsyslog.messages()
    assert {h[3] for h, _ in everything} == {"ctcovid"}
    for header, xml in everything:
        assert patient_name not in " ".join(header) and patient_id not in " ".join(header)
        check_valid(schema, xml)
    assert patient_name not in (tmp_path / "audit.log").read_text()
    events = [
        event_id(etree.fromstring(line.encode()))
        for line in (tmp_path / "audit.log").read_text().splitlines()
    ]
    assert events[0] == "110100" and events[-1] == "110100"
    assert {"110104", "110113"} <= set(events)


def test_nothing_acceptable_and_a_failed_tls_handshake_are_security_alerts(
    schema, tmp_path: Path
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    log = tmp_path / "audit.log"
    tls = make_test_ca(tmp_path / "tls")
    plain = NodeConfig(
        store=tmp_path / "store",
        host="127.0.0.1",
        port=0,
        ae_title=NODE_AET,
        min_free_mb=0,
        audit_file=log,
    )
    secure = dataclasses.replace(plain, tls_cert=tls["cert"], tls_key=tls["key"])
    for config in (plain, secure):
        node_audit = NodeAudit(config, deliver=True)
        listener = Listener(config, Store(config.store, min_free_mb=0), audit=node_audit)
        listener.start()
        try:
            if config.tls_cert is None:  # an MR sender: nothing it proposes is acceptable
                ae = AE(ae_title="MRSCU")
                ae.add_requested_context(MRImageStorage)
                assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AET)
                if assoc.is_established:
                    assoc.release()
            else:  # a plain-text caller at a TLS port
                with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    sock.settimeout(5)
                    with contextlib.suppress(OSError):
                        sock.recv(100)
            wait_for(lambda: log.exists() and log.read_text(), 10, "the alert")
        finally:
            listener.stop(drain_seconds=2)
            listener.store.close()
            node_audit.close()
    docs = [check_valid(schema, line) for line in log.read_text().splitlines()]
    described = [
        (
            event_id(d),
            d.find("EventIdentification/EventTypeCode").get("csd-code"),
            d.findtext("EventIdentification/EventOutcomeDescription").split(" ")[0],
        )
        for d in docs
    ]
    assert described == [
        ("110113", "110132", "no_acceptable_presentation_context"),
        ("110113", "110126", "tls_handshake_failed"),
    ]
    requestor = [p.get("UserID") for p in docs[0].iter("ActiveParticipant")]
    assert requestor == [NODE_AET, "MRSCU"]


def test_messages_spooled_while_the_repository_is_down_arrive_once_and_in_order(
    schema, tmp_path: Path
) -> None:
    server = Rsyslog(tmp_path / "rsyslog")
    trail = AuditTrail(
        source_id="CTCOVID",
        syslog=server.endpoint,
        ca=server.tls["ca"],
        spool_dir=tmp_path / "spool",
        max_retry_seconds=1.0,
    )
    me = trail.me

    def message(n: int) -> str:
        return audit.security_alert_message(
            me,
            "CTCOVID",
            kind=audit.NETWORK_CONFIGURATION,
            description=f"event-{n:03d}",
            outcome=audit.SUCCESS,
        )

    try:
        trail.emit(message(0))  # the connection is up and idle when the repository stops
        wait_for(lambda: len(server.lines()) == 1, 20, "the first message")
        server.stop()
        for n in range(1, 51):
            trail.emit(message(n))
        wait_for(lambda: len(trail.pending()) == 50, 20, "50 messages in the spool")
        time.sleep(1.0)
        assert len(server.lines()) == 1
        server.start()
        wait_for(
            lambda: not trail.pending() and len(server.lines()) >= 51,
            60,
            "the spool to be delivered",
        )
        time.sleep(1.0)  # anything sent twice would show now
    finally:
        trail.close()
        server.stop()
    received = [x for _, x in server.messages()]
    order = [
        etree.fromstring(x.encode()).findtext("EventIdentification/EventOutcomeDescription")
        for x in received
    ]
    assert order == [f"event-{n:03d}" for n in range(51)]
    check_valid(schema, received[-1])
    assert trail.dropped == 0


def test_a_full_spool_drops_counts_never_blocks_and_reports_the_loss(
    schema, tmp_path: Path
) -> None:
    server = Rsyslog(tmp_path / "rsyslog")
    server.stop()  # unreachable: everything stays in the spool, bounded
    trail = AuditTrail(
        source_id="CTCOVID",
        file=tmp_path / "audit.log",
        syslog=server.endpoint,
        ca=server.tls["ca"],
        spool_dir=tmp_path / "spool",
        max_spool=5,
        max_retry_seconds=1.0,
    )
    start = time.monotonic()
    for n in range(12):
        trail.emit(audit.application_activity_message(trail.me, f"n{n}", started=True))
    # A blocking emit would wait for the stopped repository, for ever; 5 s leaves room for a
    # slow disk's fsyncs (a file line and a spool file per message).
    assert time.monotonic() - start < 5.0
    try:
        wait_for(lambda: trail.dropped == 7, 20, "7 messages dropped")
        assert len(trail.pending()) == 5
        server.start()
        wait_for(lambda: not trail.pending(), 20, "the spool to be delivered")
        # The next message is preceded by a Security Alert about the 7 lost.
        trail.emit(audit.application_activity_message(trail.me, "n12", started=True))
        wait_for(lambda: len(server.lines()) == 7, 20, "the alert and the next message")
    finally:
        trail.close(flush_seconds=2)
        server.stop()
    docs = [check_valid(schema, x) for _, x in server.messages()]
    sources = [d.find("AuditSourceIdentification").get("AuditSourceID") for d in docs]
    assert sources == ["n0", "n1", "n2", "n3", "n4", "CTCOVID", "n12"]
    alert = docs[5]
    assert event_id(alert) == "110113"
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110133"
    assert "7 audit message(s) lost" in alert.findtext(
        "EventIdentification/EventOutcomeDescription"
    )
    # The audit file has every message and the alert.
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 14


def test_a_failed_login_to_the_status_page_is_a_security_alert(schema, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from ctcovid.node.web import WebContext, WebServer
    from ctcovid.node.webauth import hash_password

    auth = tmp_path / "users"
    auth.write_text(f"user alice {hash_password('correct horse')}\n")
    config = NodeConfig(
        store=tmp_path / "store",
        http_port=0,
        min_free_mb=0,
        http_auth_file=auth,
        audit_file=tmp_path / "audit.log",
    )
    node_audit = NodeAudit(config, deliver=True)
    store = Store(config.store, min_free_mb=0)
    server = WebServer(
        WebContext(config=config, store=store, model={}, on_login_failed=node_audit.login_failed)
    )
    server.start()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    wrong = base64.b64encode(b"alice:wrong horse").decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/", headers={"Authorization": f"Basic {wrong}"}
    )
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(request, timeout=10)
    finally:
        server.stop()
        store.close()
        node_audit.close()
    assert refused.value.code == 401
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    doc = check_valid(schema, line)
    assert event_id(doc) == "110113"
    assert doc.find("EventIdentification/EventTypeCode").get("csd-code") == "110132"
    peer = [p for p in doc.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert [(p.get("UserID"), p.get("NetworkAccessPointID")) for p in peer] == [
        ("alice", "127.0.0.1")
    ]
    assert "wrong horse" not in line
