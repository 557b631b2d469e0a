"""Durable storage of received instances and the job database of the DICOM node.

Layout under the store folder::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received, as sent
    sr/<SeriesInstanceUID>/<SR SOPInstanceUID>.dcm                          reports built
    replaced/<StudyInstanceUID>/<SeriesInstanceUID>/<SOP>.<ns>.dcm          superseded content
    tmp/                                                                    half-written files
    node.sqlite                                                             instances, series, jobs

Every file is written to ``tmp/``, fsynced and renamed into place, so a path under
``instances/`` or ``sr/`` always holds a complete file. Paths are built only from UIDs that match
``^[0-9]+(\\.[0-9]+)*$`` and have at most 64 characters, so no received value can name a file
outside the store. A folder created for a new study or series is fsynced in its parent, so the
first instance of a series survives a power loss once it was answered with success. The files are
the ground truth: :meth:`Store.reconcile` records any file the database missed (a crash between
rename and commit); the database commits with ``synchronous=FULL``.

The same SOPInstanceUID received again with identical bytes changes nothing. With different
bytes the new instance is kept, the old file is moved (hard link, then rename) to ``replaced/`` and
recorded in the ``replaced`` table, and the series is classified again as a new revision: the SR
never describes pixels that are no longer in the store.

Each series is one job, keyed by StudyInstanceUID *and* SeriesInstanceUID (a SeriesInstanceUID
reused in another study is another series), with a state:


``received``     instances arriving; becomes ``waiting`` after ``stable_seconds`` of quiet
``waiting``      complete, queued for the worker (arrival order)
``classifying``  the worker has it; back to ``waiting`` if the worker dies, or when the disk is
                 below the free-space floor (retried after ``next_try``, not failed)
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
import filecmp
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

from ctcovid.fsio import fsync_dir, make_dirs_durable

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
    PRIMARY KEY (study_instance_uid, series_instance_uid)
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
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


def _key(record: SeriesRecord) -> tuple[str, str]:
    """The primary key of a series row: (study, series) in the column order of the queries."""
    return (record.study_instance_uid, record.series_instance_uid)


def _same_content(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


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
        self.replaced_dir = self.root / "replaced"
        self.tmp_dir = self.root / "tmp"
        for folder in (self.root, self.instances_dir, self.sr_dir, self.replaced_dir, self.tmp_dir):
            make_dirs_durable(folder)
        self.db_path = self.root / "node.sqlite"
        self._lock = threading.RLock()
        # Serialises "compare with the stored file, keep it aside, rename" per SOP instance.
        self._put_lock = threading.Lock()
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
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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
        make_dirs_durable(path.parent)
        tmp = self._write_temp(path.name, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(path.parent)

    def _write_temp(self, name: str, data: bytes) -> Path:
        """``data`` in a new fsynced file under ``tmp/`` (removed again if writing fails)."""
        tmp = self.tmp_dir / f"{name}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp

    def _keep_aside(self, old: Path, study: str, series: str, sop: str) -> Path:
        """Link the superseded file of ``sop`` under ``replaced/``; its new path there."""
        aside = self.replaced_dir / study / series / f"{sop}.{time.time_ns()}.dcm"
        make_dirs_durable(aside.parent)
        try:
            os.link(old, aside)  # no copy, and the old file stays in place until the rename
        except OSError:
            tmp = self._write_temp(aside.name, old.read_bytes())
            os.replace(tmp, aside)
        fsync_dir(aside.parent)
        return aside

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
        self.check_free_space(len(data))
        tmp = self._write_temp(path.name, data)
        try:
            with self._put_lock:
                return self._place_instance(
                    tmp,
                    path,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid,
                    calling_aet=calling_aet,
                )
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _place_instance(
        self,
        tmp: Path,
        path: Path,
        *,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        calling_aet: str,
    ) -> bool:
        """Rename the fsynced ``tmp`` into place unless the store already holds these bytes."""
        with self._lock:
            row = self._conn.execute(
                "SELECT path, study_instance_uid, series_instance_uid FROM instances "
                "WHERE sop_instance_uid = ?",
                (sop_instance_uid,),
            ).fetchone()
        old = self.root / row[0] if row is not None else path
        supersedes: tuple[str, str, str] | None = None
        if old.is_file():
            if _same_content(tmp, old):
                # A resend: nothing changes (record_instance only notes that it arrived).
                return self.record_instance(
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid,
                    path=path,
                    calling_aet=calling_aet,
                )
            old_study = row[1] if row is not None else study_instance_uid
            old_series = row[2] if row is not None else series_instance_uid
            aside = self._keep_aside(old, old_study, old_series, sop_instance_uid)
            supersedes = (old_study, old_series, str(aside.relative_to(self.root)))
        elif row is not None:  # recorded, but its file is gone: the new one takes its place
            supersedes = (row[1], row[2], "")
        make_dirs_durable(path.parent)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old != path and old.is_file():  # the UID moved to another series: it has a copy
            old.unlink()
            fsync_dir(old.parent)
        if supersedes is not None:
            logger.warning(
                "event=instance_replaced study=%s series=%s sop=%s previous_study=%s "
                "previous_series=%s kept_as=%s",
                study_instance_uid,
                series_instance_uid,
                sop_instance_uid,
                supersedes[0],
                supersedes[1],
                supersedes[2] or "-",
            )
        return self.record_instance(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            path=path,
            calling_aet=calling_aet,
            supersedes=supersedes,
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
        supersedes: tuple[str, str, str] | None = None,
    ) -> bool:
        """Record a stored instance; a new one (re)opens its series for classification.

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
            str(path.relative_to(self.root)),
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
                        (sop_instance_uid, old_study, old_series, kept_as, values[4], now),
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
                    "n_instances, first_received, last_received, updated_at) "
                    "VALUES (?, ?, ?, 1, ?, ?, ?)",
                    (series_instance_uid, study_instance_uid, RECEIVED, now, now, now),
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
        return changed

    @staticmethod
    def _reopen(db: sqlite3.Connection, key: tuple[str, str], now: float, *, added: int) -> None:
        """The content of series ``key`` changed: classify it again (a new revision if sent).

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

    def instance_paths(
        self, series_instance_uid: str, study_instance_uid: str | None = None
    ) -> list[Path]:
        """The recorded files of a series (of every study that has that series UID if no study
        is given)."""
        query = "SELECT path FROM instances WHERE series_instance_uid = ?"
        args: tuple[str, ...] = (series_instance_uid,)
        if study_instance_uid is not None:
            query += " AND study_instance_uid = ?"
            args = (series_instance_uid, study_instance_uid)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY rowid", args).fetchall()
        return [self.root / r[0] for r in rows]

    def replaced_instances(self) -> list[dict[str, Any]]:
        """Every superseded instance: its UIDs, where the old file is kept, what replaced it."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM replaced ORDER BY rowid").fetchall()
        return [dict(r) for r in rows]

    # -- jobs -------------------------------------------------------------------------------

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
                "UPDATE series SET state = ?, next_try = 0, updated_at = ? "
                "WHERE state = ? AND last_received <= ?",
                (WAITING, now, RECEIVED, now - stable_seconds),
            )
            return cur.rowcount

    def claim_next(self) -> SeriesRecord | None:
        """Take the oldest due ``waiting`` series (by first arrival), mark it ``classifying``."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM series WHERE state = ? AND next_try <= ? "
                "ORDER BY first_received, rowid LIMIT 1",
                (WAITING, now),
            ).fetchone()
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

    def _finish(self, record: SeriesRecord, assignments: str, args: tuple[Any, ...]) -> bool:
        """Apply a worker result unless a new instance arrived meanwhile (then re-queue)."""
        now = time.time()
        with self._transaction() as db:
            cur = db.execute(
                f"UPDATE series SET {assignments}, updated_at = ? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND state = ? "
                "AND generation = ?",
                (*args, now, *_key(record), CLASSIFYING, record.generation),
            )
            if cur.rowcount == 1:
                return True
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

    def defer_classification(
        self, record: SeriesRecord, reason: str, *, retry_seconds: float
    ) -> bool:
        """Put a claimed series back in the queue for ``retry_seconds`` (the disk is below its
        floor, say): a temporary condition, so it is neither failed nor counted as an attempt.
        """
        return self._finish(
            record,
            "state = ?, reason = ?, next_try = ?, "
            "classify_attempts = MAX(0, classify_attempts - 1)",
            (WAITING, reason, time.time() + retry_seconds),
        )

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

    def mark_sent(self, record: SeriesRecord) -> None:
        """The peer has revision ``record.revision``, whatever happened to the series since."""
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET sent_revision = MAX(sent_revision, ?), updated_at = ?, "
                "sent_sr_path = CASE WHEN ? >= sent_revision THEN ? ELSE sent_sr_path END "
                "WHERE study_instance_uid = ? AND series_instance_uid = ?",
                (record.revision, now, record.revision, record.sr_path, *_key(record)),
            )
            db.execute(
                "UPDATE series SET state = ?, reason = '', attempts = attempts + 1 "
                "WHERE study_instance_uid = ? AND series_instance_uid = ? AND state = ? "
                "AND revision = ?",
                (SENT, *_key(record), CLASSIFIED, record.revision),
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
                "updated_at = ? WHERE study_instance_uid = ? AND series_instance_uid = ? "
                "AND state = ? AND revision = ?",
                (
                    state,
                    reason,
                    attempts,
                    next_try if next_try is not None else 0.0,
                    now,
                    *_key(record),
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

    def retry(
        self, series_instance_uid: str | None = None, study_instance_uid: str | None = None
    ) -> list[str]:
        """Re-queue failed jobs (one series, or all): resend a built SR, else classify again.

        Returns the series UIDs re-queued.
        """
        now = time.time()
        with self._transaction() as db:
            query = (
                "SELECT study_instance_uid, series_instance_uid, sr_path FROM series "
                "WHERE state = ?"
            )
            args: tuple[Any, ...] = (FAILED,)
            if series_instance_uid is not None:
                query += " AND series_instance_uid = ?"
                args = (*args, series_instance_uid)
            if study_instance_uid is not None:
                query += " AND study_instance_uid = ?"
                args = (*args, study_instance_uid)
            rows = db.execute(query, args).fetchall()
            for study, uid, sr_path in rows:
                if sr_path and (self.root / sr_path).exists():
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
