"""Durable storage of received instances and the job database of the DICOM node.

Layout under the store folder::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received, as sent
    sr/<SeriesInstanceUID>/<SR SOPInstanceUID>.dcm                          reports built
    tmp/                                                                    half-written files
    node.sqlite                                                             instances, series, jobs

Every file is written to ``tmp/``, fsynced and renamed into place, so a path under
``instances/`` or ``sr/`` always holds a complete file. Paths are built only from UIDs that match
``^[0-9]+(\\.[0-9]+)*$`` and have at most 64 characters, so no received value can name a file
outside the store. The files are the ground truth: :meth:`Store.reconcile` records any file the
database missed (a crash between rename and commit).

Each series is one job with a state:

``received``     instances arriving; becomes ``waiting`` after ``stable_seconds`` of quiet
``waiting``      complete, queued for the worker (arrival order)
``classifying``  the worker has it; back to ``waiting`` if the worker dies
``classified``   SR built and stored, to be sent (``attempts``, ``next_try``)
``sent``         the peer accepted the SR (revision ``sent_revision``, file ``sent_sr_path``)
``failed``       classification error, or sending gave up; ``reason`` says which
``unusable``     not a classifiable CT series; ``reason`` says why

A new instance for a series in any later state moves it back to ``received``: it is classified
again and, when an SR was already delivered, sent as revision ``sent_revision + 1`` that names
the SR in ``sent_sr_path`` as its predecessor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_CHARS = 64

RECEIVED = "received"
WAITING = "waiting"
CLASSIFYING = "classifying"
CLASSIFIED = "classified"
SENT = "sent"
FAILED = "failed"
UNUSABLE = "unusable"
STATES = (RECEIVED, WAITING, CLASSIFYING, CLASSIFIED, SENT, FAILED, UNUSABLE)
# States in which the job is done until a new instance arrives or someone retries it.
FINISHED = (SENT, FAILED, UNUSABLE)

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
    series_instance_uid TEXT PRIMARY KEY,
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
    sent_sr_path TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
"""


class InvalidUidError(ValueError):
    """A UID that may not become part of a path (wrong characters or too long)."""


class OutOfSpaceError(OSError):
    """Writing would take the store's file system below its free-space floor."""


def valid_uid(uid: object) -> bool:
    """True when ``uid`` is a DICOM UID safe to use as a file name (PS3.5 9.1)."""
    return isinstance(uid, str) and len(uid) <= UID_MAX_CHARS and bool(UID_PATTERN.match(uid))


def check_uid(uid: object, attribute: str) -> str:
    """Return ``uid`` or raise :class:`InvalidUidError` naming the attribute."""
    if not valid_uid(uid):
        shown = repr(uid)[:80]
        raise InvalidUidError(
            f"{attribute} {shown} is not a valid UID (digits and dots, at most "
            f"{UID_MAX_CHARS} characters)"
        )
    return str(uid)


