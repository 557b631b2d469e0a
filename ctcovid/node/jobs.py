"""The node's job database: one job per series, moved through its states by one method each.

Each series is one job, keyed by StudyInstanceUID *and* SeriesInstanceUID (a SeriesInstanceUID
reused in another study is another series), with a state (:class:`JobState`):

================  ================================================================================
state             meaning, and the transitions out of it (method)
================  ================================================================================
``received``      instances arriving; becomes ``waiting`` after ``stable_seconds`` of quiet
                  (:meth:`JobDatabase.promote_stable`)
``waiting``       complete, queued for the worker in arrival order; ``classifying`` when the
                  worker takes it (:meth:`~JobDatabase.claim_next`)
``classifying``   the worker has it; ends ``classified``, ``unusable`` or ``failed``
                  (:meth:`~JobDatabase.finish_classified`, :meth:`~JobDatabase.finish_unusable`,
                  :meth:`~JobDatabase.finish_failed`), or as its routing rule says: ``shadow``
                  (:meth:`~JobDatabase.finish_classified` with ``shadow``) or ``ignored``
                  (:meth:`~JobDatabase.finish_ignored`); back to ``waiting`` if the worker dies
                  (:meth:`~JobDatabase.resume`), or when the disk is below the free-space floor
                  (:meth:`~JobDatabase.defer_classification`: retried after ``next_try``, not
                  failed); back to ``received`` when an instance arrived meanwhile (its result
                  is stale)
``classified``    SR built and stored, to be sent (``attempts``, ``next_try``); ``sent``
                  (:meth:`~JobDatabase.mark_sent`), or a failed send: ``classified`` again
                  later, ``failed`` after the last attempt (:meth:`~JobDatabase.mark_send_failed`);
                  ``waiting`` when an earlier SR of the series is delivered while this one waits
                  (it names an older predecessor: classified again)
``sent``          the peer accepted the SR (revision ``sent_revision``, file ``sent_sr_path``,
                  its label and stated probability ``sent_label``, ``sent_probability``); or
                  the series was classified again and the result is clinically the same as
                  the one delivered (:meth:`~JobDatabase.finish_unchanged`): nothing new to send
``failed``        classification error, or sending gave up; ``reason`` says which. Re-queued by
                  hand (:meth:`~JobDatabase.retry`): ``classified`` when its SR is still there,
                  else ``waiting``
``unusable``      not a classifiable CT series; ``reason`` says why
``shadow``        classified under a ``shadow`` rule (``rule``): the SR is kept in the store and
                  never sent
``ignored``       an ``ignore`` rule matched: not classified; its instances are forgotten and
                  their files removed after ``ignore_keep_hours``
                  (:meth:`~JobDatabase.take_ignored_files`)
================  ================================================================================

A new instance for a series in any later state moves it back to ``received``
(:meth:`~JobDatabase.record_instance`): it is classified again and, when an SR was already
delivered, sent as revision ``sent_revision + 1`` that names the SR in ``sent_sr_path`` as its
predecessor, unless its label and stated probability are those delivered (then it is not sent
again). A job being classified keeps its state; its generation changes, so the worker's result
is known to be stale when it finishes. A send of the previous SR may also finish while the
series is classified again: the worker's SR was then built on an older predecessor, and
:meth:`~JobDatabase.finish_classified` refuses it (:class:`PredecessorChanged`, with the
record as it is now) so that the worker builds the next revision instead, never a second
revision 1 beside the one just delivered.

A transition is applied only from the states :data:`TRANSITIONS` allows. A caller that asks for
one with a record in another state gets :class:`JobStateError`; a job that moved on in the
database meanwhile (a new instance arrived while the SR was being sent, say) is left as it is
and the method says so in its return value.

Deliveries to destinations besides the SR's peer (the RIS by HL7, named DICOM and STOW-RS
destinations) have a table of their own, ``deliveries``: one row per (study, series, destination
name), with a kind, its own state
(:class:`DeliveryState`: ``pending`` -> ``sent`` | ``failed``; ``failed`` -> ``pending`` by
:meth:`~JobDatabase.retry_deliveries`), attempts, next try and reason, the SR it reports and
the message built for it (:class:`DeliveryRecord`). A row is queued in the transaction that
records the SR (:meth:`~JobDatabase.finish_classified`) and then moves on its own, so a
destination that is down delays neither the SR nor any other destination.

The database (SQLite, WAL, ``synchronous=FULL``) also records every stored instance and every
superseded one, so that a receipt and the job it opens commit together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class JobState(StrEnum):
    """The state of a series' job. The values are the strings stored in the database."""

    RECEIVED = "received"
    """Instances arriving."""
    WAITING = "waiting"
    """Complete, queued for the worker."""
    CLASSIFYING = "classifying"
    """The worker has it."""
    CLASSIFIED = "classified"
    """SR built and stored, to be sent."""
    SENT = "sent"
    """The peer accepted the SR."""
    FAILED = "failed"
    """Classification error, or sending gave up (``reason``)."""
    UNUSABLE = "unusable"
    """Not a classifiable CT series (``reason``)."""
    SHADOW = "shadow"
    """Classified under a ``shadow`` rule: the SR is kept in the store, nothing is sent."""
    IGNORED = "ignored"
    """An ``ignore`` rule matched: not classified (``rule``); its files are removed."""


RECEIVED = JobState.RECEIVED
WAITING = JobState.WAITING
CLASSIFYING = JobState.CLASSIFYING
CLASSIFIED = JobState.CLASSIFIED
SENT = JobState.SENT
FAILED = JobState.FAILED
UNUSABLE = JobState.UNUSABLE
SHADOW = JobState.SHADOW
IGNORED = JobState.IGNORED
STATES = tuple(JobState)
# States in which the job is done until a new instance arrives or someone retries it.
FINISHED = (SENT, FAILED, UNUSABLE, SHADOW, IGNORED)

