"""The Ray engine of ``ctcovid batch``: the local engine's work expressed with Ray Data.

Series list -> decode and preprocess tasks on CPUs (one row per selected slice) -> ``map_batches``
inference on a pool of classifier actors (one per GPU when the cluster has GPUs, else one on a
CPU), whose batches mix slices of several series -> the driver collects the probabilities of each
series and writes its result row and SR through the same :class:`~ctcovid.batch.engine.BatchSink`
as the local engine. Needs the optional extra ``ray`` (``pip install 'ctcovid[ray]'``); on a
cluster every node needs ctcovid installed and the archive, the model and the output folder's
parent on shared storage at the same paths.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ctcovid.batch.engine import BatchSink
from ctcovid.batch.index import SeriesEntry
from ctcovid.batch.options import BatchOptions
from ctcovid.decoder import Decoded, decode_series
from ctcovid.errors import ConfigError

if TYPE_CHECKING:
    from ctcovid.model.artifact import ModelArtifact

logger = logging.getLogger(__name__)

# Environment that Ray workers inherit from the driver (backend choice, log levels).
FORWARDED_ENV = ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # the Data library is a separate part of the extra
    except ImportError as exc:
        raise ConfigError(
            f"--engine ray needs Ray Data ({exc}); install it with: pip install 'ctcovid[ray]'"
        ) from exc
    return ray


def decode_rows(row: dict[str, Any], artifact: ModelArtifact) -> list[dict[str, Any]]:
    """Ray task: one indexed series -> one row per slice the model will see.

    The first row carries the prepared scan without pixels (what the driver needs for the result
    and the SR); a series that cannot be prepared becomes one row with ``k = -1`` and the reason.
    """
    entry: SeriesEntry = pickle.loads(row["entry"])
    decoded = decode_series(entry, entry.where, artifact.ingest_config)
    size = artifact.model_config.input_size
    if decoded.prepared is None:
        return [
            {
                "idx": row["idx"],
                "k": -1,
                "n": 0,
                "slice": np.zeros((size, size), np.uint8),
                "meta": pickle.dumps(decoded),
                "error": decoded.error,
            }
        ]
    used = decoded.prepared.used
    slices = used.slices
    decoded.prepared.used = dataclasses.replace(used, slices=slices[:0])
    meta = pickle.dumps(decoded)
    return [
        {
            "idx": row["idx"],
            "k": k,
            "n": len(slices),
            "slice": slices[k],
            "meta": meta if k == 0 else b"",
            "error": "",
        }
        for k in range(len(slices))
    ]


class SliceScorer:
    """Ray actor: the model, loaded once, scoring batches of slices from any series."""

    def __init__(self, model_path: str, batch_size: int, runtime: str = "keras"):
        from ctcovid.inference import Classifier

        self.classifier = Classifier.from_file(model_path, batch_size=batch_size, runtime=runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k = np.asarray(batch["k"])
        probs = np.full(len(k), np.nan, np.float32)
        ok = k >= 0
        if ok.any():
            probs[ok] = self.classifier.predict_slices(np.stack(list(batch["slice"][ok])))
        # The pixels stay here: the driver needs only the probabilities.
        return {
            "idx": batch["idx"],
            "k": k,
            "n": batch["n"],
            "prob": probs,
            "meta": batch["meta"],
            "error": batch["error"],
        }


def _init_ray(ray: Any, options: BatchOptions) -> None:
    if ray.is_initialized():
        return
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": env} if env else None,
        "log_to_driver": False,
        "configure_logging": False,
    }
    if options.ray_address:
        ray.init(address=options.ray_address, **kwargs)
    else:
        ray.init(
            num_cpus=options.ray_num_cpus or max(2, options.workers + 1),
            include_dashboard=False,
            **kwargs,
        )


def run_ray(
    entries: list[SeriesEntry], options: BatchOptions, artifact: ModelArtifact, sink: BatchSink
) -> None:
    """Classify ``entries`` on Ray; the driver writes rows and SRs as series finish."""
    if not entries:
        return
    ray = import_ray()
    if not logger.isEnabledFor(logging.DEBUG):
        # Its per-stage chatter is noise in a batch job's output.
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    _init_ray(ray, options)
    from ray.data import ActorPoolStrategy

    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    # One scorer per GPU; on CPU one scorer (it uses all the cores its node gives it), the other
    # CPUs decode.
    n_scorers = max(1, n_gpus)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    items = [{"idx": i, "entry": pickle.dumps(e)} for i, e in enumerate(entries)]
    ds = (
        ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        .flat_map(decode_rows, fn_kwargs={"artifact": artifact}, num_cpus=1)
        .map_batches(
            SliceScorer,
            fn_constructor_kwargs={
                "model_path": str(options.model_path),
                "batch_size": options.batch_size,
                "runtime": artifact.runtime,
            },
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=n_scorers),
            num_gpus=1 if n_gpus else 0,
            num_cpus=0 if n_gpus else 1,
        )
    )
    started: dict[int, float] = {}
    probs: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    metas: dict[int, Decoded] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for idx, k, n, prob, meta, error in zip(
            batch["idx"],
            batch["k"],
            batch["n"],
            batch["prob"],
            batch["meta"],
            batch["error"],
            strict=True,
        ):
            idx, k, n = int(idx), int(k), int(n)
            started.setdefault(idx, time.perf_counter())
            if k < 0:
                sink.failed(entries[idx], str(error))
                continue
            if idx not in probs:
                probs[idx] = np.empty(n, np.float32)
                counts[idx] = 0
            probs[idx][k] = prob
            counts[idx] += 1
            if k == 0:
                metas[idx] = pickle.loads(meta)
            if counts[idx] == n and idx in metas:
                decoded = metas.pop(idx)
                assert decoded.prepared is not None
                sink.classified(
                    entries[idx],
                    decoded.prepared,
                    probs.pop(idx),
                    time.perf_counter() - started.pop(idx),
                )
                del counts[idx]
    if probs:
        missing = ", ".join(entries[i].series_instance_uid for i in probs)
        raise RuntimeError(f"Ray returned incomplete slice scores for series {missing}")