@dataclass
class SeriesRecord:
    """One row of the ``series`` table: a series and the state of its job."""

    series_instance_uid: str
    study_instance_uid: str
    state: str
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

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COLUMNS = ", ".join(f.name for f in fields(SeriesRecord))


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX needs the directory itself fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Store:
    """Instances on disk and jobs in SQLite (WAL); safe to share between threads of a process.

    Several processes (the listener and the worker) open the same store; SQLite's locking
    serialises their writes.
    """

    def __init__(self, root: Path | str, *, min_free_mb: float = 0.0) -> None:
        self.root = Path(root)
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.instances_dir = self.root / "instances"
        self.sr_dir = self.root / "sr"
        self.tmp_dir = self.root / "tmp"
        for folder in (self.root, self.instances_dir, self.sr_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "node.sqlite"
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        # WAL: the listener writes while the worker reads. NORMAL sync loses at most the last
        # commits on power loss, never on a process crash; reconcile() recovers those from the
        # fsynced files.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._conn.executescript(SCHEMA)
            self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Bring a store made by an older version up to the schema (new columns only)."""
        present = {row[1] for row in self._conn.execute("PRAGMA table_info(series)")}
        if "sent_sr_path" not in present:
            try:
                self._conn.execute(
                    "ALTER TABLE series ADD COLUMN sent_sr_path TEXT NOT NULL DEFAULT ''"
                )
            except sqlite3.OperationalError as exc:  # the other process added it first
                if "duplicate column" not in str(exc):
                    raise

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

    # -- files ------------------------------------------------------------------------------

    def series_dir(self, study_instance_uid: str, series_instance_uid: str) -> Path:
        study = check_uid(study_instance_uid, "StudyInstanceUID (0020,000D)")
        series = check_uid(series_instance_uid, "SeriesInstanceUID (0020,000E)")
        return self.instances_dir / study / series

    def instance_path(self, study: str, series: str, sop_instance_uid: str) -> Path:
        sop = check_uid(sop_instance_uid, "SOPInstanceUID (0008,0018)")
        return self.series_dir(study, series) / f"{sop}.dcm"

    def sr_path(self, series_instance_uid: str, sr_sop_instance_uid: str) -> Path:
        series = check_uid(series_instance_uid, "SeriesInstanceUID (0020,000E)")
        sop = check_uid(sr_sop_instance_uid, "SR SOPInstanceUID")
        return self.sr_dir / series / f"{sop}.dcm"

    def check_free_space(self, needed_bytes: int = 0) -> None:
        """Raise :class:`OutOfSpaceError` if writing ``needed_bytes`` would cross the floor."""
        if self.min_free_bytes <= 0:
            return
        free = shutil.disk_usage(self.root).free
        if free - needed_bytes < self.min_free_bytes:
            raise OutOfSpaceError(
                f"{self.root}: {free // (1024 * 1024)} MB free, floor is "
                f"{self.min_free_bytes // (1024 * 1024)} MB"
            )

    def write_file(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename)."""
        self.check_free_space(len(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{path.name}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(path.parent)

    # -- instances --------------------------------------------------------------------------

    def put_instance(
        self,
        data: bytes,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        calling_aet: str = "",
    ) -> bool:
        """Store one instance (Part 10 bytes) and record it; True if it was new to the store.

        Raises :class:`InvalidUidError` before anything is written, :class:`OutOfSpaceError`
        below the free-space floor, ``OSError`` when the disk fails.
        """
        path = self.instance_path(study_instance_uid, series_instance_uid, sop_instance_uid)
        self.write_file(path, data)
        return self.record_instance(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            path=path,
            calling_aet=calling_aet,
        )

    def record_instance(
        self,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        path: Path,
        calling_aet: str = "",
        received_at: float | None = None,
    ) -> bool:
        """Record a stored instance; a new one (re)opens its series for classification."""
        now = time.time() if received_at is None else received_at
        with self._transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    sop_instance_uid,
                    study_instance_uid,
                    series_instance_uid,
                    sop_class_uid,
                    str(path.relative_to(self.root)),
                    calling_aet,
                    now,
                ),
            )
            new = cur.rowcount == 1
            row = db.execute(
                "SELECT state FROM series WHERE series_instance_uid = ?", (series_instance_uid,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO series (series_instance_uid, study_instance_uid, state, "
                    "n_instances, first_received, last_received, updated_at) "
                    "VALUES (?, ?, ?, 1, ?, ?, ?)",
                    (series_instance_uid, study_instance_uid, RECEIVED, now, now, now),
                )
            elif new:
                # A classifying job keeps its state; the changed generation tells the worker
                # that its result is stale when it finishes.
                db.execute(
                    "UPDATE series SET n_instances = n_instances + 1, last_received = ?, "
                    "generation = generation + 1, updated_at = ?, "
                    "state = CASE WHEN state = ? THEN state ELSE ? END, "
                    "reason = CASE WHEN state = ? THEN reason ELSE '' END, "
                    "classify_attempts = CASE WHEN state = ? THEN classify_attempts ELSE 0 END "
                    "WHERE series_instance_uid = ?",
                    (
                        now,
                        now,
                        CLASSIFYING,
                        RECEIVED,
                        CLASSIFYING,
                        CLASSIFYING,
                        series_instance_uid,
                    ),
                )
            elif row["state"] == RECEIVED:
                # The same instance again (a resend) still means the series is not quiet.
                db.execute(
                    "UPDATE series SET last_received = ? WHERE series_instance_uid = ?",
                    (now, series_instance_uid),
                )
        return new

    def reconcile(self) -> int:
        """Record instance files the database lacks and remove half-written temp files.

        Returns the number of instances recovered.
        """
        import pydicom

        for part in self.tmp_dir.glob("*.part"):
            with contextlib.suppress(OSError):
                part.unlink()
        with self._lock:
            known = {r[0] for r in self._conn.execute("SELECT sop_instance_uid FROM instances")}
        recovered = 0
        for path in sorted(self.instances_dir.glob("*/*/*.dcm")):
            sop, series, study = path.stem, path.parent.name, path.parent.parent.name
            if sop in known or not all(valid_uid(u) for u in (sop, series, study)):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
                sop_class = str(ds.get("SOPClassUID", ""))
            except Exception as exc:  # the file was renamed complete; a bad one is still kept
                logger.warning("event=reconcile_unreadable path=%s error=%s", path, exc)
                sop_class = ""
            self.record_instance(
                study_instance_uid=study,
                series_instance_uid=series,
                sop_instance_uid=sop,
                sop_class_uid=sop_class,
                path=path,
                received_at=path.stat().st_mtime,
            )
            recovered += 1
            logger.info("event=instance_recovered study=%s series=%s sop=%s", study, series, sop)
        return recovered

    def instance_paths(self, series_instance_uid: str) -> list[Path]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT path FROM instances WHERE series_instance_uid = ? ORDER BY rowid",
                (series_instance_uid,),
            ).fetchall()
        return [self.root / r[0] for r in rows]

    # -- jobs -------------------------------------------------------------------------------

    def get(self, series_instance_uid: str) -> SeriesRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM series WHERE series_instance_uid = ?",
                (series_instance_uid,),
            ).fetchone()
        return SeriesRecord(**dict(row)) if row is not None else None

    def list_series(self, state: str | None = None) -> list[SeriesRecord]:
        query = f"SELECT {_COLUMNS} FROM series"
        args: tuple[Any, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY first_received, rowid", args).fetchall()
        return [SeriesRecord(**dict(r)) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM series GROUP BY state")
            found = {r[0]: r[1] for r in rows}
        return {state: found.get(state, 0) for state in STATES}

    def count_instances(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def promote_stable(self, stable_seconds: float, now: float | None = None) -> int:
        """Queue every ``received`` series quiet for ``stable_seconds``; returns how many."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE series SET state = ?, updated_at = ? "
                "WHERE state = ? AND last_received <= ?",
                (WAITING, now, RECEIVED, now - stable_seconds),
            )
            return cur.rowcount

    def claim_next(self) -> SeriesRecord | None:
        """Take the oldest ``waiting`` series (by first arrival) and mark it ``classifying``."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM series WHERE state = ? "
                "ORDER BY first_received, rowid LIMIT 1",
                (WAITING,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE series SET state = ?, classify_attempts = classify_attempts + 1, "
                "updated_at = ? WHERE series_instance_uid = ?",
                (CLASSIFYING, now, row["series_instance_uid"]),
            )
        record = SeriesRecord(**dict(row))
        record.state = CLASSIFYING
        record.classify_attempts += 1
        return record

    def _finish(self, record: SeriesRecord, assignments: str, args: tuple[Any, ...]) -> bool:
        """Apply a worker result unless a new instance arrived meanwhile (then re-queue)."""
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                f"UPDATE series SET {assignments}, updated_at = ? "
                "WHERE series_instance_uid = ? AND state = ? AND generation = ?",
                (*args, now, record.series_instance_uid, CLASSIFYING, record.generation),
            )
            if cur.rowcount == 1:
                return True
            db.execute(
                "UPDATE series SET state = ?, updated_at = ? "
                "WHERE series_instance_uid = ? AND state = ?",
                (RECEIVED, now, record.series_instance_uid, CLASSIFYING),
            )
            return False

    def finish_classified(
        self,
        record: SeriesRecord,
        *,
        revision: int,
        sr_path: Path,
        sr_sop_instance_uid: str,
        probability_covid: float,
        label: str,
        classify_seconds: float,
    ) -> bool:
        """Record the built SR; False (and re-queued) if the series changed while classifying."""
        return self._finish(
            record,
            "state = ?, reason = '', revision = ?, sr_path = ?, sr_sop_instance_uid = ?, "
            "probability_covid = ?, label = ?, classify_seconds = ?, attempts = 0, next_try = ?",
            (
                CLASSIFIED,
                revision,
                str(sr_path.relative_to(self.root)),
                sr_sop_instance_uid,
                probability_covid,
                label,
                classify_seconds,
                time.time(),
            ),
        )

    def finish_unusable(self, record: SeriesRecord, reason: str) -> bool:
        return self._finish(record, "state = ?, reason = ?, sr_path = ''", (UNUSABLE, reason))

    def finish_failed(self, record: SeriesRecord, reason: str) -> bool:
        # No SR of this generation exists; a retry must classify again, not resend an old one.
        return self._finish(record, "state = ?, reason = ?, sr_path = ''", (FAILED, reason))

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

    def next_send_time(self) -> float | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT MIN(next_try) FROM series WHERE state = ?", (CLASSIFIED,)
            ).fetchone()
        return row[0]

    def mark_sent(self, record: SeriesRecord) -> None:
        """The peer has revision ``record.revision``, whatever happened to the series since."""
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET sent_revision = MAX(sent_revision, ?), updated_at = ?, "
                "sent_sr_path = CASE WHEN ? >= sent_revision THEN ? ELSE sent_sr_path END "
                "WHERE series_instance_uid = ?",
                (record.revision, now, record.revision, record.sr_path, record.series_instance_uid),
            )
            db.execute(
                "UPDATE series SET state = ?, reason = '', attempts = attempts + 1 "
                "WHERE series_instance_uid = ? AND state = ? AND revision = ?",
                (SENT, record.series_instance_uid, CLASSIFIED, record.revision),
            )

    def mark_send_failed(
        self,
        record: SeriesRecord,
        reason: str,
        *,
        retry_seconds: float,
        max_retry_seconds: float,
        max_attempts: int,
    ) -> tuple[str, float | None]:
        """Count a failed send: back off exponentially, or give up after ``max_attempts``.

        Returns the new state and, while retrying, the time of the next attempt.
        """
        attempts = record.attempts + 1
        now = time.time()
        if attempts >= max_attempts:
            state, next_try = FAILED, None
            reason = f"sending the SR failed {attempts} time(s); last: {reason}"
        else:
            state = CLASSIFIED
            next_try = now + min(max_retry_seconds, retry_seconds * 2 ** (attempts - 1))
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET state = ?, reason = ?, attempts = ?, next_try = ?, "
                "updated_at = ? WHERE series_instance_uid = ? AND state = ? AND revision = ?",
                (
                    state,
                    reason,
                    attempts,
                    next_try if next_try is not None else 0.0,
                    now,
                    record.series_instance_uid,
                    CLASSIFIED,
                    record.revision,
                ),
            )
        return state, next_try

    def resume(self, max_classify_attempts: int) -> int:
        """After a crash: jobs left ``classifying`` go back to ``waiting`` (or fail, if they
        already killed the worker ``max_classify_attempts`` times). Returns how many resumed.
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

    def retry(self, series_instance_uid: str | None = None) -> list[str]:
        """Re-queue failed jobs (one series, or all): resend a built SR, else classify again.

        Returns the series UIDs re-queued.
        """
        now = time.time()
        with self._transaction() as db:
            query = "SELECT series_instance_uid, sr_path FROM series WHERE state = ?"
            args: tuple[Any, ...] = (FAILED,)
            if series_instance_uid is not None:
                query += " AND series_instance_uid = ?"
                args = (FAILED, series_instance_uid)
            rows = db.execute(query, args).fetchall()
            for uid, sr_path in rows:
                if sr_path and (self.root / sr_path).exists():
                    db.execute(
                        "UPDATE series SET state = ?, reason = '', attempts = 0, next_try = ?, "
                        "updated_at = ? WHERE series_instance_uid = ?",
                        (CLASSIFIED, now, now, uid),
                    )
                else:
                    db.execute(
                        "UPDATE series SET state = ?, reason = '', classify_attempts = 0, "
                        "updated_at = ? WHERE series_instance_uid = ?",
                        (WAITING, now, uid),
                    )
        return [r[0] for r in rows]
