"""The one logging set-up of every ctcovid process: the CLI's commands and the node's worker.

The library itself only logs to ``logging.getLogger(__name__)``; whoever runs a process calls
:func:`configure_logging` once, before Keras (and TensorFlow) is imported, so that TensorFlow's
C++ start-up lines (CPU features, oneDNN notes, absl's pre-init warning) stay off stderr unless
asked for with ``-v -v``. The node's processes also call :func:`quiet_libraries`, which keeps
pynetdicom and highdicom at WARNING and reduces library records to the tags they name.
"""

from __future__ import annotations

import logging
import os
import re
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", tensorflow_log_level(verbose))
    if verbose < 2:
        logging.getLogger("absl").setLevel(logging.ERROR)


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
