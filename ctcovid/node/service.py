"""The node as a process tree: the listener in this process, the worker in a child process.

The listener never loads the model, so a worker that crashes (out of memory, a broken model)
does not take the SCP down: the node logs it, puts the interrupted job back in the queue and
starts a new worker. A worker that is alive but stops making progress (its heartbeat is older
than ``worker_stall_seconds``) is killed and replaced the same way; the job it was stuck on
fails after ``max_attempts`` such restarts, alone. On start every unfinished job is resumed from
the store. SIGTERM (or Ctrl-C) stops accepting associations, lets open ones finish, lets the
worker finish and record its current job (abandoning a send in flight), and exits 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import queue
import signal
import time
from collections.abc import Callable
from typing import Any

from ctcovid.errors import ConfigError
from ctcovid.logs import quiet_libraries
from ctcovid.node.alerts import start_alerts
from ctcovid.node.auditing import node_audit
from ctcovid.node.config import NodeConfig
from ctcovid.node.scp import Listener, ReceiveStats
from ctcovid.node.store import Store
from ctcovid.node.worker import run_worker

logger = logging.getLogger(__name__)

NODE_LOCK_FILE = "node.lock"
WORKER_STOP_SECONDS = 300.0
# Open associations get this long to finish after SIGTERM, then they are cut (the peer resends).
LISTENER_DRAIN_SECONDS = 5.0
# How long a worker that exited cleanly waits for the node's own stop to show (see poll).
STOP_GRACE_SECONDS = 2.0
MAX_WORKER_RESTART_DELAY_SECONDS = 60.0
# Alerts still queued at stop get this long to be delivered.
ALERT_DRAIN_SECONDS = 3.0


class WorkerSupervisor:
    """Keeps one worker process running: restarts it, with backoff, when it dies or when its
    heartbeat (a shared ``time.monotonic()`` value the worker updates) is older than
    ``stall_seconds``. A heartbeat of 0 means "still starting" (the model may take minutes to
    load) and is not judged.

    ``start_process(heartbeat)`` starts a worker with a fresh shared heartbeat value;
    ``on_lost()`` runs after a worker was lost (the node puts its job back in the queue).
    ``stopping()`` says whether the node is stopping: a worker that exits then has stopped, not
    died. A clean exit (code 0) is the worker obeying a stop: SIGTERM to the process group
    reaches it at the same moment as the node, so the node's own stop is given
    ``STOP_GRACE_SECONDS`` to show before the exit counts as a death.
    """

    def __init__(
        self,
        start_process: Callable[[Any], Any],
        make_heartbeat: Callable[[], Any],
        *,
        stall_seconds: float,
        on_lost: Callable[[], object],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.start_process = start_process
        self.make_heartbeat = make_heartbeat
        self.stall_seconds = stall_seconds
        self.on_lost = on_lost
        self.stopping = stopping
        self.process: Any = None
        self.heartbeat: Any = None
        self.restarts = 0
        self.stalls = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.heartbeat = self.make_heartbeat()
        self.process = self.start_process(self.heartbeat)
        self.restart_at = None

    def poll(self) -> None:
        """Check the worker once; restart it when it is gone and its backoff has passed."""
        now = time.monotonic()
        process = self.process
        if process is not None:
            lost = False
            if not process.is_alive():
                if self._stopped_cleanly(process):
                    logger.info("event=worker_stopped_with_node exitcode=%s", process.exitcode)
                    self.process, self.restart_at = None, None
                    return
                lost = True
                logger.error("event=worker_died exitcode=%s", process.exitcode)
            else:
                beat = float(self.heartbeat.value)
                if beat > 0 and now - beat > self.stall_seconds:
                    lost = True
                    self.stalls += 1
                    logger.error(
                        "event=worker_stalled pid=%s seconds_without_progress=%.0f",
                        process.pid,
                        now - beat,
                    )
                    process.kill()
                    process.join(30)
            if lost:
                self.restarts += 1
                delay = min(MAX_WORKER_RESTART_DELAY_SECONDS, 2.0 ** min(self.restarts, 6))
                logger.error("event=worker_restart restarts=%d in=%.0fs", self.restarts, delay)
                self.on_lost()
                self.process, self.restart_at = None, now + delay
        if self.process is None and self.restart_at is not None and now >= self.restart_at:
            self.start()

    def _stopped_cleanly(self, process: Any) -> bool:
        """Whether the exited ``process`` stopped because the node is stopping."""
        if self.stopping():
            return True
        if process.exitcode != 0:
            return False
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline:
            if self.stopping():
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout_seconds: float) -> None:
        """Wait for the worker (already asked to stop) to exit; kill it after the timeout."""
        process, self.process, self.restart_at = self.process, None, None
        if process is None:
            return
        process.join(timeout_seconds)
        if process.is_alive():
            # Its job stays 'classifying' in the store and is resumed on the next start.
            logger.error("event=worker_killed reason='did not stop in time'")
            process.kill()
            process.join(10)


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
        self._runtime_name: str | None = None  # resolved once, at start (_check_model)

    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True

    def _check_destination(self) -> None:
        """Fail at start, with the reason, on credentials, TLS files or a URL the worker's
        sender could not use."""
        from ctcovid.net.sender import sr_sender

        settings = self.config.send_settings()
        if settings is not None:
            sr_sender(settings)

    def _check_model(self) -> None:
        from ctcovid.model.artifact import default_model_path, read_artifact
        from ctcovid.model.runtimes import resolve_runtime

        # Fail here, with the reason, rather than in a worker that restarts forever.
        path = self.config.model or default_model_path()
        artifact = read_artifact(path)
        choice = resolve_runtime(path, artifact, self.config.runtime)
        self._runtime_name = choice.name  # for the page; the graph's session is let go here
        artifact = artifact.with_runtime(choice.name, choice.graph_sha256)
        logger.info(
            "event=model model=%s version=%s runtime=%s device_uid=%s",
            artifact.info.name,
            artifact.info.version,
            artifact.runtime,
            artifact.device_uid,
        )

    def _start_web(self, store: Store, stats: ReceiveStats, supervisor: WorkerSupervisor) -> Any:
        """The HTTP server (page, API, probes, /metrics) in a thread, on its own connection to
        the store; started before the listener, so that a port in use fails the start."""
        from ctcovid.node.health import model_summary
        from ctcovid.node.metrics import Metrics
        from ctcovid.node.web import WebContext, WebServer, require_web

        config = self.config
        require_web()
        if config.metrics_port is not None:
            logger.warning(
                "event=deprecated_option metrics_port/--metrics-port: use http_port/--http-port "
                "(metrics are served at /metrics there)"
            )
        self.metrics = Metrics(None, config.http_host, store, stats)

        def heartbeat() -> float | None:
            process, beat = supervisor.process, supervisor.heartbeat
            if process is None or beat is None or not process.is_alive():
                return None
            return float(beat.value)

        web_store = Store(config.store, min_free_mb=config.min_free_mb)
        listener = self.listener
        audit = listener.audit if listener is not None else None
        try:
            web = WebServer(
                WebContext(
                    config=config,
                    store=web_store,
                    model=model_summary(config, self._runtime_name),
                    heartbeat=heartbeat,
                    metrics=self.metrics,
                    dicom_port=(lambda: listener.port) if listener is not None else None,
                    on_login_failed=audit.login_failed if audit is not None else None,
                )
            )
        except BaseException:
            web_store.close()
            raise
        web.start()
        return web

    def _start_worker(self, heartbeat: Any) -> Any:
        process = self._mp.Process(
            target=run_worker,
            args=(
                self.config.to_dict(),
                self._worker_stop,
                self._events,
                self.log_level,
                heartbeat,
            ),
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
        self._check_destination()
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
        started = time.time()
        recovered = store.reconcile()
        resumed = store.jobs.resume(config.max_attempts)
        counts = store.jobs.counts_by_state()
        logger.info(
            "event=node_start store=%s recovered_instances=%d resumed_jobs=%d %s peer=%s",
            config.store,
            recovered,
            resumed,
            " ".join(f"{k}={v}" for k, v in counts.items()),
            config.sr_destination,
        )
        if not config.sends:
            logger.warning("event=no_peer SRs are kept in %s/sr and not sent", config.store)
        stats = ReceiveStats()
        self._worker_stop = self._mp.Event()
        self._events = self._mp.Queue()
        audit = node_audit(config, deliver=True)
        self.listener = Listener(config, store, stats, audit)
        supervisor = WorkerSupervisor(
            self._start_worker,
            lambda: self._mp.Value("d", 0.0, lock=False),
            stall_seconds=config.worker_stall_seconds,
            on_lost=lambda: store.jobs.resume(config.max_attempts),
            stopping=lambda: self._stop_requested,
        )
        web = self._start_web(store, stats, supervisor) if config.http_port is not None else None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        self.listener.start()
        if audit is not None:
            audit.started()
        supervisor.start()
        alerts = start_alerts(config, store, stats, supervisor, started_at=started)
        try:
            while not self._stop_requested:
                time.sleep(0.25)
                self._drain_events()
                if not self._stop_requested:
                    supervisor.poll()
                if alerts is not None and not self._stop_requested:
                    alerts.check()
        finally:
            logger.info("event=node_stopping")
            # The worker first: it finishes its job and abandons a send at once, meanwhile
            # the listener drains.
            self._worker_stop.set()
            self.listener.stop(LISTENER_DRAIN_SECONDS)
            supervisor.stop(WORKER_STOP_SECONDS)
            self._drain_events()
            if alerts is not None:
                alerts.close(ALERT_DRAIN_SECONDS)
            if web is not None:
                with contextlib.suppress(Exception):
                    web.stop()
                    web.ctx.store.close()
            store.close()
            if audit is not None:
                audit.stopped()
                audit.close()
        logger.info("event=node_stopped")
        return 0
