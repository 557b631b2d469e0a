"""Batch reprocessing of archives, a front: classify every usable series, one row each.

``run_batch(BatchOptions(archive, out, model_path))`` (``job.py``, ``options.py``) writes
``out/index.sqlite``, ``out/results.csv`` (``results.py``, appended row by row), ``out/sr/`` and
``out/summary.json``; ``--resume`` finishes an interrupted run. The archive is a folder
(``index.py``) or a PACS (``sources.py``); ``engine.py`` decodes in capped worker processes
(:mod:`ctcovid.decoder`) and infers in one, the Ray engine (``ray_engine.py``, optional extra
``ray``) spreads the same work over a cluster; ``destinations.py`` also sends every SR on.
"""

from ctcovid.batch.engine import BatchSink, SeriesScorer
from ctcovid.batch.index import IndexSummary, SeriesEntry, build_index, iter_series
from ctcovid.batch.job import ENGINES, run_batch
from ctcovid.batch.options import BatchOptions
from ctcovid.batch.results import (
    CLASSIFIED,
    FAILED,
    INCOMPLETE,
    RESULTS_FILE,
    SKIPPED,
    BatchProgress,
    ResultRow,
    ResultsWriter,
    read_results,
)

__all__ = [
    "CLASSIFIED",
    "ENGINES",
    "FAILED",
    "INCOMPLETE",
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
    "iter_series",
    "read_results",
    "run_batch",
]
