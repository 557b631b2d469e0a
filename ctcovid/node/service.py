"""The node as a process tree: the listener in this process, the worker in a child process.

The listener never loads the model, so a worker that crashes (out of memory, a broken model)
does not take the SCP down: the node logs it, puts the interrupted job back in the queue and
starts a new worker. On start every unfinished job is resumed from the store. SIGTERM (or
Ctrl-C) stops accepting associations, lets open ones finish, lets the worker finish and record
its current job, and exits 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import queue
import signal
import time
from typing import Any

from ctcovid.errors import ConfigError
from ctcovid.node.config import NodeConfig
from ctcovid.node.scp import Listener, ReceiveStats
from ctcovid.node.store import Store
from ctcovid.node.worker import run_worker

logger = logging.getLogger(__name__)

NODE_LOCK_FILE = "node.lock"
WORKER_STOP_SECONDS = 300.0
LISTENER_DRAIN_SECONDS = 30.0
MAX_WORKER_RESTART_DELAY_SECONDS = 60.0


def quiet_libraries(level: int) -> None:
    """pynetdicom and highdicom log every PDU and copied module at INFO: keep that for debug."""
    library_level = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(library_level)


class Node:
    """Run with :meth:`run`; :meth:`request_stop` (or SIGTERM) ends it cleanly."""

    def __init__(self, config: NodeConfig, *, log_level: int = logging.INFO) -> None:
        self.config = config
        self.log_level = log_level
        # A plain flag: a signal handler that took a lock (Event.set) could deadlock against
        # the same thread's Event.wait, which it interrupts.
        self._stop_requested = False
        self._mp = multiprocessing.get_context("spawn")
        self._worker_stop: Any = None
        self._events: Any = None
        self.listener: Listener | None = None
        self.metrics: Any = None

    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True

    def _check_model(self) -> None:
        from ctcovid.model.artifact import default_model_path, read_artifact
        from ctcovid.model.runtimes import resolve_runtime

        # Fail here, with the reason, rather than in a worker that restarts forever.
        path = self.config.model or default_model_path()
        artifact = read_artifact(path)
        choice = resolve_runtime(path, artifact, self.config.runtime)
        artifact = artifact.with_runtime(choice.name, choice.graph_sha256)
        logger.info(
            "event=model model=%s version=%s runtime=%s device_uid=%s",
            artifact.info.name,
            artifact.info.version,
            artifact.runtime,
            artifact.device_uid,
        )

    def _start_worker(self) -> Any:
        process = self._mp.Process(
            target=run_worker,
            args=(self.config.to_dict(), self._worker_stop, self._events, self.log_level),
            name="ctcovid-worker",
            daemon=False,
        )
        process.start()
        logger.info("event=worker_started pid=%s", process.pid)
        return process

    def _drain_events(self) -> None:
        while True:
            try:
                name, value = self._events.get_nowait()
            except (queue.Empty, EOFError, OSError):
                return
            if self.metrics is not None:
                self.metrics.observe(name, value)

    def run(self) -> int:
        """Serve until asked to stop; returns the exit code (0)."""
        config = self.config
        quiet_libraries(self.log_level)
        self._check_model()
        store = Store(config.store, min_free_mb=config.min_free_mb)
        with open(config.store / NODE_LOCK_FILE, "a+") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"{config.store}: another 'ctcovid listen' is using this store"
                ) from None
            return self._serve(store)

    def _serve(self, store: Store) -> int:
        config = self.config
        recovered = store.reconcile()
        resumed = store.resume(config.max_attempts)
        counts = store.counts_by_state()
        logger.info(
            "event=node_start store=%s recovered_instances=%d resumed_jobs=%d %s peer=%s",
            config.store,
            recovered,
            resumed,
            " ".join(f"{k}={v}" for k, v in counts.items()),
            config.peer or "none",
        )
        if config.peer is None:
            logger.warning("event=no_peer SRs are kept in %s/sr and not sent", config.store)
        stats = ReceiveStats()
        if config.metrics_port is not None:
            from ctcovid.node.metrics import Metrics

            self.metrics = Metrics(config.metrics_port, config.host, store, stats)
        self._worker_stop = self._mp.Event()
        self._events = self._mp.Queue()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        self.listener = Listener(config, store, stats)
        self.listener.start()
        worker = self._start_worker()
        restarts = 0
        restart_at: float | None = None
        try:
            while not self._stop_requested:
                time.sleep(0.25)
                self._drain_events()
                if worker is not None and not worker.is_alive():
                    restarts += 1
                    delay = min(MAX_WORKER_RESTART_DELAY_SECONDS, 2.0 ** min(restarts, 6))
                    logger.error(
                        "event=worker_died exitcode=%s restarts=%d restart_in=%.0fs",
                        worker.exitcode,
                        restarts,
                        delay,
                    )
                    store.resume(config.max_attempts)
                    worker, restart_at = None, time.monotonic() + delay
                if worker is None and restart_at is not None and time.monotonic() >= restart_at:
                    worker, restart_at = self._start_worker(), None
        finally:
            logger.info("event=node_stopping")
            self.listener.stop(LISTENER_DRAIN_SECONDS)
            self._worker_stop.set()
            if worker is not None:
                worker.join(WORKER_STOP_SECONDS)
                if worker.is_alive():
                    # Its job stays 'classifying' in the store and is resumed on the next start.
                    logger.error("event=worker_killed reason='did not stop in time'")
                    worker.kill()
                    worker.join(10)
            self._drain_events()
            if self.metrics is not None:
                with contextlib.suppress(Exception):
                    self.metrics.close()
            store.close()
        logger.info("event=node_stopped")
        return 0
