"""What every command shares: error translation to exit codes, logging set-up, JSON output."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from ctcovid.errors import CtCovidError

F = TypeVar("F", bound=Callable[..., Any])


class Runtime(StrEnum):
    """How the model runs (ctcovid.model.runtimes); fixed choices for every command."""

    auto = "auto"
    keras = "keras"
    onnx = "onnx"
    int8 = "int8"


console = Console(stderr=True)
stdout = Console()


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr; the library itself only adds a NullHandler."""
    level = logging.WARNING - 10 * verbose
    if quiet:
        level = logging.ERROR
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # TensorFlow and absl are chatty at import; keep them to errors unless debugging.
    if verbose < 2:
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line reason and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def handle_errors(fn: F) -> F:
    """Expected failures (bad input, missing model) exit 1 with one line; anything else exits 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except CtCovidError as exc:
            raise fail(str(exc), 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as exc:  # an internal failure: say so, keep the traceback in debug logs
            logging.getLogger("ctcovid").debug("internal error", exc_info=True)
            raise fail(f"internal error: {type(exc).__name__}: {exc}", 2) from None

    return wrapper  # type: ignore[return-value]


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else there."""
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def quiet_keras() -> None:
    """Silence TensorFlow's start-up chatter before Keras is imported."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.ERROR)
