"""A PACS as the archive of ``ctcovid batch``: query, retrieve into a bounded cache, classify.

``PacsSource`` takes the place of the archive folder and its index. ``plan`` asks the PACS for
the studies and series that match the query (``out/pacs.sqlite``; reused by ``--resume``, so a
resumed run works through the same list); series the rules turn away become ``skipped`` rows.
``classify`` retrieves the rest, ``max_retrievals`` at a time, into the cache, judges each
retrieved series exactly as a folder's series is judged (``load_series``) and feeds them to
the same engine loop as a folder run (``run_local``: decoders, classifier, :class:`BatchSink`).
Retrieval runs in background threads, so the next series arrives while this one is classified;
a series leaves the cache when its row is written. A series the PACS fails to deliver becomes a
``failed`` row with the reason, and the run goes on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctcovid.batch.engine import BatchSink, Ready, run_local
from ctcovid.batch.index import IndexSummary, SeriesEntry
from ctcovid.batch.results import INCOMPLETE, ProgressThen
from ctcovid.config import IngestConfig
from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB
from ctcovid.dicom.series import load_series
from ctcovid.errors import ConfigError, CtCovidError, InvalidInputError, PacsError
from ctcovid.net.cache import CacheFullError, SeriesCache
from ctcovid.net.query import (
    Archive,
    IncompleteRetrievalError,
    SeriesMatch,
    SeriesRules,
    StudyMatch,
    StudyQuery,
)

if TYPE_CHECKING:
    from ctcovid.inference import Classifier

logger = logging.getLogger(__name__)

PLAN_FILE = "pacs.sqlite"
CACHE_DIR = "cache"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    modality TEXT NOT NULL,
    series_description TEXT NOT NULL,
    body_part TEXT NOT NULL,
    n_instances INTEGER,
    reason TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    PRIMARY KEY (study_instance_uid, series_instance_uid)
);
"""


class Pacer:
    """At most one request to the PACS per ``pause_seconds``, across threads."""

    def __init__(self, pause_seconds: float):
        self.pause_seconds = max(0.0, pause_seconds)
        self._lock = threading.Lock()
        self._last = -float("inf")

    def wait(self) -> None:
        with self._lock:
            delay = self._last + self.pause_seconds - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._last = time.monotonic()


def judge_retrieved(entry: SeriesEntry, paths: Sequence[Path], config: IngestConfig) -> Ready:
    """Read the headers of a retrieved series and judge it as the folder ingest would.

    A file in a syntax the ingest does not decode is refused from its file meta alone: its
    header is not read (a deflated data set would be inflated whole, here, without a bound).
    """
    from ctcovid.net.wado import syntax_refusal

    refused = [(p, why) for p in paths if (why := syntax_refusal(p))]
    if refused:
        path, why = refused[0]
        return Ready(
            entry,
            f"{len(refused)} of the {len(paths)} instance(s) retrieved for series "
            f"{entry.series_instance_uid} refused unread; {path.name}: {why}",
        )
    try:
        series = load_series(
            paths,
            config,
            series_instance_uid=entry.series_instance_uid,
            study_instance_uid=entry.study_instance_uid,
        )
    except InvalidInputError as exc:
        return Ready(entry, str(exc))
    return Ready(
        SeriesEntry(
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            patient_id=series.patient_id,
            modality=series.modality,
            n_instances=series.n_instances,
            n_slices=series.n_slices,
            usable=series.usable,
            reason=series.reason,
            paths=tuple(str(inst.path) for inst in series.instances),
            duplicates=series.duplicates,
        )
    )


