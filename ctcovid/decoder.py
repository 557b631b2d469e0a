"""Decoding in a memory-capped process: the one way the node and batch turn a series' files into
what the model sees.

A file can declare an image far larger than its data (a header or a compressed frame claiming
tens of thousands of rows and columns); decoding it can take all the memory of the machine. In a
process capped with ``RLIMIT_AS`` the allocation fails instead (``MemoryError``, or a codec's own
error), and a decoder that still dies takes only its own process with it.

:func:`decode_series` is the task: find the series among its files (``load_series``), judge it,
decode, window and select its slices with the model's ingest settings (no model is loaded).
:class:`Decoders` runs it in a pool of such processes. The error convention is one: every
series comes back as a :class:`Decoded`, prepared or with the reason it failed (``unusable``
when the series itself cannot be classified); a series that kills its decoder process fails
alone with "decoder process died", and the pool is rebuilt.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import resource
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctcovid.config import IngestConfig
from ctcovid.dicom.series import load_series
from ctcovid.errors import CtCovidError, InvalidInputError
from ctcovid.scans import PreparedScan, prepare_scan

logger = logging.getLogger(__name__)

DEFAULT_DECODER_MEMORY_MB = 4096


def limit_memory(memory_mb: int) -> None:
    """Cap this process's address space at ``memory_mb`` MiB (0: leave it as it is).

    Runs as the initializer of every decoder process, before any task (and the imports its
    unpickling brings) runs. The hard limit is kept, so the cap can never be raised above it.
    """
    if memory_mb <= 0:
        return
    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def start_decoder(memory_mb: int, niceness: int = 0) -> None:
    """Initializer of a decoder process: :func:`limit_memory`, then lower its CPU priority by
    ``niceness`` (0: as its parent's)."""
    limit_memory(memory_mb)
    if niceness > 0:
        os.nice(niceness)


def decoder_pool(
    workers: int, memory_mb: int = DEFAULT_DECODER_MEMORY_MB, niceness: int = 0
) -> ProcessPoolExecutor:
    """A pool of fresh interpreters, each under :func:`limit_memory` (and ``niceness``).

    Workers are spawned, not forked: forking a process that may already run a deep-learning
    runtime's threads is unsafe.
    """
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=start_decoder,
        initargs=(memory_mb, niceness),
    )


def out_of_memory_reason(memory_mb: int) -> str:
    """The reason recorded for a series whose decoding exceeded the decoder's memory."""
    limit = f"the decoder memory limit ({memory_mb} MB)" if memory_mb > 0 else "the memory"
    return f"decoding needed more than {limit}: a file declares an image too large to decode"


def crashed_reason(memory_mb: int) -> str:
    """The reason recorded for a series whose decoder process died."""
    limit = f" (memory limit {memory_mb} MB)" if memory_mb > 0 else ""
    return (
        f"the decoder process died while decoding this series{limit}; "
        "a file of the series crashes or exhausts the pixel decoder"
    )


@dataclass(frozen=True)
class SeriesFiles:
    """Where one series is: a folder, or its files; ``known_duplicates`` as in ``load_series``."""

    files: Path | tuple[str, ...]
    study_instance_uid: str
    series_instance_uid: str
    known_duplicates: int = 0


@dataclass
class Decoded:
    """A series back from its decoder: the prepared scan, or why it failed (``unusable``: the
    series itself cannot be classified, as opposed to a failure to decode it)."""

    job: Any  # what the caller submitted it as
    prepared: PreparedScan | None = None
    error: str = ""
    unusable: bool = False


def decode_series(job: Any, where: SeriesFiles, ingest: IngestConfig) -> Decoded:
    """Decoder task: find, judge, decode, window and select the slices of one series."""
    try:
        series = load_series(
            where.files if isinstance(where.files, Path) else [Path(p) for p in where.files],
            ingest,
            series_instance_uid=where.series_instance_uid,
            study_instance_uid=where.study_instance_uid,
            known_duplicates=where.known_duplicates,
        )
        if not series.usable:
            raise InvalidInputError(series.reason)
        prepared = prepare_scan(series, ingest)
    except InvalidInputError as exc:
        return Decoded(job, error=str(exc), unusable=True)
    except CtCovidError as exc:
        return Decoded(job, error=str(exc))
    except MemoryError:
        return Decoded(job, error=out_of_memory_reason(_memory_limit_mb()))
    except Exception as exc:  # one broken series must not stop the others
        logger.debug("decoding series %s failed", where.series_instance_uid, exc_info=True)
        return Decoded(job, error=f"internal error: {type(exc).__name__}: {exc}")
    # The result needs only the count of all slices, not their pixels: do not ship them back.
    prepared.all_slices = dataclasses.replace(
        prepared.all_slices, slices=prepared.all_slices.slices[:0]
    )
    return Decoded(job, prepared=prepared)


def _memory_limit_mb() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return 0 if soft == resource.RLIM_INFINITY else soft // (1024 * 1024)


def warm_up() -> None:
    """Task that does nothing: unpickling it imports this module and its dependencies."""


