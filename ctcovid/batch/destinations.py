"""Where the SRs of a batch run go besides ``out/sr``: a PACS by C-STORE, or STOW-RS, and a RIS
as HL7 v2.5.1 ORU^R01 over MLLP (``--hl7``: :class:`~ctcovid.net.mllp.Hl7Sender`, the node's
builder and MLLP client; an AE/AR acknowledgement fails at once with its text, silence or a
broken connection is retried like a failed C-STORE).

Every classified row's SR is sent to every destination by a background thread, so sending never
slows classification. Sending is the node's: :mod:`ctcovid.net.sender` (C-STORE, with TLS when
the TLS files are given, or STOW-RS; the same statuses count as delivered, the same deadline per
send; one request per attempt, the HTTP client's own quiet retries are off). A failed send is
retried with exponential backoff, here and only here; after the last try, or at once for a
refusal that sending again cannot change (STOW-RS 4xx), it is ``failed`` with the reason. The
outcome of every send is kept in ``out/sent.sqlite``: ``--resume`` sends what is not ``sent``
yet (including rows of an earlier run that crashed before sending). Re-sending is harmless: SR
UIDs are derived from what the SR states, and a PACS keeps the first copy of a UID (a resend
answered 409 counts as delivered when the PACS holds that UID).

One current result per series: before each send the forwarder asks the destination which
revisions of that result's SR series it holds (C-FIND / QIDO-RS) and reads its own delivery
record (``deliveries`` in ``out/sent.sqlite``: per destination, study, series and SR series,
the SR, revision, label and stated probability delivered), then sends what
:func:`~ctcovid.report.delivery.plan_delivery` says: revision 1, nothing (the destination
already holds this report, or one with the same label and probability), or revision n + 1
naming revision n (made from the run's revision-1 file by :func:`~ctcovid.report.revise_sr`
and kept beside it in ``out/sr``). A destination that cannot answer the query is warned about
once, and the record alone decides.

With ``result_card`` each SR goes with its result card (``out/cards``, found from the SR's UID),
in the same association or request: revision n's card is made from revision 1's by
:func:`~ctcovid.report.card.revise_card` and kept beside it. The send is delivered when both are.
"""

from __future__ import annotations

import heapq
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from ctcovid.batch.results import (
    CARD_DIR,
    CLASSIFIED,
    RESULTS_FILE,
    BatchProgress,
    ProgressThen,
    ResultRow,
    read_results,
)
from ctcovid.errors import PacsError
from ctcovid.fsio import write_atomic
from ctcovid.net.mllp import Hl7Refused, Hl7Sender, Hl7Settings
from ctcovid.net.query import HeldInstance
from ctcovid.net.sender import SendSettings, SrSender, sr_sender
from ctcovid.net.stow import StowRefused
from ctcovid.report.delivery import Delivered, Delivery, plan_delivery

logger = logging.getLogger(__name__)

SENT_FILE = "sent.sqlite"
SENT = "sent"
UNCHANGED = "unchanged"  # not sent: the destination holds this result already
FAILED = "failed"
PENDING = "pending"
SCHEMA = """
CREATE TABLE IF NOT EXISTS sends (
    sr_path TEXT NOT NULL,
    destination TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (sr_path, destination)
);
CREATE TABLE IF NOT EXISTS deliveries (
    destination TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sr_series_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    label TEXT NOT NULL,
    probability REAL,
    predecessor_sop_instance_uid TEXT NOT NULL,
    sr_path TEXT NOT NULL,
    PRIMARY KEY (destination, study_instance_uid, series_instance_uid, sr_series_instance_uid)
);
"""


