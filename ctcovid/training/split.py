"""Train/validation split by scan, never by slice; by patient where the data says who it is.

The published reference code split COV19-CT-DB at slice level, so slices of one scan sat on both
sides and validation measured memory. Here a whole group (a patient, or a scan when the patient is
unknown) goes to one side, classes are stratified, and the same seed gives the same split.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctcovid.errors import InvalidInputError
from ctcovid.training.data import CLASSES, ScanItem

logger = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.25


@dataclass(frozen=True)
class Split:
    """Which scans train and which validate, and how the split was made."""

    train: list[ScanItem]
    val: list[ScanItem]
    method: str  # "layout" (the data's own train/val folders) | "patient" | "scan"
    seed: int
    val_fraction: float

    def counts(self) -> dict[str, object]:
        """Scans per side and class, and the number of groups (patients) per side."""
        out: dict[str, object] = {"method": self.method, "seed": self.seed}
        for side, items in (("train", self.train), ("val", self.val)):
            labels = Counter(i.label for i in items)
            out[side] = {
                "scans": len(items),
                **{c: labels.get(c, 0) for c in CLASSES},
                "groups": len({i.group for i in items}),
            }
        return out

    def describe(self) -> str:
        c = self.counts()
        parts = []
        for side in ("train", "val"):
            s = c[side]
            assert isinstance(s, dict)
            parts.append(
                f"{side} {s['scans']} scans ({s['covid']} covid, {s['non-covid']} non-covid, "
                f"{s['groups']} {'patients' if self.method == 'patient' else 'groups'})"
            )
        return f"split by {self.method}: " + "; ".join(parts)

    def write_csv(self, path: Path) -> None:
        """``scan,label,patient_id,split`` for every scan (the run folder's split.csv)."""
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["scan", "label", "patient_id", "split"])
            for side, items in (("train", self.train), ("val", self.val)):
                for item in items:
                    writer.writerow([item.scan_id, item.label, item.patient_id, side])


def split_scans(
    items: Sequence[ScanItem],
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    use_layout: bool = True,
) -> Split:
    """Split labelled scans into train and validation.

    When the layout already has ``train`` and ``val`` folders (COV19-CT-DB) and ``use_layout`` is
    true, that split is kept. Otherwise groups (patients when any scan has a PatientID, else
    scans) are shuffled with ``seed`` and, class by class, ``val_fraction`` of them (at least one
    when the class has two or more) go to validation. A group is labelled by its majority class.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction must be in (0, 1). Received: {val_fraction}.")
    items = list(items)
    if any(i.label is None for i in items):
        raise InvalidInputError("cannot split unlabelled scans")
    splits = {i.split for i in items}
    if use_layout and "train" in splits and "val" in splits:
        train = [i for i in items if i.split == "train"]
        val = [i for i in items if i.split == "val"]
        _check_disjoint(train, val)
        return Split(train, val, "layout", seed, val_fraction)

    groups: dict[str, list[ScanItem]] = {}
    for item in sorted(items, key=lambda i: i.scan_id):
        groups.setdefault(item.group, []).append(item)
    method = "patient" if any(i.patient_id for i in items) else "scan"

    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for cls in CLASSES:
        names = sorted(
            g
            for g, members in groups.items()
            if Counter(m.label for m in members).most_common(1)[0][0] == cls
        )
        if len(names) < 2:
            continue  # one group cannot be on both sides; it trains
        n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
        order = rng.permutation(len(names))
        val_groups.update(names[i] for i in order[:n_val])
    train = [i for g, members in groups.items() if g not in val_groups for i in members]
    val = [i for g, members in groups.items() if g in val_groups for i in members]
    if not val:
        raise InvalidInputError(
            f"too few scans to split ({len(items)} scans in {len(groups)} groups); "
            "add scans or provide a validation folder"
        )
    _check_disjoint(train, val)
    split = Split(train, val, method, seed, val_fraction)
    logger.info("%s", split.describe())
    return split


def _check_disjoint(train: Sequence[ScanItem], val: Sequence[ScanItem]) -> None:
    """No scan, and no patient, on both sides: the whole point of splitting by scan."""
    both = {i.scan_id for i in train} & {i.scan_id for i in val}
    if both:
        raise InvalidInputError(f"scans in both train and val: {', '.join(sorted(both)[:5])}")
    patients = {i.patient_id for i in train if i.patient_id} & {
        i.patient_id for i in val if i.patient_id
    }
    if patients:
        logger.warning(
            "patients with scans in both train and val (from the data's own split): %s",
            ", ".join(sorted(patients)[:5]),
        )
