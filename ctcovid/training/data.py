"""Labelled (or unlabelled) scans on disk: the COV19-CT-DB JPG layout and labelled DICOM.

:func:`discover` lists the scans of a data folder without decoding anything; :func:`load_scan`
turns one of them into the uint8 slices the model sees, with the same preprocessing and slice
policy as :class:`ctcovid.inference.Classifier` applies at inference.

Layouts:

- ``cov19-ct-db``: ``ROOT/{train,val}/{covid,non-covid}/<scan>/<n>.jpg`` (or
  ``ROOT/{covid,non-covid}/<scan>/...`` without a split, or ``ROOT/<scan>/...`` unlabelled, as the
  challenge's test folder); slices sorted by their number; the JPGs are already lung-windowed.
- ``dicom``: ``ROOT/{covid,non-covid}/...`` with DICOM series anywhere below (every usable CT
  series is one scan), or ``ROOT/labels.csv`` with columns ``path,label`` (paths relative to ROOT).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ctcovid.config import IngestConfig
from ctcovid.errors import InvalidInputError
from ctcovid.preprocess import resize_uint8
from ctcovid.scans import PreparedScan, model_slices, prepare_scan

logger = logging.getLogger(__name__)

POSITIVE = "covid"
NEGATIVE = "non-covid"
CLASSES = (NEGATIVE, POSITIVE)  # index = target value: 0 non-covid, 1 covid
LAYOUTS = ("auto", "cov19-ct-db", "dicom")
SPLITS = ("train", "val", "test")
LABELS_CSV = "labels.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FEW_SLICES = 3  # scans with fewer slices than this are reported (they occur in COV19-CT-DB)

# Spellings of the two classes accepted in folder names and labels.csv.
_LABEL_ALIASES = {
    "covid": POSITIVE,
    "covid-19": POSITIVE,
    "covid19": POSITIVE,
    "positive": POSITIVE,
    "1": POSITIVE,
    "non-covid": NEGATIVE,
    "non_covid": NEGATIVE,
    "noncovid": NEGATIVE,
    "non-covid-19": NEGATIVE,
    "negative": NEGATIVE,
    "0": NEGATIVE,
}


def normalise_label(text: str, where: str) -> str:
    """``"COVID"``, ``"non_covid"``, ``"1"`` ... -> ``"covid"`` | ``"non-covid"``."""
    label = _LABEL_ALIASES.get(text.strip().lower())
    if label is None:
        raise InvalidInputError(
            f"{where}: unknown label {text!r}; use {POSITIVE!r} or {NEGATIVE!r}"
        )
    return label


@dataclass
class ScanItem:
    """One scan of a data set: where it is, its label, and what groups it for the split.

    ``scan_id`` is unique within the data set (the path relative to the data root; for DICOM,
    plus ``#SeriesInstanceUID`` when a folder holds several series). ``files`` are the inputs
    whose names, sizes and modification times key the slice cache.
    """

    scan_id: str
    label: str | None  # "covid" | "non-covid" | None (unlabelled)
    kind: str  # "jpg" | "dicom"
    source: Path
    files: list[Path]
    patient_id: str = ""
    split: str | None = None  # "train" | "val" | "test" from the layout, else None
    series_instance_uid: str = ""

    @property
    def target(self) -> int:
        """1 for covid, 0 for non-covid."""
        if self.label is None:
            raise InvalidInputError(f"scan {self.scan_id} has no label")
        return CLASSES.index(self.label)

    @property
    def group(self) -> str:
        """What must stay on one side of a split: the patient when known, else the scan."""
        return f"patient:{self.patient_id}" if self.patient_id else f"scan:{self.scan_id}"

    @property
    def name(self) -> str:
        """The scan's own name (its folder), as the COV19-CT-DB challenge files list it."""
        return Path(self.scan_id.split("#", 1)[0]).name

    def fingerprint(self) -> str:
        """Changes when any input file is added, removed, replaced or touched."""
        digest = hashlib.sha256(f"{self.kind}|{self.scan_id}|{self.label}".encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


@dataclass
class DataSet:
    """The scans found under a data folder, and what was skipped there (with reasons)."""

    root: Path
    layout: str
    items: list[ScanItem]
    skipped: list[str] = field(default_factory=list)

    @property
    def has_splits(self) -> bool:
        return any(item.split is not None for item in self.items)

    def select(self, split: str | None) -> DataSet:
        """Only the scans of one split of the layout (``None``: all)."""
        if split is None:
            return self
        items = [i for i in self.items if i.split == split]
        return DataSet(self.root, self.layout, items, list(self.skipped))

    def counts(self) -> dict[str, int]:
        """Scans per label (``unlabelled`` for scans without one)."""
        out: dict[str, int] = {}
        for item in self.items:
            key = item.label or "unlabelled"
            out[key] = out.get(key, 0) + 1
        return out


# -- discovery ----------------------------------------------------------------------------------


def detect_layout(root: Path) -> str:
    """``cov19-ct-db`` when image files (JPG/PNG) lie below ``root``, else ``dicom``."""
    if (root / LABELS_CSV).is_file():
        return "dicom"
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            return "cov19-ct-db"
    return "dicom"


def discover(
    root: Path | str,
    layout: str = "auto",
    *,
    ingest: IngestConfig | None = None,
    labelled: bool = True,
) -> DataSet:
    """List the scans under ``root`` without decoding pixels.

    ``labelled=False`` accepts scans without a class folder (e.g. the challenge test set).
    Raises :class:`InvalidInputError` when nothing usable is found, naming what was expected.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"{root}: no such data folder")
    if layout not in LAYOUTS:
        raise InvalidInputError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "cov19-ct-db":
        data = _discover_cov19(root, labelled)
    else:
        data = _discover_dicom(root, ingest or IngestConfig(), labelled)
    if not data.items:
        expected = (
            "ROOT/{train,val}/{covid,non-covid}/<scan>/<n>.jpg"
            if layout == "cov19-ct-db"
            else f"ROOT/{{covid,non-covid}}/<DICOM series> or ROOT/{LABELS_CSV} (path,label)"
        )
        why = f"; skipped: {data.skipped[0]}" if data.skipped else ""
        raise InvalidInputError(f"{root}: no scans found in the {layout} layout {expected}{why}")
    labels = {i.label for i in data.items}
    if labelled and None in labels:
        raise InvalidInputError(f"{root}: some scans have no class folder ({POSITIVE}/{NEGATIVE})")
    logger.info("%s: %d scans (%s layout) %s", root, len(data.items), layout, data.counts())
    return data


def _numeric_key(path: Path) -> tuple[int, float, str]:
    """Sort ``2.jpg`` before ``10.jpg``; names without a number go last, alphabetically."""
    match = re.search(r"(\d+(?:\.\d+)?)(?!.*\d)", path.stem)
    return (0, float(match.group(1)), path.name) if match else (1, 0.0, path.name)


def image_files(scan_dir: Path) -> list[Path]:
    """The slice images of one COV19-CT-DB scan folder, in slice-number order."""
    files = [p for p in scan_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_numeric_key)


def _scan_dirs(folder: Path) -> Iterable[Path]:
    """Folders below ``folder`` that directly hold slice images, in a stable order."""
    for path in sorted(p for p in folder.rglob("*") if p.is_dir()):
        if any(c.suffix.lower() in IMAGE_SUFFIXES for c in path.iterdir() if c.is_file()):
            yield path
    if any(c.suffix.lower() in IMAGE_SUFFIXES for c in folder.iterdir() if c.is_file()):
        yield folder


def _label_of_folder(name: str) -> str | None:
    return _LABEL_ALIASES.get(name.lower()) if not name.isdigit() else None


def _discover_cov19(root: Path, labelled: bool) -> DataSet:
    items: list[ScanItem] = []
    skipped: list[str] = []
    for scan_dir in _scan_dirs(root):
        rel = scan_dir.relative_to(root)
        parts = [p.lower() for p in rel.parts]
        split = next((p for p in parts[:-1] if p in SPLITS), None)
        label = next(
            (lab for p in rel.parts[:-1] if (lab := _label_of_folder(p)) is not None), None
        )
        if label is None and labelled:
            skipped.append(f"{rel}: not inside a {POSITIVE}/{NEGATIVE} folder")
            continue
        items.append(
            ScanItem(
                scan_id=rel.as_posix() if rel.parts else scan_dir.name,
                label=label,
                kind="jpg",
                source=scan_dir,
                files=image_files(scan_dir),
                split=split,
            )
        )
    return DataSet(root, "cov19-ct-db", items, skipped)


def _discover_dicom(root: Path, ingest: IngestConfig, labelled: bool) -> DataSet:
    from ctcovid.dicom import scan

    sources: list[tuple[Path, str | None]] = []
    csv_path = root / LABELS_CSV
    if csv_path.is_file():
        sources = _read_labels_csv(csv_path)
    else:
        class_dirs = [
            (p, lab)
            for p in sorted(root.iterdir())
            if p.is_dir() and (lab := _label_of_folder(p.name)) is not None
        ]
        if class_dirs:
            sources = [(p, lab) for p, lab in class_dirs]
        elif not labelled:
            sources = [(root, None)]
    items: list[ScanItem] = []
    skipped: list[str] = []
    for source, label in sources:
        report = scan(source, ingest)
        skipped += [f"{bad.path}: {bad.reason}" for bad in report.bad_files]
        for series in report.series:
            if not series.usable:
                skipped.append(
                    f"series {series.series_instance_uid} ({series.modality}) under {source}: "
                    f"{series.reason}"
                )
                continue
            files = sorted({inst.path for inst in series.instances})
            folder = Path(_common_parent(files))
            rel = folder.relative_to(root) if folder.is_relative_to(root) else folder
            items.append(
                ScanItem(
                    scan_id=rel.as_posix(),
                    label=label,
                    kind="dicom",
                    source=folder,
                    files=files,
                    patient_id=series.patient_id,
                    series_instance_uid=series.series_instance_uid,
                )
            )
    # Two series in one folder would share an id: disambiguate by SeriesInstanceUID.
    seen: dict[str, int] = {}
    for item in items:
        seen[item.scan_id] = seen.get(item.scan_id, 0) + 1
    for item in items:
        if seen[item.scan_id] > 1:
            item.scan_id = f"{item.scan_id}#{item.series_instance_uid}"
    return DataSet(root, "dicom", items, skipped)


def _common_parent(files: list[Path]) -> str:
    import os

    return os.path.commonpath([str(p.parent) for p in files])


def _read_labels_csv(path: Path) -> list[tuple[Path, str | None]]:
    """``path,label`` rows -> (absolute path, label); a header row is required."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: unreadable ({exc})") from exc
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise InvalidInputError(f"{path}: expected a header 'path,label' and one row per series")
    out: list[tuple[Path, str | None]] = []
    for n, row in enumerate(rows, start=2):
        target = (path.parent / row["path"].strip()).resolve()
        if not target.exists():
            raise InvalidInputError(f"{path}, line {n}: {row['path']!r} does not exist")
        out.append((target, normalise_label(row["label"], f"{path}, line {n}")))
    return out


# -- decoding one scan into model slices ----------------------------------------------------------


@dataclass
class LoadedScan:
    """The slices of one scan after preprocessing and the slice policy, with what was noticed."""

    slices: np.ndarray  # (N, S, S) uint8
    n_slices_total: int
    warnings: list[str]


def load_scan(item: ScanItem, ingest: IngestConfig) -> LoadedScan:
    """Decode one scan into model input, exactly as inference would.

    Both kinds go through :func:`ctcovid.scans.model_slices` (the slice policy). A DICOM series
    goes through :func:`ctcovid.scans.prepare_scan`, so the slice minimum is the one inference
    applies and a series that inference would refuse raises ``InvalidInputError`` here too. A
    COV19-CT-DB scan has no minimum: the data set defines its scans, some of one or two slices.
    """
    if item.kind == "dicom":
        prepared = _prepare_dicom(item, ingest)
        return LoadedScan(prepared.used.slices, len(prepared.all_slices), prepared.warnings)
    slices, warnings = load_jpg_slices(item, ingest.image_size)
    indices, policy_warnings = model_slices(slices, ingest, name=f"scan {item.scan_id}")
    return LoadedScan(slices[indices], len(slices), warnings + policy_warnings)


def load_jpg_slices(item: ScanItem, size: int) -> tuple[np.ndarray, list[str]]:
    """The JPG slices of a COV19-CT-DB scan, resized; duplicates dropped, oddities reported.

    Real COV19-CT-DB scans mix slice sizes, repeat identical slices and sometimes hold one or two
    slices only: each is handled here and named in the returned warnings.
    """
    warnings: list[str] = []
    slices: list[np.ndarray] = []
    shapes: set[tuple[int, ...]] = set()
    seen: dict[bytes, str] = {}
    duplicates: list[str] = []
    unreadable: list[str] = []
    for path in item.files:
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("L"))
        except (OSError, ValueError) as exc:
            unreadable.append(f"{path.name} ({exc})")
            continue
        key = hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).digest()
        if key in seen:
            # Identical slices add nothing but weight in the scan mean; keep the first copy.
            duplicates.append(f"{path.name}={seen[key]}")
            continue
        seen[key] = path.name
        shapes.add(pixels.shape)
        slices.append(resize_uint8(pixels, size))
    if unreadable:
        warnings.append(f"{len(unreadable)} unreadable image(s) skipped: {', '.join(unreadable)}")
    if duplicates:
        warnings.append(
            f"{len(duplicates)} duplicate slice(s) dropped: {', '.join(duplicates[:5])}"
            + (" ..." if len(duplicates) > 5 else "")
        )
    if len(shapes) > 1:
        sizes = ", ".join(f"{s[1]}x{s[0]}" for s in sorted(shapes))
        warnings.append(f"mixed slice sizes ({sizes}); each resized to {size}x{size}")
    if not slices:
        raise InvalidInputError(f"scan {item.scan_id}: no readable slice image in {item.source}")
    if len(slices) < FEW_SLICES:
        warnings.append(f"only {len(slices)} slice(s)")
    return np.stack(slices), warnings


def _prepare_dicom(item: ScanItem, ingest: IngestConfig) -> PreparedScan:
    from ctcovid.dicom import load_series

    series = load_series(item.source, ingest, series_instance_uid=item.series_instance_uid)
    return prepare_scan(series, ingest)