class SrForwarder:
    """Sends the SR of each classified row to every destination, in the background."""

    def __init__(
        self,
        out: Path,
        destinations: tuple[SendSettings | Hl7Settings, ...],
        *,
        max_attempts: int = 5,
        retry_seconds: float = 2.0,
        max_retry_seconds: float = 60.0,
        audit: Any = None,
        result_card: bool = False,
    ):
        self.out = Path(out)
        self.result_card = result_card
        self.destinations = destinations
        self.max_attempts = max_attempts
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        # Made now: a bad URL, TLS file or missing extra shows before any series is classified.
        self._senders = {str(d): _sender(d) for d in destinations}
        self._settings = {str(d): d for d in destinations}
        self.audit = audit  # a ctcovid.batch.auditing.BatchAudit, or None
        self._unqueryable: set[str] = set()
        self._db = sqlite3.connect(self.out / SENT_FILE, check_same_thread=False)
        self._db.executescript(SCHEMA)
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, str, str, ResultRow, int]] = []
        self._seq = 0
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="sr-forwarder", daemon=True)
        # SRs of earlier runs that were not delivered (crash, PACS down): send them again.
        for row in read_results(self.out / RESULTS_FILE):
            self.submit(row)
        self._thread.start()

    def watch(self, progress: BatchProgress) -> BatchProgress:
        """``progress`` that also hands every finished row to this forwarder."""
        return ProgressThen(progress, self.submit)

    def _state(self, sr_path: str, destination: str) -> str | None:
        with self._lock:
            found = self._db.execute(
                "SELECT state FROM sends WHERE sr_path = ? AND destination = ?",
                (sr_path, destination),
            ).fetchone()
        return found[0] if found else None

    def _record(
        self, row: ResultRow, destination: str, state: str, attempts: int, error: str
    ) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO sends VALUES (?,?,?,?,?,?,?)",
                (
                    row.sr_path,
                    destination,
                    row.study_instance_uid,
                    row.series_instance_uid,
                    state,
                    attempts,
                    error,
                ),
            )

    def submit(self, row: ResultRow) -> None:
        """Queue the SR of ``row`` for every destination it has not reached yet."""
        if row.status != CLASSIFIED or not row.sr_path:
            return
        for name in self._senders:
            if self._state(row.sr_path, name) in (SENT, UNCHANGED):
                continue
            self._record(row, name, PENDING, 0, "")
            self._push(time.monotonic(), name, row, 0)

    def _push(self, when: float, name: str, row: ResultRow, attempts: int) -> None:
        with self._lock:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, name, row.sr_path, row, attempts))
            self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._heap:
                        delay = self._heap[0][0] - time.monotonic()
                        if delay <= 0:
                            break
                        self._lock.wait(delay)
                    elif self._closing:
                        return
                    else:
                        self._lock.wait()
                _, _, name, _, row, attempts = heapq.heappop(self._heap)
            self._send(name, row, attempts)

    def _recorded(self, name: str, sr: Dataset, row: ResultRow) -> Delivered | None:
        with self._lock:
            found = self._db.execute(
                "SELECT sop_instance_uid, revision, label, probability, "
                "predecessor_sop_instance_uid FROM deliveries WHERE destination = ? AND "
                "study_instance_uid = ? AND series_instance_uid = ? AND sr_series_instance_uid = ?",
                (name, row.study_instance_uid, row.series_instance_uid, str(sr.SeriesInstanceUID)),
            ).fetchone()
        return Delivered(*found) if found else None

    def _record_delivery(
        self, name: str, sr: Dataset, row: ResultRow, delivered: Delivered, sr_path: str
    ) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO deliveries VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    row.study_instance_uid,
                    row.series_instance_uid,
                    str(sr.SeriesInstanceUID),
                    delivered.sop_instance_uid,
                    delivered.revision,
                    delivered.label,
                    delivered.probability,
                    delivered.predecessor_sop_instance_uid,
                    sr_path,
                ),
            )

    def _held(self, name: str, sr: Dataset) -> list[HeldInstance] | None:
        """What the destination holds in the SR series; None (warned once) if it cannot say."""
        try:
            return self._senders[name].held(str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID))
        except Exception as exc:
            if name not in self._unqueryable:
                self._unqueryable.add(name)
                logger.warning(
                    "event=destination_not_queryable destination=%s error=%r: deciding "
                    "revisions from this run folder's delivery record alone",
                    name,
                    str(exc),
                )
            return None

    def _plan(self, name: str, row: ResultRow) -> tuple[Path | None, Delivery, Dataset]:
        """The file to send (None: nothing to send) and the plan, for ``row`` at ``name``."""
        first = pydicom.dcmread(self.out / row.sr_path)
        recorded = self._recorded(name, first, row)
        held = self._held(name, first)
        assert row.label is not None and row.probability_covid is not None  # a classified row
        plan = plan_delivery(
            str(first.SOPInstanceUID),
            row.label,
            row.probability_covid,
            recorded=recorded,
            held=held,
        )
        if not plan.needed:
            return None, plan, first
        if plan.revision == 1:
            return self.out / row.sr_path, plan, first
        assert plan.predecessor_sop_instance_uid is not None
        from ctcovid.report import revise_sr, write_sr

        revised = revise_sr(
            first,
            plan.revision,
            plan.predecessor_sop_instance_uid,
            str(first.SeriesInstanceUID),
        )
        path = write_atomic(
            (self.out / row.sr_path).with_name(f"{revised.SOPInstanceUID}.dcm"),
            lambda tmp: write_sr(revised, tmp),
        )
        return path, plan, revised

    def _send(self, name: str, row: ResultRow, attempts: int) -> None:
        sr: Dataset | None = None
        try:
            path, plan, sr = self._plan(name, row)
            if path is None:
                self._unchanged(name, row, plan, sr)
                return
            # The card is a DICOM image: it goes to DICOM destinations, not in an ORU.
            dicom = isinstance(self._settings[name], SendSettings)
            self._senders[name].send(path, also=self._cards(row, path, sr) if dicom else ())
        except Exception as exc:  # refused, unreachable, TLS, failure status: back off
            attempts += 1
            reason = str(exc) if isinstance(exc, PacsError) else f"{type(exc).__name__}: {exc}"
            # A refusal that sending again cannot change (STOW-RS 4xx) fails at once, as in the
            # node; everything else is retried with backoff.
            if attempts >= self.max_attempts or isinstance(exc, StowRefused | Hl7Refused):
                self._record(row, name, FAILED, attempts, reason)
                if self._audited(name) and sr is not None:
                    self.audit.sr_sent(self._settings[name], sr, failure=reason)
                logger.error(
                    "event=sr_send_failed sr=%s destination=%s attempts=%d error=%r",
                    row.sr_path,
                    name,
                    attempts,
                    # The RIS's own text may quote patient data: in sent.sqlite, not the log.
                    f"refused with {exc.code}" if isinstance(exc, Hl7Refused) else reason,
                )
                return
            self._record(row, name, PENDING, attempts, reason)
            delay = min(self.max_retry_seconds, self.retry_seconds * 2 ** (attempts - 1))
            logger.warning(
                "event=sr_send_retry sr=%s destination=%s attempt=%d next_try_in=%.1fs error=%r",
                row.sr_path,
                name,
                attempts,
                delay,
                reason,
            )
            self._push(time.monotonic() + delay, name, row, attempts)
            return
        self._record(row, name, SENT, attempts + 1, "")
        if self._audited(name):
            self.audit.sr_sent(self._settings[name], sr)
        assert row.label is not None
        delivered = Delivered(
            str(sr.SOPInstanceUID),
            plan.revision,
            row.label,
            row.probability_covid,
            plan.predecessor_sop_instance_uid or "",
        )
        relative = str(path.relative_to(self.out))
        self._record_delivery(name, sr, row, delivered, relative)
        logger.info(
            "event=sr_sent sr=%s destination=%s revision=%d (%s)",
            relative,
            name,
            plan.revision,
            plan.reason,
        )

    def _audited(self, name: str) -> bool:
        """Whether sends to ``name`` are audited: DICOM Instances Transferred for an SR (PS3.15
        A.5.3.4), Export for an ORU to the RIS (A.5.3.6); with an audit trail, all are."""
        return self.audit is not None

    def _cards(self, row: ResultRow, path: Path, sr: Dataset) -> list[Path]:
        """The result card that goes with the SR file ``path`` (made from the run's revision-1
        card for a later revision); none without ``result_card`` or when the run made none."""
        if not self.result_card:
            return []
        from ctcovid.report.card import card_path_for, revise_card, write_card

        cards = self.out / CARD_DIR
        card = card_path_for(path, cards)
        if card.is_file():
            return [card]
        first = card_path_for(self.out / row.sr_path, cards)
        if not first.is_file():
            logger.warning(
                "event=card_missing sr=%s: the SR is sent without its result card", row.sr_path
            )
            return []
        revised = revise_card(pydicom.dcmread(first), sr)
        return [write_atomic(card, lambda tmp: write_card(revised, tmp))]

    def _unchanged(self, name: str, row: ResultRow, plan: Delivery, first: Dataset) -> None:
        """Nothing to send: the destination holds this result already (recorded as sent)."""
        self._record(row, name, UNCHANGED, 0, "")
        if plan.stands is not None:  # now known, if another sender delivered it
            self._record_delivery(name, first, row, plan.stands, row.sr_path)
        logger.info(
            "event=sr_not_sent sr=%s destination=%s reason=%r", row.sr_path, name, plan.reason
        )

    def close(self) -> dict[str, Any]:
        """Finish every send (with its retries); the outcome per destination."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join()
        return self.outcome()

    def outcome(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self._lock:
            for name in self._senders:
                rows = self._db.execute(
                    "SELECT state, error, series_instance_uid FROM sends WHERE destination = ?",
                    (name,),
                ).fetchall()
                counts = {
                    state: sum(r[0] == state for r in rows) for state in (SENT, UNCHANGED, FAILED)
                }
                errors = [f"series {uid}: {err}" for state, err, uid in rows if state == FAILED]
                out[name] = counts | {"errors": errors[:10]}
            self._db.close()
        return out


def _sender(settings: SendSettings | Hl7Settings) -> SrSender:
    """The sender of one destination: the node's SR sender, or the RIS's ORU sender."""
    if isinstance(settings, Hl7Settings):
        return Hl7Sender(settings)
    return sr_sender(settings)
