"""The local engine of ``ctcovid batch``: decoders in worker processes, inference in this one.

Series are decoded and prepared in a pool of decoder processes (:func:`~ctcovid.batch.shared.
decode_entry`) while this process feeds ONE classifier, a series at a time
(:class:`~ctcovid.batch.shared.SeriesScorer`); finished series go to the
:class:`~ctcovid.batch.shared.BatchSink`. :class:`Decoders` keeps the decoder processes going
when one dies; the PACS source (``sources.py``) decodes through it too.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ctcovid.batch.index import SeriesEntry, process_pool
from ctcovid.batch.shared import BatchSink, Decoded, SeriesScorer, decode_entry
from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB, crashed_reason
from ctcovid.inference import Classifier
from ctcovid.model.artifact import ModelArtifact

logger = logging.getLogger(__name__)


class Decoders:
    """Decode tasks in worker processes that outlive the death of any of them.

    ``submit`` hands over a series; ``collect`` returns the series decoded since, each prepared
    or with the reason it failed. A decoder process that dies (a crash, or the kernel's
    out-of-memory killer) breaks the whole pool, and any series then in flight may have killed
    it: each of them runs again alone, one that kills its decoder alone comes back failed with
    the reason, a new pool replaces the broken one and the run goes on. With ``workers <= 0``
    series are decoded in this process, at ``submit``. ``pool``, when given, is used and left
    open; the pools made here are shut down by :meth:`close`.
    """

    def __init__(
        self,
        artifact: ModelArtifact,
        *,
        workers: int,
        memory_mb: int = DEFAULT_DECODER_MEMORY_MB,
        pool: ProcessPoolExecutor | None = None,
    ):
        self.artifact = artifact
        self.workers = workers
        self.memory_mb = memory_mb
        # Enough series in flight that the decoders never wait for the classifier, few enough
        # that decoded slices do not pile up in memory.
        self.max_in_flight = 2 * max(workers, 0) + 1
        self._queued: deque[SeriesEntry] = deque()
        self._pending: dict[Future[Decoded], SeriesEntry] = {}
        self._suspects: deque[SeriesEntry] = deque()
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
        executor = process_pool(self.workers, self.memory_mb)
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

    def submit(self, entry: SeriesEntry) -> None:
        if self._executor is None:
            self._done.append(decode_entry(entry, self.artifact))
        else:
            self._queued.append(entry)

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
                entry = self._pending.pop(fut)
                try:
                    self._done.append(fut.result())
                except BrokenProcessPool:
                    broken.append(entry)
        if broken:
            self._recover(broken)
        decoded, self._done = self._done, []
        return decoded

    def _submit(self, entry: SeriesEntry) -> None:
        assert self._executor is not None
        self._pending[self._executor.submit(decode_entry, entry, self.artifact)] = entry

    def _dispatch(self) -> list[SeriesEntry]:
        """Start what may start now; the series a broken pool refused."""
        broken: list[SeriesEntry] = []
        if self._executor is None:
            return broken
        if self._suspects:
            if not self._pending:
                entry = self._suspects.popleft()
                try:
                    self._submit(entry)
                    self._alone = True
                except BrokenProcessPool:
                    broken.append(entry)
            return broken
        self._alone = False
        while self._queued and len(self._pending) < self.max_in_flight:
            entry = self._queued.popleft()
            try:
                self._submit(entry)
            except BrokenProcessPool:
                broken.append(entry)
                break
        return broken

    def _recover(self, broken: list[SeriesEntry]) -> None:
        """A decoder process died: judge or re-queue the series in flight, replace the pool."""
        broken.extend(self._pending.values())  # the pool is gone: all in flight are lost
        self._pending.clear()
        if self._alone and len(broken) == 1:
            self._done.append(Decoded(broken[0], error=crashed_reason(self.memory_mb)))
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

    def close(self) -> None:
        for own in self._own:
            own.shutdown(wait=False, cancel_futures=True)


def run_local(
    entries: Iterable[SeriesEntry],
    classifier: Classifier,
    sink: BatchSink,
    *,
    workers: int,
    pool: ProcessPoolExecutor | None = None,
    memory_mb: int = DEFAULT_DECODER_MEMORY_MB,
) -> None:
    """Decode in ``workers`` processes (in this process when 0) while this process infers;
    ``pool``, when given, is used and left open (a new one replaces it if a decoder dies).
    Decoder processes run under ``memory_mb`` MiB of address space; a series that kills its
    decoder process fails alone (its row says why) and the run goes on (:class:`Decoders`)."""
    scorer = SeriesScorer(classifier)

    def take(decoded: Decoded) -> None:
        if decoded.prepared is None:
            sink.failed(decoded.entry, decoded.error)
        else:
            scorer.add(decoded.entry, decoded.prepared)

    def score(final: bool) -> None:
        while (item := scorer.step()) is not None:
            sink.classified(
                item.entry, item.prepared, item.probs, time.perf_counter() - item.started
            )
            if not final:
                return  # one series, then look after the decoders again

    todo = iter(entries)
    exhausted = False
    with Decoders(classifier.artifact, workers=workers, memory_mb=memory_mb, pool=pool) as decoders:
        while True:
            while not exhausted and decoders.has_room:
                entry = next(todo, None)
                if entry is None:
                    exhausted = True
                    break
                decoders.submit(entry)
            if exhausted and not decoders.busy:
                break
            # Wait for a decoder only when there is no series to score meanwhile.
            for decoded in decoders.collect(timeout=0 if scorer.ready else None):
                take(decoded)
            score(final=False)
    score(final=True)
