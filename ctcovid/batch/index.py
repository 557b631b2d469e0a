"""Archive index: header-only reads of every file, in parallel processes, into ``index.sqlite``.

The index records every instance (path, UIDs), every series with its usability verdict and reason,
the duplicate files (same SOPInstanceUID counted once) and every file that is not DICOM or is
broken, with its reason. Grouping and judging are those of ``ctcovid.dicom``
(``group_instances``, ``assess``), so a series is judged here exactly as ``ctcovid classify``
judges it. The classify phase reads its work list from this index.

Building it streams: paths and headers are written to the database as the walk and the reads
go, a bounded batch at a time; series are grouped by SQL and judged one at a time; iteration
reads from the database. Memory is bounded by the largest series, not the archive.

The archive is walked without opening anything but regular files: a FIFO, socket or device in it
would block or misbehave on ``open``, so it is recorded as a bad file and skipped. Symlinked
folders are followed (archives are often assembled from links to other volumes, and skipping
them would lose studies without a word), each reported; a folder already walked (a link loop, or
a second link to one folder) is reported and not entered again. The index records a fingerprint
of the walk (every path, size and modification time), so ``--resume`` rebuilds an index whose
archive has new, removed or changed files instead of trusting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import pickle
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ctcovid.config import IngestConfig
from ctcovid.decoder import SeriesFiles, decoder_pool
from ctcovid.dicom.scan import group_instances, read_header
from ctcovid.dicom.series import assess
from ctcovid.dicom.types import BadFile, Instance
from ctcovid.errors import InvalidInputError

logger = logging.getLogger(__name__)

CHUNK_FILES = 64
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    modality TEXT NOT NULL,
    series_description TEXT NOT NULL,
    n_instances INTEGER NOT NULL,
    n_slices INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    usable INTEGER NOT NULL,
    reason TEXT NOT NULL,
    ordering TEXT NOT NULL,
    warnings TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    PRIMARY KEY (study_instance_uid, series_instance_uid)
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    ordinal INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series
    ON instances (study_instance_uid, series_instance_uid, ordinal);
CREATE TABLE IF NOT EXISTS duplicates (
    path TEXT PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bad_files (path TEXT PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS walk_notes (path TEXT PRIMARY KEY, note TEXT NOT NULL);
"""
TABLES = ("meta", "series", "instances", "duplicates", "bad_files", "walk_notes")
# Working tables of a build, in a file of their own beside the index (deleted when the build
# ends, so the index keeps no free pages): every walked file, and the header of every DICOM
# file read (pickled), with its place in the walk.
SCRATCH_SCHEMA = """
CREATE TABLE scratch.paths (ordinal INTEGER PRIMARY KEY, path TEXT NOT NULL);
CREATE TABLE scratch.headers (
    ordinal INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    header BLOB NOT NULL,
    kept INTEGER NOT NULL
);
CREATE INDEX scratch.headers_by_sop ON headers (sop_instance_uid, ordinal);
CREATE INDEX scratch.headers_by_series
    ON headers (study_instance_uid, series_instance_uid, kept, ordinal);
"""
# Rows held in memory before they are written; bounds the index's memory on any archive.
BATCH_ROWS = 512
# What a header-read task returns per file: (ordinal, path, reason) for a file that is not a
# usable DICOM instance, else (ordinal, SOP, study, series UIDs, path, pickled Instance).
HeaderRow = tuple[int, str, str] | tuple[int, str, str, str, str, bytes]


@dataclass(frozen=True)
class SeriesEntry:
    """One series of the index: identity, verdict and the files of its (unique) instances."""

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str
    n_instances: int
    n_slices: int
    usable: bool
    reason: str
    paths: tuple[str, ...]
    duplicates: int = 0

    @property
    def where(self) -> SeriesFiles:
        """Its files, for a decoder (only the unique ones: the duplicates were counted)."""
        return SeriesFiles(
            self.paths, self.study_instance_uid, self.series_instance_uid, self.duplicates
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.study_instance_uid, self.series_instance_uid)


