"""Benchmark of ``ctcovid batch``: archive indexing rate and batch throughput vs the raw model.

Prints one JSON object:

- ``index_files_per_second``: header-only indexing of a synthetic archive (``build_index``);
- ``raw_slices_per_second``: ``Classifier.predict_slices`` on slices decoded beforehand;
- ``batch_slices_per_second``: the local engine end to end (decode in workers, shared batches,
  results and SRs written), on the same archive and the same loaded model;
- ``ratio``: batch / raw (goal >= 0.9: decoding hidden behind inference).

The model is the real architecture, untrained, at ``--input-size`` (default 64 px to keep the run
short on a CPU; 256 is the production size). Usage::

    python bench/batch_bench.py --studies 6 --slices 32 --input-size 64 --workers 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6, help="series in the archive")
    parser.add_argument("--slices", type=int, default=32, help="slices per series")
    parser.add_argument("--image-size", type=int, default=256, help="DICOM rows/columns")
    parser.add_argument("--input-size", type=int, default=64, help="model input size (px)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep files here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import keras
    import numpy as np

    import dicom_fixtures
    from ctcovid.batch import BatchOptions, build_index, iter_series, run_batch
    from ctcovid.batch.index import load_entry_series
    from ctcovid.config import IngestConfig, ModelConfig
    from ctcovid.inference import Classifier
    from ctcovid.model.artifact import ModelArtifact, save_model
    from ctcovid.model.build import build_res_dense

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="batch-bench-"))
    archive, model_dir = work / "archive", work / "model"
    if not archive.exists():
        dicom_fixtures.generate_studies(archive, args.studies, seed=1, n_slices=args.slices,
                                        size=args.image_size)
        (archive / "manifest.json").unlink()
    keras.utils.set_random_seed(0)
    config = ModelConfig(input_size=args.input_size)
    save_model(
        build_res_dense(config),
        ModelArtifact(model_config=config, ingest_config=IngestConfig(image_size=args.input_size)),
        model_dir,
    )
    classifier = Classifier.from_file(model_dir, batch_size=args.batch_size)
    ingest = classifier.ingest_config

    # Indexing: header-only reads in worker processes.
    index_db = work / "index-bench.sqlite"
    index_db.unlink(missing_ok=True)
    index = build_index(archive, index_db, ingest, workers=args.workers)

    # Raw model: slices decoded beforehand, the model alone.
    slices = np.concatenate([
        classifier.prepare(load_entry_series(e, ingest)).used.slices
        for e in iter_series(index_db) if e.usable
    ])
    classifier.predict_slices(slices[: args.batch_size])  # compile outside the timing
    start = time.perf_counter()
    classifier.predict_slices(slices)
    raw = len(slices) / (time.perf_counter() - start)

    # The batch engine on the same archive and the same (warm) model.
    out = work / f"run-{time.time_ns()}"
    summary = run_batch(BatchOptions(archive, out, model_dir, workers=args.workers,
                                     batch_size=args.batch_size), classifier=classifier)
    batch = summary["this_run"]["slices_per_second"]
    result = {
        "benchmark": "batch",
        "model_input_size": args.input_size,
        "dicom_image_size": args.image_size,
        "series": args.studies,
        "slices": len(slices),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "keras_backend": keras.backend.backend(),
        "index_files": index.n_files,
        "index_seconds": round(index.seconds, 3),
        "index_files_per_second": round(index.n_files / index.seconds, 1),
        "raw_slices_per_second": round(raw, 2),
        "batch_slices_per_second": batch,
        "ratio": round(batch / raw, 3) if batch else None,
        "goal_ratio": 0.9,
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