class Decoders:
    """Decode series in worker processes that outlive the death of any of them.

    ``submit`` hands over a series; ``collect`` returns the series decoded since, each as a
    :class:`Decoded`. A decoder process that dies (a crash, or the kernel's out-of-memory
    killer) breaks the whole pool, and any series then in flight may have killed it: each of
    them runs again alone, one that kills its decoder alone comes back failed with the reason,
    a new pool replaces the broken one and the work goes on. With ``workers <= 0`` series are
    decoded in this process, at ``submit``. ``pool``, when given, is used and left open; the
    pools made here are shut down by :meth:`close`.
    """

    def __init__(
        self,
        ingest: IngestConfig,
        *,
        workers: int,
        memory_mb: int = DEFAULT_DECODER_MEMORY_MB,
        pool: ProcessPoolExecutor | None = None,
        niceness: int = 0,
    ):
        self.ingest = ingest
        self.workers = workers
        self.memory_mb = memory_mb
        self.niceness = niceness
        # Enough series in flight that the decoders never wait for the classifier, few enough
        # that decoded slices do not pile up in memory.
        self.max_in_flight = 2 * max(workers, 0) + 1
        self._queued: deque[tuple[Any, SeriesFiles]] = deque()
        self._pending: dict[Future[Decoded], tuple[Any, SeriesFiles]] = {}
        self._suspects: deque[tuple[Any, SeriesFiles]] = deque()
        self._done: list[Decoded] = []
        self._alone = False  # whether the one future pending is a suspect running alone
        self._executor: ProcessPoolExecutor | None = None
        self._own: list[ProcessPoolExecutor] = []
        if workers > 0:
            self._executor = pool if pool is not None else self._new_pool()

    def __enter__(self) -> Decoders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_pool(self) -> ProcessPoolExecutor:
        executor = decoder_pool(self.workers, self.memory_mb, self.niceness)
        self._own.append(executor)
        return executor

    @property
    def n_held(self) -> int:
        """Series submitted and not yet collected."""
        return len(self._queued) + len(self._pending) + len(self._suspects) + len(self._done)

    @property
    def has_room(self) -> bool:
        return self.n_held < self.max_in_flight

    @property
    def busy(self) -> bool:
        return self.n_held > 0

    def submit(self, job: Any, where: SeriesFiles) -> None:
        if self._executor is None:
            self._done.append(decode_series(job, where, self.ingest))
        else:
            self._queued.append((job, where))

    def start(self) -> None:
        """Hand the series submitted to the decoder processes now, without waiting for any
        (``submit`` only queues them; ``collect`` starts them too): for a caller that does
        other work before it collects."""
        broken = self._dispatch()
        if broken:
            self._recover(broken)

    def decode(self, job: Any, where: SeriesFiles) -> Decoded:
        """Decode one series and wait for it (for a caller with nothing else in flight)."""
        assert not self.busy, "decode() waits for one series; use submit() and collect()"
        self.submit(job, where)
        while not (decoded := self.collect(timeout=None)):
            pass  # a decoder died: the series runs again alone
        return decoded[0]

    def collect(self, timeout: float | None) -> list[Decoded]:
        """The series decoded since the last call; when there are none yet, wait up to
        ``timeout`` seconds (``None``: as long as it takes) for one."""
        broken = self._dispatch()
        if self._pending and not broken:
            done, _ = wait(
                list(self._pending),
                timeout=0 if self._done else timeout,
                return_when=FIRST_COMPLETED,
            )
            for fut in done:
                item = self._pending.pop(fut)
                try:
                    decoded = fut.result()
                except BrokenProcessPool:
                    broken.append(item)
                    continue
                decoded.job = item[0]  # the caller's own object, not its copy
                self._done.append(decoded)
        if broken:
            self._recover(broken)
        collected, self._done = self._done, []
        return collected

    def _submit(self, item: tuple[Any, SeriesFiles]) -> None:
        assert self._executor is not None
        self._pending[self._executor.submit(decode_series, *item, self.ingest)] = item

    def _dispatch(self) -> list[tuple[Any, SeriesFiles]]:
        """Start what may start now; the series a broken pool refused."""
        broken: list[tuple[Any, SeriesFiles]] = []
        if self._executor is None:
            return broken
        if self._suspects:
            if not self._pending:
                item = self._suspects.popleft()
                try:
                    self._submit(item)
                    self._alone = True
                except BrokenProcessPool:
                    broken.append(item)
            return broken
        self._alone = False
        while self._queued and len(self._pending) < self.max_in_flight:
            item = self._queued.popleft()
            try:
                self._submit(item)
            except BrokenProcessPool:
                broken.append(item)
                break
        return broken

    def _recover(self, broken: list[tuple[Any, SeriesFiles]]) -> None:
        """A decoder process died: judge or re-queue the series in flight, replace the pool."""
        broken.extend(self._pending.values())  # the pool is gone: all in flight are lost
        self._pending.clear()
        if self._alone and len(broken) == 1:
            self._done.append(Decoded(broken[0][0], error=crashed_reason(self.memory_mb)))
        else:
            logger.warning(
                "a decoder process died; re-running the %d series in flight one by one",
                len(broken),
            )
            self._suspects.extend(broken)
        assert self._executor is not None
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_pool()
        self._alone = False

    def close(self, wait: bool = False, *, abandon: bool = False) -> None:
        """Shut the pools made here down; with ``abandon``, first end their processes, so
        that a series being decoded whose result nobody will collect does not hold the
        caller up (a pool waits for the series in flight otherwise)."""
        for own in self._own:
            if abandon:
                for process in list((own._processes or {}).values()):
                    process.kill()
            own.shutdown(wait=wait, cancel_futures=True)
