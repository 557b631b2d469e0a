"""Progress reporting for the long steps (caching, training, evaluation), free of any UI.

Library code calls a :class:`Progress`; the CLI passes :func:`console_progress` (bars with ETA on
a terminal, plain lines in a log or a pipe) and everything else gets :class:`NullProgress`.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """A sequence of tasks, one at a time, each with a known total."""

    def start(self, description: str, total: int, unit: str = "") -> None: ...

    def advance(self, n: int = 1, **fields: Any) -> None: ...

    def finish(self) -> None: ...

    def message(self, text: str) -> None: ...


class NullProgress:
    """Reports nothing except messages, which go to the log."""

    def start(self, description: str, total: int, unit: str = "") -> None:
        pass

    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def finish(self) -> None:
        pass

    def message(self, text: str) -> None:
        logger.info("%s", text)


class RichProgress:
    """Rich progress bars with rate and time remaining; messages printed above the bars."""

    def __init__(self, console: Any = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _Progress

        self._progress = _Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}", markup=False),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=console,
            transient=False,
        )
        self._task: Any = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish()
        self._progress.stop()

    def start(self, description: str, total: int, unit: str = "") -> None:
        self.finish()
        self._task = self._progress.add_task(description, total=total, unit=unit, info="")

    def advance(self, n: int = 1, **fields: Any) -> None:
        if self._task is None:
            return
        info = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
        )
        if fields:
            self._progress.update(self._task, advance=n, info=info)
        else:
            self._progress.update(self._task, advance=n)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop_task(self._task)
            self._task = None

    def message(self, text: str) -> None:
        self._progress.console.print(text, highlight=False, soft_wrap=True)


class LineProgress:
    """Plain progress lines for a log or a pipe, where redrawn bars come out as broken lines.

    One line when a task finishes, and one every ``every_seconds`` while it runs.
    """

    def __init__(self, console: Any, every_seconds: float = 30.0) -> None:
        self._console = console
        self._every = every_seconds
        self._task: dict[str, Any] | None = None

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish()

    def start(self, description: str, total: int, unit: str = "") -> None:
        self.finish()
        now = time.monotonic()
        self._task = {"description": description, "total": total, "unit": unit, "done": 0,
                      "started": now, "printed": now, "info": ""}  # fmt: skip

    def advance(self, n: int = 1, **fields: Any) -> None:
        task = self._task
        if task is None:
            return
        task["done"] += n
        if fields:
            task["info"] = " ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
            )
        if time.monotonic() - task["printed"] >= self._every:
            self._line(task)

    def finish(self) -> None:
        if self._task is not None:
            self._line(self._task)
            self._task = None

    def message(self, text: str) -> None:
        self._console.print(text, highlight=False, soft_wrap=True)

    def _line(self, task: dict[str, Any]) -> None:
        now = time.monotonic()
        task["printed"] = now
        text = (
            f"{task['description']}: {task['done']}/{task['total']} {task['unit']}".rstrip()
            + f", {now - task['started']:.0f} s"
            + (f", {task['info']}" if task["info"] else "")
        )
        self.message(text)


def console_progress(console: Any) -> RichProgress | LineProgress:
    """Bars on a terminal, plain lines otherwise (``make demo`` output, CI logs, pipes)."""
    return RichProgress(console) if console.is_terminal else LineProgress(console)
