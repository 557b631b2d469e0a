"""A memory-mapped uint8 cache of model-ready slices, so epochs never decode JPG or DICOM again.

One cache entry holds every scan of a data set after preprocessing and the slice policy:
``<cache>/<key>/slices.u8`` (all slices, (N, S, S) uint8, raw) and ``index.json`` (which slices
belong to which scan, labels, warnings, skipped scans). The key hashes the ingest settings that
change the slices and every input file's name, size and modification time, so a second run on
unchanged data with the same settings reuses the entry, and any change builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctcovid.config import IngestConfig
from ctcovid.errors import CtCovidError, InvalidInputError
from ctcovid.training.data import DataSet, ScanItem, load_scan
from ctcovid.training.progress import NullProgress, Progress

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: DICOM scans prepared by ctcovid.scans.prepare_scan
SLICES_FILE = "slices.u8"
INDEX_FILE = "index.json"
# The ingest fields that change the cached slices (min_slices and the axial tolerance only decide
# which DICOM series are usable, which the input file list already reflects).
_KEYED_INGEST = (
    "window_center_hu",
    "window_width_hu",
    "image_size",
    "slice_policy",
    "max_slices",
    "lung_min_fraction",
    "min_slices",
    "axial_tolerance_deg",
)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ctcovid/slices`` (``~/.cache/ctcovid/slices``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctcovid" / "slices"


@dataclass(frozen=True)
class CachedScan:
    """Where one scan's slices are in the cache, and what preprocessing noticed."""

    scan_id: str
    label: str | None
    patient_id: str
    split: str | None
    start: int
    count: int
    n_slices_total: int
    warnings: tuple[str, ...]

    @property
    def stop(self) -> int:
        return self.start + self.count


class SliceCache:
    """A read-only view of one cache entry: ``slices`` is a memory map, not loaded into RAM."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{folder}: unreadable slice cache ({exc})") from exc
        self.index: dict[str, Any] = index
        self.image_size = int(index["image_size"])
        self.scans = [CachedScan(**{**s, "warnings": tuple(s["warnings"])}) for s in index["scans"]]
        self.skipped: list[dict[str, str]] = list(index["skipped"])
        n = int(index["n_slices"])
        shape = (n, self.image_size, self.image_size)
        self.slices: np.ndarray = (
            np.memmap(folder / SLICES_FILE, dtype=np.uint8, mode="r", shape=shape)
            if n
            else np.zeros(shape, np.uint8)
        )
        self._by_id = {s.scan_id: s for s in self.scans}

    def __len__(self) -> int:
        return len(self.scans)

    def __contains__(self, scan_id: object) -> bool:
        return scan_id in self._by_id

    def scan(self, scan_id: str) -> CachedScan:
        return self._by_id[scan_id]

    def scan_slices(self, scan_id: str) -> np.ndarray:
        s = self._by_id[scan_id]
        return np.asarray(self.slices[s.start : s.stop])

    def slice_table(self, scan_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(slice indices into ``slices``, scan number 0..len(scan_ids)-1 of each slice)."""
        indices: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        for n, scan_id in enumerate(scan_ids):
            s = self._by_id[scan_id]
            indices.append(np.arange(s.start, s.stop))
            owners.append(np.full(s.count, n))
        if not indices:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(indices), np.concatenate(owners)

    @property
    def seconds_to_build(self) -> float:
        return float(self.index.get("seconds", 0.0))


def cache_key(items: list[ScanItem], ingest: IngestConfig) -> str:
    """A hash of the settings that shape the slices and of every input file's identity."""
    digest = hashlib.sha256(f"ctcovid-slice-cache-{CACHE_FORMAT}".encode())
    settings = {k: ingest.to_dict()[k] for k in _KEYED_INGEST}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for item in sorted(items, key=lambda i: i.scan_id):
        digest.update(item.fingerprint().encode())
    return digest.hexdigest()[:20]


def build_cache(
    data: DataSet,
    ingest: IngestConfig,
    cache_dir: Path | None = None,
    *,
    progress: Progress | None = None,
) -> SliceCache:
    """The cache entry for ``data`` under ``ingest``: reused if present, else built (with progress).

    A scan that cannot be decoded, or that inference would refuse (see
    :func:`ctcovid.training.data.load_scan`), is skipped and listed with its reason.
    """
    progress = progress or NullProgress()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(data.items, ingest)
    folder = cache_dir / key
    if (folder / INDEX_FILE).is_file():
        logger.info("reusing slice cache %s", folder)
        progress.message(f"reusing slice cache {folder}")
        return SliceCache(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start_time = time.perf_counter()
    scans: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    offset = 0
    progress.start("caching slices", total=len(data.items), unit="scans")
    try:
        with open(tmp / SLICES_FILE, "wb") as fh:
            for item in data.items:
                try:
                    loaded = load_scan(item, ingest)
                except CtCovidError as exc:
                    skipped.append({"scan": item.scan_id, "reason": str(exc)})
                    progress.advance(1)
                    continue
                fh.write(np.ascontiguousarray(loaded.slices, np.uint8).tobytes())
                scans.append(
                    {
                        "scan_id": item.scan_id,
                        "label": item.label,
                        "patient_id": item.patient_id,
                        "split": item.split,
                        "start": offset,
                        "count": len(loaded.slices),
                        "n_slices_total": loaded.n_slices_total,
                        "warnings": loaded.warnings,
                    }
                )
                offset += len(loaded.slices)
                progress.advance(1)
            fh.flush()
            os.fsync(fh.fileno())
        index = {
            "format": CACHE_FORMAT,
            "key": key,
            "root": str(data.root),
            "layout": data.layout,
            "ingest": ingest.to_dict(),
            "image_size": ingest.image_size,
            "n_slices": offset,
            "scans": scans,
            "skipped": skipped,
            "seconds": round(time.perf_counter() - start_time, 3),
        }
        # The index is written last: an entry without one is incomplete and never read.
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same entry first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        progress.finish()
    cache = SliceCache(folder)
    logger.info(
        "cached %d slices of %d scans in %s (%.1f s, %d skipped)",
        offset,
        len(scans),
        folder,
        index["seconds"],
        len(skipped),
    )
    return cache
