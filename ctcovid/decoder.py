"""Decoder processes: pixel decoding in spawned processes under an address-space limit.

A file can declare an image far larger than its data (a header or a compressed frame claiming
tens of thousands of rows and columns); decoding it can take all the memory of the machine. In a
process capped with ``RLIMIT_AS`` the allocation fails instead (``MemoryError``, or a codec's own
error), and a decoder that still dies takes only its own process with it: the node and the batch
driver see ``BrokenProcessPool``, fail that one series with the reason and start a new process.
"""

from __future__ import annotations

import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor

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


def decoder_pool(workers: int, memory_mb: int = DEFAULT_DECODER_MEMORY_MB) -> ProcessPoolExecutor:
    """A pool of fresh interpreters, each under :func:`limit_memory`.

    Workers are spawned, not forked: forking a process that may already run a deep-learning
    runtime's threads is unsafe.
    """
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=limit_memory,
        initargs=(memory_mb,),
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
