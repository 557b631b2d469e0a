"""Evaluate a model artifact on labelled scans, or predict unlabelled ones (challenge files).

Scans go through the model's own ingest settings and the slice cache, then the inference code
path (:class:`ctcovid.inference.Classifier`); a scan's score is its mean slice probability and its
label applies the artifact's threshold. Metrics come from scikit-learn (:mod:`.metrics`).
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctcovid.errors import InvalidInputError
from ctcovid.training.cache import build_cache
from ctcovid.training.data import CLASSES, NEGATIVE, POSITIVE, SPLITS, DataSet, discover
from ctcovid.training.metrics import binary_metrics
from ctcovid.training.progress import NullProgress, Progress

logger = logging.getLogger(__name__)

PREDICTIONS_HEADER = ["scan", "label", "probability_covid", "predicted"]
EVAL_SPLITS = ("auto", "all", *SPLITS)


@dataclass
class Prediction:
    """One scan's score and verdict (``label`` is the true class, empty when unknown)."""

    scan: str
    name: str
    label: str | None
    probability_covid: float
    predicted: str
    n_slices: int


@dataclass
class Evaluation:
    """Predictions for every scan evaluated, and the metrics when labels are known."""

    data_root: Path
    layout: str
    split: str
    model: dict[str, Any]
    threshold: float
    predictions: list[Prediction]
    metrics: dict[str, Any] | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    scan_warnings: dict[str, list[str]] = field(default_factory=dict)
    slices_per_second: float = 0.0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "data": str(self.data_root),
            "layout": self.layout,
            "split": self.split,
            "model": self.model,
            "threshold": self.threshold,
            "n_scans": len(self.predictions),
        }
        if self.metrics is not None:
            out |= self.metrics
        else:
            out["n_predicted_covid"] = sum(p.predicted == POSITIVE for p in self.predictions)
            out["n_predicted_non_covid"] = sum(p.predicted == NEGATIVE for p in self.predictions)
        out |= {
            "skipped": self.skipped,
            "scan_warnings": self.scan_warnings,
            "slices_per_second": round(self.slices_per_second, 2),
            "seconds": round(self.seconds, 1),
        }
        return out

    def write_predictions(self, path: Path) -> None:
        """``scan,label,probability_covid,predicted``, one row per scan."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(PREDICTIONS_HEADER)
            for p in self.predictions:
                writer.writerow([p.scan, p.label or "", f"{p.probability_covid:.6f}", p.predicted])

    def write_challenge_files(self, out_dir: Path) -> dict[str, Path]:
        """The COV19-CT-DB challenge files ``covid.csv`` and ``non-covid.csv``: one scan a line."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for cls in (POSITIVE, NEGATIVE):
            names = sorted(
                (p.name for p in self.predictions if p.predicted == cls), key=_natural_key
            )
            path = out_dir / f"{cls}.csv"
            path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
            paths[cls] = path
        return paths


def _natural_key(text: str) -> tuple[Any, ...]:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def choose_split(data: DataSet, split: str, *, labelled: bool) -> str:
    """``auto``: the layout's ``val`` folder for evaluation (``test`` for prediction) if present,
    else every scan; ``all``: every scan; otherwise that split, which must exist."""
    if split not in EVAL_SPLITS:
        raise InvalidInputError(f"unknown split {split!r}; choose from {', '.join(EVAL_SPLITS)}")
    present = {i.split for i in data.items}
    if split == "auto":
        wanted = "val" if labelled else "test"
        return wanted if wanted in present else "all"
    if split != "all" and split not in present:
        found = ", ".join(sorted(s for s in present if s)) or "none"
        raise InvalidInputError(f"{data.root}: no {split!r} folder (splits found: {found})")
    return split


def evaluate(
    data_dir: Path | str,
    model_path: Path | str | None = None,
    *,
    layout: str = "auto",
    split: str = "auto",
    predict_only: bool = False,
    cache_dir: Path | str | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    classifier: Any = None,
) -> Evaluation:
    """Score every scan of ``data_dir`` with the model; metrics unless ``predict_only``."""
    from ctcovid.inference import Classifier
    from ctcovid.training.train import predict_scans

    progress = progress or NullProgress()
    started = time.perf_counter()
    if classifier is None:
        classifier = Classifier.from_file(model_path, batch_size=batch_size)
    ingest = classifier.ingest_config
    data = discover(data_dir, layout, ingest=ingest, labelled=not predict_only)
    chosen = choose_split(data, split, labelled=not predict_only)
    data = data.select(None if chosen == "all" else chosen)
    cache = build_cache(data, ingest, Path(cache_dir) if cache_dir else None, progress=progress)
    items = [i for i in data.items if i.scan_id in cache]
    if not items:
        raise InvalidInputError(
            f"{data.root}: none of {len(data.items)} scan(s) could be used"
            + (
                f" (e.g. {cache.skipped[0]['scan']}: {cache.skipped[0]['reason']})"
                if cache.skipped
                else ""
            )
        )
    predict_start = time.perf_counter()
    scores = predict_scans(
        classifier, cache, [i.scan_id for i in items], progress, description="evaluating"
    )
    predict_seconds = time.perf_counter() - predict_start
    n_slices = sum(cache.scan(i.scan_id).count for i in items)
    threshold = float(classifier.threshold)
    artifact = classifier.artifact
    predictions = [
        Prediction(
            scan=i.scan_id,
            name=i.name,
            label=i.label,
            probability_covid=float(s),
            predicted=artifact.positive_class if s >= threshold else artifact.negative_class,
            n_slices=cache.scan(i.scan_id).count,
        )
        for i, s in zip(items, scores, strict=True)
    ]
    metrics = None
    if not predict_only:
        targets = np.array([CLASSES.index(i.label) for i in items])  # type: ignore[arg-type]
        metrics = binary_metrics(targets, scores, threshold)
    return Evaluation(
        data_root=data.root,
        layout=data.layout,
        split=chosen,
        model={**artifact.info.to_dict(), "path": str(model_path) if model_path else ""},
        threshold=threshold,
        predictions=predictions,
        metrics=metrics,
        skipped=cache.skipped,
        scan_warnings={s.scan_id: list(s.warnings) for s in cache.scans if s.warnings},
        slices_per_second=n_slices / predict_seconds if predict_seconds > 0 else 0.0,
        seconds=time.perf_counter() - started,
    )
