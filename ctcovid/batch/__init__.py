"""Batch reprocessing of archives: index every file, classify every usable series, one row each.

``run_batch(BatchOptions(archive, out, model_path))`` writes ``out/index.sqlite``,
``out/results.csv`` (appended row by row), ``out/sr/`` and ``out/summary.json``; ``--resume``
finishes an interrupted run. The local engine decodes in worker processes and infers in one; the
Ray engine (optional extra ``ray``) spreads the same work over a cluster.
"""

from ctcovid.batch.index import IndexSummary, SeriesEntry, build_index, iter_series
from ctcovid.batch.job import ENGINES, run_batch
from ctcovid.batch.results import (
    CLASSIFIED,
    FAILED,
    RESULTS_FILE,
    SKIPPED,
    ResultRow,
    ResultsWriter,
    read_results,
)
from ctcovid.batch.shared import BatchOptions, BatchProgress, BatchSink, SeriesScorer, decode_entry

__all__ = [
    "CLASSIFIED",
    "ENGINES",
    "FAILED",
    "RESULTS_FILE",
    "SKIPPED",
    "BatchOptions",
    "BatchProgress",
    "BatchSink",
    "IndexSummary",
    "ResultRow",
    "ResultsWriter",
    "SeriesEntry",
    "SeriesScorer",
    "build_index",
    "decode_entry",
    "iter_series",
    "read_results",
    "run_batch",
]
