"""Archive index: header-only reads of every file, in parallel processes, into ``index.sqlite``.

The index records every instance (path, UIDs), every series with its usability verdict and reason,
the duplicate files (same SOPInstanceUID counted once) and every file that is not DICOM or is
broken, with its reason. Grouping and judging are those of ``ctcovid.dicom``
(``group_instances``, ``assess``), so a series is judged here exactly as ``ctcovid classify``
judges it. The classify phase reads its work list from this index.

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
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ctcovid.config import IngestConfig
from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB, decoder_pool
from ctcovid.dicom.scan import group_instances, read_header
from ctcovid.dicom.series import assess
from ctcovid.dicom.types import BadFile, Instance, Series
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


def read_headers(paths: Sequence[str]) -> list[Instance | BadFile]:
    """Worker task: the headers of a chunk of files (never raises for a bad file)."""
    return [read_header(Path(p)) for p in paths]


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def process_pool(workers: int, memory_mb: int = DEFAULT_DECODER_MEMORY_MB) -> ProcessPoolExecutor:
    """A pool of fresh interpreters, each under an address-space limit of ``memory_mb`` MiB
    (0: none): forking a process that may already run a deep-learning runtime's threads is
    unsafe, so workers are spawned; a file that declares a huge image fails, not the machine."""
    return decoder_pool(workers, memory_mb)


def read_archive(
    paths: Sequence[str],
    workers: int,
    progress: ProgressFn | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> list[Instance | BadFile]:
    """Header-read ``paths`` with ``workers`` processes (in this process when ``workers <= 1``);
    results in the order of ``paths``, so grouping does not depend on scheduling. A ``pool``
    given is used and left open (the classify phase reuses its warm workers)."""
    total = len(paths)
    done = 0
    if workers <= 1 or total <= CHUNK_FILES:
        out: list[Instance | BadFile] = []
        for chunk in _chunks(paths, CHUNK_FILES):
            out.extend(read_headers(chunk))
            done += len(chunk)
            if progress:
                progress(done, total)
        return out
    chunks = list(_chunks(paths, CHUNK_FILES))
    results: list[list[Instance | BadFile] | None] = [None] * len(chunks)
    with contextlib.nullcontext(pool) if pool else process_pool(workers) as executor:
        pending = {}
        todo = iter(enumerate(chunks))
        # A bounded number of chunks in flight keeps memory flat on archives of any size.
        for i, chunk in todo:
            pending[executor.submit(read_headers, chunk)] = i
            if len(pending) >= 4 * workers:
                break
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                results[i] = fut.result()
                done += len(chunks[i])
                if progress:
                    progress(done, total)
                nxt = next(todo, None)
                if nxt is not None:
                    pending[executor.submit(read_headers, nxt[1])] = nxt[0]
    return [item for chunk_result in results for item in chunk_result or []]


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


def _write_index(
    conn: sqlite3.Connection,
    archive: Path,
    config: IngestConfig,
    series_list: Sequence[Series],
    duplicates: Sequence[Instance],
    bad_files: Sequence[BadFile],
    n_files: int,
    seconds: float,
    walk: ArchiveWalk,
) -> None:
    with conn:
        for table in ("meta", "series", "instances", "duplicates", "bad_files", "walk_notes"):
            conn.execute(f"DELETE FROM {table}")
        conn.executemany(
            "INSERT INTO series VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    s.study_instance_uid,
                    s.series_instance_uid,
                    s.patient_id,
                    s.modality,
                    s.series_description,
                    s.n_instances,
                    s.n_slices,
                    s.duplicates,
                    int(s.usable),
                    s.reason,
                    s.ordering,
                    json.dumps(s.warnings),
                    i,
                )
                for i, s in enumerate(series_list)
            ],
        )
        conn.executemany(
            "INSERT INTO instances VALUES (?,?,?,?,?)",
            [
                (
                    inst.sop_instance_uid,
                    inst.study_instance_uid,
                    inst.series_instance_uid,
                    str(inst.path),
                    i,
                )
                for s in series_list
                for i, inst in enumerate(s.instances)
            ],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO duplicates VALUES (?,?)",
            [(str(d.path), d.sop_instance_uid) for d in duplicates],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO bad_files VALUES (?,?)",
            [(str(b.path), b.reason) for b in bad_files],
        )
        conn.executemany("INSERT OR REPLACE INTO walk_notes VALUES (?,?)", walk.symlinked_folders)
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "archive": str(archive.resolve()),
            "ingest_config": json.dumps(config.to_dict(), sort_keys=True),
            "n_files": str(n_files),
            "seconds": f"{seconds:.3f}",
            "fingerprint": walk.fingerprint,
            # Written in the same transaction as the rows: a crash leaves no "complete" index.
            "complete": "1",
        }
        conn.executemany("INSERT INTO meta VALUES (?,?)", list(meta.items()))


def build_index(
    archive: Path,
    db_path: Path,
    config: IngestConfig,
    *,
    workers: int = 1,
    progress: ProgressFn | None = None,
    on_total: Callable[[int], None] | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> IndexSummary:
    """Index every file under ``archive`` into ``db_path`` (replacing any earlier index)."""
    import time

    archive = Path(archive)
    if not archive.exists():
        raise InvalidInputError(f"{archive}: no such file or folder")
    start = time.perf_counter()
    walk = ArchiveWalk([], [])
    paths = [str(p) for p in walk_archive(archive, walk)]
    if on_total:
        on_total(len(paths))
    items = read_archive(paths, workers, progress, pool)
    instances = [it for it in items if isinstance(it, Instance)]
    bad_files = walk.skipped + [it for it in items if isinstance(it, BadFile)]
    series_list, _ = group_instances(instances)
    kept = {id(inst) for s in series_list for inst in s.instances}
    duplicates = [inst for inst in instances if id(inst) not in kept]
    for series in series_list:
        assess(series, config)
    for bad in bad_files:
        logger.info("skipping %s: %s", bad.path, bad.reason)
    seconds = time.perf_counter() - start
    conn = connect(db_path)
    try:
        _write_index(
            conn, archive, config, series_list, duplicates, bad_files, len(paths), seconds, walk
        )
    finally:
        conn.close()
    return IndexSummary(
        n_files=len(paths),
        n_instances=len(instances) - len(duplicates),
        n_duplicates=len(duplicates),
        n_bad_files=len(bad_files),
        n_series=len(series_list),
        n_usable=sum(s.usable for s in series_list),
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
        rows = conn.execute(
            "SELECT study_instance_uid, series_instance_uid, patient_id, modality, n_instances, "
            "n_slices, usable, reason, duplicates FROM series ORDER BY ordinal"
        ).fetchall()
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


def load_entry_series(entry: SeriesEntry, config: IngestConfig) -> Series:
    """Re-read the headers of an indexed series and judge it again, as ``classify`` would.

    The headers (patient and study modules, geometry) are needed to decode and to build the SR;
    the index stores only what is needed to find and report series.
    """
    items = [read_header(Path(p)) for p in entry.paths]
    bad = [it for it in items if isinstance(it, BadFile)]
    instances = [it for it in items if isinstance(it, Instance)]
    series_list, _ = group_instances(instances)
    match = [s for s in series_list if (s.study_instance_uid, s.series_instance_uid) == entry.key]
    if not match:
        detail = f"; {bad[0].path}: {bad[0].reason}" if bad else ""
        raise InvalidInputError(
            f"Series {entry.series_instance_uid}: its files changed since indexing{detail}"
        )
    series = match[0]
    series.duplicates = entry.duplicates  # counted at indexing; only unique files are re-read
    assess(series, config)
    for b in bad:
        series.warnings.append(f"skipped {b.path}: {b.reason}")
    return series
