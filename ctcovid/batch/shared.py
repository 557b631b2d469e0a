"""The parts both engines of ``ctcovid batch`` are built from.

A decode task (:func:`decode_entry`, run in a worker process) turns one indexed series into what
the model sees; :class:`SeriesScorer` scores the queued series one at a time, never two in one
model call; :class:`BatchSink` turns each series' probabilities into its result row and SR with
the same ``Classifier`` and SR builder as ``ctcovid classify``. :class:`BatchOptions` and
:class:`BatchProgress` are what the job (``job.py``) hands to an engine. The local engine
(``local.py``) and the Ray engine (``ray_engine.py``) import this module, never each other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ctcovid.batch.index import SeriesEntry, load_entry_series
from ctcovid.batch.results import (
    CLASSIFIED,
    FAILED,
    SKIPPED,
    SR_DIR,
    ResultRow,
    ResultsWriter,
)
from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB, out_of_memory_reason
from ctcovid.errors import CtCovidError
from ctcovid.fsio import write_atomic
from ctcovid.inference import Classifier
from ctcovid.model.artifact import ModelArtifact
from ctcovid.scans import PreparedScan, prepare_scan

if TYPE_CHECKING:
    from ctcovid.batch.sources import PacsSource
    from ctcovid.net.sender import SendSettings

logger = logging.getLogger(__name__)


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


# -- scoring, one series at a time ----------------------------------------------------------------


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
    destinations: tuple[SendSettings, ...] = ()
    # Address-space limit of each decoder process, MiB (0: none).
    decoder_memory_mb: int = DEFAULT_DECODER_MEMORY_MB
    runtime: str = "auto"  # how the model runs (keras | onnx | int8 | auto), not where
