"""Results to destinations besides the SR's peer, from the job database's ``deliveries`` table:
the RIS, as an HL7 v2.5.1 ORU^R01 over MLLP (:class:`Hl7Courier`), and the named DICOM and
STOW-RS destinations (``[destination.NAME]``), which get the SR itself (:class:`SrCourier`).
Each destination is served by a courier of its own, on a thread of its own.

A delivery is queued with the SR that states the result, in the transaction that records it
(:meth:`~ctcovid.node.jobs.JobDatabase.finish_classified`): the ORU needs the SR's UID, not
its delivery, so a dead PACS never delays it, and it is sent from a thread of its own, so a
dead RIS never delays the SR. Before its first send the message is built from the stored SR
(:func:`~ctcovid.report.oru.build_oru`; ``C`` when the RIS already acknowledged an earlier
result of the series), written to the store (``hl7/SERIES/SR_UID.hl7``) and recorded; every
later send, after a crash too, sends that file again.

================  =========================================================================
outcome           the delivery
================  =========================================================================
AA (CA)           ``sent``
AE, AR (CE, CR)   ``failed`` at once, with the ACK's MSA-3 and ERR text; ``ctcovid queue
                  --retry`` sends the same message again
no ACK, broken    ``pending`` again after an exponential backoff (``retry_seconds``,
                  doubling, at most ``max_retry_seconds``); ``failed`` after ``max_attempts``
================  =========================================================================

So exactly one ORU per result reaches the RIS, except when the process dies between the send
and the ACK: the message is then sent again, with the same MSH-10, which the RIS can recognise.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ctcovid.net.mllp import MllpSettings
from ctcovid.net.sender import SendSettings
from ctcovid.node.config import RIS_DESTINATION, NamedDestination
from ctcovid.node.jobs import DeliveryRecord, DeliveryState, Destination
from ctcovid.node.store import Store

if TYPE_CHECKING:
    from ctcovid.net.sender import Cancel
    from ctcovid.node.config import NodeConfig

logger = logging.getLogger(__name__)

HL7 = "hl7"
RIS = RIS_DESTINATION  # the destination's name in the job database, ctcovid queue and rules


class Courier(Protocol):
    """What the worker asks of a courier: its destinations, and to send what is due."""

    @property
    def destinations(self) -> tuple[Destination, ...]: ...

    def send_due(self, stop: Cancel | None = None) -> bool: ...


def couriers(config: NodeConfig, store: Store, audit: Any = None) -> list[Courier]:
    """One courier per destination besides the SR's peer: the RIS (``hl7``), then each
    ``[destination.NAME]``."""
    found: list[Courier] = [Hl7Courier(config, store, audit=audit)] if config.hl7 else []
    for d in config.destinations:
        if d.kind == HL7:
            found.append(Hl7Courier(config, store, d, audit))
        else:
            found.append(SrCourier(config, store, d, audit))
    return found


def result_cards(config: NodeConfig, store: Store, record: Any) -> list[Path]:
    """The result card that goes with the SR of ``record`` (a job or a delivery: its series and
    ``sr_path``), when ``result_card`` is on and the card was built; sent with the SR to every
    DICOM or STOW-RS destination it goes to."""
    if not config.result_card:
        return []
    path = store.files.card_path(record.series_instance_uid, record.sr_path)
    if not path.is_file():
        logger.warning(
            "event=card_missing study=%s series=%s sr=%s: the SR is sent without its card",
            record.study_instance_uid,
            record.series_instance_uid,
            record.sr_sop_instance_uid,
        )
        return []
    return [path]


class SrCourier:
    """Sends the due SRs of one named DICOM or STOW-RS destination (the SR file itself, the
    message ID its SOP Instance UID); each send under the sender's hard deadline.

    The SR's UID derives from what it states, so a send repeated after a crash between the
    send and its record stores the same instance again: the destination holds one.
    """

    def __init__(
        self, config: NodeConfig, store: Store, destination: NamedDestination, audit: Any = None
    ) -> None:
        from ctcovid.net.sender import sr_sender

        self.config = config
        self.store = store
        self.destination = destination
        self.audit = audit  # a ctcovid.node.auditing.NodeAudit, or None
        assert isinstance(destination.settings, SendSettings)
        self.settings = destination.settings
        self.sender = sr_sender(self.settings)  # bad TLS files fail here, at start

    @property
    def destinations(self) -> tuple[Destination, ...]:
        return ((self.destination.name, self.destination.kind),)

    def send_due(self, stop: Cancel | None = None) -> bool:
        """Send every SR due to this destination; True if there was one."""
        did_work = False
        for due in self.store.jobs.due_deliveries(
            self.destination.kind, destination=self.destination.name
        ):
            if stop is not None and stop.is_set():
                break
            self.send(due, stop)
            did_work = True
        return did_work

    def send(self, record: DeliveryRecord, cancel: Cancel | None = None) -> None:
        """Send one SR and record the outcome (never raises)."""
        from ctcovid.net.sender import SendCancelled
        from ctcovid.net.stow import StowRefused

        name, where = self.destination.name, self.destination.address
        log_ids = (
            f"study={record.study_instance_uid} series={record.series_instance_uid} "
            f"revision={record.revision} sr={record.sr_sop_instance_uid} destination={name}"
        )
        if not record.message_id:
            if not self.store.jobs.delivery_prepared(
                record, record.sr_sop_instance_uid, record.sr_path
            ):
                logger.info("event=sr_superseded %s", log_ids)
                return
            record = _with(
                record, message_id=record.sr_sop_instance_uid, message_path=record.sr_path
            )
        path = self.store.root / record.message_path
        start = time.perf_counter()
        try:
            outcome = self.sender.send(path, cancel, result_cards(self.config, self.store, record))
        except SendCancelled:
            logger.info("event=send_abandoned %s reason=stopping", log_ids)
            return
        except Exception as exc:  # refused, unreachable, failure status: retry or give up
            state = record_failure(
                self.store,
                self.config,
                record,
                str(exc),
                log_ids,
                "send",
                where,
                permanent=isinstance(exc, StowRefused),
            )
            if state == DeliveryState.FAILED and self.audit is not None:
                self.audit.sr_sent(path, failure=str(exc), to=self.settings)
            return
        self.store.jobs.mark_delivered(record)
        if self.audit is not None:
            self.audit.sr_sent(path, to=self.settings)
        logger.info(
            "event=sr_sent %s peer=%s %s seconds=%.2f",
            log_ids,
            where,
            outcome,
            time.perf_counter() - start,
        )


class Hl7Courier:
    """Sends the due ORUs of a store to ``config.hl7``; each send under a hard deadline."""

    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        destination: NamedDestination | None = None,
        audit: Any = None,
    ) -> None:
        """The RIS of ``config.hl7`` (named ``ris``), or the ``hl7`` kind ``destination``;
        ``audit`` (a :class:`~ctcovid.node.auditing.NodeAudit`) records each ORU delivered or
        given up on."""
        settings = config.hl7_settings() if destination is None else destination.settings
        if not isinstance(settings, MllpSettings):
            raise ValueError("Hl7Courier needs the hl7 setting (HOST:PORT) or an hl7 destination")
        self.config = config
        self.store = store
        self.name = RIS if destination is None else destination.name
        self.mllp = settings
        settings.ssl_context()  # an unreadable certificate or CA stops the node at start
        self.oru = config.oru_settings()
        self.audit = audit

    @property
    def destinations(self) -> tuple[Destination, ...]:
        """The destinations each new result is queued for: (name, kind)."""
        return ((self.name, HL7),)

    def send_due(self, stop: Cancel | None = None) -> bool:
        """Send every ORU whose send is due; True if there was one."""
        did_work = False
        for due in self.store.jobs.due_deliveries(HL7, destination=self.name):
            if stop is not None and stop.is_set():
                break
            self.send(due, stop)
            did_work = True
        return did_work

    def send(self, record: DeliveryRecord, cancel: Cancel | None = None) -> None:
        """Build (once) and send one ORU; record the outcome (never raises)."""
        from ctcovid.net.mllp import Hl7Refused, send_message
        from ctcovid.net.sender import SendCancelled

        log_ids = (
            f"study={record.study_instance_uid} series={record.series_instance_uid} "
            f"revision={record.revision} sr={record.sr_sop_instance_uid}"
        )
        try:
            if not record.message_path:
                prepared = self._prepare(record)
                if prepared is None:
                    logger.info("event=hl7_superseded %s", log_ids)
                    return
                record = prepared
            message = (self.store.root / record.message_path).read_bytes()
        except Exception as exc:  # the SR or the message cannot be read or built: for good
            self._failed(record, f"{type(exc).__name__}: {exc}", log_ids, permanent=True)
            return
        start = time.perf_counter()
        try:
            ack = send_message(message, record.message_id, self.mllp, cancel=cancel)
        except SendCancelled:
            logger.info("event=hl7_abandoned %s reason=stopping", log_ids)
            return
        except Hl7Refused as exc:
            # The RIS's own text may quote patient data: in the job database (ctcovid queue),
            # not in the log.
            self._failed(
                record, str(exc), log_ids, permanent=True, logged=f"refused with {exc.code}"
            )
            return
        except Exception as exc:  # unreachable, silent, broken: may pass
            self._failed(record, str(exc), log_ids, permanent=False)
            return
        delivered = self.store.jobs.mark_delivered(record)
        if self.audit is not None:
            self.audit.oru_sent(self.store.root / record.sr_path, self.mllp)
        logger.info(
            "event=hl7_sent %s peer=%s control_id=%s ack=%s seconds=%.2f%s",
            log_ids,
            self.mllp.endpoint,
            record.message_id,
            ack.code,
            time.perf_counter() - start,
            "" if delivered else " (a newer result is queued as its correction)",
        )

    def _prepare(self, record: DeliveryRecord) -> DeliveryRecord | None:
        """Build the ORU of ``record``'s SR, store it and record it; None if the row moved on."""
        import pydicom

        from ctcovid.report.oru import build_oru

        sr = pydicom.dcmread(self.store.root / record.sr_path)
        oru = build_oru(sr, self.oru, corrected=record.sent_count > 0)
        path = (
            self.store.root
            / "hl7"
            / record.series_instance_uid
            / (
                f"{record.sr_sop_instance_uid}.hl7"
                if self.name == RIS
                else f"{record.sr_sop_instance_uid}.{self.name}.hl7"
            )
        )
        self.store.files.write_file(path, oru.to_bytes())
        relative = self.store.files.relative(path)
        if not self.store.jobs.delivery_prepared(record, oru.control_id, relative):
            return None
        return _with(record, message_id=oru.control_id, message_path=relative)

    def _failed(
        self,
        record: DeliveryRecord,
        reason: str,
        log_ids: str,
        *,
        permanent: bool,
        logged: str | None = None,
    ) -> None:
        state = record_failure(
            self.store,
            self.config,
            record,
            reason,
            log_ids,
            "hl7",
            str(self.mllp.endpoint),
            permanent=permanent,
            logged=logged,
        )
        if state == DeliveryState.FAILED and self.audit is not None:
            self.audit.oru_sent(self.store.root / record.sr_path, self.mllp, failure=reason)


