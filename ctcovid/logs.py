"""The one logging set-up of every ctcovid process: the CLI's commands and the node's worker.

The library itself only logs to ``logging.getLogger(__name__)``; whoever runs a process calls
:func:`configure_logging` once, before Keras (and TensorFlow) is imported, so that TensorFlow's
C++ start-up lines (CPU features, oneDNN notes, absl's pre-init warning) stay off stderr unless
asked for with ``-v -v``.
"""

from __future__ import annotations

import logging
import os
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
