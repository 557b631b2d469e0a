"""The bounded local cache that retrieved series wait in until they are classified.

Layout: ``ROOT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, every part a
validated UID, and a ``.complete`` marker written (after every file is on disk) when the series
has been retrieved in full. A series is removed from the cache as soon as its results row is
written. On restart, complete series that still need classifying are reused; partial ones are
removed and retrieved again.

Every file (instances and the marker) is written with :func:`ctcovid.fsio.write_atomic` and
every folder created with :func:`ctcovid.fsio.make_dirs_durable`: a series reused after a power
cut because its marker survived must have every instance the marker vouches for.

The bound is enforced on every instance, before its bytes are written: a write that would take
the cache over ``bound_bytes`` raises :class:`CacheFullError` instead. So the cache never holds
more than its bound, whatever the PACS sends.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

from ctcovid.dicom.uids import check_uid
from ctcovid.errors import CtCovidError
from ctcovid.fsio import make_dirs_durable, write_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"

Key = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)


def _instance_files(folder: Path) -> list[Path]:
    """The instances in a series folder; a temporary file left by a crash (``.name``) is none."""
    return [p for p in folder.glob("*.dcm") if p.is_file() and not p.name.startswith(".")]


class CacheFullError(CtCovidError):
    """Writing an instance would take the cache over its bound."""


class SeriesCache:
    """Series on disk, their sizes, and the bound they share (thread-safe)."""

    def __init__(self, root: Path, bound_bytes: int):
        if bound_bytes <= 0:
            raise ValueError(f"bound_bytes must be positive. Received: {bound_bytes}.")
        self.root = Path(root)
        self.bound_bytes = int(bound_bytes)
        make_dirs_durable(self.root)
        self._sizes: dict[Key, int] = {}
        self._complete: set[Key] = set()
        self._lock = threading.Condition()
        self.version = 0  # bumped on every completion or removal, for waiters
        self.used_bytes = 0
        self.peak_bytes = 0
        self.bytes_written = 0

    # -- paths ----------------------------------------------------------------------------------

    def series_dir(self, key: Key) -> Path:
        study, series = key
        return (
            self.root
            / check_uid(study, "StudyInstanceUID")
            / check_uid(series, "SeriesInstanceUID")
        )

    def paths(self, key: Key) -> list[Path]:
        folder = self.series_dir(key)
        return sorted(_instance_files(folder))

    # -- restart --------------------------------------------------------------------------------

    def recover(self, wanted: Iterable[Key]) -> set[Key]:
        """Keep the complete series of ``wanted``, remove everything else; the kept keys."""
        wanted = set(wanted)
        kept: set[Key] = set()
        for study_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
                key = (study_dir.name, series_dir.name)
                if key in wanted and (series_dir / COMPLETE_MARKER).is_file():
                    size = sum(p.stat().st_size for p in _instance_files(series_dir))
                    with self._lock:
                        self._sizes[key] = size
                        self._complete.add(key)
                        self.used_bytes += size
                        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
                    kept.add(key)
                else:
                    shutil.rmtree(series_dir, ignore_errors=True)
            if not any(study_dir.iterdir()):
                study_dir.rmdir()
        if kept:
            logger.info("reusing %d series already retrieved into %s", len(kept), self.root)
        return kept

    # -- writing --------------------------------------------------------------------------------

    def is_complete(self, key: Key) -> bool:
        with self._lock:
            return key in self._complete

    def write(self, key: Key, sop_instance_uid: str, data: bytes | Path) -> Path:
        """Write one instance of series ``key`` (temp file, fsync, rename) within the bound.

        ``data`` is the file's bytes, or a spooled file that is moved into place (copied in
        chunks when it lies on another file system); its size is checked first, so an
        instance over the bound is refused unread.
        """
        name = check_uid(sop_instance_uid, "SOPInstanceUID")
        folder = self.series_dir(key)
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        with self._lock:
            if self.used_bytes + size > self.bound_bytes:
                raise CacheFullError(
                    f"cache {self.root} holds {self.used_bytes} bytes; instance {name} "
                    f"({size} bytes) would exceed its bound of {self.bound_bytes} bytes"
                )
            self.used_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
            self._sizes[key] = self._sizes.get(key, 0) + size
        final = folder / f"{name}.dcm"
        try:
            if isinstance(data, Path):
                spooled = data
                write_atomic(final, lambda tmp: shutil.move(spooled, tmp))
            else:
                write_atomic(final, data)
        except OSError:
            with self._lock:
                self.used_bytes -= size
                self._sizes[key] -= size
            raise
        with self._lock:
            self.bytes_written += size
        return final

    def mark_complete(self, key: Key, n_instances: int) -> None:
        """Record that series ``key`` is in the cache in full: the marker, durable in its folder."""
        marker = self.series_dir(key) / COMPLETE_MARKER
        write_atomic(marker, json.dumps({"instances": n_instances}) + "\n")
        with self._lock:
            self._complete.add(key)
            self._sizes.setdefault(key, 0)
            self.version += 1
            self._lock.notify_all()

    def discard(self, key: Key) -> None:
        """Remove series ``key`` (classified, failed or partial) and give its bytes back."""
        try:
            folder = self.series_dir(key)
        except ValueError:
            return  # an invalid UID never became a path: nothing was written
        # The study folder stays (another retrieval may be creating a series in it); empty
        # study folders are removed by ``recover``.
        shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            self.used_bytes -= self._sizes.pop(key, 0)
            self._complete.discard(key)
            self.version += 1
            self._lock.notify_all()

    def held(self, besides: Key | None = None) -> int:
        """Series in the cache (complete or being written), other than ``besides``."""
        with self._lock:
            return sum(1 for k in self._sizes if k != besides)

    def wait_for_change(self, version: int, timeout: float) -> int:
        """Block until a series completes or leaves the cache (or ``timeout``); the version."""
        with self._lock:
            if self.version == version:
                self._lock.wait(timeout)
            return self.version
