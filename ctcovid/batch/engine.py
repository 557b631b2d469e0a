"""The engines of ``ctcovid batch``: what turns indexed series into rows and SRs.

Each series is decoded by :class:`~ctcovid.decoder.Decoders` (memory-capped decoder processes
that outlive the death of any of them); :class:`SliceBatcher` scores the slices of several
series in shared batches; :class:`BatchSink` turns each series' probabilities into its result
row and SR with the same ``Classifier`` and SR builder as ``ctcovid classify``. The one engine
loop (:func:`run_local`) decodes in worker processes while this process feeds ONE classifier,
fed by the folder index or by the PACS retriever (``sources.py``); the Ray engine
(``ray_engine.py``) is built from the same parts.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ctcovid.batch.index import SeriesEntry
from ctcovid.batch.results import (
    CLASSIFIED,
    FAILED,
    SKIPPED,
    SR_DIR,
    BatchProgress,
    ResultRow,
    ResultsWriter,
)
from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB, Decoded, Decoders
from ctcovid.errors import CtCovidError
from ctcovid.fsio import write_atomic
from ctcovid.inference import Classifier, scan_result_of
from ctcovid.model.artifact import ModelArtifact
from ctcovid.scans import PreparedScan

logger = logging.getLogger(__name__)


# -- results and SRs ---------------------------------------------------------------------------


class BatchSink:
    """Writes each finished series: SR first (atomically), then its row in ``results.csv``."""

    def __init__(
        self, out: Path, artifact: ModelArtifact, writer: ResultsWriter, progress: BatchProgress
    ):
        self.out = out
        self.sr_dir = out / SR_DIR
        self.sr_dir.mkdir(parents=True, exist_ok=True)
        self.artifact = artifact
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

    def failed(self, entry: SeriesEntry, reason: str, status: str = FAILED) -> None:
        logger.warning("series %s %s: %s", entry.series_instance_uid, status, reason)
        self._append(
            ResultRow(
                entry.study_instance_uid,
                entry.series_instance_uid,
                entry.patient_id,
                status,
                reason=reason,
                model_device_uid=self.artifact.device_uid,
            ),
            entry.n_slices,
        )

    def classified(
        self, entry: SeriesEntry, prepared: PreparedScan, probs: np.ndarray, seconds: float
    ) -> None:
        from ctcovid.report import build_sr, write_sr

        try:
            result = scan_result_of(self.artifact, prepared, probs, seconds)
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


# -- the engine loop ----------------------------------------------------------------------------


@dataclass
class Ready:
    """A series to decode, or why it cannot be had (a PACS that failed to deliver it)."""

    entry: SeriesEntry
    error: str = ""
    status: str = FAILED  # or INCOMPLETE: delivered in part


@runtime_checkable
class Feed(Protocol):
    """Where the series of a run come from: the folder index, or the PACS retriever."""

    @property
    def exhausted(self) -> bool: ...

    def get(self, timeout: float) -> Ready | None: ...


class _Listed:
    """The series of the index, as a feed whose next series is always there."""

    def __init__(self, entries: Iterable[SeriesEntry]):
        self._todo = iter(entries)
        self.exhausted = False

    def get(self, timeout: float) -> Ready | None:
        entry = next(self._todo, None)
        self.exhausted = entry is None
        return None if entry is None else Ready(entry)


def run_local(
    entries: Iterable[SeriesEntry] | Feed,
    classifier: Classifier,
    sink: BatchSink,
    *,
    workers: int,
    pool: ProcessPoolExecutor | None = None,
    memory_mb: int = DEFAULT_DECODER_MEMORY_MB,
) -> None:
    """The one engine loop: decode in ``workers`` processes (in this process when 0) while this
    process infers; ``entries`` are indexed series or a :class:`Feed` (the PACS retriever).

    ``pool``, when given, is used and left open (a new one replaces it if a decoder dies).
    Decoder processes run under ``memory_mb`` MiB of address space; a series that kills its
    decoder process fails alone (its row says why) and the run goes on. When the next series
    is not there yet (a PACS still retrieving it), the classifier scores what it has (a partial
    batch) rather than wait with slices queued.
    """
    feed = entries if isinstance(entries, Feed) else _Listed(entries)
    batcher = SliceBatcher(classifier)

    def take(decoded: Decoded) -> None:
        if decoded.prepared is None:
            sink.failed(decoded.job, decoded.error)
        else:
            batcher.add(decoded.job, decoded.prepared)

    def score_one() -> None:
        for item in batcher.step():
            sink.classified(
                item.entry, item.prepared, item.probs, time.perf_counter() - item.started
            )

    def route(item: Ready) -> None:
        if item.error:
            sink.failed(item.entry, item.error, item.status)
        elif not item.entry.usable:
            sink.skipped(item.entry)
        else:
            decoders.submit(item.entry, item.entry.where)

    with Decoders(
        classifier.ingest_config, workers=workers, memory_mb=memory_mb, pool=pool
    ) as decoders:
        while not feed.exhausted or decoders.busy:
            while decoders.has_room and not feed.exhausted:  # keep the decoders fed
                item = feed.get(timeout=0)
                if item is None:
                    break
                route(item)
            if batcher.full:
                score_one()
            elif decoders.busy:
                for decoded in decoders.collect(timeout=0.1):
                    take(decoded)
            elif batcher.n_queued:
                score_one()  # nothing to decode and nothing arrived: do not idle
            elif not feed.exhausted:
                item = feed.get(timeout=0.5)
                if item is not None:
                    route(item)
    while batcher.n_queued:
        score_one()
