"""The node's audit messages (see :mod:`ctcovid.audit`): start and stop, refusals, a change of
settings, studies received per association, SRs sent.

The listener's process delivers the spool (``STORE/audit-spool``) to the syslog repository;
the worker process has its own :class:`NodeAudit` that only writes spool files and the audit
file (one file per message in the spool, merged in name order by the listener's sender thread;
the audit file is appended under a lock).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctcovid import audit
from ctcovid.audit import AuditTrail, Participant
from ctcovid.fsio import write_atomic
from ctcovid.node.config import NodeConfig

if TYPE_CHECKING:
    from ctcovid.net.mllp import MllpSettings
    from ctcovid.net.sender import SendSettings

logger = logging.getLogger(__name__)

SPOOL_DIR = "audit-spool"
SETTINGS_FILE = "audit-settings.json"

# Refusals that are Security Alerts, and their event type; the rest (limits on connections and
# time, counted and logged) are not: they would flood the repository under load.
ALERTS = {
    "calling_aet_not_allowed": audit.NODE_AUTHENTICATION,
    "called_aet_not_recognised": audit.NODE_AUTHENTICATION,
    "tls_handshake_failed": audit.NODE_AUTHENTICATION,
    "tls_timeout": audit.NODE_AUTHENTICATION,
    "application_context_not_supported": audit.USE_OF_RESTRICTED_FUNCTION,
    "protocol_version_not_supported": audit.USE_OF_RESTRICTED_FUNCTION,
    "no_acceptable_presentation_context": audit.USE_OF_RESTRICTED_FUNCTION,
    "rejected": audit.USE_OF_RESTRICTED_FUNCTION,
}
# Settings whose change is a Security Configuration alert; any other is Network Configuration.
SECURITY_SETTINGS = frozenset(
    {"allow_aet", "tls_cert", "tls_key", "tls_ca", "peer_tls", "stow_auth_file", "stow_ca_file"}
    | {"audit_file", "audit_syslog", "audit_ca", "metrics_host"}
    | {"http_host", "http_tls_cert", "http_tls_key", "http_auth_file", "http_show_phi"}
)
_TALLY = "_ctcovid_audit_tally"

# What the node audits, and when (the conformance statement lists it).
EVENTS: tuple[tuple[audit.Code, str], ...] = (
    (audit.APPLICATION_ACTIVITY, "the node started, the node stopped"),
    (
        audit.SECURITY_ALERT,
        "an association refused (calling AE title not allowed, called AE title unknown, "
        "no acceptable presentation context), a failed TLS handshake, a failed login to the "
        "HTTP server, settings changed since the last start, audit messages lost",
    ),
    (
        audit.INSTANCES_TRANSFERRED,
        "a study received, once per study and association (study UID, patient ID, SOP classes "
        "with counts, the calling AE title and address); an SR sent or given up on (the "
        "destination a participant)",
    ),
)


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


class NodeAudit:
    """The node's :class:`AuditTrail`, with one method per event it records."""

    def __init__(self, config: NodeConfig, *, deliver: bool) -> None:
        self.config = config
        self.trail = AuditTrail(
            source_id=config.ae_title,
            file=config.audit_file,
            syslog=config.audit_syslog,
            ca=config.audit_ca,
            spool_dir=config.store / SPOOL_DIR,
            deliver=deliver,
            app_user_id=config.ae_title,
        )
        self.me = self.trail.me
        self._lock = threading.Lock()

    def close(self, flush_seconds: float = 5.0) -> None:
        self.trail.close(flush_seconds)

    # -- the node ---------------------------------------------------------------------------

    def started(self) -> None:
        with_user = _user()
        self.trail.emit(
            audit.application_activity_message(
                self.me, self.trail.source_id, started=True, user=with_user
            )
        )
        self._settings_changed()

    def stopped(self) -> None:
        self.trail.emit(
            audit.application_activity_message(
                self.me, self.trail.source_id, started=False, user=_user()
            )
        )

    def _settings_changed(self) -> None:
        """A Security Alert when the settings differ from those of the previous start."""
        path = self.config.store / SETTINGS_FILE
        now = {k: v for k, v in self.config.to_dict().items() if k != "extra" and v is not None}
        digests = {
            k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()
            for k, v in now.items()
        }
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and before != digests:
            changed = sorted(
                k for k in set(before) | set(digests) if before.get(k) != digests.get(k)
            )
            security = [k for k in changed if k in SECURITY_SETTINGS]
            self.trail.emit(
                audit.security_alert_message(
                    self.me,
                    self.trail.source_id,
                    kind=audit.SECURITY_CONFIGURATION if security else audit.NETWORK_CONFIGURATION,
                    description="settings changed since the last start: " + ", ".join(changed),
                    outcome=audit.SUCCESS,
                )
            )
        try:
            write_atomic(path, json.dumps(digests, sort_keys=True, indent=1))
        except OSError as exc:
            logger.warning("event=audit_settings_not_saved path=%s error=%r", path, str(exc))

    # -- the listener -------------------------------------------------------------------------

    def refused(self, reason: str, address: str, calling: str) -> None:
        """A Security Alert for a refused association or a failed TLS handshake."""
        kind = ALERTS.get(reason)
        if kind is None:
            return
        peer = Participant(calling or "(unknown)", requestor=True, address=_host(address) or None)
        self.trail.emit(
            audit.security_alert_message(
                self.me,
                self.trail.source_id,
                kind=kind,
                description=f"{reason} from {address or 'unknown address'}"
                + (f" calling AE {calling}" if calling else ""),
                peer=peer,
            ),
            failure=True,
        )

    def login_failed(self, user: str, address: str) -> None:
        """A Security Alert for a failed login to the node's HTTP server (status page, API)."""
        peer = Participant(user or "(unknown)", requestor=True, address=address or None)
        self.trail.emit(
            audit.security_alert_message(
                self.me,
                self.trail.source_id,
                kind=audit.USE_OF_RESTRICTED_FUNCTION,
                description=f"failed login to the HTTP server as {user} from {address}",
                peer=peer,
            ),
            failure=True,
        )

    def handlers(self) -> list[Any]:
        """pynetdicom handlers that tally received instances per association."""
        from pynetdicom import evt

        return [
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_ended, ["connection closed"]),
        ]

    def _on_accepted(self, event: Any) -> None:
        assoc = event.assoc
        setattr(assoc, _TALLY, {})
        try:
            accepted = bool(assoc.accepted_contexts)
            address = f"{assoc.requestor.address}:{assoc.requestor.port}"
            calling = str(assoc.requestor.ae_title).strip()
        except Exception:
            return
        if not accepted:
            self.refused("no_acceptable_presentation_context", address, calling)

    def _on_ended(self, event: Any, how: str) -> None:
        """Instances Transferred, one per study the association brought (once per
        association: at release, abort or the closing of its connection)."""
        assoc = event.assoc
        with self._lock:
            tally = getattr(assoc, _TALLY, None)
            if tally is None:
                return
            setattr(assoc, _TALLY, None)
        if not tally:
            return
        try:
            address = str(assoc.requestor.address)
            calling = str(assoc.requestor.ae_title).strip()
        except Exception:
            address, calling = "", ""
        source = Participant(calling or "(unknown)", True, audit.ROLE_SOURCE, address or None)
        destination = Participant(
            self.config.ae_title, False, audit.ROLE_DESTINATION, self.me.address
        )
        for study_uid, (patient_id, classes) in tally.items():
            ok = how == "released"
            self.trail.emit(
                audit.transfer_message(
                    audit.INSTANCES_TRANSFERRED,
                    source=source,
                    destination=destination,
                    source_id=self.trail.source_id,
                    study_uid=study_uid,
                    patient_id=patient_id,
                    sop_classes=classes,
                    action="C",
                    outcome=audit.SUCCESS if ok else audit.MINOR_FAILURE,
                    description=None if ok else f"association {how} before release",
                ),
                failure=not ok,
            )

    # -- the worker ---------------------------------------------------------------------------

    def sr_sent(
        self, sr_path: Path, *, failure: str | None = None, to: SendSettings | None = None
    ) -> None:
        """Instances Transferred: an SR sent to the destination (or given up on); ``to``: a
        named destination's settings (default: the node's ``peer`` or ``stow``)."""
        identity = _sr_identity(sr_path)
        if identity is None:
            return
        study_uid, patient_id, sop_class = identity
        config = self.config
        if to is not None:
            peer, url = to.peer, to.stow_url
        else:
            peer, url = (config.peer if config.stow is None else None), config.stow
        self.trail.emit(
            audit.sr_sent_message(
                source=Participant(config.ae_title, True, audit.ROLE_SOURCE, self.me.address),
                source_id=self.trail.source_id,
                peer=(peer.ae_title, peer.host) if peer is not None else None,
                url=url,
                study_uid=study_uid,
                patient_id=patient_id,
                sop_class_uid=sop_class,
                failure=failure,
            ),
            failure=failure is not None,
        )

    def oru_sent(self, sr_path: Path, ris: MllpSettings, *, failure: str | None = None) -> None:
        """Export: the ORU of the SR at ``sr_path`` acknowledged by the RIS ``ris`` (or given
        up on: ``failure``)."""
        identity = _sr_identity(sr_path)
        if identity is None:
            return
        study_uid, patient_id, sop_class = identity
        config = self.config
        self.trail.emit(
            audit.oru_sent_message(
                me=Participant(config.ae_title, True, audit.ROLE_SOURCE, self.me.address),
                ris=ris.uri,
                source_id=self.trail.source_id,
                study_uid=study_uid,
                patient_id=patient_id,
                sop_class_uid=sop_class,
                failure=failure,
            ),
            failure=failure is not None,
        )


