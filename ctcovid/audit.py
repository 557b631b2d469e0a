"""The audit trail (IHE ATNA): DICOM audit messages (PS3.15 A.5) to a file and a syslog server.

A message is built by one of the ``*_message`` functions (Application Activity, Security Alert,
Begin Transferring, Instances Transferred, Query, Export) and handed to
:meth:`AuditTrail.emit`, which never blocks: it puts the message in a bounded queue that a
writer thread of the trail empties.

Sinks:

- ``audit_file``: one XML message per line, appended under an exclusive ``flock`` and fsynced.
  The file is opened again for every message, so a log rotation (rename, then a new file) takes
  effect at the next message and nothing is written to the rotated file after it.
- ``audit_syslog`` (``HOST:PORT``, with ``audit_ca``): RFC 5424 messages over TLS with
  octet-counting framing (RFC 5425), APP-NAME ``ctcovid``, MSGID ``IHE+RFC-3881``, facility
  authpriv (10), severity notice (5) or warning (4) for a failure. The header carries only the
  time, host name, application and process id: never a patient's name or identifier.
  Each message is first written to a spool folder (one file per message, written whole and
  renamed, named by creation time, process id and sequence) and deleted once sent, so that
  while the Audit Record Repository is unreachable messages wait on disk and are delivered in
  order when it is back. Before each message the connection is checked for a close by the
  repository (a stopped rsyslog), so that a message is not written into a dead connection.
  The spool is bounded (``max_spool`` files): past it new messages are dropped, counted and
  logged (they still go to ``audit_file``); once the spool has room again, a Security Alert
  (Audit Recording Stopped) saying how many were lost goes first.

Several processes may write one spool (the node's listener and its worker): only one of them,
``deliver=True``, runs the sender thread, which sends every process's files in name order
(creation time, then process id and sequence). The others only write files.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import itertools
import logging
import os
import queue
import re
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ctcovid.errors import ConfigError
from ctcovid.fsio import write_atomic

logger = logging.getLogger(__name__)

Code = tuple[str, str, str]  # (code, code system name, meaning)

# Event IDs (PS3.15 A.5.3, PS3.16 CID 400).
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
BEGIN_TRANSFERRING: Code = ("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
EXPORT: Code = ("110106", "DCM", "Export")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
# Event type codes (CID 401, 403).
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
NETWORK_CONFIGURATION: Code = ("110128", "DCM", "Network Configuration")
SECURITY_CONFIGURATION: Code = ("110129", "DCM", "Security Configuration")
USE_OF_RESTRICTED_FUNCTION: Code = ("110132", "DCM", "Use of Restricted Function")
AUDIT_RECORDING_STOPPED: Code = ("110133", "DCM", "Audit Recording Stopped")
# Active participant roles (CID 402).
ROLE_APPLICATION: Code = ("110150", "DCM", "Application")
ROLE_APPLICATION_LAUNCHER: Code = ("110151", "DCM", "Application Launcher")
ROLE_DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Code = ("110153", "DCM", "Source Role ID")
ROLE_DESTINATION_MEDIA: Code = ("110154", "DCM", "Destination Media")
# Participant object ID types (RFC 3881 5.5.4, CID 404).
ID_PATIENT: Code = ("2", "RFC-3881", "Patient Number")
ID_URI: Code = ("12", "RFC-3881", "URI")
ID_STUDY: Code = ("110180", "DCM", "Study Instance UID")
ID_SOP_CLASS: Code = ("110181", "DCM", "SOP Class UID")
ID_NODE: Code = ("110182", "DCM", "Node ID")

# EventOutcomeIndicator.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"

# NetworkAccessPointTypeCode: 1 machine name, 2 IP address, 5 URI.
_IP = re.compile(r"^[0-9.]+$|:")

APP_NAME = "ctcovid"
MSGID = "IHE+RFC-3881"
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5
DEFAULT_MAX_SPOOL = 10_000
QUEUE_SIZE = 10_000
CONNECT_TIMEOUT_SECONDS = 5.0
MAX_RETRY_SECONDS = 30.0
SPOOL_SUFFIX = ".msg"

# Characters XML 1.0 cannot carry; a received value may hold any of them.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(value: object) -> str:
    return _NOT_XML.sub("?", str(value))


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process, a peer (AE title and address), a file."""

    user_id: str
    requestor: bool = False
    role: Code | None = None
    address: str | None = None  # a host name, an IP address or a URI
    alternative_user_id: str | None = None
    user_name: str | None = None


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a patient, a study, a query, a node, a file."""

    object_id: str
    id_type: Code
    type_code: str  # 1 person, 2 system object, 3 organization, 4 other
    role: str  # 1 patient, 3 report, 13 security resource, 24 query ...
    name: str | None = None
    query: bytes | None = None
    details: tuple[tuple[str, bytes], ...] = ()
    description: str | None = None
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    life_cycle: str | None = None


def patient(patient_id: str) -> ParticipantObject:
    """A patient by ID (never by name)."""
    return ParticipantObject(patient_id or "(none)", ID_PATIENT, "1", "1")


def study(uid: str, sop_classes: Mapping[str, int] | None = None) -> ParticipantObject:
    """A study, with the number of instances of each SOP class transferred."""
    return ParticipantObject(uid, ID_STUDY, "2", "3", sop_classes=dict(sop_classes or {}))


def _set_code(element: ET.Element, code: Code) -> None:
    element.set("csd-code", code[0])
    element.set("codeSystemName", code[1])
    element.set("originalText", code[2])


def build_message(
    event: Code,
    *,
    action: str,
    outcome: str = SUCCESS,
    event_types: Iterable[Code] = (),
    outcome_description: str | None = None,
    participants: Iterable[Participant],
    source_id: str,
    objects: Iterable[ParticipantObject] = (),
    when: datetime | None = None,
) -> str:
    """One ``AuditMessage`` (PS3.15 A.5.1) as a single line of XML."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification")
    ident.set("EventActionCode", action)
    stamp = (when or datetime.now(UTC)).isoformat(timespec="milliseconds")
    ident.set("EventDateTime", stamp)
    ident.set("EventOutcomeIndicator", outcome)
    _set_code(ET.SubElement(ident, "EventID"), event)
    for code in event_types:
        _set_code(ET.SubElement(ident, "EventTypeCode"), code)
    if outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _clean(outcome_description)
    for p in participants:
        el = ET.SubElement(root, "ActiveParticipant")
        el.set("UserID", _clean(p.user_id))
        if p.alternative_user_id:
            el.set("AlternativeUserID", _clean(p.alternative_user_id))
        if p.user_name:
            el.set("UserName", _clean(p.user_name))
        el.set("UserIsRequestor", "true" if p.requestor else "false")
        if p.address:
            host = p.address
            kind = (
                "5" if "://" in host or host.startswith("/") else "2" if _IP.search(host) else "1"
            )
            el.set("NetworkAccessPointID", _clean(host))
            el.set("NetworkAccessPointTypeCode", kind)
        if p.role is not None:
            _set_code(ET.SubElement(el, "RoleIDCode"), p.role)
    source = ET.SubElement(root, "AuditSourceIdentification")
    source.set("AuditSourceID", _clean(source_id))
    for o in objects:
        el = ET.SubElement(root, "ParticipantObjectIdentification")
        el.set("ParticipantObjectID", _clean(o.object_id))
        el.set("ParticipantObjectTypeCode", o.type_code)
        el.set("ParticipantObjectTypeCodeRole", o.role)
        if o.life_cycle:
            el.set("ParticipantObjectDataLifeCycle", o.life_cycle)
        _set_code(ET.SubElement(el, "ParticipantObjectIDTypeCode"), o.id_type)
        if o.name is not None:
            ET.SubElement(el, "ParticipantObjectName").text = _clean(o.name)
        elif o.query is not None:
            ET.SubElement(el, "ParticipantObjectQuery").text = base64.b64encode(o.query).decode()
        for kind, value in o.details:
            detail = ET.SubElement(el, "ParticipantObjectDetail")
            detail.set("type", kind)
            detail.set("value", base64.b64encode(value).decode())
        if o.description:
            ET.SubElement(el, "ParticipantObjectDescription").text = _clean(o.description)
        for uid, count in sorted(o.sop_classes.items()):
            sop = ET.SubElement(el, "SOPClass")
            sop.set("UID", _clean(uid))
            sop.set("NumberOfInstances", str(int(count)))
    return ET.tostring(root, encoding="unicode")