# The state table as data: transition -> (states it applies to, states it may lead to).
TRANSITIONS: dict[str, tuple[frozenset[JobState], frozenset[JobState]]] = {
    "promote_stable": (frozenset({RECEIVED}), frozenset({WAITING})),
    "claim_next": (frozenset({WAITING}), frozenset({CLASSIFYING})),
    "finish_classified": (
        frozenset({CLASSIFYING}),
        frozenset({CLASSIFIED, SHADOW, SENT, RECEIVED}),
    ),
    "finish_unchanged": (frozenset({CLASSIFYING}), frozenset({SENT, RECEIVED})),
    "finish_unusable": (frozenset({CLASSIFYING}), frozenset({UNUSABLE, RECEIVED})),
    "finish_ignored": (frozenset({CLASSIFYING}), frozenset({IGNORED, RECEIVED})),
    "finish_failed": (frozenset({CLASSIFYING}), frozenset({FAILED, RECEIVED})),
    "defer_classification": (frozenset({CLASSIFYING}), frozenset({WAITING, RECEIVED})),
    "mark_sent": (frozenset({CLASSIFIED}), frozenset({SENT, WAITING})),
    "mark_send_failed": (frozenset({CLASSIFIED}), frozenset({CLASSIFIED, FAILED})),
    "resume": (frozenset({CLASSIFYING}), frozenset({WAITING, FAILED})),
    "retry": (frozenset({FAILED}), frozenset({CLASSIFIED, WAITING})),
    "reopen": (frozenset(JobState) - {CLASSIFYING}, frozenset({RECEIVED})),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_aet TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    n_instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    classify_attempts INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 0,
    sent_revision INTEGER NOT NULL DEFAULT 0,
    sr_path TEXT NOT NULL DEFAULT '',
    sr_sop_instance_uid TEXT NOT NULL DEFAULT '',
    probability_covid REAL,
    label TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    classify_seconds REAL,
    updated_at REAL NOT NULL,
    sent_sr_path TEXT NOT NULL DEFAULT '',
    sent_label TEXT NOT NULL DEFAULT '',
    sent_probability REAL,
    accession_number TEXT NOT NULL DEFAULT '',
    slice_probabilities TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (study_instance_uid, series_instance_uid)
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS series_updated ON series(updated_at);
CREATE TABLE IF NOT EXISTS deliveries (
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    sr_path TEXT NOT NULL DEFAULT '',
    sr_sop_instance_uid TEXT NOT NULL DEFAULT '',
    message_id TEXT NOT NULL DEFAULT '',
    message_path TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    sent_count INTEGER NOT NULL DEFAULT 0,
    sent_sr_sop_instance_uid TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    PRIMARY KEY (study_instance_uid, series_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_try);
CREATE TABLE IF NOT EXISTS replaced (
    sop_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    replaced_by TEXT NOT NULL,
    replaced_at REAL NOT NULL
);
"""
# Schema 2 keys series by (study, series); version 1 keyed them by series alone.
SCHEMA_VERSION = 2
# Every change of a job's state, reason or send attempts, one row each, written by the database
# itself (triggers), so that no transition can forget it. Kept apart from SCHEMA: its triggers
# hold semicolons. A store from before it simply has no history for its earlier changes.
HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS history_series ON history(study_instance_uid, series_instance_uid);
CREATE TRIGGER IF NOT EXISTS history_insert AFTER INSERT ON series BEGIN
    INSERT INTO history VALUES (NEW.study_instance_uid, NEW.series_instance_uid,
        NEW.updated_at, NEW.state, NEW.reason, NEW.attempts, NEW.revision);
END;
CREATE TRIGGER IF NOT EXISTS history_update AFTER UPDATE ON series
WHEN NEW.state IS NOT OLD.state OR NEW.reason IS NOT OLD.reason
    OR NEW.attempts IS NOT OLD.attempts BEGIN
    INSERT INTO history VALUES (NEW.study_instance_uid, NEW.series_instance_uid,
        NEW.updated_at, NEW.state, NEW.reason, NEW.attempts, NEW.revision);
END;
"""


class JobStateError(ValueError):
    """A transition asked of a job in a state the state table does not allow it from."""


class PredecessorChanged(Exception):
    """An SR was delivered while the series was classified again: the result must be stated as
    the revision after it. ``record`` is the job as it is now (still ``classifying``)."""

    def __init__(self, record: SeriesRecord) -> None:
        super().__init__(
            f"Series {record.series_instance_uid}: revision {record.sent_revision} was "
            "delivered while it was classified again"
        )
        self.record = record


@dataclass
class SeriesRecord:
    """One row of the ``series`` table: a series and the state of its job."""

    series_instance_uid: str
    study_instance_uid: str
    state: JobState
    reason: str
    n_instances: int
    first_received: float
    last_received: float
    generation: int
    classify_attempts: int
    revision: int
    sent_revision: int
    sr_path: str
    sr_sop_instance_uid: str
    probability_covid: float | None
    label: str
    attempts: int
    next_try: float
    classify_seconds: float | None
    updated_at: float
    # The SR file of revision sent_revision, as the peer received it: a revision's predecessor.
    sent_sr_path: str = ""
    # What that SR states: a new result with the same label and stated probability is not sent.
    sent_label: str = ""
    sent_probability: float | None = None
    # AccessionNumber (0008,0050) of the study as received (shown on the node's page).
    accession_number: str = ""
    # The result's per-slice P(COVID), as a JSON list ('' before a result).
    slice_probabilities: str = ""
    # The routing rule (ctcovid.dicom.rules) the series matched when it was last claimed.
    rule: str = ""

    def __post_init__(self) -> None:
        self.state = JobState(self.state)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COLUMNS = ", ".join(f.name for f in fields(SeriesRecord))


class DeliveryState(StrEnum):
    """The state of one result's delivery to one destination (a row of ``deliveries``)."""

    PENDING = "pending"
    """To be sent (again) at ``next_try``; a message built for it is in ``message_path``."""
    SENT = "sent"
    """The destination acknowledged the message (``sent_count`` so far for the series)."""
    FAILED = "failed"
    """Refused (the destination's reason), or sending gave up; ``ctcovid queue --retry``."""


@dataclass
class DeliveryRecord:
    """One row of ``deliveries``: the current result of a series at one named destination.

    Each (study, series, destination) has its own state, attempts and backoff, apart from the
    series' job and from every other destination: a dead RIS never delays the SR and a dead
    PACS never delays the RIS. The row carries the SR it reports (``revision``,
    ``sr_sop_instance_uid``, ``sr_path``) and, once built, the message (``message_id``, the
    file ``message_path``): a send after a crash sends that very message again.
    """

    study_instance_uid: str
    series_instance_uid: str
    destination: str
    kind: str  # hl7 (later: c-store, stow-rs)
    state: DeliveryState
    revision: int
    sr_path: str
    sr_sop_instance_uid: str
    message_id: str
    message_path: str
    attempts: int
    next_try: float
    reason: str
    # Messages the destination acknowledged for this series, and the SR of the last one.
    sent_count: int
    sent_sr_sop_instance_uid: str
    updated_at: float

    def __post_init__(self) -> None:
        self.state = DeliveryState(self.state)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_DELIVERY_COLUMNS = ", ".join(f.name for f in fields(DeliveryRecord))
# A destination that receives every new result of a series: (name, kind).
Destination = tuple[str, str]


def _key(record: SeriesRecord) -> tuple[str, str]:
    """The primary key of a series row: (study, series) in the column order of the queries."""
    return (record.study_instance_uid, record.series_instance_uid)


def _require(transition: str, record: SeriesRecord) -> None:
    """Refuse ``transition`` for a record whose state the state table does not allow it from."""
    sources, _ = TRANSITIONS[transition]
    if record.state not in sources:
        allowed = ", ".join(sorted(s.value for s in sources))
        raise JobStateError(
            f"Series {record.series_instance_uid} (study {record.study_instance_uid}): "
            f"{transition} applies to a job in state {allowed}, not {record.state.value}"
        )


class JobDatabase:
    """Instances, series and their jobs in SQLite (WAL); safe to share between threads.

    Several processes (the listener and the worker) open the same database; SQLite's locking
    serialises their writes.
    """

    def __init__(self, db_path: Path | str) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        # WAL: the listener writes while the worker reads. FULL: a commit (a job's state, a
        # receipt) is on disk when it returns, also across a power loss.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._migrate()
            self._conn.executescript(SCHEMA)
            self._add_missing_columns()
            self._conn.executescript(HISTORY_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _add_missing_columns(self) -> None:
        """Bring a store made by an older version up to the schema (new columns only)."""
        present = {row[1] for row in self._conn.execute("PRAGMA table_info(series)")}
        for column, declaration in (
            ("sent_sr_path", "TEXT NOT NULL DEFAULT ''"),
            ("sent_label", "TEXT NOT NULL DEFAULT ''"),
            ("sent_probability", "REAL"),
            ("accession_number", "TEXT NOT NULL DEFAULT ''"),
            ("slice_probabilities", "TEXT NOT NULL DEFAULT ''"),
            ("rule", "TEXT NOT NULL DEFAULT ''"),
        ):
            if column in present:
                continue
            try:
                self._conn.execute(f"ALTER TABLE series ADD COLUMN {column} {declaration}")
            except sqlite3.OperationalError as exc:  # the other process added it first
                if "duplicate column" not in str(exc):
                    raise

    def _migrate(self) -> None:
        """Re-key a version-1 ``series`` table (series UID alone) by (study, series)."""
        pk = [
            r["name"]
            for r in sorted(
                self._conn.execute("PRAGMA table_info(series)").fetchall(), key=lambda r: r["pk"]
            )
            if r["pk"]
        ]
        if pk != ["series_instance_uid"]:
            return
        old = {r["name"] for r in self._conn.execute("PRAGMA table_info(series)").fetchall()}
        columns = ", ".join(f.name for f in fields(SeriesRecord) if f.name in old)
        with self._transaction() as db:
            db.execute("DROP INDEX IF EXISTS series_state")
            db.execute("ALTER TABLE series RENAME TO series_v1")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"INSERT INTO series ({columns}) SELECT {columns} FROM series_v1")
            db.execute("DROP TABLE series_v1")
        logger.info("event=store_migrated schema_version=%d", SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _refused(self, transition: str, record: SeriesRecord) -> None:
        """Log that ``transition`` found the job moved on in the database, and left it there."""
        current = self.get(record.series_instance_uid, record.study_instance_uid)
        logger.info(
            "event=transition_refused transition=%s study=%s series=%s expected=%s now=%s",
            transition,
            record.study_instance_uid,
            record.series_instance_uid,
            record.state.value,
            current.state.value if current is not None else "-",
        )

    # -- instances --------------------------------------------------------------------------

    def stored_instance(self, sop_instance_uid: str) -> tuple[str, str, str] | None:
        """``(path, study, series)`` recorded for ``sop_instance_uid``, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT path, study_instance_uid, series_instance_uid FROM instances "
                "WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        return (row[0], row[1], row[2]) if row is not None else None

    def known_instances(self) -> set[str]:
        """The SOPInstanceUIDs of every recorded instance."""
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT sop_instance_uid FROM instances")}

    def record_instance(
        self,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: str,
        calling_aet: str = "",
        received_at: float | None = None,
        supersedes: tuple[str, str, str] | None = None,
        accession_number: str = "",
    ) -> bool:
        """Record a stored instance (``path`` relative to the store); a new one (re)opens its
        series for classification. ``accession_number`` is noted on the series when it has none.

        ``supersedes`` is ``(study, series, kept_as)`` when the instance replaces different
        content under the same SOPInstanceUID: the replacement is recorded, and the series that
        held the old content is re-opened too. Returns True when the series' content changed.
        """
        now = time.time() if received_at is None else received_at
        key = (study_instance_uid, series_instance_uid)
        values = (
            sop_instance_uid,
            study_instance_uid,
            series_instance_uid,
            sop_class_uid,
            path,
            calling_aet,
            now,
        )
        with self._transaction() as db:
            if supersedes is None:
                cur = db.execute(
                    "INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)", values
                )
                changed = cur.rowcount == 1
            else:
                db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)", values)
                old_study, old_series, kept_as = supersedes
                if kept_as:
                    db.execute(
                        "INSERT INTO replaced VALUES (?, ?, ?, ?, ?, ?)",
                        (sop_instance_uid, old_study, old_series, kept_as, path, now),
                    )
                if (old_study, old_series) != key:
                    self._reopen(db, (old_study, old_series), now, added=-1)
                changed = True
            row = db.execute(
                "SELECT state FROM series WHERE study_instance_uid = ? AND series_instance_uid = ?",
                key,
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO series (series_instance_uid, study_instance_uid, state, "
                    "n_instances, first_received, last_received, updated_at, accession_number) "
                    "VALUES (?, ?, ?, 1, ?, ?, ?, ?)",
                    (
                        series_instance_uid,
                        study_instance_uid,
                        RECEIVED,
                        now,
                        now,
                        now,
                        accession_number,
                    ),
                )
            elif changed:
                added = 0 if supersedes is not None and supersedes[:2] == key else 1
                self._reopen(db, key, now, added=added)
            elif row["state"] == RECEIVED:
                # The same instance again (a resend) still means the series is not quiet.
                db.execute(
                    "UPDATE series SET last_received = ? "
                    "WHERE study_instance_uid = ? AND series_instance_uid = ?",
                    (now, *key),
                )
            if row is not None and accession_number:
                db.execute(
                    "UPDATE series SET accession_number = ? WHERE study_instance_uid = ? "
                    "AND series_instance_uid = ? AND accession_number = ''",
                    (accession_number, *key),
                )
        return changed

    @staticmethod
    def _reopen(db: sqlite3.Connection, key: tuple[str, str], now: float, *, added: int) -> None:
        """Transition ``reopen``: the content of series ``key`` changed, classify it again (a
        new revision if sent).

        A classifying job keeps its state; the changed generation tells the worker that its
        result is stale when it finishes.
        """
        db.execute(
            "UPDATE series SET n_instances = n_instances + ?, last_received = ?, "
            "generation = generation + 1, updated_at = ?, "
            "state = CASE WHEN state = ? THEN state ELSE ? END, "
            "reason = CASE WHEN state = ? THEN reason ELSE '' END, "
            "classify_attempts = CASE WHEN state = ? THEN classify_attempts ELSE 0 END "
            "WHERE study_instance_uid = ? AND series_instance_uid = ?",
            (added, now, now, CLASSIFYING, RECEIVED, CLASSIFYING, CLASSIFYING, *key),
        )

    def instance_paths(
        self, series_instance_uid: str, study_instance_uid: str | None = None
    ) -> list[str]:
        """The recorded files of a series, relative to the store (of every study that has that
        series UID if no study is given)."""
        query = "SELECT path FROM instances WHERE series_instance_uid = ?"
        args: tuple[str, ...] = (series_instance_uid,)
        if study_instance_uid is not None:
            query += " AND study_instance_uid = ?"
            args = (series_instance_uid, study_instance_uid)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY rowid", args).fetchall()
        return [r[0] for r in rows]

    def replaced_instances(self) -> list[dict[str, Any]]:
        """Every superseded instance: its UIDs, where the old file is kept, what replaced it."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM replaced ORDER BY rowid").fetchall()
        return [dict(r) for r in rows]

    def count_instances(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    # -- reading jobs -----------------------------------------------------------------------

    def get(
        self, series_instance_uid: str, study_instance_uid: str | None = None
    ) -> SeriesRecord | None:
        """The series with this UID (in this study; without a study, the first to arrive)."""
        query = f"SELECT {_COLUMNS} FROM series WHERE series_instance_uid = ?"
        args: tuple[str, ...] = (series_instance_uid,)
        if study_instance_uid is not None:
            query += " AND study_instance_uid = ?"
            args = (series_instance_uid, study_instance_uid)
        with self._lock:
            row = self._conn.execute(query + " ORDER BY first_received LIMIT 1", args).fetchone()
        return SeriesRecord(**dict(row)) if row is not None else None

    def list_series(self, state: str | None = None) -> list[SeriesRecord]:
        query = f"SELECT {_COLUMNS} FROM series"
        args: tuple[Any, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (JobState(state),)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY first_received, rowid", args).fetchall()
        return [SeriesRecord(**dict(r)) for r in rows]

    def updated_since(self, since: float, states: tuple[JobState, ...]) -> list[SeriesRecord]:
        """Jobs in one of ``states`` whose record changed at or after ``since`` (oldest change
        first): what the node's alerts poll for."""
        marks = ", ".join("?" for _ in states)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM series WHERE updated_at >= ? AND state IN ({marks}) "
                "ORDER BY updated_at, rowid",
                (since, *states),
            ).fetchall()
        return [SeriesRecord(**dict(r)) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        """The number of jobs in each state, every state named (plain strings as keys)."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM series GROUP BY state")
            found = {r[0]: r[1] for r in rows}
        return {state.value: found.get(state.value, 0) for state in STATES}

    def page(
        self,
        *,
        state: str | None = None,
        accession_number: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[int, list[SeriesRecord]]:
        """``(total, records)``: the series matching ``state`` and an accession number
        containing ``accession_number``, newest first (by last arrival), ``limit`` of them
        from ``offset``."""
        where: list[str] = []
        args: list[Any] = []
        if state:
            where.append("state = ?")
            args.append(JobState(state))
        if accession_number:
            where.append("instr(accession_number, ?) > 0")
            args.append(accession_number)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        with self._lock:
            total = int(
                self._conn.execute(f"SELECT COUNT(*) FROM series{clause}", args).fetchone()[0]
            )
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM series{clause} "
                "ORDER BY last_received DESC, rowid DESC LIMIT ? OFFSET ?",
                (*args, max(0, limit), max(0, offset)),
            ).fetchall()
        return total, [SeriesRecord(**dict(r)) for r in rows]

    def history(self, series_instance_uid: str, study_instance_uid: str) -> list[dict[str, Any]]:
        """The recorded changes of a series' job, oldest first: ``at``, ``state``, ``reason``,
        ``attempts``, ``revision``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT at, state, reason, attempts, revision FROM history "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? ORDER BY rowid",
                (study_instance_uid, series_instance_uid),
            ).fetchall()
        return [dict(r) for r in rows]

    def last_times(self) -> dict[str, float | None]:
        """When an instance was last received, and a job last became classified and sent."""
        with self._lock:
            received = self._conn.execute("SELECT MAX(last_received) FROM series").fetchone()[0]
            found = dict(
                self._conn.execute(
                    "SELECT state, MAX(at) FROM history WHERE state IN (?, ?) GROUP BY state",
                    (CLASSIFIED, SENT),
                ).fetchall()
            )
        return {
            "received": received,
            "classified": found.get(CLASSIFIED.value),
            "sent": found.get(SENT.value),
        }

    def per_hour(self, since: float, hours: int = 24) -> dict[str, list[int]]:
        """Per hour from ``since``: series first received, results classified, SRs sent."""
        with self._lock:
            received = self._conn.execute(
                "SELECT first_received FROM series WHERE first_received >= ?", (since,)
            ).fetchall()
            done = self._conn.execute(
                "SELECT state, at FROM history WHERE at >= ? AND state IN (?, ?)",
                (since, CLASSIFIED, SENT),
            ).fetchall()
        counts = {name: [0] * hours for name in ("received", CLASSIFIED.value, SENT.value)}
        events = [("received", at) for (at,) in received] + [(state, at) for state, at in done]
        for name, at in events:
            hour = int((at - since) // 3600)
            if hour < hours:
                counts[name][hour] += 1
        return counts

    def note_slice_probabilities(self, record: SeriesRecord, probabilities: list[float]) -> None:
        """Keep the per-slice P(COVID) of the result just recorded for ``record`` (for display;
        not a transition)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET slice_probabilities = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND generation = ?",
                (
                    json.dumps([round(float(p), 6) for p in probabilities]),
                    *_key(record),
                    record.generation,
                ),
            )

    def note_rule(self, record: SeriesRecord, rule: str) -> None:
        """Record the routing rule ``record`` matched (shown by ``ctcovid queue``; not a
        transition)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET rule = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ?",
                (rule, *_key(record)),
            )
        record.rule = rule

    def calling_aet(self, study_instance_uid: str, series_instance_uid: str) -> str:
        """The calling AE title that sent the series' first instance ('' if none recorded)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT calling_aet FROM instances WHERE study_instance_uid = ? "
                "AND series_instance_uid = ? ORDER BY received_at, rowid LIMIT 1",
                (study_instance_uid, series_instance_uid),
            ).fetchone()
        return str(row[0]) if row is not None else ""

    def take_ignored_files(self, ignored_before: float) -> list[str]:
        """Forget the instances of every ``ignored`` series ignored before ``ignored_before``
        and return their paths (relative to the store) for the caller to delete.

        The rows go first, in one transaction with the state check: an instance that arrives
        later re-opens its series as new content, and the series is judged again.
        """
        with self._transaction() as db:
            rows = db.execute(
                "SELECT i.sop_instance_uid, i.path FROM instances i JOIN series s "
                "ON s.study_instance_uid = i.study_instance_uid "
                "AND s.series_instance_uid = i.series_instance_uid "
                "WHERE s.state = ? AND s.updated_at <= ?",
                (IGNORED, ignored_before),
            ).fetchall()
            db.executemany(
                "DELETE FROM instances WHERE sop_instance_uid = ?",
                [(r["sop_instance_uid"],) for r in rows],
            )
        return [str(r["path"]) for r in rows]

    def due_sends(self, now: float | None = None) -> list[SeriesRecord]:
        """``classified`` series whose next send attempt is due, earliest first."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM series WHERE state = ? AND next_try <= ? "
                "ORDER BY next_try, rowid",
                (CLASSIFIED, now),
            ).fetchall()
        return [SeriesRecord(**dict(r)) for r in rows]

    # -- transitions ------------------------------------------------------------------------

    def promote_stable(self, stable_seconds: float, now: float | None = None) -> int:
        """``received`` -> ``waiting`` for every series quiet for ``stable_seconds``; how many."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE series SET state = ?, next_try = 0, updated_at = ? "
                "WHERE state = ? AND last_received <= ?",
                (WAITING, now, RECEIVED, now - stable_seconds),
            )
            return cur.rowcount

    # The job claim_next takes: the oldest due waiting series, by first arrival.
    _NEXT_WAITING = (
        f"SELECT {_COLUMNS} FROM series WHERE state = ? AND next_try <= ? "
        "ORDER BY first_received, rowid LIMIT 1"
    )

    def next_waiting(self) -> SeriesRecord | None:
        """The series :meth:`claim_next` would take now, left ``waiting`` (not a transition).

        For a worker that decodes it ahead: every change to a series' files is followed by a
        new ``generation`` (:meth:`record_instance`), so files read after this call are those a
        claim with this same generation finds; a claim with another generation must read them
        again.
        """
        with self._lock:
            row = self._conn.execute(self._NEXT_WAITING, (WAITING, time.time())).fetchone()
        return SeriesRecord(**dict(row)) if row is not None else None

    def claim_next(self) -> SeriesRecord | None:
        """``waiting`` -> ``classifying`` for the oldest due series (by first arrival)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(self._NEXT_WAITING, (WAITING, now)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE series SET state = ?, classify_attempts = classify_attempts + 1, "
                "updated_at = ? WHERE study_instance_uid = ? AND series_instance_uid = ?",
                (CLASSIFYING, now, row["study_instance_uid"], row["series_instance_uid"]),
            )
        record = SeriesRecord(**dict(row))
        record.state = CLASSIFYING
        record.classify_attempts += 1
        return record

    def _finish(
        self,
        transition: str,
        record: SeriesRecord,
        assignments: str,
        args: tuple[Any, ...],
        *,
        on_predecessor: bool = False,
        deliveries: Sequence[Destination] = (),
        sr: tuple[int, str, str] | None = None,
    ) -> bool:
        """Apply a worker result unless a new instance arrived meanwhile (then ``received``).

        ``deliveries`` with ``sr`` (revision, path, SOP Instance UID): the result's delivery to
        each of these destinations is queued in the same transaction, so a crash can never
        keep the result and lose its delivery.

        ``on_predecessor``: the result names the delivered SR ``record.sent_revision``; if
        another was delivered since, raise :class:`PredecessorChanged` (the job stays
        ``classifying``), checked in the same transaction that stores the result.
        """
        _require(transition, record)
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                f"UPDATE series SET {assignments}, updated_at = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND state = ? "
                "AND generation = ?" + (" AND sent_revision = ?" if on_predecessor else ""),
                (
                    *args,
                    now,
                    *_key(record),
                    CLASSIFYING,
                    record.generation,
                    *((record.sent_revision,) if on_predecessor else ()),
                ),
            )
            if cur.rowcount == 1:
                if sr is not None:
                    for destination in deliveries:
                        _queue_delivery(db, record, destination, sr, now)
                return True
            if on_predecessor:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM series "
                    "WHERE study_instance_uid = ? AND series_instance_uid = ? AND state = ? "
                    "AND generation = ?",
                    (*_key(record), CLASSIFYING, record.generation),
                ).fetchone()
                if row is not None:
                    raise PredecessorChanged(SeriesRecord(**dict(row)))
            db.execute(
                "UPDATE series SET state = ?, updated_at = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND state = ?",
                (RECEIVED, now, *_key(record), CLASSIFYING),
            )
            return False

    def finish_classified(
        self,
        record: SeriesRecord,
        *,
        revision: int,
        sr_path: str,
        sr_sop_instance_uid: str,
        probability_covid: float,
        label: str,
        classify_seconds: float,
        deliveries: Sequence[Destination] = (),
        shadow: str | None = None,
        handed_over: bool = False,
    ) -> bool:
        """``classifying`` -> ``classified`` with the built SR (``sr_path`` relative to the
        store); False (and ``received``) if the series changed while classifying. With
        ``shadow`` (the name of a ``shadow`` rule): ``shadow`` instead, the SR kept and never
        sent (give no ``deliveries``). With ``handed_over`` (the node has no SR peer of its
        own, only ``deliveries``): ``sent`` at once, this SR recorded as the delivered
        revision, so that the next result is its revision (or not sent when the same).

        The SR's delivery to each of ``deliveries`` (name, kind) is queued with it, unless
        that destination has this very SR already (see :class:`DeliveryRecord`).

        Raises
        ------
        PredecessorChanged
            If an SR was delivered after ``record`` was read: the SR names the wrong
            predecessor (revision ``record.sent_revision``) and must be built again.
        """
        state, reason = CLASSIFIED, ""
        if shadow is not None:
            state, reason = SHADOW, f"shadow rule {shadow!r}: the SR is kept, not sent"
        elif handed_over:
            names = ", ".join(name for name, _ in deliveries)
            state, reason = SENT, f"revision {revision} queued for delivery to {names}"
        handed = handed_over and shadow is None
        return self._finish(
            "finish_classified",
            record,
            "state = ?, reason = ?, revision = ?, sr_path = ?, sr_sop_instance_uid = ?, "
            "probability_covid = ?, label = ?, classify_seconds = ?, attempts = 0, next_try = ?, "
            "sent_revision = CASE WHEN ? THEN ? ELSE sent_revision END, "
            "sent_sr_path = CASE WHEN ? THEN ? ELSE sent_sr_path END, "
            "sent_label = CASE WHEN ? THEN ? ELSE sent_label END, "
            "sent_probability = CASE WHEN ? THEN ? ELSE sent_probability END",
            (
                state,
                reason,
                revision,
                sr_path,
                sr_sop_instance_uid,
                probability_covid,
                label,
                classify_seconds,
                time.time(),
                handed,
                revision,
                handed,
                sr_path,
                handed,
                label,
                handed,
                probability_covid,
            ),
            on_predecessor=True,
            deliveries=deliveries,
            sr=(revision, sr_path, sr_sop_instance_uid),
        )

    def finish_unchanged(
        self,
        record: SeriesRecord,
        *,
        probability_covid: float,
        label: str,
        classify_seconds: float,
        sent_sop_instance_uid: str = "",
    ) -> bool:
        """``classifying`` -> ``sent``: the new result states what revision
        ``record.sent_revision`` states (label and probability), so nothing is sent. False as
        :meth:`finish_classified`, which also raises :class:`PredecessorChanged` likewise.
        """
        reason = (
            f"classified again: label and probability unchanged, revision "
            f"{record.sent_revision} stands"
        )
        return self._finish(
            "finish_unchanged",
            record,
            "state = ?, reason = ?, revision = sent_revision, sr_path = sent_sr_path, "
            "sr_sop_instance_uid = ?, probability_covid = ?, label = ?, classify_seconds = ?, "
            "attempts = 0",
            (SENT, reason, sent_sop_instance_uid, probability_covid, label, classify_seconds),
            on_predecessor=True,
        )

    def finish_unusable(self, record: SeriesRecord, reason: str) -> bool:
        """``classifying`` -> ``unusable`` with the reason; False as :meth:`finish_classified`."""
        return self._finish(
            "finish_unusable", record, "state = ?, reason = ?, sr_path = ''", (UNUSABLE, reason)
        )

    def finish_ignored(self, record: SeriesRecord, rule: str) -> bool:
        """``classifying`` -> ``ignored`` by the rule named ``rule``; False as
        :meth:`finish_classified`."""
        return self._finish(
            "finish_ignored",
            record,
            "state = ?, reason = ?, sr_path = ''",
            (IGNORED, f"ignored by rule {rule!r}: not classified"),
        )

    def finish_failed(self, record: SeriesRecord, reason: str) -> bool:
        """``classifying`` -> ``failed`` with the reason; False as :meth:`finish_classified`."""
        # No SR of this generation exists; a retry must classify again, not resend an old one.
        return self._finish(
            "finish_failed", record, "state = ?, reason = ?, sr_path = ''", (FAILED, reason)
        )

    def defer_classification(
        self, record: SeriesRecord, reason: str, *, retry_seconds: float
    ) -> bool:
        """``classifying`` -> ``waiting`` for ``retry_seconds`` (the disk is below its floor,
        say): a temporary condition, so it is neither failed nor counted as an attempt.
        """
        return self._finish(
            "defer_classification",
            record,
            "state = ?, reason = ?, next_try = ?, "
            "classify_attempts = MAX(0, classify_attempts - 1)",
            (WAITING, reason, time.time() + retry_seconds),
        )

    def mark_sent(self, record: SeriesRecord) -> bool:
        """``classified`` -> ``sent``. The peer has revision ``record.revision``, whatever
        happened to the series since: that is recorded in any case (it is the predecessor of
        the next revision). False when the job moved on (it keeps its new state); a newer
        result that was stored meanwhile as a revision not above this one (it was built before
        this delivery was known, naming an older predecessor) goes back to ``waiting`` to be
        classified again as the revision after this one, never sent beside it.
        """
        _require("mark_sent", record)
        now = time.time()
        with self._transaction() as db:
            newest = "CASE WHEN ? >= sent_revision THEN ? ELSE {} END"
            db.execute(
                "UPDATE series SET "
                f"sent_sr_path = {newest.format('sent_sr_path')}, "
                f"sent_label = {newest.format('sent_label')}, "
                f"sent_probability = {newest.format('sent_probability')}, "
                "sent_revision = MAX(sent_revision, ?), updated_at = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ?",
                (
                    record.revision,
                    record.sr_path,
                    record.revision,
                    record.label,
                    record.revision,
                    record.probability_covid,
                    record.revision,
                    now,
                    *_key(record),
                ),
            )
            cur = db.execute(
                "UPDATE series SET state = ?, reason = '', attempts = attempts + 1 "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND state = ? "
                "AND sr_path = ?",
                (SENT, *_key(record), CLASSIFIED, record.sr_path),
            )
            moved = cur.rowcount == 1
            # A newer result stored while this SR was in flight was built on the older
            # predecessor: classify it again, so that it goes as the revision after this one.
            stale = db.execute(
                "UPDATE series SET state = ?, next_try = 0, classify_attempts = 0, reason = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND state = ? "
                "AND sr_path != ? AND revision <= ?",
                (
                    WAITING,
                    f"revision {record.revision} was delivered while a newer result waited to "
                    "be sent; classifying again to state the revision after it",
                    *_key(record),
                    CLASSIFIED,
                    record.sr_path,
                    record.revision,
                ),
            ).rowcount
        if stale:
            logger.info(
                "event=requeued_after_delivery study=%s series=%s delivered_revision=%d",
                record.study_instance_uid,
                record.series_instance_uid,
                record.revision,
            )
        elif not moved:
            self._refused("mark_sent", record)
        return moved

    def mark_send_failed(
        self,
        record: SeriesRecord,
        reason: str,
        *,
        retry_seconds: float,
        max_retry_seconds: float,
        max_attempts: int,
        permanent: bool = False,
    ) -> tuple[JobState, float | None]:
        """``classified`` -> ``classified`` (back off exponentially) or, after ``max_attempts``
        or at once for a ``permanent`` refusal (one that sending again cannot change),
        ``failed``.

        Returns the new state and, while retrying, the time of the next attempt. A job that
        moved on meanwhile keeps its new state (logged).
        """
        _require("mark_send_failed", record)
        attempts = record.attempts + 1
        now = time.time()
        next_try: float | None
        if permanent:
            state, next_try = FAILED, None
            reason = (
                f"the SR was refused (attempt {attempts}), sending it again cannot help: {reason}"
            )
        elif attempts >= max_attempts:
            state, next_try = FAILED, None
            reason = f"sending the SR failed {attempts} time(s); last: {reason}"
        else:
            state = CLASSIFIED
            next_try = now + min(max_retry_seconds, retry_seconds * 2 ** (attempts - 1))
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE series SET state = ?, reason = ?, attempts = ?, next_try = ?, "
                "updated_at = ? WHERE study_instance_uid = ? AND series_instance_uid = ? "
                "AND state = ? AND sr_path = ?",
                (
                    state,
                    reason,
                    attempts,
                    next_try if next_try is not None else 0.0,
                    now,
                    *_key(record),
                    CLASSIFIED,
                    record.sr_path,
                ),
            )
            moved = cur.rowcount == 1
        if not moved:
            self._refused("mark_send_failed", record)
        return state, next_try

    def resume(self, max_classify_attempts: int) -> int:
        """After a crash: ``classifying`` -> ``waiting`` (or ``failed``, for jobs that already
        stopped the worker ``max_classify_attempts`` times). Returns how many resumed.
        """
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET state = ?, reason = ?, updated_at = ? "
                "WHERE state = ? AND classify_attempts >= ?",
                (
                    FAILED,
                    f"classification stopped the worker {max_classify_attempts} time(s)",
                    now,
                    CLASSIFYING,
                    max_classify_attempts,
                ),
            )
            cur = db.execute(
                "UPDATE series SET state = ?, updated_at = ? WHERE state = ?",
                (WAITING, now, CLASSIFYING),
            )
            return cur.rowcount

    def retry(
        self,
        series_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        *,
        sr_exists: Callable[[str], bool],
    ) -> list[str]:
        """``failed`` -> ``classified`` (resend the built SR, when ``sr_exists`` says its file is
        there) or ``waiting`` (classify again), for one series or all. Jobs in other states are
        not touched. Returns the series UIDs re-queued.
        """
        now = time.time()
        with self._transaction() as db:
            query = (
                "SELECT study_instance_uid, series_instance_uid, sr_path, revision, "
                "sent_revision FROM series WHERE state = ?"
            )
            args: tuple[Any, ...] = (FAILED,)
            if series_instance_uid is not None:
                query += " AND series_instance_uid = ?"
                args = (*args, series_instance_uid)
            if study_instance_uid is not None:
                query += " AND study_instance_uid = ?"
                args = (*args, study_instance_uid)
            rows = db.execute(query, args).fetchall()
            for study, uid, sr_path, revision, sent_revision in rows:
                # An SR at or below the delivered revision names an older predecessor.
                if sr_path and revision > sent_revision and sr_exists(sr_path):
                    db.execute(
                        "UPDATE series SET state = ?, reason = '', attempts = 0, next_try = ?, "
                        "updated_at = ? WHERE study_instance_uid = ? AND series_instance_uid = ?",
                        (CLASSIFIED, now, now, study, uid),
                    )
                else:
                    db.execute(
                        "UPDATE series SET state = ?, reason = '', classify_attempts = 0, "
                        "next_try = 0, updated_at = ? "
                        "WHERE study_instance_uid = ? AND series_instance_uid = ?",
                        (WAITING, now, study, uid),
                    )
        return [r[1] for r in rows]

    # -- deliveries to named destinations ---------------------------------------------------

    def deliveries(
        self, study_instance_uid: str | None = None, series_instance_uid: str | None = None
    ) -> list[DeliveryRecord]:
        """The delivery rows (of one series, or all), oldest first."""
        query = f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"
        where, args = [], []
        if study_instance_uid is not None:
            where.append("study_instance_uid = ?")
            args.append(study_instance_uid)
        if series_instance_uid is not None:
            where.append("series_instance_uid = ?")
            args.append(series_instance_uid)
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY rowid", args).fetchall()
        return [DeliveryRecord(**dict(r)) for r in rows]

    def due_deliveries(
        self, kind: str, now: float | None = None, *, destination: str | None = None
    ) -> list[DeliveryRecord]:
        """``pending`` deliveries of ``kind`` (to ``destination`` when given) whose next
        attempt is due, earliest first."""
        now = time.time() if now is None else now
        query = (
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE kind = ? AND state = ? "
            "AND next_try <= ?"
        )
        args: tuple[Any, ...] = (kind, DeliveryState.PENDING, now)
        if destination is not None:
            query += " AND destination = ?"
            args += (destination,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY next_try, rowid", args).fetchall()
        return [DeliveryRecord(**dict(r)) for r in rows]

    def delivery_prepared(self, record: DeliveryRecord, message_id: str, message_path: str) -> bool:
        """Record the message built for ``record`` (before its first send: every later send,
        after a crash too, sends this one). False when the row moved on (a newer result)."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE deliveries SET message_id = ?, message_path = ?, updated_at = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND destination = ? "
                "AND state = ? AND sr_sop_instance_uid = ? AND message_path = ''",
                (
                    message_id,
                    message_path,
                    time.time(),
                    *_delivery_key(record),
                    DeliveryState.PENDING,
                    record.sr_sop_instance_uid,
                ),
            )
            return cur.rowcount == 1

    def mark_delivered(self, record: DeliveryRecord) -> bool:
        """``pending`` -> ``sent``: the destination acknowledged ``record.message_id``. False
        when the row carries another message by now (a newer result, to be sent next)."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE deliveries SET state = ?, reason = '', attempts = attempts + 1, "
                "sent_count = sent_count + 1, sent_sr_sop_instance_uid = ?, updated_at = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND destination = ? "
                "AND state = ? AND message_id = ?",
                (
                    DeliveryState.SENT,
                    record.sr_sop_instance_uid,
                    time.time(),
                    *_delivery_key(record),
                    DeliveryState.PENDING,
                    record.message_id,
                ),
            )
            if cur.rowcount == 1:
                return True
            # A newer result replaced the message in flight; the destination still holds this
            # one, so the newer one is a correction of it.
            db.execute(
                "UPDATE deliveries SET sent_count = sent_count + 1, sent_sr_sop_instance_uid = ?, "
                "message_id = '', message_path = '' "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND destination = ? "
                "AND state = ? AND message_id != ?",
                (
                    record.sr_sop_instance_uid,
                    *_delivery_key(record),
                    DeliveryState.PENDING,
                    record.message_id,
                ),
            )
            return False

    def mark_delivery_failed(
        self,
        record: DeliveryRecord,
        reason: str,
        *,
        retry_seconds: float,
        max_retry_seconds: float,
        max_attempts: int,
        permanent: bool = False,
    ) -> tuple[DeliveryState, float | None]:
        """A failed send: ``pending`` again after an exponential backoff, or ``failed`` after
        ``max_attempts`` or at once when ``permanent`` (the destination refused it).

        Returns the new state and, while retrying, the time of the next attempt.
        """
        attempts = record.attempts + 1
        now = time.time()
        next_try: float | None
        if permanent:
            state, next_try = DeliveryState.FAILED, None
            reason = f"refused (attempt {attempts}), sending it again cannot help: {reason}"
        elif attempts >= max_attempts:
            state, next_try = DeliveryState.FAILED, None
            reason = f"sending failed {attempts} time(s); last: {reason}"
        else:
            state = DeliveryState.PENDING
            next_try = now + min(max_retry_seconds, retry_seconds * 2 ** (attempts - 1))
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, reason = ?, attempts = ?, next_try = ?, "
                "updated_at = ? WHERE study_instance_uid = ? AND series_instance_uid = ? "
                "AND destination = ? AND state = ? AND message_id = ?",
                (
                    state,
                    reason,
                    attempts,
                    next_try if next_try is not None else 0.0,
                    now,
                    *_delivery_key(record),
                    DeliveryState.PENDING,
                    record.message_id,
                ),
            )
        return state, next_try

    def retry_deliveries(
        self, series_instance_uid: str | None = None, study_instance_uid: str | None = None
    ) -> list[str]:
        """``failed`` -> ``pending`` (attempts reset, due now) for the deliveries of one series
        or all; the series UIDs re-queued. The message already built is sent again as it is."""
        now = time.time()
        where = ["state = ?"]
        args: list[Any] = [DeliveryState.FAILED]
        if series_instance_uid is not None:
            where.append("series_instance_uid = ?")
            args.append(series_instance_uid)
        if study_instance_uid is not None:
            where.append("study_instance_uid = ?")
            args.append(study_instance_uid)
        clause = " AND ".join(where)
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT DISTINCT series_instance_uid FROM deliveries WHERE {clause}", args
            ).fetchall()
            db.execute(
                "UPDATE deliveries SET state = ?, reason = '', attempts = 0, next_try = ?, "
                f"updated_at = ? WHERE {clause}",
                (DeliveryState.PENDING, now, now, *args),
            )
        return [r[0] for r in rows]


