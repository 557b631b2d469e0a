"""Durable writes: the old file or the new one, never half, and nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctcovid.fsio import write_atomic


def test_write_atomic_creates_folders_and_replaces_the_content(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "result.json"
    write_atomic(target, "{}\n")
    write_atomic(target, b'{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.weights.h5"
    target.write_bytes(b"old")
    seen: list[Path] = []

    def broken(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_bytes() == b"old"
    assert seen[0].name.endswith(".weights.h5")  # writers that check the suffix accept it
    assert [p.name for p in tmp_path.iterdir()] == ["model.weights.h5"]