@dataclass(frozen=True)
class IndexSummary:
    n_files: int
    n_instances: int
    n_duplicates: int
    n_bad_files: int
    n_series: int
    n_usable: int
    seconds: float
    reused: bool = False
    n_symlinked_folders: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "symlinked_folders": self.n_symlinked_folders,
            "files": self.n_files,
            "instances": self.n_instances,
            "duplicate_files": self.n_duplicates,
            "bad_files": self.n_bad_files,
            "series": self.n_series,
            "usable_series": self.n_usable,
            "seconds": round(self.seconds, 3),
            "files_per_second": round(self.n_files / self.seconds, 1) if self.seconds else None,
            "reused": self.reused,
        }


ProgressFn = Callable[[int, int], None]  # (files done, files total)


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


@dataclass
class ArchiveWalk:
    """What a walk of an archive found besides its regular files."""

    skipped: list[BadFile]  # never opened: FIFOs, sockets, devices, broken links
    symlinked_folders: list[tuple[str, str]]  # (path, what was done with it)
    fingerprint: str = ""


def walk_archive(root: Path, walk: ArchiveWalk) -> Iterator[Path]:
    """Every regular file under ``root`` (or ``root`` itself) in a stable order.

    Only ``stat`` is called on other entries, never ``open``; what is skipped or followed is
    recorded in ``walk``. ``walk.fingerprint`` is set when the generator is exhausted.
    """
    digest = hashlib.sha256()

    def regular(path: Path, st: os.stat_result) -> Path:
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "replace"))
        return path

    def skip(path: Path, reason: str) -> None:
        digest.update(f"{path}\0skipped\n".encode("utf-8", "replace"))
        walk.skipped.append(BadFile(path, reason))
        logger.warning("skipping %s: %s", path, reason)

    try:
        root_stat = os.stat(root)
    except OSError as exc:
        raise InvalidInputError(f"{root}: cannot read ({exc})") from None
    if stat.S_ISREG(root_stat.st_mode):
        yield regular(root, root_stat)
    elif not stat.S_ISDIR(root_stat.st_mode):
        skip(root, f"{_kind(root_stat.st_mode)}, not a file or folder; not opened")
    else:
        seen = {(root_stat.st_dev, root_stat.st_ino)}
        folders = [root]
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                skip(folder, f"cannot list this folder ({exc})")
                continue
            subfolders = []
            for entry in entries:
                path = Path(entry.path)
                try:
                    st = os.stat(path)  # follows links: what the entry is in the end
                except OSError as exc:
                    skip(path, f"broken link or unreadable entry ({exc.strerror})")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    linked = entry.is_symlink()
                    if key in seen:
                        if linked:
                            note = "symlinked folder already indexed (a loop or a second link)"
                            walk.symlinked_folders.append((str(path), note + "; not followed"))
                            logger.warning("%s: %s; not followed", path, note)
                        continue
                    if linked:
                        target = os.path.realpath(path)
                        walk.symlinked_folders.append((str(path), f"followed to {target}"))
                        logger.warning("%s: symlinked folder, followed to %s", path, target)
                    seen.add(key)
                    subfolders.append(path)
                elif stat.S_ISREG(st.st_mode):
                    yield regular(path, st)
                else:
                    skip(path, f"{_kind(st.st_mode)}, not a regular file; not opened")
            folders.extend(reversed(subfolders))  # depth first, in name order
    walk.fingerprint = digest.hexdigest()


def archive_fingerprint(root: Path) -> str:
    """The fingerprint of the files under ``root`` (paths, sizes, modification times)."""
    walk = ArchiveWalk([], [])
    for _ in walk_archive(root, walk):
        pass
    return walk.fingerprint


def read_header_rows(chunk: Sequence[tuple[int, str]]) -> list[HeaderRow]:
    """Worker task: the headers of a chunk of ``(ordinal, path)`` files, as index rows (never
    raises for a bad file). The header travels pickled: the driver stores it, it never needs it
    until its series is judged."""
    rows: list[HeaderRow] = []
    for ordinal, path in chunk:
        item = read_header(Path(path))
        if isinstance(item, BadFile):
            rows.append((ordinal, str(item.path), item.reason))
            continue
        try:
            header = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a value pydicom read but cannot copy: one bad file
            rows.append((ordinal, path, f"corrupt DICOM header: {type(exc).__name__}: {exc}"))
            continue
        rows.append(
            (
                ordinal,
                item.sop_instance_uid,
                item.study_instance_uid,
                item.series_instance_uid,
                path,
                header,
            )
        )
    return rows


