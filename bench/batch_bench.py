"""Benchmark of ``ctcovid batch``: archive indexing rate and batch throughput vs the raw model.

Prints one JSON object:

- ``index_files_per_second``: header-only indexing of a synthetic archive (``build_index``);
- ``raw_slices_per_second``: ``Classifier.predict_slices`` on slices decoded beforehand;
- ``batch_slices_per_second``: the local engine end to end (decode in workers, shared batches,
  results and SRs written), on the same archive and the same loaded model;
- ``ratio``: batch / raw (goal >= 0.95 at 256 px: decoding hidden behind inference);
- ``batch_seconds_in_model`` / ``batch_seconds_outside_model``: the batch run's time inside
  ``predict_slices`` and the rest (waiting for decoders, results and SRs): a batch slower than
  raw with its model time near raw's lost the difference outside the model, one whose model
  time itself grew was slowed by what ran beside it;
- ``decode_slices_per_second``: the decode task of the workers (``decode_series``: headers read
  again, pixels decoded, windowed, slice policy) alone, in this process, no model running; with
  the raw rate it says how long batch would take with no overlap (``serial_estimate_s``) and
  with perfect overlap (``overlapped_estimate_s``).

The model is the real architecture, untrained, at ``--input-size`` (default 64 px to keep the run
short on a CPU; 256 is the production size). ``--runtime`` is how it runs (``auto``, the default
of every command, picks the fastest graph the model folder holds); ``--export int8`` first adds
the ONNX graphs with ``ctcovid export`` (calibration: phantom scans in the COV19-CT-DB layout).
An untrained network may fail the int8 accuracy gate; the graph is then not written and the
fp32 ONNX graph is what ``auto`` runs, which the output says (``export``). Usage::

    python bench/batch_bench.py --studies 6 --slices 32 --input-size 64 --workers 1
    python bench/batch_bench.py --studies 4 --slices 32 --input-size 256 --export int8 \\
        --work-dir /tmp/batch-bench-256
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_model(model_dir: Path, input_size: int) -> None:
    """An untrained Res-Dense Net artifact at ``input_size`` (kept when already there)."""
    if (model_dir / "ctcovid.json").exists():
        return
    import keras

    from ctcovid.config import IngestConfig, ModelConfig
    from ctcovid.model.artifact import ModelArtifact, save_model
    from ctcovid.model.build import build_res_dense

    keras.utils.set_random_seed(0)
    config = ModelConfig(input_size=input_size)
    save_model(
        build_res_dense(config),
        ModelArtifact(model_config=config, ingest_config=IngestConfig(image_size=input_size)),
        model_dir,
    )


def export_graphs(model_dir: Path, work: Path, input_size: int, kind: str) -> dict[str, Any]:
    """``ctcovid export`` of the model folder (fp32 ONNX, and int8 or bf16 through its gate);
    what was written and, when the gate refused, the measured reason."""
    from ctcovid.errors import ModelError
    from ctcovid.model.artifact import read_artifact
    from ctcovid.training.export import export_model

    if kind == "none":
        return {"export": "none"}
    graphs = read_artifact(model_dir).graphs
    refused = work / f"{kind}-refused.txt"
    if kind in graphs or refused.exists():
        return {"export": kind, "graphs": sorted(graphs), "reused": True,
                **({f"{kind}_refused": refused.read_text()} if refused.exists() else {})}
    start = time.perf_counter()
    out: dict[str, Any] = {"export": kind}
    if kind in ("int8", "bf16"):
        calib = work / "calibration"
        if not (calib / ".done").exists():
            from dicom_fixtures import write_cov19_layout

            write_cov19_layout(calib, n_per_class=2, n_slices=8, size=input_size, seed=5)
            (calib / ".done").write_text("")
        try:
            report = export_model(model_dir, calibration=calib, **{kind: True})
            # Gated on the calibration scans only: unverified, so --runtime auto runs fp32;
            # time it with --runtime int8, openvino-int8 (export int8 gates it too) or bf16.
            out[f"{kind}_gate"] = report.graphs.get(kind, {}).get(
                "selection", report.graphs.get(kind, {}).get("verification"))
        except ModelError as exc:  # the gate refused: keep the fp32 graph, say so
            refused.write_text(str(exc))
            out[f"{kind}_refused"] = str(exc)
            export_model(model_dir)
    else:
        export_model(model_dir)
    out["graphs"] = sorted(read_artifact(model_dir).graphs)
    out["export_seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6, help="series in the archive")
    parser.add_argument("--slices", type=int, default=32, help="slices per series")
    parser.add_argument("--image-size", type=int, default=256, help="DICOM rows/columns")
    parser.add_argument("--input-size", type=int, default=64, help="model input size (px)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--runtime", default="auto",
        choices=("auto", "keras", "onnx", "int8", "openvino-int8", "bf16"),
        help="how the model runs (auto: the fastest graph the model folder holds)",
    )
    parser.add_argument(
        "--export", default="none", choices=("none", "onnx", "int8", "bf16"),
        help="add ONNX graphs to the model folder first (ctcovid export; int8 and bf16 gated)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2,
        help="raw model timings (median), split before and after the batch run",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep files here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()

    import statistics

    import numpy as np

    import dicom_fixtures
    from ctcovid.batch import BatchOptions, build_index, iter_series, run_batch
    from ctcovid.decoder import decode_series
    from ctcovid.inference import Classifier
    from ctcovid.model.export import cpu_description

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    archive = work / f"archive-{args.studies}x{args.slices}x{args.image_size}"
    model_dir = work / f"model-{args.input_size}"
    if not archive.exists():
        dicom_fixtures.generate_studies(archive, args.studies, seed=1, n_slices=args.slices,
                                        size=args.image_size)
        (archive / "manifest.json").unlink()
    build_model(model_dir, args.input_size)
    exported = export_graphs(model_dir, work, args.input_size, args.export)
    classifier = Classifier.from_file(model_dir, batch_size=args.batch_size, runtime=args.runtime)

    # Indexing: header-only reads in worker processes.
    index_db = work / "index-bench.sqlite"
    index_db.unlink(missing_ok=True)
    index = build_index(archive, index_db, classifier.ingest_config, workers=args.workers)
    entries = [e for e in iter_series(index_db) if e.usable]

    # The workers' decode task alone (this process, no model running): what batch must hide.
    start = time.perf_counter()
    decoded = [decode_series(e, e.where, classifier.ingest_config) for e in entries]
    decode_s = time.perf_counter() - start
    failed = [d.error for d in decoded if d.prepared is None]
    if failed:
        raise SystemExit(f"decoding failed: {failed[0]}")

    # Raw model: slices decoded beforehand, the model alone.
    slices = np.concatenate([d.prepared.used.slices for d in decoded if d.prepared is not None])
    classifier.predict_slices(slices[: args.batch_size])  # compile / warm up outside the timing
    raw_runs: list[float] = []

    def time_raw() -> None:
        start = time.perf_counter()
        classifier.predict_slices(slices)
        raw_runs.append(time.perf_counter() - start)

    # Raw runs before and after the batch run: drift (other jobs) hits both sides alike.
    repeats = max(1, args.repeats)
    for _ in range(repeats - repeats // 2):
        time_raw()

    # The batch engine on the same archive and the same (warm) model. Its time in the model is
    # measured too: the rest is what batch adds (waiting for decoders, results, SRs).
    predict = classifier.predict_slices
    in_model = {"seconds": 0.0, "calls": 0, "slices": 0}
    stamps: list[tuple[float, float]] = []  # (start, end) of each model call

    def timed_predict(batch_slices: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return predict(batch_slices)
        finally:
            stamps.append((start, time.perf_counter()))
            in_model["seconds"] += stamps[-1][1] - start
            in_model["calls"] += 1
            in_model["slices"] += len(batch_slices)

    classifier.predict_slices = timed_predict  # type: ignore[method-assign]
    out = work / f"run-{time.time_ns()}"
    batch_start = time.perf_counter()
    try:
        summary = run_batch(BatchOptions(archive, out, model_dir, workers=args.workers,
                                         batch_size=args.batch_size, runtime=args.runtime),
                            classifier=classifier)
    finally:
        classifier.predict_slices = predict  # type: ignore[method-assign]
    batch_end = time.perf_counter()
    # Where the time outside the model went: before the first model call (index, then waiting
    # for the first decoded series), between calls (waiting for decoders, results, SRs), after.
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(stamps)]
    outside = {
        "index_s": summary["index"]["seconds"],
        "before_first_model_call_s": round(stamps[0][0] - batch_start, 3) if stamps else None,
        "between_model_calls_s": [round(g, 3) for g in gaps],
        "after_last_model_call_s": round(batch_end - stamps[-1][1], 3) if stamps else None,
    }
    for _ in range(repeats // 2):
        time_raw()
    raw_s = statistics.median(raw_runs)
    raw = len(slices) / raw_s
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
        "cpu": cpu_description(),
        "runtime_requested": args.runtime,
        "runtime": classifier.artifact.runtime,
        **exported,
        "index_files": index.n_files,
        "index_seconds": round(index.seconds, 3),
        "index_files_per_second": round(index.n_files / index.seconds, 1),
        "raw_slices_per_second": round(raw, 2),
        "raw_runs_s": [round(t, 3) for t in raw_runs],
        "batch_slices_per_second": batch,
        "batch_classify_seconds": summary["this_run"]["classify_seconds"],
        "batch_seconds_in_model": round(in_model["seconds"], 3),
        "batch_model_calls": in_model["calls"],
        "batch_slices_in_model": in_model["slices"],
        "batch_seconds_outside_model": round(
            summary["this_run"]["classify_seconds"] - in_model["seconds"], 3
        ),
        "batch_outside_model": outside,
        "ratio": round(batch / raw, 3) if batch else None,
        "goal_ratio": 0.95,
        "decode_seconds": round(decode_s, 3),
        "decode_slices_per_second": round(len(slices) / decode_s, 2),
        "serial_estimate_s": round(raw_s + decode_s, 3),
        "overlapped_estimate_s": round(max(raw_s, decode_s / max(1, args.workers)), 3),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
