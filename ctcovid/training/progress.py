"""Progress reporting for the long steps (caching, training, evaluation), free of any UI.

Library code calls a :class:`Progress`; the CLI passes :class:`RichProgress` (bars with ETA on
stderr) and everything else gets :class:`NullProgress`.
"""

from __future__ import annotations

import logging
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
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
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
