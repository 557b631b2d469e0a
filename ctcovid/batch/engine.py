"""The engines of ``ctcovid batch``: what turns indexed series into rows and SRs.

Each series is decoded by :class:`~ctcovid.decoder.Decoders` (memory-capped decoder processes
that outlive the death of any of them); :class:`SeriesScorer` scores one whole series at a
time, never two in one model call; :class:`BatchSink` turns each series' probabilities into its
result row and SR with the same ``Classifier`` and SR builder as ``ctcovid classify``. The one
engine loop (:func:`run_local`) decodes in worker processes while this process feeds ONE
classifier, fed by the folder index or by the PACS retriever (``sources.py``); the Ray engine
(``ray_engine.py``) is built from the same parts.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ctcovid.batch.index import SeriesEntry
from ctcovid.batch.results import (
    CARD_DIR,
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
from ctcovid.results import ScanResult
from ctcovid.scans import PreparedScan

logger = logging.getLogger(__name__)


# -- results and SRs ---------------------------------------------------------------------------


class BatchSink:
    """Writes each finished series: SR first (atomically), then its row in ``results.csv``.

    With ``card_maps`` (the classifier's class-activation maps, set when ``--result-card`` is
    on) each SR gets its result card in ``out/cards``, written before the SR, so that an SR on
    disk has its card.
    """

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
        self.card_maps: Callable[[np.ndarray], np.ndarray] | None = None

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
            if self.card_maps is not None:
                self._write_card(prepared, result, ds)
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

    def _write_card(self, prepared: PreparedScan, result: ScanResult, sr: Any) -> None:
        """The result card of ``sr``, in ``out/cards`` (its heatmap left out if the map fails)."""
        from ctcovid.report.card import (
            build_result_card,
            card_key_slice,
            card_path_for,
            write_card,
        )

        assert self.card_maps is not None
        index = card_key_slice(result)
        key_slice = prepared.used.slices[index]
        try:
            cam = self.card_maps(key_slice[np.newaxis])[0]
        except Exception:  # the card states the result without it
            logger.warning(
                "series %s: no class-activation map for the result card",
                result.series_instance_uid,
                exc_info=True,
            )
            cam = None
        card = build_result_card(result, prepared.series, sr, key_slice=key_slice, cam=cam)
        path = card_path_for(Path(f"{sr.SOPInstanceUID}.dcm"), self.out / CARD_DIR)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: write_card(card, tmp))


# -- the shared batches --------------------------------------------------------------------------


@dataclass
class _Pending:
    entry: SeriesEntry
    prepared: PreparedScan
    probs: np.ndarray
    started: float = field(default_factory=time.perf_counter)


class SeriesScorer:
    """Queues prepared series and scores them one whole series per step.

    A model call never holds slices of two series (``Classifier.predict_slices`` pads a
    series' last batch instead): the series scored before and after one, and when the
    retrieval of the next one lags, cannot change its numbers.
    """

    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self.queue: deque[_Pending] = deque()

    def add(self, entry: SeriesEntry, prepared: PreparedScan) -> None:
        self.queue.append(_Pending(entry, prepared, np.empty(0, np.float32)))

    @property
    def ready(self) -> bool:
        """Whether a series waits to be scored."""
        return bool(self.queue)

    def step(self) -> _Pending | None:
        """Score the series queued first; ``None`` when none waits."""
        if not self.queue:
            return None
        item = self.queue.popleft()
        item.probs = self.classifier.predict_slices(item.prepared.used.slices)
        return item


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
    decoder process fails alone (its row says why) and the run goes on. Each series is scored
    whole and alone (:class:`SeriesScorer`), so neither its neighbours nor a PACS that lags can
    change its numbers.
    """
    feed = entries if isinstance(entries, Feed) else _Listed(entries)
    scorer = SeriesScorer(classifier)

    def take(decoded: Decoded) -> None:
        if decoded.prepared is None:
            sink.failed(decoded.job, decoded.error)
        else:
            scorer.add(decoded.job, decoded.prepared)

    def score_one() -> None:
        item = scorer.step()
        if item is not None:
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
            if scorer.ready:
                score_one()
            elif decoders.busy:
                for decoded in decoders.collect(timeout=0.1):
                    take(decoded)
            elif not feed.exhausted:
                item = feed.get(timeout=0.5)
                if item is not None:
                    route(item)
    while scorer.ready:
        score_one()
