"""The PACS cache: retrieved series on disk, durable before they are trusted after a restart."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ctcovid.net.cache import COMPLETE_MARKER, SeriesCache

STUDY, SERIES = "1.2.3", "1.2.3.4"


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path fsynced from now on, in order (read back from the descriptor, Linux only)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a descriptor's file")
    synced: list[Path] = []
    real_fsync: Callable[[int], None] = os.fsync

    def recording(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_complete_marker_is_fsynced_and_then_its_folder(tmp_path: Path, fsynced: list[Path]):
    cache = SeriesCache(tmp_path / "cache", bound_bytes=1 << 20)
    cache.write((STUDY, SERIES), "1.2.3.4.5", b"instance")
    folder = cache.series_dir((STUDY, SERIES))
    fsynced.clear()

    cache.mark_complete((STUDY, SERIES), 1)

    # The marker's bytes (in its temporary name), then the folder that holds its new name.
    assert [p.parent for p in fsynced] == [folder, folder.parent]
    assert COMPLETE_MARKER in fsynced[0].name
    assert fsynced[1] == folder
    assert (folder / COMPLETE_MARKER).read_text() == '{"instances": 1}\n'


def test_folders_created_for_a_new_series_are_fsynced_in_their_parents(
    tmp_path: Path, fsynced: list[Path]
):
    cache = SeriesCache(tmp_path / "cache", bound_bytes=1 << 20)
    root = cache.root
    fsynced.clear()

    written = cache.write((STUDY, SERIES), "1.2.3.4.5", b"instance")

    study_dir, series_dir = root / STUDY, root / STUDY / SERIES
    # New study folder in the root, new series folder in the study, the instance in the series.
    assert root in fsynced and study_dir in fsynced
    assert fsynced.index(root) < fsynced.index(study_dir) < fsynced.index(series_dir)
    assert fsynced[-1] == series_dir
    assert written.read_bytes() == b"instance"
    assert cache.paths((STUDY, SERIES)) == [written]
