"""The local engine of ``ctcovid batch``: decoders in worker processes, inference in this one.

Series are decoded and prepared in a pool of decoder processes (:func:`~ctcovid.batch.shared.
decode_entry`) while this process feeds ONE classifier, whose batches mix the slices of several
series (:class:`~ctcovid.batch.shared.SliceBatcher`); finished series go to the
:class:`~ctcovid.batch.shared.BatchSink`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ctcovid.batch.index import SeriesEntry, process_pool
from ctcovid.batch.shared import BatchSink, Decoded, SliceBatcher, decode_entry
from ctcovid.decoder import DEFAULT_DECODER_MEMORY_MB, crashed_reason
from ctcovid.inference import Classifier

logger = logging.getLogger(__name__)


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
    decoder process fails alone (its row says why) and the run goes on."""
    batcher = SliceBatcher(classifier)
    artifact = classifier.artifact

    def take(decoded: Decoded) -> None:
        if decoded.prepared is None:
            sink.failed(decoded.entry, decoded.error)
        else:
            batcher.add(decoded.entry, decoded.prepared)

    def score(final: bool) -> None:
        while batcher.full or (final and batcher.n_queued):
            for item in batcher.step():
                sink.classified(
                    item.entry, item.prepared, item.probs, time.perf_counter() - item.started
                )
            if not final:
                return  # one batch, then look after the decoders again

    todo = iter(entries)
    if workers <= 0:
        for entry in todo:
            take(decode_entry(entry, artifact))
            score(final=False)
        score(final=True)
        return

    # Enough series in flight that the decoders never wait for the classifier, few enough that
    # decoded slices do not pile up in memory.
    max_in_flight = 2 * workers + 1
    pending: dict[Future[Decoded], SeriesEntry] = {}
    # Series that were in flight when a decoder process died: any of them may have killed it,
    # so each runs again alone; one that kills its decoder alone fails with the reason.
    suspects: deque[SeriesEntry] = deque()
    executor = pool if pool is not None else process_pool(workers, memory_mb)
    own_pools: list[ProcessPoolExecutor] = [] if pool is not None else [executor]
    alone = False  # whether the one future pending is a suspect running alone
    exhausted = False
    try:
        while True:
            broken: list[SeriesEntry] = []
            if suspects:
                if not pending:
                    entry = suspects.popleft()
                    try:
                        pending[executor.submit(decode_entry, entry, artifact)] = entry
                        alone = True
                    except BrokenProcessPool:
                        broken.append(entry)
            else:
                alone = False
                while not exhausted and len(pending) < max_in_flight:
                    following = next(todo, None)
                    if following is None:
                        exhausted = True
                        break
                    try:
                        pending[executor.submit(decode_entry, following, artifact)] = following
                    except BrokenProcessPool:
                        broken.append(following)
                        break
            if not pending and not broken and not suspects and exhausted:
                break
            if pending and not broken:
                # Wait for a decoder only when there is no full batch to work on meanwhile.
                done, _ = wait(
                    list(pending), timeout=0 if batcher.full else None, return_when=FIRST_COMPLETED
                )
                for fut in done:
                    entry = pending.pop(fut)
                    try:
                        decoded = fut.result()
                    except BrokenProcessPool:
                        broken.append(entry)
                        continue
                    take(decoded)
            if broken:
                broken.extend(pending.values())  # the pool is gone: all in flight are lost
                pending.clear()
                if alone and len(broken) == 1:
                    sink.failed(broken[0], crashed_reason(memory_mb))
                else:
                    logger.warning(
                        "a decoder process died; re-running the %d series in flight one by one",
                        len(broken),
                    )
                    suspects.extend(broken)
                executor.shutdown(wait=False, cancel_futures=True)
                executor = process_pool(workers, memory_mb)
                own_pools.append(executor)
                alone = False
            score(final=False)
    finally:
        for own in own_pools:
            own.shutdown(wait=False, cancel_futures=True)
    score(final=True)