def record_failure(
    store: Store,
    config: NodeConfig,
    record: DeliveryRecord,
    reason: str,
    log_ids: str,
    event: str,
    where: str,
    *,
    permanent: bool,
    logged: str | None = None,
) -> DeliveryState:
    """Record a failed send of ``record`` (backoff, or ``failed`` after the last attempt or at
    once when ``permanent``) and log it as ``event_retry`` or ``event_failed``; ``logged``
    replaces ``reason`` in the log (a peer's text may quote patient data)."""
    state, next_try = store.jobs.mark_delivery_failed(
        record,
        reason,
        retry_seconds=config.retry_seconds,
        max_retry_seconds=config.max_retry_seconds,
        max_attempts=config.max_attempts,
        permanent=permanent,
    )
    if state == DeliveryState.FAILED:
        logger.error(
            "event=%s_failed %s peer=%s attempts=%d error=%r",
            event,
            log_ids,
            where,
            record.attempts + 1,
            logged or reason,
        )
    else:
        logger.warning(
            "event=%s_retry %s peer=%s attempt=%d next_try_in=%.1fs error=%r",
            event,
            log_ids,
            where,
            record.attempts + 1,
            (next_try or time.time()) - time.time(),
            logged or reason,
        )
    return state


def _with(record: DeliveryRecord, **changes: Any) -> DeliveryRecord:
    data = record.to_dict()
    data.update(changes)
    return DeliveryRecord(**data)
