"""Batch reprocessing of an archive as one job: index, then classify every usable series.

``run_batch`` is the whole job: it locks and checks the output folder (``results.py``), builds
or reuses the archive index (``index.py``) or asks the PACS (``sources.py``), writes a
``skipped`` row for every series judged unusable, and hands the rest to the engine the options
name: the local engine (``engine.py``) or the Ray engine (``ray_engine.py``). ``--resume`` skips
every series that already has its row.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ctcovid.batch.engine import BatchSink, run_local
from ctcovid.batch.index import (
    build_index,
    index_is_complete,
    index_summary,
    iter_series,
)
from ctcovid.batch.options import BatchOptions
from ctcovid.batch.ray_engine import run_ray
from ctcovid.batch.results import (
    CARD_DIR,
    INDEX_FILE,
    RESULTS_FILE,
    SR_DIR,
    STATUSES,
    SUMMARY_FILE,
    BatchProgress,
    ResultsWriter,
    RunInfo,
    lock_output,
    prepare_output,
    read_results,
    write_json_atomic,
)
from ctcovid.decoder import decoder_pool, warm_up
from ctcovid.errors import ConfigError
from ctcovid.inference import Classifier
from ctcovid.model.artifact import ModelArtifact, read_artifact
from ctcovid.model.runtimes import resolve_runtime

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")


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
    from ctcovid.batch.auditing import batch_audit

    trail = batch_audit(
        out, file=options.audit_file, syslog=options.audit_syslog, ca=options.audit_ca
    )
    if trail is not None:
        trail.activity(started=True)
        if options.source is not None:
            options.source.audit = trail
    forwarder = None
    try:
        if options.destinations:
            from ctcovid.batch.destinations import SrForwarder

            forwarder = SrForwarder(
                out, options.destinations, audit=trail, result_card=options.result_card
            )
            progress = forwarder.watch(progress)
        with (
            decoder_pool(options.workers, options.decoder_memory_mb)
            if local_pool
            else contextlib.nullcontext()
        ) as pool:
            if pool is not None:
                for _ in range(options.workers):
                    pool.submit(warm_up)
            summary = _run(options, progress, classifier, artifact, pool, wall_start)
        if trail is not None:  # results.csv names patients (by ID): an Export
            trail.export(out / RESULTS_FILE, read_results(out / RESULTS_FILE))
        if options.research_key is not None:
            from ctcovid.batch.research import RESEARCH_DIR, export_run

            # The whole results file, rows of an earlier interrupted run included; still
            # under this run's lock.
            research = out / RESEARCH_DIR
            summary["research"] = export_run(out, research, options.research_key, lock=False)
            if trail is not None:  # which patients went into it, de-identified: an Export
                trail.export(research / RESULTS_FILE, read_results(out / RESULTS_FILE))
    finally:
        sent = forwarder.close() if forwarder is not None else None
        if trail is not None:
            trail.activity(started=False)
            trail.close()
    if sent is not None:
        summary["sent"] = sent
    if sent is not None or options.research_key is not None:
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
        # Results and SRs need only the artifact: the network is loaded only to infer.
        sink = BatchSink(out, artifact, writer, progress)
        for entry in entries:
            if not entry.usable:
                sink.skipped(entry)
        classify_start = time.perf_counter()
        if usable and classifier is None and options.engine == "local":
            classifier = Classifier.from_file(
                options.model_path, batch_size=options.batch_size, runtime=artifact.runtime
            )
        if options.result_card and classifier is not None:
            sink.card_maps = classifier.class_activation_maps
        if options.engine == "ray":
            run_ray(usable, options, artifact, sink)
        elif options.source is not None:
            options.source.classify(
                usable,
                classifier,
                sink,
                out=out,
                workers=options.workers,
                pool=pool,
                memory_mb=options.decoder_memory_mb,
            )
        elif classifier is not None and usable:
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

    counts = {status: sum(r.status == status for r in rows) for status in STATUSES}
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
    if options.result_card:
        summary["card_dir"] = str(out / CARD_DIR)
    if options.source is not None:
        summary["source"] = options.source.summary()
    write_json_atomic(summary, out / SUMMARY_FILE)
    return summary