class PacsSource:
    """The studies of a PACS that match a query, as the archive of a batch run."""

    def __init__(
        self,
        archive: Archive,
        query: StudyQuery,
        rules: SeriesRules,
        *,
        cache_bytes: int,
        max_retrievals: int = 1,
        pause_seconds: float = 0.5,
    ):
        if max_retrievals < 1:
            raise ConfigError(f"--max-retrievals must be at least 1. Received: {max_retrievals}.")
        self.archive = archive
        self.query = query
        self.rules = rules
        self.cache_bytes = cache_bytes
        self.max_retrievals = max_retrievals
        self.pacer = Pacer(pause_seconds)
        self.identity = archive.identity()
        self._matches: dict[tuple[str, str], SeriesMatch] = {}
        self._entries: list[SeriesEntry] = []
        self._n_studies = 0
        self.cache: SeriesCache | None = None
        # A ctcovid.batch.auditing.BatchAudit (set by the run), or None.
        self.audit: Any = None
        self.stats = {"retrieved_series": 0, "reused_from_cache": 0, "retrieve_seconds": 0.0}

    def describe(self) -> str:
        return self.archive.describe()

    def close(self) -> None:
        """Stop what the archive keeps open (the C-MOVE receiver)."""
        close = getattr(self.archive, "close", None)
        if close is not None:
            close()

    def _meta(self) -> dict[str, str]:
        return {
            "source": self.identity,
            "query": json.dumps(self.query.to_dict(), sort_keys=True),
            "rules": json.dumps(self.rules.to_dict(), sort_keys=True),
        }

    # -- plan -----------------------------------------------------------------------------------

    def plan(self, out: Path, *, resume: bool) -> IndexSummary:
        """Query the PACS (or, resuming, reuse the list of the interrupted run)."""
        start = time.perf_counter()
        db = out / PLAN_FILE
        conn = sqlite3.connect(db)
        try:
            conn.executescript(SCHEMA)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            reused = False
            if meta.get("complete") == "1":
                wanted = self._meta()
                for key, value in wanted.items():
                    if meta.get(key) != value:
                        raise ConfigError(
                            f"{out} was made from {key} {meta.get(key)}, not {value}; resume "
                            "with the same source, query and rules, or choose a new --out folder"
                        )
                if not resume:
                    raise ConfigError(f"{out} already holds a batch run; pass --resume")
                reused = True
            else:
                self._query(conn)
            self._load(conn)
        finally:
            conn.close()
        n_instances = sum(m.n_instances or 0 for m in self._matches.values())
        return IndexSummary(
            n_files=n_instances,
            n_instances=n_instances,
            n_duplicates=0,
            n_bad_files=0,
            n_series=len(self._entries),
            n_usable=sum(e.usable for e in self._entries),
            seconds=time.perf_counter() - start,
            reused=reused,
        )

    def _query(self, conn: sqlite3.Connection) -> None:
        studies: dict[str, StudyMatch] = {}
        for keys in self.query.study_queries():
            self.pacer.wait()
            for study in self._find("STUDY", keys, self.archive.find_studies, keys):
                studies.setdefault(study.study_instance_uid, study)
        logger.info("%s: %d matching studies", self.archive.describe(), len(studies))
        rows: list[tuple[object, ...]] = []
        for study in studies.values():
            self.pacer.wait()
            keys = {"StudyInstanceUID": study.study_instance_uid}
            for match in self._find("SERIES", keys, self.archive.find_series, study):
                rows.append(
                    (
                        match.study_instance_uid,
                        match.series_instance_uid,
                        match.patient_id,
                        match.modality,
                        match.series_description,
                        match.body_part,
                        match.n_instances,
                        self.rules.reason(match),
                        len(rows),
                    )
                )
        with conn:
            conn.execute("DELETE FROM series")
            conn.execute("DELETE FROM meta")
            conn.executemany("INSERT OR IGNORE INTO series VALUES (?,?,?,?,?,?,?,?,?)", rows)
            meta = self._meta() | {"studies": str(len(studies)), "complete": "1"}
            # In the same transaction as the rows: a crash never leaves a half list "complete".
            conn.executemany("INSERT INTO meta VALUES (?,?)", list(meta.items()))

    def _find(self, level: str, keys: dict[str, str], find: Any, arg: Any) -> list[Any]:
        """``find(arg)``, audited as a Query when the run has an audit trail."""
        try:
            found = list(find(arg))
        except Exception as exc:
            if self.audit is not None:
                self.audit.query(self.archive, level, keys, error=str(exc))
            raise
        if self.audit is not None:
            self.audit.query(self.archive, level, keys)
        return found

    def _load(self, conn: sqlite3.Connection) -> None:
        self._n_studies = int(
            dict(conn.execute("SELECT key, value FROM meta").fetchall()).get("studies", 0)
        )
        rows = conn.execute(
            "SELECT study_instance_uid, series_instance_uid, patient_id, modality, "
            "series_description, body_part, n_instances, reason FROM series ORDER BY ordinal"
        ).fetchall()
        self._matches.clear()
        self._entries.clear()
        for study, series, patient, modality, desc, body, n_inst, reason in rows:
            match = SeriesMatch(study, series, patient, modality, desc, body, n_inst)
            self._matches[match.key] = match
            n = n_inst or 0
            self._entries.append(
                SeriesEntry(study, series, patient, modality, n, n, not reason, reason, ())
            )

    def entries(self) -> list[SeriesEntry]:
        """Every series found, in query order; ``usable`` means "passes the series rules"."""
        return list(self._entries)

    # -- retrieve and classify ------------------------------------------------------------------

    def classify(
        self,
        entries: Sequence[SeriesEntry],
        classifier: Classifier | None,
        sink: BatchSink,
        *,
        out: Path,
        workers: int,
        pool: ProcessPoolExecutor | None = None,
        memory_mb: int = DEFAULT_DECODER_MEMORY_MB,
    ) -> None:
        """Retrieve, judge and classify ``entries`` (series without a row yet), decoding in
        ``workers`` processes under ``memory_mb`` MiB each (``pool``, when given, is used).
        With no ``entries`` (and no ``classifier``) the cache is only emptied."""
        cache = SeriesCache(out / CACHE_DIR, self.cache_bytes)
        self.cache = cache
        kept = cache.recover(e.key for e in entries)
        self.stats["reused_from_cache"] = len(kept)
        if classifier is None or not entries:
            return
        # A series leaves the cache once its row is written.
        sink.progress = ProgressThen(sink.progress, lambda row: cache.discard(row.key))
        retriever = _Retriever(self, list(entries), cache, classifier.ingest_config)
        try:
            run_local(retriever, classifier, sink, workers=workers, pool=pool, memory_mb=memory_mb)
        finally:
            retriever.stop()

    def summary(self) -> dict[str, Any]:
        cache = self.cache
        seconds = float(self.stats["retrieve_seconds"])
        written = cache.bytes_written if cache else 0
        return {
            "pacs": self.describe(),
            "query": self.query.to_dict(),
            "rules": self.rules.to_dict(),
            "studies": self._n_studies,
            "series": len(self._entries),
            "retrieved_series": self.stats["retrieved_series"],
            "reused_from_cache": self.stats["reused_from_cache"],
            "retrieved_bytes": written,
            "retrieve_seconds": round(seconds, 3),
            "retrieve_mb_per_second": round(written / 1e6 / seconds, 3) if seconds else None,
            "cache_bound_bytes": self.cache_bytes,
            "cache_peak_bytes": cache.peak_bytes if cache else 0,
        }


