"""The one logging set-up of every ctcovid process: the CLI's commands and the node's worker.

The library itself only logs to ``logging.getLogger(__name__)``; whoever runs a process calls
:func:`configure_logging` once, before Keras (and TensorFlow) is imported, so that TensorFlow's
C++ start-up lines (CPU features, oneDNN notes, absl's pre-init warning) stay off stderr unless
asked for with ``-v -v``.

``TF_CPP_MIN_LOG_LEVEL`` alone is not enough: on CPUs where oneDNN's custom operations are on
(AVX-512 VNNI, AMX) TensorFlow writes absl's "All log messages before absl::InitializeLog()"
warning and the oneDNN note straight to file descriptor 2 while it is imported, whatever the
level. So :func:`quiet_native_imports` runs that one import with descriptor 2 pointed at a
temporary file, and shows what was written there only if the import fails.

The node's processes also call :func:`quiet_libraries`, which keeps pynetdicom and highdicom at
WARNING and reduces library records to the tags they name.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Packages whose import writes to file descriptor 2 from C++ (absl, oneDNN).
NOISY_NATIVE_PACKAGES = ("tensorflow",)


def tensorflow_log_level(verbose: int) -> str:
    """``TF_CPP_MIN_LOG_LEVEL`` for a verbosity: 3 (nothing) by default, 2 (errors) with ``-v``,
    TensorFlow's own default from ``-v -v`` on."""
    return {0: "3", 1: "2"}.get(verbose, "0")


def configure_logging(
    verbose: int = 0, *, quiet: bool = False, level: int | None = None, fmt: str = LOG_FORMAT
) -> None:
    """Log to stderr at WARNING (``-v`` INFO, ``-v -v`` DEBUG; ``quiet``: errors only), or at
    ``level`` when given (a process started with its parent's level, such as the node worker).

    An explicit ``TF_CPP_MIN_LOG_LEVEL`` in the environment is left as the user set it.
    """
    if level is None:
        level = logging.ERROR if quiet else max(logging.WARNING - 10 * verbose, logging.DEBUG)
    else:
        verbose = max(0, (logging.WARNING - level) // 10)
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    quiet_tensorflow(verbose)


def quiet_tensorflow(verbose: int = 0) -> None:
    """Keep TensorFlow's start-up lines off stderr below ``-v -v`` (see the module docstring).

    A ``TF_CPP_MIN_LOG_LEVEL`` that the user set below 3 asks for TensorFlow's lines: then the
    import is left alone too.
    """
    asked = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", tensorflow_log_level(verbose))
    if verbose >= 2:
        return
    logging.getLogger("absl").setLevel(logging.ERROR)
    if asked is None or asked.strip() == "3":
        quiet_native_imports()


class Captured:
    """What was written to descriptor 2 inside :func:`descriptor_2_captured`; set on exit."""

    text: str = ""


@contextlib.contextmanager
def descriptor_2_captured() -> Iterator[Captured]:
    """Point file descriptor 2 (what C and C++ code write to as stderr) at a temporary file for
    the ``with`` block; the text written there is in the yielded object once the block is over."""
    captured = Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as spool:
        os.dup2(spool.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(ValueError, OSError):  # stderr may be closed already
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            spool.seek(0)
            captured.text = spool.read().decode("utf-8", "replace")


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader with descriptor 2 captured; on failure the captured text is written
    to stderr before the error propagates, so a real import error keeps its explanation."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        created: ModuleType | None = self._loader.create_module(spec)
        return created

    def exec_module(self, module: ModuleType) -> None:
        failure: BaseException | None = None
        with descriptor_2_captured() as captured:
            try:
                self._loader.exec_module(module)
            except BaseException as error:
                failure = error
        if failure is not None:
            if captured.text:
                sys.stderr.write(captured.text)
                sys.stderr.flush()
            raise failure
        # Hand the module its real loader, as if this wrapper had never been there.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class QuietNativeImport(importlib.abc.MetaPathFinder):
    """A finder that finds nothing itself: for the named top-level packages it asks the other
    finders, then wraps the loader they return in :class:`_QuietLoader`."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def quiet_native_imports(names: Sequence[str] = NOISY_NATIVE_PACKAGES) -> None:
    """Capture what importing ``names`` writes to descriptor 2 (once per process; a package
    already imported is past saving)."""
    if any(isinstance(f, QuietNativeImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, QuietNativeImport(names))


def quiet_libraries(level: int) -> None:
    """pynetdicom and highdicom log every PDU and copied module at INFO: keep that for debug.

    Library records and Python warnings that could quote a received value are reduced to the
    tags they name (:class:`RedactLibraryRecords`) on every root handler.
    """
    library_level = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(library_level)
    # Warnings go through logging (and so through the filter), not straight to stderr.
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactLibraryRecords) for f in handler.filters):
            handler.addFilter(RedactLibraryRecords())


_TAG_TEXT = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_VR_TEXT = re.compile(r"\bVR:? ([A-Z]{2})\b")
_CATEGORY_TEXT = re.compile(r"\b([A-Z][A-Za-z]*Warning)\b")
_REDACTED_LOGGERS = ("pydicom", "py.warnings", "pynetdicom")


class RedactLibraryRecords(logging.Filter):
    """Reduce what pydicom and pynetdicom log, and Python warnings, to the tags they name.

    Their messages quote received values (``Invalid value for VR UI: '<value>'``), and a
    malformed element can swallow its neighbours, so the quoted value may hold the patient's
    name. A log handler with this filter passes such a record as ``event=library_message`` with
    the logger, the warning category, the VR and the tags ``(gggg,eeee)`` the text names,
    without the text itself or an exception's message. pynetdicom's info and debug records
    (association events, PDU and command set dumps, asked for with ``-v``) pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not any(name == lib or name.startswith(lib + ".") for lib in _REDACTED_LOGGERS):
            return True
        if name.startswith("pynetdicom") and record.levelno < logging.WARNING:
            return True
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        parts = [f"event=library_message source={name}"]
        category = _CATEGORY_TEXT.search(text)
        if category:
            parts.append(f"category={category.group(1)}")
        vr = _VR_TEXT.search(text)
        if vr:
            parts.append(f"vr={vr.group(1)}")
        tags = sorted({f"({g.upper()},{e.upper()})" for g, e in _TAG_TEXT.findall(text)})
        if tags:
            parts.append("tags=" + ",".join(tags))
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(f"error={record.exc_info[0].__name__}")
        record.msg = " ".join(parts)
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True