# -- the messages ctcovid emits -------------------------------------------------------------------


def application_activity_message(
    me: Participant, source_id: str, *, started: bool, user: str | None = None
) -> str:
    """Application Activity: the node (or a batch run) started or stopped."""
    participants = [me]
    if user:
        participants.append(Participant(user, requestor=True, role=ROLE_APPLICATION_LAUNCHER))
    return build_message(
        APPLICATION_ACTIVITY,
        action="E",
        event_types=[APPLICATION_START if started else APPLICATION_STOP],
        participants=participants,
        source_id=source_id,
    )


def security_alert_message(
    me: Participant,
    source_id: str,
    *,
    kind: Code,
    description: str,
    peer: Participant | None = None,
    outcome: str = MINOR_FAILURE,
    alerting_node: str | None = None,
) -> str:
    """Security Alert: an association or connection refused, a TLS failure, settings changed.

    ``outcome`` MINOR_FAILURE: refused, the refusal mitigated it; SUCCESS: informative (a change
    of settings). The participant object is the node the alert concerns.
    """
    participants = [me] if peer is None else [me, peer]
    return build_message(
        SECURITY_ALERT,
        action="E",
        outcome=outcome,
        event_types=[kind],
        outcome_description=description,
        participants=participants,
        source_id=source_id,
        objects=[
            ParticipantObject(
                alerting_node or me.user_id, ID_NODE, "2", "13", description=description
            )
        ],
    )