class _Retriever:
    """Background threads that retrieve series in order into the cache, then judge them: the
    :class:`~ctcovid.batch.engine.Feed` of a PACS run."""

    def __init__(
        self,
        source: PacsSource,
        todo: list[SeriesEntry],
        cache: SeriesCache,
        config: IngestConfig,
    ):
        self.source = source
        self.cache = cache
        self.config = config
        self.n_total = len(todo)
        self.n_delivered = 0
        self.ready: queue.Queue[Ready] = queue.Queue()
        self._todo = deque(todo)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._mean_instance_bytes = 0.0
        self._threads = [
            threading.Thread(target=self._work, name=f"retrieve-{i}", daemon=True)
            for i in range(min(source.max_retrievals, max(1, len(todo))))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def exhausted(self) -> bool:
        return self.n_delivered >= self.n_total

    def get(self, timeout: float) -> Ready | None:
        try:
            item = self.ready.get(timeout=timeout) if timeout > 0 else self.ready.get_nowait()
        except queue.Empty:
            return None
        self.n_delivered += 1
        return item

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _work(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if not self._todo:
                    return
                entry = self._todo.popleft()
            try:
                item = self._fetch(entry)
            except Exception as exc:  # never lose a series: it becomes a failed row
                logger.debug("retrieving %s failed", entry.series_instance_uid, exc_info=True)
                with contextlib.suppress(Exception):
                    self.cache.discard(entry.key)
                item = Ready(entry, f"internal error: {type(exc).__name__}: {exc}")
            self.ready.put(item)

    def _write(self, key: tuple[str, str], sop_instance_uid: str, data: bytes | Path) -> None:
        self.cache.write(key, sop_instance_uid, data)

    def _retrieve(self, match: SeriesMatch, key: tuple[str, str]) -> int:
        """One retrieval, audited (Begin Transferring, Instances Transferred) when the run has
        an audit trail; a retrieval retried for room in the cache is audited again."""
        archive, trail = self.source.archive, self.source.audit
        if trail is not None:
            trail.transfer(archive, match, begun=True)
        try:
            n = archive.retrieve_series(match, functools.partial(self._write, key))
        except Exception as exc:
            if trail is not None:
                trail.transfer(archive, match, begun=False, error=f"{type(exc).__name__}: {exc}")
            raise
        if trail is not None:
            trail.transfer(archive, match, begun=False, n_instances=n)
        return n

    def _admit(self, entry: SeriesEntry) -> None:
        """Wait until the series is likely to fit beside what the cache holds."""
        while not self._stopping.is_set():
            estimate = entry.n_instances * self._mean_instance_bytes
            version = self.cache.version
            if (
                self.cache.held(besides=entry.key) == 0
                or self.cache.used_bytes + estimate <= self.cache.bound_bytes
            ):
                return
            self.cache.wait_for_change(version, timeout=1.0)

    def _fetch(self, entry: SeriesEntry) -> Ready:
        key = entry.key
        match = self.source._matches[key]
        if not self.cache.is_complete(key):
            while True:
                self._admit(entry)
                if self._stopping.is_set():
                    return Ready(entry, "run stopped before the series was retrieved")
                self.source.pacer.wait()
                start = time.perf_counter()
                version = self.cache.version
                try:
                    n = self._retrieve(match, key)
                except CacheFullError as exc:
                    self.cache.discard(key)
                    if self.cache.held(besides=key) == 0:
                        return Ready(
                            entry,
                            f"series does not fit in the cache on its own ({exc}); "
                            "raise --cache-gb",
                        )
                    # Others hold the room: wait for one of them to leave, then try again.
                    while self.cache.held(besides=key) and not self._stopping.is_set():
                        if self.cache.wait_for_change(version, 1.0) != version:
                            break
                    continue
                except IncompleteRetrievalError as exc:
                    self.cache.discard(key)
                    return Ready(entry, str(exc), INCOMPLETE)
                except PacsError as exc:
                    self.cache.discard(key)
                    return Ready(entry, str(exc))
                except CtCovidError as exc:
                    self.cache.discard(key)
                    return Ready(entry, f"retrieval failed: {exc}")
                self.cache.mark_complete(key, n)
                seconds = time.perf_counter() - start
                with self._lock:
                    self.source.stats["retrieved_series"] += 1
                    self.source.stats["retrieve_seconds"] += seconds
                    size = sum(p.stat().st_size for p in self.cache.paths(key))
                    done = self.source.stats["retrieved_series"]
                    self._mean_instance_bytes += (
                        size / max(n, 1) - self._mean_instance_bytes
                    ) / done
                logger.info(
                    "event=series_retrieved series=%s instances=%d seconds=%.2f",
                    entry.series_instance_uid,
                    n,
                    seconds,
                )
                break
        return judge_retrieved(entry, self.cache.paths(key), self.config)
