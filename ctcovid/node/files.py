"""The node's files: received instances and built SRs on disk, named only by checked UIDs.

Layout under the store folder::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received, as sent
    sr/<SeriesInstanceUID>/<SR SOPInstanceUID>.dcm                          reports built
    cards/<SeriesInstanceUID>/<card SOPInstanceUID>.dcm                     result cards built
    heatmaps/<StudyInstanceUID>/<SeriesInstanceUID>/key<N>.png              for the node's page
    replaced/<StudyInstanceUID>/<SeriesInstanceUID>/<SOP>.<ns>.dcm          superseded content
    tmp/                                                                    half-written files

Every file is written to ``tmp/``, fsynced and renamed into place, so a path under
``instances/``, ``sr/`` or ``cards/`` always holds a complete file. Paths are built only from
UIDs that match ``^[0-9]+(\\.[0-9]+)*$`` and have at most 64 characters, so no received value
can name a file outside the store. A folder created for a new study or series is fsynced in its
parent, so the first instance of a series survives a power loss once it was answered with
success. The files are the ground truth: :meth:`FileStore.instance_files` lists what is on disk
for the job database to reconcile with.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ctcovid.dicom.uids import check_uid, valid_uid
from ctcovid.fsio import fsync_dir, make_dirs_durable

# Suffix of the half-written files in tmp/; any left after a crash are removed on start.
PART_SUFFIX = ".part"
# Heatmaps kept per series (the key slices of a result are fewer).
MAX_HEATMAPS = 16


class OutOfSpaceError(OSError):
    """Writing would take the store's file system below its free-space floor."""


def same_content(a: Path, b: Path) -> bool:
    """True when the files at ``a`` and ``b`` hold the same bytes (False if one is unreadable)."""
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


