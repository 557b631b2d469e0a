"""The worker: one process that owns the model and turns complete series into sent SRs.

Each step queues the series that have been quiet for ``stable_seconds``, classifies the oldest
waiting one (scan its folder, judge it with the ingest rules, ``Classifier.classify``,
``build_sr``, store the SR) and sends every SR whose send is due. All state lives in the
:class:`~ctcovid.node.store.Store`, so the process can be killed at any moment and resumed.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ctcovid.errors import InvalidInputError
from ctcovid.node.config import NodeConfig
from ctcovid.node.store import SeriesRecord, Store

logger = logging.getLogger(__name__)

Observer = Callable[[str, float], None]
LOCK_FILE = "worker.lock"


class StopFlag(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Worker:
    """Classify and send, one step at a time; the process around it is :func:`run_worker`."""

    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        classifier: Any,
        observe: Observer | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.classifier = classifier
        self.observe = observe or (lambda name, value: None)
        self._ssl_context: Any = None
        if config.peer is not None and config.send_tls:
            from ctcovid.node.sender import client_ssl_context

            self._ssl_context = client_ssl_context(config)

    def run(self, stop: StopFlag, keep_going: Callable[[], bool] = lambda: True) -> None:
        """Work until ``stop`` is set; the current job always finishes and is recorded first."""
        logger.info("event=worker_ready model=%s", self.classifier.artifact.info.name)
        while not stop.is_set() and keep_going():
            if not self.step(stop):
                stop.wait(self.config.poll_seconds)
        logger.info("event=worker_stopped")

    def step(self, stop: StopFlag | None = None) -> bool:
        """One round: queue stable series, classify one, send what is due. True if it did work."""
        promoted = self.store.promote_stable(self.config.stable_seconds)
        if promoted:
            logger.debug("event=series_complete count=%d", promoted)
        did_work = False
        record = self.store.claim_next()
        if record is not None:
            self.classify(record)
            did_work = True
        if self.config.peer is not None:
            for due in self.store.due_sends():
                if stop is not None and stop.is_set():
                    break
                self.send(due)
                did_work = True
        return did_work

    # -- classify ---------------------------------------------------------------------------

    def classify(self, record: SeriesRecord) -> None:
        """Classify one claimed series and record the outcome (never raises)."""
        uid = record.series_instance_uid
        log_ids = f"study={record.study_instance_uid} series={uid}"
        start = time.perf_counter()
        try:
            series = self._assessed_series(record)
            if not series.usable:
                self.store.finish_unusable(record, series.reason)
                logger.warning("event=series_unusable %s reason=%r", log_ids, series.reason)
                return
            result = self.classifier.classify(series)
            revision = record.sent_revision + 1
            from ctcovid.report import build_sr

            sr = build_sr(result, series, revision=revision)
            buffer = io.BytesIO()
            sr.save_as(buffer, enforce_file_format=True)
            sr_path = self.store.sr_path(uid, str(sr.SOPInstanceUID))
            self.store.write_file(sr_path, buffer.getvalue())
        except InvalidInputError as exc:
            self.store.finish_unusable(record, str(exc))
            logger.warning("event=series_unusable %s reason=%r", log_ids, str(exc))
            return
        except Exception as exc:  # a model or report failure: visible as failed, retryable
            logger.exception("event=classify_failed %s", log_ids)
            self.store.finish_failed(record, f"classification failed: {type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - start
        current = self.store.finish_classified(
            record,
            revision=revision,
            sr_path=sr_path,
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
            probability_covid=result.probability_covid,
            label=result.label,
            classify_seconds=seconds,
        )
        self.observe("classify_seconds", seconds)
        if not current:
            logger.info("event=series_changed_while_classifying %s; it will run again", log_ids)
            return
        logger.info(
            "event=classified %s revision=%d probability_covid=%.4f label=%s slices=%d "
            "seconds=%.2f sr=%s",
            log_ids,
            revision,
            result.probability_covid,
            result.label,
            result.n_slices_used,
            seconds,
            sr.SOPInstanceUID,
        )

    def _assessed_series(self, record: SeriesRecord) -> Any:
        from ctcovid.dicom import scan

        folder = self.store.series_dir(record.study_instance_uid, record.series_instance_uid)
        report = scan(folder, self.classifier.ingest_config)
        for series in report.series:
            if series.series_instance_uid == record.series_instance_uid:
                for bad in report.bad_files:
                    series.warnings.append(f"skipped {bad.path.name}: {bad.reason}")
                return series
        reasons = "; ".join(f"{b.path.name}: {b.reason}" for b in report.bad_files[:3])
        raise InvalidInputError(
            f"Series {record.series_instance_uid}: no readable instance in the store"
            + (f" ({reasons})" if reasons else "")
        )

    # -- send -------------------------------------------------------------------------------

    def send(self, record: SeriesRecord) -> None:
        """Send one classified series' SR; on failure back off or give up (never raises)."""
        from ctcovid.node.sender import send_file

        assert self.config.peer is not None
        log_ids = (
            f"study={record.study_instance_uid} series={record.series_instance_uid} "
            f"revision={record.revision} sr={record.sr_sop_instance_uid}"
        )
        start = time.perf_counter()
        try:
            status = send_file(
                self.store.root / record.sr_path,
                self.config.peer,
                calling_ae_title=self.config.ae_title,
                ssl_context=self._ssl_context,
                timeout_seconds=self.config.network_timeout_seconds,
                max_pdu_bytes=self.config.max_pdu_bytes,
            )
        except Exception as exc:  # refused, unreachable, TLS failure, failure status: retry
            state, next_try = self.store.mark_send_failed(
                record,
                str(exc),
                retry_seconds=self.config.retry_seconds,
                max_retry_seconds=self.config.max_retry_seconds,
                max_attempts=self.config.max_attempts,
            )
            if next_try is None:
                logger.error(
                    "event=send_failed %s peer=%s attempts=%d state=%s error=%r",
                    log_ids,
                    self.config.peer,
                    record.attempts + 1,
                    state,
                    str(exc),
                )
            else:
                logger.warning(
                    "event=send_retry %s peer=%s attempt=%d next_try_in=%.1fs error=%r",
                    log_ids,
                    self.config.peer,
                    record.attempts + 1,
                    next_try - time.time(),
                    str(exc),
                )
            return
        seconds = time.perf_counter() - start
        self.store.mark_sent(record)
        self.observe("send_seconds", seconds)
        logger.info(
            "event=sr_sent %s peer=%s status=0x%04X seconds=%.2f",
            log_ids,
            self.config.peer,
            status,
            seconds,
        )