def transfer_message(
    event: Code,
    *,
    source: Participant,
    destination: Participant,
    source_id: str,
    study_uid: str,
    patient_id: str,
    sop_classes: Mapping[str, int],
    action: str,
    outcome: str = SUCCESS,
    description: str | None = None,
    others: Iterable[Participant] = (),
) -> str:
    """Begin Transferring / DICOM Instances Transferred: one study of one patient."""
    return build_message(
        event,
        action=action,
        outcome=outcome,
        outcome_description=description,
        participants=[source, destination, *others],
        source_id=source_id,
        objects=[study(study_uid, sop_classes), patient(patient_id)],
    )


def sr_sent_message(
    *,
    source: Participant,
    source_id: str,
    peer: tuple[str, str] | None,
    url: str | None,
    study_uid: str,
    patient_id: str,
    sop_class_uid: str,
    failure: str | None = None,
) -> str:
    """Instances Transferred: one SR sent to ``peer`` (AE title, host: C-STORE) or ``url``
    (STOW-RS), or given up on (``failure``: why)."""
    if peer is not None:
        destination = Participant(peer[0], False, ROLE_DESTINATION, peer[1])
    else:
        destination = Participant(str(url), False, ROLE_DESTINATION, url)
    return transfer_message(
        INSTANCES_TRANSFERRED,
        source=source,
        destination=destination,
        source_id=source_id,
        study_uid=study_uid,
        patient_id=patient_id,
        sop_classes={sop_class_uid: 1},
        action="R",
        outcome=SERIOUS_FAILURE if failure else SUCCESS,
        description=failure,
    )