def _sr_identity(sr_path: Path) -> tuple[str, str, str] | None:
    """Study Instance UID, Patient ID and SOP Class UID of an SR file (None, and a warning
    naming the path only, when it cannot be read)."""
    from pydicom import dcmread

    try:
        ds = dcmread(
            sr_path,
            stop_before_pixels=True,
            specific_tags=["PatientID", "StudyInstanceUID", "SOPClassUID"],
        )
    except Exception as exc:
        logger.warning("event=audit_sr_unreadable path=%s error=%s", sr_path, type(exc).__name__)
        return None
    return (
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("PatientID", "")),
        str(ds.get("SOPClassUID", "")),
    )


def note_received(assoc: Any, study_uid: str, patient_id: str, sop_class_uid: str) -> None:
    """Count one stored instance on its association (no-op without an audit trail)."""
    tally = getattr(assoc, _TALLY, None)
    if tally is None:
        return
    entry = tally.setdefault(study_uid, (patient_id, Counter()))
    entry[1][sop_class_uid] += 1


def node_audit(config: NodeConfig, *, deliver: bool) -> NodeAudit | None:
    """The node's audit trail, or None when neither ``audit_file`` nor ``audit_syslog`` is set."""
    if config.audit_file is None and not config.audit_syslog:
        return None
    return NodeAudit(config, deliver=deliver)


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None