def connect(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def index_is_complete(db_path: Path, archive: Path, config: IngestConfig) -> bool:
    """True when ``db_path`` holds a finished index of ``archive`` as it is now (same files,
    sizes and modification times), judged with ``config``."""
    if not db_path.exists():
        return False
    conn = connect(db_path)
    try:
        meta = _meta(conn)
    finally:
        conn.close()
    if not (
        meta.get("complete") == "1"
        and meta.get("schema_version") == str(SCHEMA_VERSION)
        and meta.get("archive") == str(archive.resolve())
        and meta.get("ingest_config") == json.dumps(config.to_dict(), sort_keys=True)
    ):
        return False
    if meta.get("fingerprint") != archive_fingerprint(archive):
        logger.warning("%s changed since it was indexed (files new, removed or changed)", archive)
        return False
    return True


def scratch_path(db_path: Path) -> Path:
    """The working file of a build of the index ``db_path``."""
    return db_path.with_name(db_path.name + ".scratch")


class Batched:
    """Rows bound for one table, written once ``batch_rows`` of them are held (and committed,
    so the write-ahead log is checkpointed as the index grows)."""

    def __init__(self, conn: sqlite3.Connection, sql: str, batch_rows: int):
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1. Received: {batch_rows}.")
        self.conn = conn
        self.sql = sql
        self.batch_rows = batch_rows
        self.rows: list[tuple[object, ...]] = []

    def add(self, row: tuple[object, ...]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            with self.conn:
                self.conn.executemany(self.sql, self.rows)
            self.rows.clear()


def _store_walk(conn: sqlite3.Connection, root: Path, walk: ArchiveWalk, batch_rows: int) -> int:
    """Walk ``root`` into ``scratch.paths``; the number of regular files found."""
    paths = Batched(conn, "INSERT INTO scratch.paths VALUES (?,?)", batch_rows)
    n = 0
    for path in walk_archive(root, walk):
        paths.add((n, str(path)))
        n += 1
    paths.flush()
    return n


def _path_chunks(conn: sqlite3.Connection, n_files: int) -> Iterator[list[tuple[int, str]]]:
    """The walked paths in chunks of ``CHUNK_FILES``, read from the index as they are needed."""
    for start in range(0, n_files, CHUNK_FILES):
        yield conn.execute(
            "SELECT ordinal, path FROM scratch.paths WHERE ordinal >= ? AND ordinal < ? "
            "ORDER BY ordinal",
            (start, start + CHUNK_FILES),
        ).fetchall()


def _store_headers(
    conn: sqlite3.Connection,
    n_files: int,
    workers: int,
    batch_rows: int,
    progress: ProgressFn | None,
    pool: ProcessPoolExecutor | None,
) -> None:
    """Header-read every walked file with ``workers`` processes (in this process when
    ``workers <= 1``) into ``scratch.headers`` and ``bad_files``, ``batch_rows`` at a time.

    Rows carry the file's place in the walk, so chunks may finish in any order: grouping
    follows the walk, not the scheduling. A ``pool`` given is used and left open (the classify
    phase reuses its warm workers).
    """
    headers = Batched(conn, "INSERT INTO scratch.headers VALUES (?,?,?,?,?,?,0)", batch_rows)
    bad = Batched(conn, "INSERT OR REPLACE INTO bad_files VALUES (?,?)", batch_rows)
    done = 0

    def store(rows: list[HeaderRow]) -> None:
        nonlocal done
        for row in rows:
            if len(row) == 3:
                logger.info("skipping %s: %s", row[1], row[2])
                bad.add(row[1:])
            else:
                headers.add(row)
        done += len(rows)
        if progress:
            progress(done, n_files)

    chunks = _path_chunks(conn, n_files)
    if workers <= 1 or n_files <= CHUNK_FILES:
        for chunk in chunks:
            store(read_header_rows(chunk))
    else:
        with contextlib.nullcontext(pool) if pool else decoder_pool(workers) as executor:
            # A bounded number of chunks in flight keeps memory flat on archives of any size.
            pending = {
                executor.submit(read_header_rows, chunk)
                for chunk in itertools.islice(chunks, 4 * workers)
            }
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    store(fut.result())
                    nxt = next(chunks, None)
                    if nxt is not None:
                        pending.add(executor.submit(read_header_rows, nxt))
    headers.flush()
    bad.flush()


def _store_series(
    conn: sqlite3.Connection, config: IngestConfig, batch_rows: int
) -> tuple[int, int]:
    """Group the stored headers into series by SQL and judge each series, one at a time;
    (series, usable series).

    The same SOPInstanceUID twice counts once: the first file in walk order is kept, the others
    are duplicates, counted in the series of a kept instance that came before them; series come
    in the order of their first kept instance (all as ``group_instances`` does it in memory).
    Only the headers of the series being judged are in memory.
    """
    conn.execute(
        "UPDATE scratch.headers SET kept = 1 WHERE ordinal IN "
        "(SELECT MIN(ordinal) FROM scratch.headers GROUP BY sop_instance_uid)"
    )
    conn.execute(
        "INSERT OR REPLACE INTO duplicates SELECT path, sop_instance_uid FROM scratch.headers "
        "WHERE kept = 0 ORDER BY ordinal"
    )
    series_rows = Batched(conn, "INSERT INTO series VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", batch_rows)
    instance_rows = Batched(conn, "INSERT INTO instances VALUES (?,?,?,?,?)", batch_rows)
    keys = conn.cursor()  # its own cursor: the loop below runs other statements meanwhile
    keys.execute(
        "SELECT study_instance_uid, series_instance_uid, MIN(ordinal) AS first "
        "FROM scratch.headers WHERE kept = 1 "
        "GROUP BY study_instance_uid, series_instance_uid ORDER BY first"
    )
    n_series = n_usable = 0
    for study_uid, series_uid, first in keys:
        instances: list[Instance] = [
            pickle.loads(blob)
            for (blob,) in conn.execute(
                "SELECT header FROM scratch.headers WHERE kept = 1 AND study_instance_uid = ? "
                "AND series_instance_uid = ? ORDER BY ordinal",
                (study_uid, series_uid),
            )
        ]
        (series,), _ = group_instances(instances)
        series.duplicates = conn.execute(
            "SELECT COUNT(*) FROM scratch.headers WHERE kept = 0 AND study_instance_uid = ? "
            "AND series_instance_uid = ? AND ordinal > ?",
            (study_uid, series_uid, first),
        ).fetchone()[0]
        assess(series, config)
        series_rows.add(
            (
                series.study_instance_uid,
                series.series_instance_uid,
                series.patient_id,
                series.modality,
                series.series_description,
                series.n_instances,
                series.n_slices,
                series.duplicates,
                int(series.usable),
                series.reason,
                series.ordering,
                json.dumps(series.warnings),
                n_series,
            )
        )
        # Rows of plain values: no header outlives the judging of its series.
        for row in [
            (inst.sop_instance_uid, study_uid, series_uid, str(inst.path), i)
            for i, inst in enumerate(series.instances)
        ]:
            instance_rows.add(row)
        n_series += 1
        n_usable += series.usable
    series_rows.flush()
    instance_rows.flush()
    return n_series, n_usable


def build_index(
    archive: Path,
    db_path: Path,
    config: IngestConfig,
    *,
    workers: int = 1,
    progress: ProgressFn | None = None,
    on_total: Callable[[int], None] | None = None,
    pool: ProcessPoolExecutor | None = None,
    batch_rows: int = BATCH_ROWS,
) -> IndexSummary:
    """Index every file under ``archive`` into ``db_path`` (replacing any earlier index).

    The index streams: paths and headers go to the database as they are found and read, at most
    ``batch_rows`` rows held at a time; series are grouped by SQL and judged one at a time, so
    memory does not grow with the size of the archive.
    """
    import time

    archive = Path(archive)
    if not archive.exists():
        raise InvalidInputError(f"{archive}: no such file or folder")
    start = time.perf_counter()
    scratch = scratch_path(db_path)
    scratch.unlink(missing_ok=True)  # left by a build that crashed
    conn = connect(db_path)
    try:
        with conn:  # the earlier index goes first: a crash from here on leaves none "complete"
            for table in TABLES:
                conn.execute(f"DELETE FROM {table}")
        conn.execute("ATTACH DATABASE ? AS scratch", (str(scratch),))
        # Nothing in it outlives the build: no journal, no sync.
        conn.execute("PRAGMA scratch.journal_mode=OFF")
        conn.execute("PRAGMA scratch.synchronous=OFF")
        conn.executescript(SCRATCH_SCHEMA)
        walk = ArchiveWalk([], [])
        n_files = _store_walk(conn, archive, walk, batch_rows)
        if on_total:
            on_total(n_files)
        for bad in walk.skipped:
            logger.info("skipping %s: %s", bad.path, bad.reason)
        with conn:
            conn.executemany(
                "INSERT OR REPLACE INTO bad_files VALUES (?,?)",
                [(str(b.path), b.reason) for b in walk.skipped],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO walk_notes VALUES (?,?)", walk.symlinked_folders
            )
        _store_headers(conn, n_files, workers, batch_rows, progress, pool)

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        # "complete" is written after every row: a build that stops before it leaves an index
        # that is never trusted, and is built again.
        with conn:
            n_series, n_usable = _store_series(conn, config, batch_rows)
            n_instances = count("SELECT COUNT(*) FROM scratch.headers WHERE kept = 1")
            n_duplicates = count("SELECT COUNT(*) FROM scratch.headers WHERE kept = 0")
            n_bad_files = count("SELECT COUNT(*) FROM bad_files")
            seconds = time.perf_counter() - start
            meta = {
                "schema_version": str(SCHEMA_VERSION),
                "archive": str(archive.resolve()),
                "ingest_config": json.dumps(config.to_dict(), sort_keys=True),
                "n_files": str(n_files),
                "seconds": f"{seconds:.3f}",
                "fingerprint": walk.fingerprint,
                "complete": "1",
            }
            conn.executemany("INSERT INTO meta VALUES (?,?)", list(meta.items()))
    finally:
        conn.close()
        scratch.unlink(missing_ok=True)
    return IndexSummary(
        n_files=n_files,
        n_instances=n_instances,
        n_duplicates=n_duplicates,
        n_bad_files=n_bad_files,
        n_series=n_series,
        n_usable=n_usable,
        seconds=seconds,
        n_symlinked_folders=len(walk.symlinked_folders),
    )


def index_summary(db_path: Path) -> IndexSummary:
    """The summary of an existing, complete index."""
    conn = connect(db_path)
    try:
        meta = _meta(conn)

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        return IndexSummary(
            n_files=int(meta.get("n_files", 0)),
            n_instances=count("SELECT COUNT(*) FROM instances"),
            n_duplicates=count("SELECT COUNT(*) FROM duplicates"),
            n_bad_files=count("SELECT COUNT(*) FROM bad_files"),
            n_series=count("SELECT COUNT(*) FROM series"),
            n_usable=count("SELECT COUNT(*) FROM series WHERE usable = 1"),
            seconds=float(meta.get("seconds", 0.0)),
            reused=True,
            n_symlinked_folders=count("SELECT COUNT(*) FROM walk_notes"),
        )
    finally:
        conn.close()


def iter_series(db_path: Path) -> Iterator[SeriesEntry]:
    """Every series of the index in archive order, with the paths of its unique instances."""
    conn = connect(db_path)
    try:
        rows = conn.cursor()  # its own cursor: read as the caller goes, not all at once
        rows.execute(
            "SELECT study_instance_uid, series_instance_uid, patient_id, modality, n_instances, "
            "n_slices, usable, reason, duplicates FROM series ORDER BY ordinal"
        )
        for study, series_uid, patient_id, modality, n_inst, n_slices, usable, reason, dup in rows:
            paths = tuple(
                p
                for (p,) in conn.execute(
                    "SELECT path FROM instances WHERE study_instance_uid = ? AND "
                    "series_instance_uid = ? ORDER BY ordinal",
                    (study, series_uid),
                )
            )
            yield SeriesEntry(
                study,
                series_uid,
                patient_id,
                modality,
                n_inst,
                n_slices,
                bool(usable),
                reason,
                paths,
                dup,
            )
    finally:
        conn.close()
