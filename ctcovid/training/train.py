"""Train a Res-Dense Net the paper's way, with its faults fixed, judged at scan level.

Read top to bottom (every setting is a :class:`~.config.TrainConfig`, saved with the model and in
the run folder): :func:`train_one_epoch`, :func:`validate` (scan-level macro F1 in inference
mode), then the run in three steps that :func:`train` ties together: :func:`prepare_run` (split,
network, slice cache, settings), :func:`fit_stages` (frozen backbones with Adam, then each
backbone unfrozen except its first layers; best epoch by validation) and :func:`save_best` (the
best epoch as a model artifact whose threshold was tuned on validation). The feed of training
batches is in :mod:`.feed`, the freezing, compiling and BatchNormalization re-estimation in
:mod:`.stages`.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ctcovid import __version__
from ctcovid.errors import ConfigError
from ctcovid.model.artifact import ModelArtifact, save_model
from ctcovid.model.build import build_res_dense
from ctcovid.training.cache import SliceCache, build_cache
from ctcovid.training.config import TrainConfig
from ctcovid.training.data import CLASSES, POSITIVE, DataSet, discover
from ctcovid.training.feed import SliceBatches, input_rate
from ctcovid.training.metrics import binary_metrics, scan_scores, tune_threshold
from ctcovid.training.progress import NullProgress, Progress
from ctcovid.training.split import split_scans
from ctcovid.training.stages import (
    TrainingModeForward,
    compile_stage,
    recalibrate_batchnorm,
    set_stage,
    training_model,
    zero_head,
)

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.csv"
SPLIT_FILE = "split.csv"
SUMMARY_FILE = "summary.json"


# -- one epoch, one validation -------------------------------------------------------------------


class ProgressCallback(keras.callbacks.Callback):
    """Advances a progress bar per batch and times the steps (the first one includes compiling)."""

    def __init__(self, progress: Progress, batch_size: int) -> None:
        super().__init__()
        self.progress = progress
        self.batch_size = batch_size
        self.step_seconds: list[float] = []
        self._t0 = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.step_seconds.append(time.perf_counter() - self._t0)
        logs = logs or {}
        self.progress.advance(
            1, **{k: float(v) for k, v in logs.items() if k in ("loss", "accuracy")}
        )


def train_one_epoch(
    trainer: keras.Model,
    feed: SliceBatches,
    epoch: int,
    progress: Progress,
    description: str,
) -> dict[str, float]:
    """One pass over the training slices; returns loss, accuracy and timings."""
    feed.shuffle(epoch)
    callback = ProgressCallback(progress, feed.batch_size)
    progress.start(description, total=len(feed), unit="batches")
    start = time.perf_counter()
    history = trainer.fit(feed, epochs=1, verbose=0, callbacks=[callback])
    seconds = time.perf_counter() - start
    progress.finish()
    steps = callback.step_seconds
    # The first step of a freshly compiled function includes tracing; leave it out of the rate.
    timed = steps[1:] if len(steps) > 1 else steps
    return {
        "train_loss": float(history.history["loss"][-1]),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "seconds": seconds,
        "first_step_seconds": steps[0] if steps else 0.0,
        "slices_per_second": len(timed) * feed.batch_size / sum(timed) if timed else 0.0,
    }


def predict_scans(
    classifier: Any,
    cache: SliceCache,
    scan_ids: Sequence[str],
    progress: Progress | None = None,
    description: str = "predicting",
    chunk_slices: int = 1024,
) -> np.ndarray:
    """Scan scores (mean slice P(COVID)) through the inference code path, in bounded memory."""
    progress = progress or NullProgress()
    indices, owners = cache.slice_table(list(scan_ids))
    probs = np.empty(len(indices), np.float32)
    progress.start(description, total=len(indices), unit="slices")
    for start in range(0, len(indices), chunk_slices):
        chunk = indices[start : start + chunk_slices]
        probs[start : start + len(chunk)] = classifier.predict_slices(cache.slices[chunk])
        progress.advance(len(chunk))
    progress.finish()
    return scan_scores(probs, owners, len(scan_ids))


def validate(
    classifier: Any, cache: SliceCache, val_ids: Sequence[str], targets: np.ndarray
) -> tuple[dict[str, Any], np.ndarray]:
    """Scan-level metrics in inference mode at 0.5 and at the threshold tuned on these scans."""
    scores = predict_scans(classifier, cache, val_ids)
    at_half = binary_metrics(targets, scores, 0.5)
    threshold, tuned_f1 = tune_threshold(targets, scores)
    metrics = {
        "val_macro_f1": at_half["macro_f1"],
        "val_macro_f1_tuned": tuned_f1,
        "val_threshold": threshold,
        "val_roc_auc": at_half["roc_auc"],
        "val_score_std": float(np.std(scores)),
    }
    return metrics, scores


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    model_dir: Path
    run_dir: Path
    artifact: ModelArtifact
    best_epoch: int
    val_metrics: dict[str, Any]
    split_counts: dict[str, Any]
    history: list[dict[str, Any]]
    cache_dir: Path
    skipped: list[dict[str, str]]
    scan_warnings: dict[str, list[str]]
    input_slices_per_second: float
    train_slices_per_second: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "model": str(self.model_dir),
            "run_dir": str(self.run_dir),
            "device_uid": self.artifact.device_uid,
            "threshold": self.artifact.threshold,
            "best_epoch": self.best_epoch,
            **{
                k: self.val_metrics[k]
                for k in ("f1_covid", "f1_non_covid", "macro_f1", "confusion", "n_scans", "roc_auc")
            },
            "validation": self.val_metrics,
            "split": self.split_counts,
            "cache": str(self.cache_dir),
            "skipped": self.skipped,
            "scan_warnings": self.scan_warnings,
            "input_slices_per_second": round(self.input_slices_per_second, 1),
            "train_slices_per_second": round(self.train_slices_per_second, 2),
            "epochs": self.history,
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
        }


def _class_weight(targets: np.ndarray) -> dict[int, float]:
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(targets.astype(int))
    weights = compute_class_weight("balanced", classes=present, y=targets.astype(int))
    out = {0: 1.0, 1: 1.0}
    out.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return out


def _environment() -> dict[str, str]:
    return {
        "ctcovid": __version__,
        "keras": keras.__version__,
        "backend": keras.config.backend(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _write_metrics_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


@dataclass
class PreparedRun:
    """A run ready to fit: data split and cached, the network built, the settings written."""

    config: TrainConfig
    out: Path
    run: Path
    data: DataSet
    split: Any  # ctcovid.training.split.Split
    core: keras.Model
    cache: SliceCache
    feed: SliceBatches
    val_ids: list[str]
    val_targets: np.ndarray
    feed_rate: float


@dataclass
class Fit:
    """What fitting the stages produced: the best epoch (by scan-level validation) and the log."""

    best_epoch: int
    best_weights: list[Any]
    best_scores: np.ndarray
    history: list[dict[str, Any]]
    rates: list[float]
    notes: list[str]


def prepare_run(
    data_dir: Path | str,
    out: Path,
    config: TrainConfig,
    *,
    run_dir: Path | str | None,
    cache_dir: Path | str | None,
    progress: Progress,
) -> PreparedRun:
    """Seed, discover and split the data, build the network, cache the slices, write settings.

    The network is built before any slice is cached, so an unreachable ImageNet download fails
    in seconds, not after caching.
    """
    run = Path(run_dir) if run_dir is not None else out / "run"
    ingest = config.ingest
    keras.utils.set_random_seed(config.seed)

    data: DataSet = discover(data_dir, config.layout, ingest=ingest)
    split = split_scans(data.items, val_fraction=config.val_fraction, seed=config.seed)
    progress.message(split.describe())

    core = build_res_dense(config.model)
    zero_head(core)

    used = DataSet(data.root, data.layout, split.train + split.val, data.skipped)
    cache = build_cache(
        used, ingest, Path(cache_dir) if cache_dir is not None else None, progress=progress
    )
    train_ids = [i.scan_id for i in split.train if i.scan_id in cache]
    val_ids = [i.scan_id for i in split.val if i.scan_id in cache]
    if not train_ids or not val_ids:
        raise ConfigError(
            f"nothing left to {'train' if not train_ids else 'validate'} on after caching "
            f"({len(cache.skipped)} scan(s) skipped, e.g. {cache.skipped[:1]})"
        )
    label_of = {i.scan_id: i.label for i in split.train + split.val}
    val_targets = np.array([CLASSES.index(label_of[s]) for s in val_ids])  # type: ignore[arg-type]
    train_idx, train_owner = cache.slice_table(train_ids)
    slice_targets = np.array(
        [float(label_of[train_ids[o]] == POSITIVE) for o in train_owner], np.float32
    )
    class_weight = _class_weight(slice_targets) if config.class_weights else None
    feed = SliceBatches(
        cache.slices,
        train_idx,
        slice_targets,
        config.batch_size,
        class_weight=class_weight,
        seed=config.seed,
    )
    feed_rate = input_rate(feed)

    run.mkdir(parents=True, exist_ok=True)
    split.write_csv(run / SPLIT_FILE)
    (run / METRICS_FILE).unlink(missing_ok=True)
    settings = {
        "train": config.run_dict(),
        "model": config.model.to_dict(),
        "ingest": ingest.to_dict(),
        "data": {"root": str(data.root), "layout": data.layout, "scans": data.counts()},
        "split": split.counts(),
        "cache": str(cache.folder),
        "class_weight": class_weight,
        "environment": _environment(),
    }
    (run / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return PreparedRun(
        config, out, run, data, split, core, cache, feed, val_ids, val_targets, feed_rate
    )


def fit_stages(prepared: PreparedRun, progress: Progress) -> Fit:
    """Both stages, one compile each; after every epoch, validation at scan level in inference
    mode picks the best epoch (tuned macro F1, then ROC AUC)."""
    from ctcovid.inference import Classifier

    config, core, feed, cache = prepared.config, prepared.core, prepared.feed, prepared.cache
    run = prepared.run
    artifact = ModelArtifact(model_config=config.model, ingest_config=config.ingest)
    classifier = Classifier(core, artifact, batch_size=feed.batch_size)
    trainer = training_model(core, config)
    bn_forward = TrainingModeForward(core) if not config.pretrained else None

    stages = [(1, config.stage1_epochs), (2, config.epochs - config.stage1_epochs)]
    best: dict[str, Any] = {"key": (-1.0, -1.0), "epoch": 0, "weights": None, "scores": None}
    history: list[dict[str, Any]] = []
    rates: list[float] = []
    notes: list[str] = []
    epoch = 0
    for stage, n_epochs in stages:
        if n_epochs == 0:
            continue
        set_stage(core, stage, config)
        compile_stage(trainer, stage, config)
        for _ in range(n_epochs):
            epoch += 1
            desc = f"epoch {epoch}/{config.epochs} (stage {stage})"
            row: dict[str, Any] = {"epoch": epoch, "stage": stage, "lr": config.lr}
            row |= train_one_epoch(trainer, feed, epoch, progress, desc)
            if row["slices_per_second"] and (epoch > 1 or len(feed) > 1):
                rates.append(row["slices_per_second"])
            if bn_forward is not None:
                row["bn_batches"] = recalibrate_batchnorm(bn_forward, core, feed, config.bn_batches)
            val, scores = validate(classifier, cache, prepared.val_ids, prepared.val_targets)
            row |= val
            key = (val["val_macro_f1_tuned"], val["val_roc_auc"] or 0.0)
            row["best"] = key > best["key"]
            if row["best"]:
                best = {"key": key, "epoch": epoch, "weights": core.get_weights(), "scores": scores}
            if val["val_score_std"] < 1e-4:
                note = (
                    f"epoch {epoch}: validation scores are constant ({float(scores[0]):.4f}); "
                    "the model has not learned anything usable yet"
                )
                notes.append(note)
                logger.warning("%s", note)
            row["seconds"] = round(row["seconds"], 2)
            history.append(row)
            _write_metrics_row(run / METRICS_FILE, row)
            progress.message(
                f"epoch {epoch}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | "
                f"val macro F1 {val['val_macro_f1']:.3f} (tuned {val['val_macro_f1_tuned']:.3f} "
                f"at {val['val_threshold']:.3f}) AUC "
                + (f"{val['val_roc_auc']:.3f}" if val["val_roc_auc"] is not None else "n/a")
                + (" *" if row["best"] else "")
            )
    return Fit(best["epoch"], best["weights"], best["scores"], history, rates, notes)


def save_best(prepared: PreparedRun, fit: Fit, started: float) -> TrainResult:
    """Restore the best epoch, tune its threshold on validation, save the artifact and summary."""
    config, core, data, split = prepared.config, prepared.core, prepared.data, prepared.split
    core.set_weights(fit.best_weights)
    threshold, _ = tune_threshold(prepared.val_targets, fit.best_scores)
    val_metrics = binary_metrics(prepared.val_targets, fit.best_scores, threshold)
    train_rate = float(np.median(fit.rates)) if fit.rates else 0.0
    training_info = {
        "config": config.to_dict(),
        "best_epoch": fit.best_epoch,
        "validation": val_metrics,
        "split": split.counts(),
        "data": {"root": str(data.root), "layout": data.layout},
        "train_slices_per_second": round(train_rate, 2),
        "environment": _environment(),
    }
    artifact = save_model(
        core,
        ModelArtifact(
            model_config=config.model,
            ingest_config=config.ingest,
            threshold=threshold,
            training=training_info,
        ),
        prepared.out,
    )
    cache = prepared.cache
    result = TrainResult(
        model_dir=prepared.out,
        run_dir=prepared.run,
        artifact=artifact,
        best_epoch=fit.best_epoch,
        val_metrics=val_metrics,
        split_counts=split.counts(),
        history=fit.history,
        cache_dir=cache.folder,
        skipped=cache.skipped,
        scan_warnings={s.scan_id: list(s.warnings) for s in cache.scans if s.warnings},
        input_slices_per_second=prepared.feed_rate,
        train_slices_per_second=train_rate,
        seconds=time.perf_counter() - started,
        notes=fit.notes,
    )
    (prepared.run / SUMMARY_FILE).write_text(
        json.dumps(result.summary(), indent=2, default=str) + "\n"
    )
    return result


def train(
    data_dir: Path | str,
    out: Path | str,
    config: TrainConfig | None = None,
    *,
    run_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train on ``data_dir`` and save the best epoch as a model artifact in ``out``.

    The run folder (default ``out/run``) receives settings.json, split.csv, metrics.csv (one row
    per epoch) and summary.json. Weight problems (e.g. no network for ImageNet weights) surface
    before any slice is cached.
    """
    config = config or TrainConfig()
    progress = progress or NullProgress()
    started = time.perf_counter()
    prepared = prepare_run(
        data_dir, Path(out), config, run_dir=run_dir, cache_dir=cache_dir, progress=progress
    )
    return save_best(prepared, fit_stages(prepared, progress), started)
