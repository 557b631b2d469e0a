"""The engines of ``ctcovid batch``: what turns indexed series into rows and SRs.

A decode task (:func:`decode_entry`, run in a decoder process) turns one indexed series into what
the model sees; :class:`SliceBatcher` scores the slices of several series in shared batches;
:class:`BatchSink` turns each series' probabilities into its result row and SR with the same
``Classifier`` and SR builder as ``ctcovid classify``. The local engine (:func:`run_local`)
decodes in worker processes (:class:`Decoders`, which outlive the death of any of them) while
this process feeds ONE classifier; the Ray engine (``ray_engine.py``) and the PACS source
(``sources.py``) are built from the same parts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctcovid.batch.index import SeriesEntry, process_pool
from ctcovid.batch.results import (
    CLASSIFIED,
    FAILED,
    SKIPPED,
    SR_DIR,
    BatchProgress,
    ResultRow,
    ResultsWriter,
)
from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB, crashed_reason, out_of_memory_reason
from ctcovid.dicom.series import load_series
from ctcovid.errors import CtCovidError
from ctcovid.fsio import write_atomic
from ctcovid.inference import Classifier
from ctcovid.model.artifact import ModelArtifact
from ctcovid.scans import PreparedScan, prepare_scan

logger = logging.getLogger(__name__)


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
        # Only the unique files indexed are re-read: the duplicates were counted then.
        series = load_series(
            [Path(p) for p in entry.paths],
            artifact.ingest_config,
            series_instance_uid=entry.series_instance_uid,
            study_instance_uid=entry.study_instance_uid,
            known_duplicates=entry.duplicates,
        )
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


# -- the local engine: decoders in worker processes, inference in this one --------------------


class Decoders:
    """Decode tasks in worker processes that outlive the death of any of them.

    ``submit`` hands over a series; ``collect`` returns the series decoded since, each prepared
    or with the reason it failed. A decoder process that dies (a crash, or the kernel's
    out-of-memory killer) breaks the whole pool, and any series then in flight may have killed
    it: each of them runs again alone, one that kills its decoder alone comes back failed with
    the reason, a new pool replaces the broken one and the run goes on. With ``workers <= 0``
    series are decoded in this process, at ``submit``. ``pool``, when given, is used and left
    open; the pools made here are shut down by :meth:`close`.
    """

    def __init__(
        self,
        artifact: ModelArtifact,
        *,
        workers: int,
        memory_mb: int = DEFAULT_DECODER_MEMORY_MB,
        pool: ProcessPoolExecutor | None = None,
    ):
        self.artifact = artifact
        self.workers = workers
        self.memory_mb = memory_mb
        # Enough series in flight that the decoders never wait for the classifier, few enough
        # that decoded slices do not pile up in memory.
        self.max_in_flight = 2 * max(workers, 0) + 1
        self._queued: deque[SeriesEntry] = deque()
        self._pending: dict[Future[Decoded], SeriesEntry] = {}
        self._suspects: deque[SeriesEntry] = deque()
        self._done: list[Decoded] = []
        self._alone = False  # whether the one future pending is a suspect running alone
        self._executor: ProcessPoolExecutor | None = None
        self._own: list[ProcessPoolExecutor] = []
        if workers > 0:
            self._executor = pool if pool is not None else self._new_pool()

    def __enter__(self) -> Decoders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_pool(self) -> ProcessPoolExecutor:
        executor = process_pool(self.workers, self.memory_mb)
        self._own.append(executor)
        return executor

    @property
    def n_held(self) -> int:
        """Series submitted and not yet collected."""
        return len(self._queued) + len(self._pending) + len(self._suspects) + len(self._done)

    @property
    def has_room(self) -> bool:
        return self.n_held < self.max_in_flight

    @property
    def busy(self) -> bool:
        return self.n_held > 0

    def submit(self, entry: SeriesEntry) -> None:
        if self._executor is None:
            self._done.append(decode_entry(entry, self.artifact))
        else:
            self._queued.append(entry)

    def collect(self, timeout: float | None) -> list[Decoded]:
        """The series decoded since the last call; when there are none yet, wait up to
        ``timeout`` seconds (``None``: as long as it takes) for one."""
        broken = self._dispatch()
        if self._pending and not broken:
            done, _ = wait(
                list(self._pending),
                timeout=0 if self._done else timeout,
                return_when=FIRST_COMPLETED,
            )
            for fut in done:
                entry = self._pending.pop(fut)
                try:
                    self._done.append(fut.result())
                except BrokenProcessPool:
                    broken.append(entry)
        if broken:
            self._recover(broken)
        decoded, self._done = self._done, []
        return decoded

    def _submit(self, entry: SeriesEntry) -> None:
        assert self._executor is not None
        self._pending[self._executor.submit(decode_entry, entry, self.artifact)] = entry

    def _dispatch(self) -> list[SeriesEntry]:
        """Start what may start now; the series a broken pool refused."""
        broken: list[SeriesEntry] = []
        if self._executor is None:
            return broken
        if self._suspects:
            if not self._pending:
                entry = self._suspects.popleft()
                try:
                    self._submit(entry)
                    self._alone = True
                except BrokenProcessPool:
                    broken.append(entry)
            return broken
        self._alone = False
        while self._queued and len(self._pending) < self.max_in_flight:
            entry = self._queued.popleft()
            try:
                self._submit(entry)
            except BrokenProcessPool:
                broken.append(entry)
                break
        return broken

    def _recover(self, broken: list[SeriesEntry]) -> None:
        """A decoder process died: judge or re-queue the series in flight, replace the pool."""
        broken.extend(self._pending.values())  # the pool is gone: all in flight are lost
        self._pending.clear()
        if self._alone and len(broken) == 1:
            self._done.append(Decoded(broken[0], error=crashed_reason(self.memory_mb)))
        else:
            logger.warning(
                "a decoder process died; re-running the %d series in flight one by one",
                len(broken),
            )
            self._suspects.extend(broken)
        assert self._executor is not None
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_pool()
        self._alone = False

    def close(self) -> None:
        for own in self._own:
            own.shutdown(wait=False, cancel_futures=True)


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
    decoder process fails alone (its row says why) and the run goes on (:class:`Decoders`)."""
    batcher = SliceBatcher(classifier)

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
    exhausted = False
    with Decoders(classifier.artifact, workers=workers, memory_mb=memory_mb, pool=pool) as decoders:
        while True:
            while not exhausted and decoders.has_room:
                entry = next(todo, None)
                if entry is None:
                    exhausted = True
                    break
                decoders.submit(entry)
            if exhausted and not decoders.busy:
                break
            # Wait for a decoder only when there is no full batch to work on meanwhile.
            for decoded in decoders.collect(timeout=0 if batcher.full else None):
                take(decoded)
            score(final=False)
    score(final=True)