class FileStore:
    """The folders of a store and atomic, durable writes into them (thread-safe, no state)."""

    def __init__(self, root: Path | str, *, min_free_mb: float = 0.0) -> None:
        self.root = Path(root)
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.instances_dir = self.root / "instances"
        self.sr_dir = self.root / "sr"
        self.cards_dir = self.root / "cards"
        self.heatmaps_dir = self.root / "heatmaps"
        self.replaced_dir = self.root / "replaced"
        self.tmp_dir = self.root / "tmp"
        for folder in (self.root, self.instances_dir, self.sr_dir, self.replaced_dir, self.tmp_dir):
            make_dirs_durable(folder)

    # -- paths ------------------------------------------------------------------------------

    def series_dir(self, study_instance_uid: str, series_instance_uid: str) -> Path:
        study = check_uid(study_instance_uid, "StudyInstanceUID (0020,000D)")
        series = check_uid(series_instance_uid, "SeriesInstanceUID (0020,000E)")
        return self.instances_dir / study / series

    def instance_path(self, study: str, series: str, sop_instance_uid: str) -> Path:
        sop = check_uid(sop_instance_uid, "SOPInstanceUID (0008,0018)")
        return self.series_dir(study, series) / f"{sop}.dcm"

    def sr_path(self, series_instance_uid: str, sr_sop_instance_uid: str) -> Path:
        series = check_uid(series_instance_uid, "SeriesInstanceUID (0020,000E)")
        sop = check_uid(sr_sop_instance_uid, "SR SOPInstanceUID")
        return self.sr_dir / series / f"{sop}.dcm"

    def card_path(self, series_instance_uid: str, sr_path: str | Path) -> Path:
        """The result card of the SR file ``sr_path`` (named by the SR's SOP Instance UID): its
        own UID derives from the SR's (:func:`~ctcovid.report.uids.card_sop_instance_uid`)."""
        from ctcovid.report.uids import card_sop_instance_uid

        series = check_uid(series_instance_uid, "SeriesInstanceUID (0020,000E)")
        sr_uid = check_uid(Path(sr_path).stem, "SR SOPInstanceUID")
        return self.cards_dir / series / f"{card_sop_instance_uid(sr_uid)}.dcm"

    def heatmap_path(self, study: str, series: str, number: int) -> Path:
        """The ``number``-th key slice's heatmap (1 = the most suspicious slice)."""
        if not 1 <= number <= MAX_HEATMAPS:
            raise ValueError(f"heatmap number must be in 1-{MAX_HEATMAPS}. Received: {number}.")
        study = check_uid(study, "StudyInstanceUID (0020,000D)")
        series = check_uid(series, "SeriesInstanceUID (0020,000E)")
        return self.heatmaps_dir / study / series / f"key{number}.png"

    def heatmap_count(self, study: str, series: str) -> int:
        """How many heatmaps of the series are on disk (numbered from 1 without a gap)."""
        count = 0
        while count < MAX_HEATMAPS and self.heatmap_path(study, series, count + 1).is_file():
            count += 1
        return count

    def write_heatmaps(self, study: str, series: str, pngs: list[bytes]) -> None:
        """Store the series' key-slice heatmaps, replacing those of an earlier result."""
        for number, data in enumerate(pngs[:MAX_HEATMAPS], start=1):
            self.write_file(self.heatmap_path(study, series, number), data)
        for number in range(len(pngs) + 1, MAX_HEATMAPS + 1):
            with contextlib.suppress(FileNotFoundError):
                self.remove(self.heatmap_path(study, series, number))

    def relative(self, path: Path) -> str:
        """``path`` as the job database records it: relative to the store folder."""
        return str(path.relative_to(self.root))

    # -- writing ----------------------------------------------------------------------------

    def check_free_space(self, needed_bytes: int = 0) -> None:
        """Raise :class:`OutOfSpaceError` if writing ``needed_bytes`` would cross the floor."""
        if self.min_free_bytes <= 0:
            return
        free = shutil.disk_usage(self.root).free
        if free - needed_bytes < self.min_free_bytes:
            raise OutOfSpaceError(
                f"{self.root}: {free // (1024 * 1024)} MB free, floor is "
                f"{self.min_free_bytes // (1024 * 1024)} MB"
            )

    def write_file(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename)."""
        self.check_free_space(len(data))
        make_dirs_durable(path.parent)
        tmp = self.write_temp(path.name, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(path.parent)

    def write_temp(self, name: str, data: bytes) -> Path:
        """``data`` in a new fsynced file under ``tmp/`` (removed again if writing fails)."""
        tmp = self.tmp_dir / f"{name}.{uuid.uuid4().hex}{PART_SUFFIX}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp

    def move_into_place(self, tmp: Path, path: Path) -> None:
        """Rename the fsynced ``tmp`` to ``path`` and make the rename durable."""
        make_dirs_durable(path.parent)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def remove(self, path: Path) -> None:
        """Delete ``path`` and make the deletion durable."""
        path.unlink()
        fsync_dir(path.parent)

    def keep_aside(self, old: Path, study: str, series: str, sop: str) -> Path:
        """Link the superseded file of ``sop`` under ``replaced/``; its new path there."""
        aside = self.replaced_dir / study / series / f"{sop}.{time.time_ns()}.dcm"
        make_dirs_durable(aside.parent)
        try:
            os.link(old, aside)  # no copy, and the old file stays in place until the rename
        except OSError:
            tmp = self.write_temp(aside.name, old.read_bytes())
            os.replace(tmp, aside)
        fsync_dir(aside.parent)
        return aside

    # -- recovery ---------------------------------------------------------------------------

    def remove_half_written(self) -> None:
        """Delete the temp files a crash left in ``tmp/`` (none of them was ever in place)."""
        for part in self.tmp_dir.glob(f"*{PART_SUFFIX}"):
            with contextlib.suppress(OSError):
                part.unlink()

    def instance_files(self) -> Iterator[tuple[str, str, str, Path]]:
        """``(study, series, sop, path)`` of every instance file on disk named by valid UIDs."""
        for path in sorted(self.instances_dir.glob("*/*/*.dcm")):
            sop, series, study = path.stem, path.parent.name, path.parent.parent.name
            if all(valid_uid(u) for u in (sop, series, study)):
                yield study, series, sop, path
