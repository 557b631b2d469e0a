"""Batch reprocessing of an archive: index, then classify every usable series, one row each.

``run_batch`` is the whole job: it checks the output folder (``results.py``), builds or reuses the
archive index (``index.py``), writes a ``skipped`` row for every series the index judged unusable,
and hands the rest to an engine. The local engine here decodes and preprocesses series in worker
processes (``Classifier.prepare``) and feeds ONE classifier in this process, whose batches mix the
slices of several series; the Ray engine (``ray_engine.py``) does the same on a cluster. Both end
in :class:`BatchSink`, which turns probabilities into results and SRs with the same ``Classifier``
and SR builder as ``ctcovid classify``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctcovid.batch.index import (
    SeriesEntry,
    build_index,
    index_is_complete,
    index_summary,
    iter_series,
    load_entry_series,
    process_pool,
)
from ctcovid.batch.results import (
    CLASSIFIED,
    FAILED,
    INDEX_FILE,
    RESULTS_FILE,
    SKIPPED,
    SR_DIR,
    SUMMARY_FILE,
    ResultRow,
    ResultsWriter,
    RunInfo,
    lock_output,
    prepare_output,
    write_json_atomic,
)
from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB, crashed_reason, out_of_memory_reason
from ctcovid.errors import ConfigError, CtCovidError
from ctcovid.fsio import write_atomic
from ctcovid.inference import Classifier
from ctcovid.model.artifact import ModelArtifact, read_artifact
from ctcovid.scans import PreparedScan, prepare_scan

if TYPE_CHECKING:
    from ctcovid.batch.destinations import Destination
    from ctcovid.batch.sources import PacsSource
from ctcovid.model.runtimes import resolve_runtime

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


def default_workers() -> int:
    """Decode workers: every core but the one that runs inference."""
    return max(1, (os.cpu_count() or 2) - 1)


# -- progress -----------------------------------------------------------------------------------


class BatchProgress:
    """Callbacks the CLI implements with progress bars; the defaults do nothing."""

    def index_started(self, n_files: int) -> None: ...

    def index_advanced(self, n_done: int, n_total: int) -> None: ...

    def classify_started(self, n_series: int, n_slices: int) -> None: ...

    def series_finished(self, row: ResultRow, n_slices: int) -> None: ...


# -- decoding (worker side) ---------------------------------------------------------------------


@dataclass
class Decoded:
    """What a decode task returns: the prepared scan, or why the series failed."""

    entry: SeriesEntry
    prepared: PreparedScan | None = None
    error: str = ""


def decode_entry(entry: SeriesEntry, artifact: ModelArtifact) -> Decoded:
    """Worker task: read, judge, decode, window and select the slices of one indexed series.

    Preparing needs only the artifact's ingest settings: the worker never loads a model.
    """
    try:
        series = load_entry_series(entry, artifact.ingest_config)
        prepared = prepare_scan(series, artifact.ingest_config)
    except CtCovidError as exc:
        return Decoded(entry, error=str(exc))
    except MemoryError:
        return Decoded(entry, error=out_of_memory_reason(_memory_limit_mb()))
    except Exception as exc:  # one broken series must not stop an archive
        logger.debug("decoding series %s failed", entry.series_instance_uid, exc_info=True)
        return Decoded(entry, error=f"internal error: {type(exc).__name__}: {exc}")
    # The result needs only the count of all slices, not their pixels: do not ship them back.
    prepared.all_slices = dataclasses.replace(
        prepared.all_slices, slices=prepared.all_slices.slices[:0]
    )
    return Decoded(entry, prepared=prepared)


def _memory_limit_mb() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return 0 if soft == resource.RLIM_INFINITY else soft // (1024 * 1024)


def warm_up() -> None:
    """Worker task that does nothing: unpickling it imports this module and its dependencies."""


# -- results and SRs (driver side) --------------------------------------------------------------


class BatchSink:
    """Writes each finished series: SR first (atomically), then its row in ``results.csv``."""

    def __init__(
        self, out: Path, classifier: Classifier, writer: ResultsWriter, progress: BatchProgress
    ):
        self.out = out
        self.sr_dir = out / SR_DIR
        self.sr_dir.mkdir(parents=True, exist_ok=True)
        self.classifier = classifier
        self.writer = writer
        self.progress = progress
        self.n_slices_classified = 0

    def _append(self, row: ResultRow, n_slices: int = 0) -> None:
        self.writer.append(row)
        self.progress.series_finished(row, n_slices)

    def skipped(self, entry: SeriesEntry) -> None:
        self._append(
            ResultRow(
                entry.study_instance_uid,
                entry.series_instance_uid,
                entry.patient_id,
                SKIPPED,
                reason=entry.reason,
            )
        )

    def failed(self, entry: SeriesEntry, reason: str) -> None:
        logger.warning("series %s failed: %s", entry.series_instance_uid, reason)
        self._append(
            ResultRow(
                entry.study_instance_uid,
                entry.series_instance_uid,
                entry.patient_id,
                FAILED,
                reason=reason,
                model_device_uid=self.classifier.artifact.device_uid,
            ),
            entry.n_slices,
        )

    def classified(
        self, entry: SeriesEntry, prepared: PreparedScan, probs: np.ndarray, seconds: float
    ) -> None:
        from ctcovid.report import build_sr, write_sr

        try:
            result = self.classifier.result(prepared, probs, seconds)
            ds = build_sr(result, prepared.series)
            # SR UIDs are derived from the series and the model: a series redone after a crash
            # rewrites the very same SR, never a second one.
            final = write_atomic(
                self.sr_dir / f"{ds.SOPInstanceUID}.dcm", lambda tmp: write_sr(ds, tmp)
            )
        except CtCovidError as exc:
            self.failed(entry, str(exc))
            return
        self.n_slices_classified += result.n_slices_used
        self._append(
            ResultRow(
                study_instance_uid=result.study_instance_uid,
                series_instance_uid=result.series_instance_uid,
                patient_id=prepared.series.patient_id,
                status=CLASSIFIED,
                probability_covid=result.probability_covid,
                label=result.label,
                n_slices_used=result.n_slices_used,
                sr_path=str(final.relative_to(self.out)),
                threshold=result.threshold,
                n_slices_total=result.n_slices_total,
                n_slices_lost=result.n_slices_lost,
                model_device_uid=result.model.device_uid,
                seconds=result.seconds,
                warnings="; ".join(result.warnings),
            ),
            entry.n_slices,
        )


# -- the shared batches --------------------------------------------------------------------------


@dataclass
class _Pending:
    entry: SeriesEntry
    prepared: PreparedScan
    probs: np.ndarray
    scored: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def slices(self) -> np.ndarray:
        return self.prepared.used.slices


class SliceBatcher:
    """Queues prepared series and scores their slices in full batches that span series.

    Only the last batch of a run is padded (inside ``Classifier.predict_slices``), so a series
    of 10 slices does not cost a batch of 32.
    """

    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self.queue: deque[_Pending] = deque()
        self.n_queued = 0

    def add(self, entry: SeriesEntry, prepared: PreparedScan) -> None:
        n = len(prepared.used)
        self.queue.append(_Pending(entry, prepared, np.empty(n, np.float32)))
        self.n_queued += n

    @property
    def full(self) -> bool:
        return self.n_queued >= self.classifier.batch_size

    def step(self) -> list[_Pending]:
        """Score one batch (at most ``batch_size`` slices); the series it completed."""
        want = self.classifier.batch_size
        parts: list[tuple[_Pending, int, int]] = []
        taken = 0
        for item in self.queue:
            if taken >= want:
                break
            n = min(len(item.probs) - item.scored, want - taken)
            parts.append((item, item.scored, n))
            taken += n
        if not parts:
            return []
        probs = self.classifier.predict_slices(
            np.concatenate([item.slices[start : start + n] for item, start, n in parts])
        )
        offset = 0
        for item, start, n in parts:
            item.probs[start : start + n] = probs[offset : offset + n]
            item.scored += n
            offset += n
        self.n_queued -= taken
        finished = []
        while self.queue and self.queue[0].scored == len(self.queue[0].probs):
            finished.append(self.queue.popleft())
        return finished


def run_local(
    entries: Iterable[SeriesEntry],
    classifier: Classifier,
    sink: BatchSink,
    *,
    workers: int,
    pool: ProcessPoolExecutor | None = None,
    memory_mb: int = DEFAULT_DECODER_MEMORY_MB,
) -> None:
    """Decode in ``workers`` processes (in this process when 0) while this process infers;
    ``pool``, when given, is used and left open (a new one replaces it if a decoder dies).
    Decoder processes run under ``memory_mb`` MiB of address space; a series that kills its
    decoder process fails alone (its row says why) and the run goes on."""
    batcher = SliceBatcher(classifier)
    artifact = classifier.artifact

    def take(decoded: Decoded) -> None:
        if decoded.prepared is None:
            sink.failed(decoded.entry, decoded.error)
        else:
            batcher.add(decoded.entry, decoded.prepared)

    def score(final: bool) -> None:
        while batcher.full or (final and batcher.n_queued):
            for item in batcher.step():
                sink.classified(
                    item.entry, item.prepared, item.probs, time.perf_counter() - item.started
                )
            if not final:
                return  # one batch, then look after the decoders again

    todo = iter(entries)
    if workers <= 0:
        for entry in todo:
            take(decode_entry(entry, artifact))
            score(final=False)
        score(final=True)
        return

    # Enough series in flight that the decoders never wait for the classifier, few enough that
    # decoded slices do not pile up in memory.
    max_in_flight = 2 * workers + 1
    pending: dict[Future[Decoded], SeriesEntry] = {}
    # Series that were in flight when a decoder process died: any of them may have killed it,
    # so each runs again alone; one that kills its decoder alone fails with the reason.
    suspects: deque[SeriesEntry] = deque()
    executor = pool if pool is not None else process_pool(workers, memory_mb)
    own_pools: list[ProcessPoolExecutor] = [] if pool is not None else [executor]
    alone = False  # whether the one future pending is a suspect running alone
    exhausted = False
    try:
        while True:
            broken: list[SeriesEntry] = []
            if suspects:
                if not pending:
                    entry = suspects.popleft()
                    try:
                        pending[executor.submit(decode_entry, entry, artifact)] = entry
                        alone = True
                    except BrokenProcessPool:
                        broken.append(entry)
            else:
                alone = False
                while not exhausted and len(pending) < max_in_flight:
                    following = next(todo, None)
                    if following is None:
                        exhausted = True
                        break
                    try:
                        pending[executor.submit(decode_entry, following, artifact)] = following
                    except BrokenProcessPool:
                        broken.append(following)
                        break
            if not pending and not broken and not suspects and exhausted:
                break
            if pending and not broken:
                # Wait for a decoder only when there is no full batch to work on meanwhile.
                done, _ = wait(
                    list(pending), timeout=0 if batcher.full else None, return_when=FIRST_COMPLETED
                )
                for fut in done:
                    entry = pending.pop(fut)
                    try:
                        decoded = fut.result()
                    except BrokenProcessPool:
                        broken.append(entry)
                        continue
                    take(decoded)
            if broken:
                broken.extend(pending.values())  # the pool is gone: all in flight are lost
                pending.clear()
                if alone and len(broken) == 1:
                    sink.failed(broken[0], crashed_reason(memory_mb))
                else:
                    logger.warning(
                        "a decoder process died; re-running the %d series in flight one by one",
                        len(broken),
                    )
                    suspects.extend(broken)
                executor.shutdown(wait=False, cancel_futures=True)
                executor = process_pool(workers, memory_mb)
                own_pools.append(executor)
                alone = False
            score(final=False)
    finally:
        for own in own_pools:
            own.shutdown(wait=False, cancel_futures=True)
    score(final=True)


# -- the job ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchOptions:
    archive: Path
    out: Path
    model_path: Path
    resume: bool = False
    workers: int = field(default_factory=default_workers)
    engine: str = "local"
    batch_size: int = 32
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    # A PACS in place of the archive folder (``sources.py``); ``archive`` is then its cache.
    source: PacsSource | None = None
    # Where every SR also goes, by C-STORE or STOW-RS (``destinations.py``).
    destinations: tuple[Destination, ...] = ()
    # Address-space limit of each decoder process, MiB (0: none).
    decoder_memory_mb: int = DEFAULT_DECODER_MEMORY_MB
    runtime: str = "auto"  # how the model runs (keras | onnx | int8 | auto), not where


def run_batch(
    options: BatchOptions,
    progress: BatchProgress | None = None,
    *,
    classifier: Classifier | None = None,
) -> dict[str, Any]:
    """Index ``options.archive`` and classify every usable series; the summary (also written to
    ``out/summary.json``).

    ``classifier``, when given, must be the model of ``options.model_path`` already loaded (the
    local engine then skips loading it); by default it is loaded only if there is work for it.
    """
    progress = progress or BatchProgress()
    if options.engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}. Received: {options.engine!r}.")
    if options.source is not None and options.engine != "local":
        raise ConfigError("a PACS source runs with the local engine (--engine local)")
    wall_start = time.perf_counter()
    out = Path(options.out)
    artifact = read_artifact(options.model_path)
    if classifier is not None:  # a loaded classifier brings its runtime
        artifact = artifact.with_runtime(
            classifier.artifact.runtime, classifier.artifact.graph_sha256
        )
    else:  # the runtime is part of the results' identity (run.json, SR UIDs)
        choice = resolve_runtime(options.model_path, artifact, options.runtime)
        artifact = artifact.with_runtime(choice.name, choice.graph_sha256)
    if classifier is not None and classifier.artifact.device_uid != artifact.device_uid:
        raise ValueError(
            f"classifier is model {classifier.artifact.device_uid}, not the model of "
            f"{options.model_path} ({artifact.device_uid})"
        )
    with lock_output(out):
        return _run_locked(options, progress, classifier, artifact, wall_start)


def _run_locked(
    options: BatchOptions,
    progress: BatchProgress,
    classifier: Classifier | None,
    artifact: ModelArtifact,
    wall_start: float,
) -> dict[str, Any]:
    out = Path(options.out)
    archive = Path(options.archive)
    prepare_output(
        out,
        RunInfo.new(
            device_uid=artifact.device_uid,
            name=artifact.name,
            version=artifact.version,
            model_path=options.model_path,
            archive=archive,
        ),
        resume=options.resume,
    )
    # One pool of workers for both phases: the decoders start warm (modules imported) while the
    # model loads.
    local_pool = options.engine == "local" and options.workers > 0
    forwarder = None
    if options.destinations:
        from ctcovid.batch.destinations import SrForwarder

        forwarder = SrForwarder(out, options.destinations)
        progress = forwarder.watch(progress)
    try:
        with (
            process_pool(options.workers, options.decoder_memory_mb)
            if local_pool
            else contextlib.nullcontext()
        ) as pool:
            if pool is not None:
                for _ in range(options.workers):
                    pool.submit(warm_up)
            summary = _run(options, progress, classifier, artifact, pool, wall_start)
    finally:
        sent = forwarder.close() if forwarder is not None else None
    if sent is not None:
        summary["sent"] = sent
        write_json_atomic(summary, out / SUMMARY_FILE)
    return summary


def _run(
    options: BatchOptions,
    progress: BatchProgress,
    classifier: Classifier | None,
    artifact: ModelArtifact,
    pool: ProcessPoolExecutor | None,
    wall_start: float,
) -> dict[str, Any]:
    out = Path(options.out)
    archive = Path(options.archive)
    db_path = out / INDEX_FILE
    config = artifact.ingest_config
    if options.source is not None:
        index = options.source.plan(out, resume=options.resume)
    elif options.resume and index_is_complete(db_path, archive, config):
        index = index_summary(db_path)
        logger.info("reusing the complete archive index %s", db_path)
    else:
        index = build_index(
            archive,
            db_path,
            config,
            workers=max(1, options.workers),
            progress=progress.index_advanced,
            on_total=progress.index_started,
            pool=pool,
        )

    with ResultsWriter(out / RESULTS_FILE) as writer:
        n_done_before = len(writer.done)
        listed = options.source.entries() if options.source is not None else iter_series(db_path)
        entries = [e for e in listed if e.key not in writer.done]
        usable = [e for e in entries if e.usable]
        progress.classify_started(len(entries), sum(e.n_slices for e in usable))
        if options.engine == "ray":
            from ctcovid.batch.ray_engine import run_ray

            # The driver needs no network: results and SRs only need the artifact.
            sink = BatchSink(out, Classifier(None, artifact), writer, progress)
            for entry in entries:
                if not entry.usable:
                    sink.skipped(entry)
            classify_start = time.perf_counter()
            run_ray(usable, options, artifact, sink)
        else:
            if classifier is None:
                classifier = (
                    Classifier.from_file(
                        options.model_path, batch_size=options.batch_size, runtime=artifact.runtime
                    )
                    if usable
                    else Classifier(None, artifact)  # nothing to infer: do not load the network
                )
            sink = BatchSink(out, classifier, writer, progress)
            for entry in entries:
                if not entry.usable:
                    sink.skipped(entry)
            classify_start = time.perf_counter()
            if options.source is not None:
                options.source.classify(
                    usable, classifier, sink, out=out, workers=options.workers, pool=pool
                )
            else:
                run_local(
                    usable,
                    classifier,
                    sink,
                    workers=options.workers,
                    pool=pool,
                    memory_mb=options.decoder_memory_mb,
                )
        classify_seconds = time.perf_counter() - classify_start
        rows = list(writer.rows)

    counts = {
        status: sum(r.status == status for r in rows) for status in (CLASSIFIED, SKIPPED, FAILED)
    }
    wall = time.perf_counter() - wall_start
    summary: dict[str, Any] = {
        "archive": str(archive),
        "out": str(out),
        "engine": options.engine,
        "workers": options.workers,
        "model": artifact.info.to_dict(),
        "index": index.to_dict(),
        "series": len(rows),
        "counts": counts,
        "positives": sum(r.label == artifact.positive_class for r in rows),
        "resumed_rows": n_done_before,
        "this_run": {
            "series": len(rows) - n_done_before,
            "slices_classified": sink.n_slices_classified,
            "classify_seconds": round(classify_seconds, 3),
            "slices_per_second": round(sink.n_slices_classified / classify_seconds, 3)
            if classify_seconds > 0
            else None,
            "wall_seconds": round(wall, 3),
        },
        "results_csv": str(out / RESULTS_FILE),
        "sr_dir": str(out / SR_DIR),
    }
    if options.source is not None:
        summary["source"] = options.source.summary()
    write_json_atomic(summary, out / SUMMARY_FILE)
    return summary
