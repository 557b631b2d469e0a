"""Scan-level metrics (scikit-learn) and the decision threshold that maximises macro F1.

A scan's score is the mean of its slice probabilities, the same rule inference applies; the
paper's Table 2 reports F1 per class and their mean (macro F1) at scan level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

logger = logging.getLogger(__name__)

CONFUSION_CLASSES = ["non-covid", "covid"]  # rows: true class, columns: predicted class


def scan_scores(
    slice_probabilities: np.ndarray, scan_index: np.ndarray, n_scans: int
) -> np.ndarray:
    """Mean slice probability per scan; ``scan_index[i]`` is the scan of slice ``i``."""
    probs = np.asarray(slice_probabilities, np.float64)
    index = np.asarray(scan_index, np.int64)
    sums = np.bincount(index, weights=probs, minlength=n_scans)
    counts = np.bincount(index, minlength=n_scans)
    if np.any(counts == 0):
        raise ValueError(f"scans without slices: {np.flatnonzero(counts == 0).tolist()}")
    return sums / counts


def binary_metrics(
    targets: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, Any]:
    """F1 of each class, macro F1, confusion matrix and ROC AUC of scan scores.

    ``targets`` are 1 for covid, 0 for non-covid; a scan is predicted covid when its score is at
    least ``threshold``. ROC AUC is ``None`` when only one class is present.
    """
    y = np.asarray(targets, np.int64)
    s = np.asarray(scores, np.float64)
    pred = (s >= threshold).astype(np.int64)
    f1 = f1_score(y, pred, labels=[0, 1], average=None, zero_division=0.0)
    auc = float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else None
    return {
        "f1_covid": float(f1[1]),
        "f1_non_covid": float(f1[0]),
        "macro_f1": float(f1_score(y, pred, labels=[0, 1], average="macro", zero_division=0.0)),
        "confusion": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "confusion_classes": CONFUSION_CLASSES,
        "roc_auc": auc,
        "n_scans": len(y),
        "n_covid": int(y.sum()),
        "n_non_covid": int(len(y) - y.sum()),
        "threshold": float(threshold),
    }


def macro_f1(targets: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    pred = (np.asarray(scores) >= threshold).astype(np.int64)
    return float(f1_score(targets, pred, labels=[0, 1], average="macro", zero_division=0.0))


def tune_threshold(
    targets: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    default: float = 0.5,
) -> tuple[float, float]:
    """The threshold with the best macro F1 on ``(targets, scores)``, and that macro F1.

    Candidates are the midpoints between consecutive distinct scores (plus one below the lowest
    and one above the highest), so the chosen threshold sits in the middle of the best gap rather
    than on a validation score. Ties go to the candidate closest to ``default``.
    """
    y = np.asarray(targets, np.int64)
    s = np.asarray(scores, np.float64)
    if len(s) == 0:
        return default, 0.0
    distinct = np.unique(s)
    candidates = np.concatenate(
        [
            [max(0.0, distinct[0] - 1e-6)],
            (distinct[:-1] + distinct[1:]) / 2.0,
            [min(1.0, distinct[-1] + 1e-6)],
        ]
    )
    results = [(macro_f1(y, s, t), -abs(t - default), t) for t in candidates]
    best_f1, _, best_t = max(results)
    return float(best_t), float(best_f1)
