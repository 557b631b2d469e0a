"""Writing files so that a crash or a power cut leaves the old file or the new one, never half.

One helper for every durable write of ctcovid (the node's store, batch results and SRs, model
artifacts): write to a temporary file in the same folder (or a given one on the same file
system), fsync it, rename it over the target, then fsync the folder, since POSIX makes a rename
durable only when the directory itself is synced.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """Make a rename or a new entry in folder ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync folders: the rename itself is atomic
        pass
    finally:
        os.close(fd)


def make_dirs_durable(path: Path | str) -> None:
    """Create ``path`` and its missing parents, each new folder fsynced in its parent.

    A file fsynced and renamed into a folder that was itself never made durable can vanish with
    that folder after a power loss, although its write was answered with success.
    """
    missing: list[Path] = []
    current = Path(path)
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        # Made by another thread meanwhile: fsync the parent anyway, that thread may not have yet.
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        fsync_dir(folder.parent)


def write_atomic(
    path: Path | str,
    data: bytes | str | Callable[[Path], object],
    *,
    tmp_dir: Path | str | None = None,
) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns ``path``.

    Parameters
    ----------
    path
        The file to create or replace. Its folder is created (durably) if missing.
    data
        Bytes, text (UTF-8), or a function that writes the content to the temporary path it is
        given (for writers that want a file name, such as Keras' ``save_weights``).
    tmp_dir
        Where the temporary file goes (same file system as ``path``); default: ``path``'s folder.
    """
    path = Path(path)
    make_dirs_durable(path.parent)
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    # The suffix keeps writers that look at it (".weights.h5", ".dcm") content.
    tmp = folder / f".{path.stem}.{uuid.uuid4().hex}.tmp{''.join(path.suffixes)}"
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path