def oru_sent_message(
    *,
    me: Participant,
    ris: str,
    source_id: str,
    study_uid: str,
    patient_id: str,
    sop_class_uid: str,
    failure: str | None = None,
) -> str:
    """Export: a result sent to the RIS as an HL7 ORU^R01 (``ris``: its ``mllp://`` or
    ``mllp+tls://`` address), or given up on (``failure``: why).

    Not Instances Transferred: no DICOM instance moves, but the message carries the patient's
    name, ID, birth date and result out of the node, which is what Export records (PS3.15
    A.5.3.6). The study's object lists the SR the ORU reports.
    """
    return build_message(
        EXPORT,
        action="R",
        outcome=SERIOUS_FAILURE if failure else SUCCESS,
        outcome_description=failure,
        participants=[me, Participant(ris, False, ROLE_DESTINATION_MEDIA, ris)],
        source_id=source_id,
        objects=[study(study_uid, {sop_class_uid: 1}), patient(patient_id)],
    )


def query_message(
    me: Participant,
    archive: Participant,
    source_id: str,
    *,
    query: bytes,
    object_id: str,
    id_type: Code = ID_SOP_CLASS,
    transfer_syntax: str | None = None,
    outcome: str = SUCCESS,
    description: str | None = None,
) -> str:
    """Query: a C-FIND (``object_id`` its SOP class, ``query`` the identifier as encoded) or a
    QIDO-RS search (``object_id`` its URL, ``query`` its query string)."""
    details: tuple[tuple[str, bytes], ...] = ()
    if transfer_syntax:
        details = (("TransferSyntax", transfer_syntax.encode()),)
    return build_message(
        QUERY,
        action="E",
        outcome=outcome,
        outcome_description=description,
        participants=[me, archive],
        source_id=source_id,
        objects=[ParticipantObject(object_id, id_type, "2", "3", query=query, details=details)],
    )


def export_message(
    me: Participant,
    media: Participant,
    source_id: str,
    *,
    patients: Iterable[str],
    studies: Iterable[str] = (),
) -> str:
    """Export: results that identify patients written to a file (``media``)."""
    objects = [study(uid) for uid in sorted(set(studies))]
    objects += [patient(pid) for pid in sorted(set(patients))]
    return build_message(
        EXPORT,
        action="R",
        participants=[me, media],
        source_id=source_id,
        objects=objects,
    )


# -- RFC 5424 / 5425 ----------------------------------------------------------------------------


def _header_token(value: str, limit: int) -> str:
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def syslog_frame(xml: str, *, host: str, pid: int, when: datetime, failure: bool) -> bytes:
    """The RFC 5424 message (no framing): header, no structured data, BOM and the XML."""
    pri = FACILITY_AUTHPRIV * 8 + (SEVERITY_WARNING if failure else SEVERITY_NOTICE)
    stamp = when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = (f"<{pri}>1 {stamp} {_header_token(host, 255)} {APP_NAME} {pid} {MSGID} - ").encode(
        "ascii"
    )
    return header + b"\xef\xbb\xbf" + xml.encode("utf-8")


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) of the Audit Record Repository."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"audit_syslog must be HOST:PORT. Received: {text!r}.")
    return host, int(port)