class SignalStop:
    """Stop flag of the worker process: the listener's event, or SIGTERM to this process.

    The signal handler only sets a plain attribute; setting a multiprocessing Event there
    could deadlock against this same thread waiting on it.
    """

    def __init__(self, event: Any) -> None:
        self.event = event
        self.signalled = False

    def handle_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def is_set(self) -> bool:
        return self.signalled or bool(self.event.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while not self.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.1, remaining))
        return True


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the listener dies, even by ``kill -9``.

    Without it an orphaned worker would go on classifying next to the restarted node's worker.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except Exception:  # best effort: the parent-alive check in the loop still ends the worker
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable", exc_info=True)


@contextlib.contextmanager
def worker_lock(store_root: Path, stop: StopFlag) -> Any:
    """Hold the store's worker lock: one worker per store, even across a crash and restart."""
    with open(store_root / LOCK_FILE, "a+") as fh:
        waited = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.warning("event=worker_waiting_for_lock store=%s", store_root)
                    waited = True
                if stop.wait(0.5):
                    yield False
                    return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def run_worker(
    config_data: dict[str, Any],
    stop: Any,
    events: Any,
    log_level: int,
) -> None:
    """Entry point of the worker process (multiprocessing, spawn)."""
    import multiprocessing

    _die_with_parent()
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.ERROR)
    from ctcovid.node.service import quiet_libraries

    quiet_libraries(log_level)
    # The listener decides when to stop: SIGTERM here only asks to finish the current job.
    stop = SignalStop(stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop.handle_signal)
    parent = multiprocessing.parent_process()

    def parent_alive() -> bool:
        return parent is None or parent.is_alive()

    def observe(name: str, value: float) -> None:
        with contextlib.suppress(Exception):  # metrics must never stop the work
            events.put_nowait((name, value))

    config = NodeConfig.from_dict(config_data)
    store = Store(config.store, min_free_mb=config.min_free_mb)
    with worker_lock(config.store, stop) as locked:
        if not locked:
            return
        from ctcovid.inference import Classifier
        from ctcovid.model.artifact import default_model_path

        model_path = config.model or default_model_path()
        start = time.perf_counter()
        classifier = Classifier.from_file(
            model_path, batch_size=config.batch_size, runtime=config.runtime
        )
        logger.info(
            "event=model_loaded model=%s version=%s runtime=%s device_uid=%s seconds=%.1f",
            classifier.artifact.info.name,
            classifier.artifact.info.version,
            classifier.artifact.runtime,
            classifier.artifact.device_uid,
            time.perf_counter() - start,
        )
        Worker(config, store, classifier, observe).run(stop, parent_alive)
    store.close()