def _delivery_key(record: DeliveryRecord) -> tuple[str, str, str]:
    return (record.study_instance_uid, record.series_instance_uid, record.destination)


def _queue_delivery(
    db: sqlite3.Connection,
    record: SeriesRecord,
    destination: Destination,
    sr: tuple[int, str, str],
    now: float,
) -> None:
    """Queue the SR ``sr`` (revision, path, SOP Instance UID) of ``record`` for
    ``destination``, replacing a result not sent yet; a destination that has (or is sending)
    this very SR keeps its row as it is."""
    name, kind = destination
    revision, sr_path, sr_uid = sr
    db.execute(
        "INSERT INTO deliveries (study_instance_uid, series_instance_uid, destination, kind, "
        "state, revision, sr_path, sr_sop_instance_uid, next_try, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (study_instance_uid, series_instance_uid, destination) DO UPDATE SET "
        "kind = excluded.kind, state = excluded.state, revision = excluded.revision, "
        "sr_path = excluded.sr_path, sr_sop_instance_uid = excluded.sr_sop_instance_uid, "
        "message_id = '', message_path = '', attempts = 0, next_try = excluded.next_try, "
        "reason = '', updated_at = excluded.updated_at "
        "WHERE deliveries.sr_sop_instance_uid != excluded.sr_sop_instance_uid",
        (*_key(record), name, kind, DeliveryState.PENDING, revision, sr_path, sr_uid, now, now),
    )