class _Connection:
    """One TLS connection to the repository; :meth:`send` raises OSError when it fails."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.context = host, port, context
        self.sock: ssl.SSLSocket | None = None

    def _closed_by_peer(self) -> bool:
        """A repository never sends data: a readable socket means it closed (or broke)."""
        assert self.sock is not None
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable and not self.sock.pending():
                return False
            self.sock.setblocking(False)
            try:
                return self.sock.recv(1) == b""
            finally:
                self.sock.setblocking(True)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except (OSError, ValueError):
            return True

    def send(self, frame: bytes) -> None:
        if self.sock is not None and self._closed_by_peer():
            self.close()
        if self.sock is None:
            raw = socket.create_connection((self.host, self.port), CONNECT_TIMEOUT_SECONDS)
            try:
                self.sock = self.context.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        self.sock.settimeout(CONNECT_TIMEOUT_SECONDS)
        try:
            self.sock.sendall(str(len(frame)).encode("ascii") + b" " + frame)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            sock, self.sock = self.sock, None
            with contextlib.suppress(OSError, ValueError):
                sock.close()


def _spooled(name: str) -> bool:
    """A spooled message (a temporary file of :func:`write_atomic` starts with a dot)."""
    return name.endswith(SPOOL_SUFFIX) and not name.startswith(".")


def append_line(path: Path, line: str) -> None:
    """Append one line to ``path`` durably, under an exclusive lock (other processes write
    it too); opened for each line, so that a rotated file is left alone."""
    data = (line.replace("\n", " ") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditTrail:
    """Where this process's audit messages go; :meth:`emit` never blocks.

    ``spool_dir`` is required with ``syslog``. ``source_id`` is the AuditSourceID (the node's
    AE title, or ``ctcovid batch``); ``me`` the ActiveParticipant of this application.
    """

    def __init__(
        self,
        *,
        source_id: str,
        file: Path | None = None,
        syslog: str | None = None,
        ca: Path | None = None,
        spool_dir: Path | None = None,
        deliver: bool = True,
        max_spool: int = DEFAULT_MAX_SPOOL,
        max_retry_seconds: float = MAX_RETRY_SECONDS,
        app_user_id: str | None = None,
    ) -> None:
        if syslog and ca is None:
            raise ConfigError("audit_syslog needs audit_ca (the repository's CA, PEM)")
        if syslog and spool_dir is None:
            raise ConfigError("audit_syslog needs a spool folder")
        self.source_id = source_id
        self.host = socket.gethostname()
        self.me = Participant(
            app_user_id or f"{APP_NAME}@{self.host}",
            requestor=False,
            role=ROLE_APPLICATION,
            alternative_user_id=str(os.getpid()),
            address=self.host,
        )
        self.file = Path(file) if file is not None else None
        if self.file is not None:  # a wrong path fails the start, not each message
            try:
                os.close(os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
            except OSError as exc:
                raise ConfigError(
                    f"audit_file {self.file}: cannot append ({exc.strerror})"
                ) from exc
        self.endpoint = parse_endpoint(syslog) if syslog else None
        self.context: ssl.SSLContext | None = None
        if self.endpoint is not None:
            try:
                self.context = ssl.create_default_context(cafile=str(ca))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"audit_ca {ca}: cannot load it as a PEM CA ({exc})") from exc
            self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        if self.spool_dir is not None and self.endpoint is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.max_spool = max_spool
        self.max_retry_seconds = max_retry_seconds
        self.dropped = 0
        self._unreported = 0  # dropped since the last Security Alert about it
        self._count_lock = threading.Lock()
        self.sent = 0
        self._seq = itertools.count()
        self._queue: queue.Queue[tuple[str, datetime, bool] | None] = queue.Queue(QUEUE_SIZE)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()
        self._sender: threading.Thread | None = None
        if deliver and self.endpoint is not None:
            self._sender = threading.Thread(
                target=self._send_loop, name="audit-sender", daemon=True
            )
            self._sender.start()

    # -- emitting -----------------------------------------------------------------------------

    def emit(self, xml: str, *, failure: bool = False) -> None:
        """Queue one message for the sinks; never blocks, never raises."""
        try:
            self._queue.put_nowait((xml, datetime.now(UTC), failure))
        except queue.Full:
            self._count_dropped("queue full")
        except Exception:
            logger.exception("event=audit_emit_failed")

    def _count_dropped(self, why: str) -> None:
        with self._count_lock:
            self.dropped += 1
            self._unreported += 1
            total = self.dropped
        if total == 1 or total % 100 == 0:
            logger.error("event=audit_dropped reason=%r dropped_total=%d", why, total)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._unreported and self._has_room():
                with self._count_lock:
                    lost, self._unreported = self._unreported, 0
                alert = security_alert_message(
                    self.me,
                    self.source_id,
                    kind=AUDIT_RECORDING_STOPPED,
                    description=f"{lost} audit message(s) lost: the queue or the spool "
                    f"({self.max_spool} messages) was full",
                )
                self._write(alert, datetime.now(UTC), True)
            self._write(*item)

    def _write(self, xml: str, when: datetime, failure: bool) -> None:
        if self.file is not None:
            try:
                append_line(self.file, xml)
            except OSError as exc:
                logger.error("event=audit_file_failed path=%s error=%r", self.file, str(exc))
        if self.endpoint is not None:
            frame = syslog_frame(xml, host=self.host, pid=os.getpid(), when=when, failure=failure)
            self._spool(frame)

    def _held(self) -> int:
        assert self.spool_dir is not None
        return sum(1 for n in os.listdir(self.spool_dir) if _spooled(n))

    def _has_room(self) -> bool:
        """Room in the spool for the alert about lost messages and the next message."""
        if self.endpoint is None:
            return True
        try:
            return self._held() + 2 <= self.max_spool
        except OSError:
            return False

    def _spool(self, frame: bytes) -> None:
        try:
            if self._held() >= self.max_spool:
                self._count_dropped(f"spool full ({self.max_spool} messages)")
                return
            assert self.spool_dir is not None
            name = f"{time.time_ns():020d}-{os.getpid():07d}-{next(self._seq):09d}"
            write_atomic(self.spool_dir / f"{name}{SPOOL_SUFFIX}", frame)
        except OSError as exc:
            self._count_dropped(f"spool write failed: {exc}")
            return
        self._wake.set()

    # -- delivering ---------------------------------------------------------------------------

    def pending(self) -> list[Path]:
        """Spooled messages not yet delivered, oldest first."""
        if self.spool_dir is None or not self.spool_dir.is_dir():
            return []
        return sorted(p for p in self.spool_dir.iterdir() if _spooled(p.name))

    def _send_loop(self) -> None:
        assert self.endpoint is not None and self.context is not None
        conn = _Connection(*self.endpoint, self.context)
        delay = 1.0
        down_since: float | None = None
        try:
            while True:
                self._wake.clear()
                failed = False
                for path in self.pending():
                    try:
                        frame = path.read_bytes()
                    except FileNotFoundError:
                        continue
                    try:
                        conn.send(frame)
                    except (OSError, ValueError) as exc:
                        failed = True
                        if down_since is None:
                            down_since = time.monotonic()
                            logger.error(
                                "event=audit_repository_unreachable endpoint=%s:%d error=%r "
                                "spooled=%d",
                                *self.endpoint,
                                str(exc),
                                len(self.pending()),
                            )
                        break
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    self.sent += 1
                    if down_since is not None:
                        logger.warning(
                            "event=audit_repository_back endpoint=%s:%d after_seconds=%.0f",
                            *self.endpoint,
                            time.monotonic() - down_since,
                        )
                        down_since = None
                    delay = 1.0
                if self._stopping.is_set() and (failed or not self.pending()):
                    return
                if failed:  # new messages do not hurry a retry: the delay grows with time
                    self._stopping.wait(delay)
                    delay = min(self.max_retry_seconds, delay * 2)
                else:
                    self._wake.wait(0.5)
        finally:
            conn.close()

    def close(self, flush_seconds: float = 5.0) -> None:
        """Write what is queued, try for ``flush_seconds`` to deliver what is spooled (the rest
        waits in the spool for the next start), and stop the threads."""
        with contextlib.suppress(Exception):
            self._queue.put(None, timeout=flush_seconds)
        self._writer.join(flush_seconds + 5)
        if self._sender is not None:
            deadline = time.monotonic() + flush_seconds
            while self.pending() and time.monotonic() < deadline and self._sender.is_alive():
                self._wake.set()
                time.sleep(0.05)
            self._stopping.set()
            self._wake.set()
            self._sender.join(CONNECT_TIMEOUT_SECONDS + 2)
        if self.dropped:
            logger.error("event=audit_dropped_total dropped=%d", self.dropped)
