"""The worker: one process that owns the model and turns complete series into sent SRs.

Each step queues the series that have been quiet for ``stable_seconds`` and classifies the oldest
waiting one (scan its folder, judge it with the ingest rules, ``Classifier.classify``,
``build_sr``, store the SR, with ``result_card`` its result card, and, for the node's page,
key-slice heatmaps as PNG). While the model scores a series, the decoder process decodes the
next waiting one (``prefetch``) without claiming it: its claim uses that decode only when the
series is still of the generation decoded. SRs (with their cards) whose send
is due go out from a thread of their own, each send under a hard deadline, so a slow or stalled
PACS never holds up classification; each result's ORU to the RIS (``hl7``) and SR to each
named destination (``[destination.NAME]``) go from a thread per destination
(:mod:`ctcovid.node.courier`), so no destination waits for another. The worker
beats a heartbeat at every step and phase; the node restarts a worker whose heartbeat stops.
All state lives in the :class:`~ctcovid.node.store.Store`, so the process can be killed at any
moment and resumed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ctcovid.decoder import Decoded, Decoders, SeriesFiles
from ctcovid.dicom.rules import DEFAULT_RULES, Rule, decide
from ctcovid.dicom.series import load_series
from ctcovid.errors import InvalidInputError, ReportError
from ctcovid.node.config import NodeConfig
from ctcovid.node.courier import Courier, couriers, result_cards
from ctcovid.node.files import OutOfSpaceError
from ctcovid.node.jobs import Destination, PredecessorChanged, SeriesRecord
from ctcovid.node.store import Store
from ctcovid.scans import same_finding, stated_text

if TYPE_CHECKING:
    from ctcovid.net.sender import SrSender

logger = logging.getLogger(__name__)

Observer = Callable[[str, float], None]
LOCK_FILE = "worker.lock"
# Each rebuild follows a delivery that finished meanwhile; more in a row means a loop.
MAX_REBUILDS = 5
# A built SR: its revision, the dataset and where it is stored.
Built = tuple[int, Any, Path]
# How often the files of ignored series are looked for (when they are kept for a while).
IGNORED_SWEEP_SECONDS = 60.0
# What a result card shows: the key slice as the model saw it, and its heatmap (None: none).
CardPicture = tuple[Any, Any]
# With ``prefetch`` the decoder runs below the model's CPU priority: a series decoded ahead
# takes the cycles the model leaves idle, and never slows the scoring it overlaps (on two cores
# both are CPU-bound, and at equal priority the decode ahead only moved time into the scoring).
PREFETCH_NICENESS = 10


class StopFlag(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class DecodeFailed(Exception):
    """The series could not be decoded within the decoder's resources (the reason says which)."""


class Worker:
    """Classify and send, one step at a time; the process around it is :func:`run_worker`."""

    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        classifier: Any,
        observe: Observer | None = None,
        heartbeat: Callable[[], None] | None = None,
        audit: Any = None,
    ) -> None:
        self.config = config
        self.audit = audit  # a ctcovid.node.auditing.NodeAudit, or None
        self.store = store
        self.classifier = classifier
        self.observe = observe or (lambda name, value: None)
        self.beat = heartbeat or (lambda: None)
        # Pixels are decoded in a process of their own under a memory limit: a file that
        # crashes or exhausts the decoder fails its series, not the worker.
        self._decoder: Decoders | None = None
        # The series the next claim is expected to take, submitted to the decoder while the
        # model scores the current one (``prefetch``); at most one, so that the decoder's
        # memory limit still applies to one series.
        self._ahead: SeriesRecord | None = None
        self._stop: StopFlag | None = None
        self._sender: SrSender | None = None
        self._sender_config: NodeConfig | None = None
        self._next_sweep = 0.0
        # Built now: bad credentials or TLS files fail here, not at the first send.
        _ = self.sender
        # Results to the RIS (HL7 ORU over MLLP) and to the named destinations, each from a
        # delivery queue of its own.
        self.couriers: list[Courier] = couriers(config, store, audit)

    @property
    def sender(self) -> SrSender | None:
        """C-STORE to the peer or STOW-RS, as ``config`` says; None: the SRs stay in the store.

        Built again when ``config`` is replaced by other settings.
        """
        if self._sender_config is not self.config:
            from ctcovid.net.sender import sr_sender

            settings = self.config.send_settings()
            self._sender = sr_sender(settings) if settings is not None else None
            self._sender_config = self.config
        return self._sender

    def run(self, stop: StopFlag, keep_going: Callable[[], bool] = lambda: True) -> None:
        """Work until ``stop`` is set; the current job always finishes and is recorded first.

        A send in flight when ``stop`` is set is abandoned (it stays due, and is sent by the
        next worker), so stopping never waits for a peer.
        """
        logger.info("event=worker_ready model=%s", self.classifier.artifact.info.name)
        self._stop = stop
        sender: threading.Thread | None = None
        if self.sender is not None:
            sender = threading.Thread(
                target=self._send_loop,
                args=(stop, keep_going, self.send_due),
                name="sender",
                daemon=True,
            )
            sender.start()
        # A thread per destination: a RIS or PACS that stalls never holds up another.
        threads: list[threading.Thread | None] = [sender]
        for courier in self.couriers:
            started = threading.Thread(
                target=self._send_loop,
                args=(stop, keep_going, courier.send_due),
                name="sender-" + "-".join(d[0] for d in courier.destinations),
                daemon=True,
            )
            started.start()
            threads.append(started)
        while not stop.is_set() and keep_going():
            self.beat()
            if not self.step(stop, send=False):
                stop.wait(self.config.poll_seconds)
        for thread in threads:
            if thread is not None:
                thread.join(self.config.poll_seconds + 10.0)
        self.close()
        logger.info("event=worker_stopped")

    def close(self) -> None:
        """End the decoder process. A series it decodes ahead is abandoned (the process is
        ended, not waited for): it was never claimed, so it stays ``waiting`` for the next
        worker."""
        if self._decoder is not None:
            if self._ahead is not None:
                logger.info(
                    "event=prefetch_abandoned study=%s series=%s reason=stopping",
                    self._ahead.study_instance_uid,
                    self._ahead.series_instance_uid,
                )
            self._decoder.close(wait=True, abandon=self._ahead is not None)
            self._decoder = None
            self._ahead = None

    def _send_loop(
        self,
        stop: StopFlag,
        keep_going: Callable[[], bool],
        send_due: Callable[[StopFlag], bool],
    ) -> None:
        while not stop.is_set() and keep_going():
            try:
                did_work = send_due(stop)
            except Exception:  # a database error: log it and try again, never die silently
                logger.exception("event=send_loop_error")
                did_work = False
            if not did_work:
                stop.wait(self.config.poll_seconds)

    def step(self, stop: StopFlag | None = None, *, send: bool = True) -> bool:
        """One round: queue stable series, classify one and (with ``send``) send what is due.
        True if it did work."""
        promoted = self.store.jobs.promote_stable(self.config.stable_seconds)
        if promoted:
            logger.debug("event=series_complete count=%d", promoted)
        did_work = False
        record = self.store.jobs.claim_next()
        if record is not None:
            self.classify(record)
            did_work = True
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + IGNORED_SWEEP_SECONDS
            self.remove_ignored_files()
        if send and self.send_due(stop):
            did_work = True
        for courier in self.couriers if send else ():
            if courier.send_due(stop):
                did_work = True
        return did_work

    def send_due(self, stop: StopFlag | None = None) -> bool:
        """Send every SR whose send is due; True if there was one."""
        if self.sender is None:
            return False
        did_work = False
        for due in self.store.jobs.due_sends():
            if stop is not None and stop.is_set():
                break
            self.send(due, stop)
            did_work = True
        return did_work

    # -- classify ---------------------------------------------------------------------------

    def classify(self, record: SeriesRecord) -> None:
        """Classify one claimed series and record the outcome (never raises)."""
        uid = record.series_instance_uid
        log_ids = f"study={record.study_instance_uid} series={uid}"
        start = time.perf_counter()
        try:
            rule = self.route(record)
        except Exception as exc:  # the store cannot be read: fail visibly, retryable
            logger.exception("event=classify_failed %s", log_ids)
            self.store.jobs.finish_failed(record, f"routing failed: {type(exc).__name__}: {exc}")
            return
        if rule.action == "ignore":
            if self.store.jobs.finish_ignored(record, rule.name):
                logger.info("event=series_ignored %s rule=%s", log_ids, rule.name)
                if self.config.ignore_keep_hours == 0:
                    self.remove_ignored_files()
            return
        decode_seconds: float | None = None  # timings for the log line (profiling)
        try:
            # Below the floor the SR could not be stored: wait for space before spending the
            # model's time, and do not fail the job for a condition that passes.
            self.store.files.check_free_space()
            if self.config.decoder_memory_mb > 0:
                decode_start = time.perf_counter()
                prepared = self._prepare(record)
                decode_seconds = time.perf_counter() - decode_start
                self.beat()
                # The decoder process is idle now: it decodes the next series while the
                # model's threads score this one.
                self._prefetch()
                series = prepared.series
                model_start = time.perf_counter()
                probabilities, prepared.cams = self.classifier.score(prepared.used.slices)
                model_seconds = time.perf_counter() - model_start
                result = self.classifier.result(
                    prepared, probabilities, time.perf_counter() - start
                )
            else:  # no decoder process: decode here, streaming slices into the model
                series = load_series(
                    self.store.files.series_dir(record.study_instance_uid, uid),
                    self.classifier.ingest_config,
                    series_instance_uid=uid,
                    study_instance_uid=record.study_instance_uid,
                )
                if not series.usable:
                    raise InvalidInputError(series.reason)
                model_start = time.perf_counter()
                prepared, result = self.classifier.run(series)
                # decode overlaps the model here: one figure for both, none for decode alone
                model_seconds = time.perf_counter() - model_start
            self.beat()
            slices = prepared.used.slices
            cams_start = time.perf_counter()
            cams = self._key_slice_maps(prepared, result, log_ids)
            cams_seconds = time.perf_counter() - cams_start
            picture = self._card_picture(slices, result, cams)
            built = self._build_sr(record, result, series, picture)
        except InvalidInputError as exc:
            self.store.jobs.finish_unusable(record, str(exc))
            logger.warning("event=series_unusable %s reason=%r", log_ids, str(exc))
            return
        except DecodeFailed as exc:
            self.store.jobs.finish_failed(record, str(exc))
            logger.error("event=classify_failed %s reason=%r", log_ids, str(exc))
            return
        except OSError as exc:
            self._failed_on_os_error(record, exc, log_ids)
            return
        except Exception as exc:  # a model or report failure: visible as failed, retryable
            logger.exception("event=classify_failed %s", log_ids)
            self.store.jobs.finish_failed(
                record, f"classification failed: {type(exc).__name__}: {exc}"
            )
            return
        self._write_heatmaps(record, result, cams, slices, log_ids)
        self.beat()
        # An SR may be delivered meanwhile (the previous result's send was in flight): the
        # store refuses a result built on the older predecessor, and the next revision is built.
        for _ in range(MAX_REBUILDS):
            seconds = time.perf_counter() - start
            try:
                current = self._finish(record, result, built, seconds, rule)
                break
            except PredecessorChanged as changed:
                record = changed.record
                logger.info(
                    "event=predecessor_changed %s sent_revision=%d; building the next revision",
                    log_ids,
                    record.sent_revision,
                )
                try:
                    built = self._build_sr(record, result, series, picture)
                except Exception as exc:
                    logger.exception("event=classify_failed %s", log_ids)
                    self.store.jobs.finish_failed(
                        record, f"classification failed: {type(exc).__name__}: {exc}"
                    )
                    return
        else:
            self.store.jobs.finish_failed(
                record,
                f"the delivered SR changed {MAX_REBUILDS} times while the result was recorded",
            )
            return
        self.observe("classify_seconds", seconds)
        if current:
            with contextlib.suppress(Exception):  # shown on the node's page; never fails a job
                self.store.jobs.note_slice_probabilities(record, list(result.slice_probabilities))
        if not current:
            logger.info("event=series_changed_while_classifying %s; it will run again", log_ids)
            return
        if built is None:
            logger.info(
                "event=result_unchanged %s revision=%d probability_covid=%s label=%s "
                "slices=%d seconds=%.2f (not sent again)",
                log_ids,
                record.sent_revision,
                stated_text(result.probability_covid),
                result.label,
                result.n_slices_used,
                seconds,
            )
            return
        revision, sr, _ = built
        logger.info(
            "event=classified %s rule=%s action=%s revision=%d probability_covid=%s label=%s "
            "slices=%d seconds=%.2f sr=%s decode_seconds=%s model_seconds=%.2f "
            "heatmap_seconds=%.2f",
            log_ids,
            rule.name,
            rule.action,
            revision,
            stated_text(result.probability_covid),
            result.label,
            result.n_slices_used,
            seconds,
            sr.SOPInstanceUID,
            "-" if decode_seconds is None else f"{decode_seconds:.2f}",
            model_seconds,
            cams_seconds,
        )

    def route(self, record: SeriesRecord) -> Rule:
        """The routing rule ``record`` matches (noted on its job): the first rule whose
        conditions hold for the header of the series' first recorded instance and the calling
        AE title that sent it. Without rules, the default (classify) at no cost."""
        rule = self._rule(record)
        if record.rule != rule.name:
            self.store.jobs.note_rule(record, rule.name)
        return rule

    def _rule(self, record: SeriesRecord) -> Rule:
        """The routing rule ``record`` matches, as :meth:`route` decides it (noted nowhere)."""
        rules = self.config.rules
        if rules == DEFAULT_RULES:
            rule = rules[0]
        else:
            import pydicom

            header = pydicom.Dataset()  # no readable header: attribute conditions fail
            study, uid = record.study_instance_uid, record.series_instance_uid
            for path in sorted(self.store.instance_paths(uid, study)):
                try:
                    header = pydicom.dcmread(path, stop_before_pixels=True)
                    break
                except Exception:  # unreadable or gone: judged by the next one
                    continue
            decision = decide(rules, header, self.store.jobs.calling_aet(study, uid))
            rule = decision.rule
            logger.debug(
                "event=series_routed study=%s series=%s %s",
                study,
                uid,
                decision.to_dict(),
            )
        return rule

    def remove_ignored_files(self) -> int:
        """Delete the files of series ignored more than ``ignore_keep_hours`` ago; how many."""
        cutoff = time.time() - self.config.ignore_keep_hours * 3600.0
        removed = 0
        for relative in self.store.jobs.take_ignored_files(cutoff):
            try:
                self.store.files.remove(self.store.root / relative)
                removed += 1
            except FileNotFoundError:
                continue
            except OSError:
                logger.warning("event=ignored_file_not_removed path=%s", relative, exc_info=True)
        if removed:
            logger.info("event=ignored_files_removed count=%d", removed)
        return removed

    def _key_slice_maps(self, prepared: Any, result: Any, log_ids: str) -> list[Any] | None:
        """Class-activation maps of ``result.key_slice_indices``, in that order (from the
        scoring run when the graph kept them); None (logged) when they cannot be computed:
        neither the SR nor the card depends on them."""
        keys = list(result.key_slice_indices)
        try:
            return list(self.classifier.key_slice_maps(prepared, keys)) if keys else []
        except Exception:
            logger.warning("event=heatmaps_failed %s", log_ids, exc_info=True)
            return None

    def _card_picture(self, slices: Any, result: Any, cams: list[Any] | None) -> CardPicture | None:
        """The key slice and its heatmap for the result card; None without ``result_card``."""
        if not self.config.result_card:
            return None
        from ctcovid.report.card import card_key_slice

        index = card_key_slice(result)
        keys = list(result.key_slice_indices)
        cam = cams[keys.index(index)] if cams is not None else None
        return slices[index], cam

    def _write_heatmaps(
        self, record: SeriesRecord, result: Any, cams: list[Any] | None, slices: Any, log_ids: str
    ) -> None:
        """Key-slice class-activation maps over their slices, as PNG for the node's page.

        Written before the result is recorded, so a classified series shows its heatmaps; a
        failure here is logged and never fails the job (the SR does not depend on them).
        """
        from ctcovid.report import overlay_rgb, png_bytes

        if cams is None:
            return
        keys = list(result.key_slice_indices)
        try:
            pngs = [
                png_bytes(overlay_rgb(slices[i], cam)) for i, cam in zip(keys, cams, strict=True)
            ]
            self.store.files.write_heatmaps(
                record.study_instance_uid, record.series_instance_uid, pngs
            )
        except Exception:
            logger.warning("event=heatmaps_failed %s", log_ids, exc_info=True)

    def _build_sr(
        self, record: SeriesRecord, result: Any, series: Any, picture: CardPicture | None = None
    ) -> Built | None:
        """The SR that states ``result`` as the revision after the delivered one, written to
        the store (with ``picture``, its result card first, so that a stored SR has its card);
        None when the delivered SR already states it (same label and probability).
        """
        if record.sent_revision >= 1 and same_finding(
            record.sent_label, record.sent_probability, result.label, result.probability_covid
        ):
            return None
        revision = record.sent_revision + 1
        predecessor_series, predecessor_sop = self._sent_sr_uids(record)
        from ctcovid.report import build_sr

        sr = build_sr(
            result,
            series,
            revision=revision,
            predecessor_sop_instance_uid=predecessor_sop,
            predecessor_series_instance_uid=predecessor_series,
        )
        sr_path = self.store.files.sr_path(record.series_instance_uid, str(sr.SOPInstanceUID))
        if picture is not None:
            from ctcovid.report.card import build_result_card

            card = build_result_card(result, series, sr, key_slice=picture[0], cam=picture[1])
            self.store.files.write_file(
                self.store.files.card_path(record.series_instance_uid, sr_path), _encoded(card)
            )
        self.store.files.write_file(sr_path, _encoded(sr))
        return revision, sr, sr_path

    def _finish(
        self,
        record: SeriesRecord,
        result: Any,
        built: Built | None,
        seconds: float,
        rule: Rule,
    ) -> bool:
        """Store the outcome of ``record``; raises ``PredecessorChanged`` as the store does."""
        if built is None:
            try:
                standing = self._sent_sr_uids(record)[1] or ""
            except ReportError:  # only shown in the job's row; the delivery itself is recorded
                standing = ""
            return self.store.jobs.finish_unchanged(
                record,
                probability_covid=result.probability_covid,
                label=result.label,
                classify_seconds=seconds,
                sent_sop_instance_uid=standing,
            )
        revision, sr, sr_path = built
        deliveries = self._deliveries(rule)
        return self.store.finish_classified(
            record,
            revision=revision,
            sr_path=sr_path,
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
            probability_covid=result.probability_covid,
            label=result.label,
            classify_seconds=seconds,
            deliveries=deliveries,
            shadow=rule.name if rule.action == "shadow" else None,
            # Without an SR peer of its own the node hands each result to its deliveries: it
            # is the delivered revision the next result revises.
            handed_over=self.sender is None and any(kind != "hl7" for _, kind in deliveries),
        )

    def _deliveries(self, rule: Rule) -> tuple[Destination, ...]:
        """The named destinations (the RIS) a result under ``rule`` is queued for: those the
        rule lists (all when it lists none); none for a ``shadow`` rule."""
        if rule.action == "shadow":
            return ()
        return tuple(
            d
            for courier in self.couriers
            for d in courier.destinations
            if rule.destinations is None or d[0] in rule.destinations
        )

    def _failed_on_os_error(self, record: SeriesRecord, exc: OSError, log_ids: str) -> None:
        """A file error fails the job; a full disk defers it (a condition that passes)."""
        if not isinstance(exc, OutOfSpaceError) and exc.errno != errno.ENOSPC:
            logger.exception("event=classify_failed %s", log_ids)
            self.store.jobs.finish_failed(
                record, f"classification failed: {type(exc).__name__}: {exc}"
            )
            return
        retry_in = max(self.config.retry_seconds, self.config.poll_seconds)
        self.store.jobs.defer_classification(
            record, f"waiting for disk space: {exc}", retry_seconds=retry_in
        )
        logger.error(
            "event=classify_deferred %s reason=%r retry_in=%.0fs", log_ids, str(exc), retry_in
        )

    def _sent_sr_uids(self, record: SeriesRecord) -> tuple[str | None, str | None]:
        """Series and SOP Instance UID of the SR the peer received last, from its stored file.

        A revision names this SR, whatever model or ctcovid version built it (PS3.3 C.17.2.3).
        ``(None, None)`` before the first send.
        """
        if record.sent_revision < 1:
            return None, None
        path = record.sent_sr_path
        if not path and record.revision == record.sent_revision:
            path = record.sr_path  # a store from before sent_sr_path: the last SR built was sent
        if not path:
            raise ReportError(
                f"Series {record.series_instance_uid}: revision {record.sent_revision} was sent "
                "but the node database does not record its SR file; cannot name the predecessor"
            )
        import pydicom

        try:
            sent = pydicom.dcmread(
                self.store.root / path,
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "SOPInstanceUID"],
            )
            return str(sent.SeriesInstanceUID), str(sent.SOPInstanceUID)
        except Exception as exc:
            raise ReportError(
                f"Series {record.series_instance_uid}: the SR sent as revision "
                f"{record.sent_revision} ({path}) cannot be read for its SeriesInstanceUID and "
                f"SOPInstanceUID: {exc}"
            ) from exc

    def _prepare(self, record: SeriesRecord) -> Any:
        """Decode the series in the decoder process (started on first use, renewed if it died),
        or take it as decoded ahead when that is still its content."""
        if self._decoder is None:
            self._decoder = Decoders(
                self.classifier.ingest_config,
                workers=1,
                memory_mb=self.config.decoder_memory_mb,
                niceness=PREFETCH_NICENESS if self.config.prefetch else 0,
            )
        decoded = self._take_ahead(record)
        if decoded is None:
            decoded = self._decoder.decode(record, self._series_files(record))
        if decoded.prepared is None:
            raise (InvalidInputError if decoded.unusable else DecodeFailed)(decoded.error)
        return decoded.prepared

    def _series_files(self, record: SeriesRecord) -> SeriesFiles:
        study, uid = record.study_instance_uid, record.series_instance_uid
        return SeriesFiles(self.store.files.series_dir(study, uid), study, uid)

    def _prefetch(self) -> None:
        """Submit the series the next claim would take to the (idle) decoder, unclaimed.

        The job stays ``waiting``: a stop or a crash leaves nothing to give back, and a series
        that changes meanwhile shows a new generation when it is claimed (:meth:`_take_ahead`
        then decodes it again). A series its rule ignores is not decoded.
        """
        if not self.config.prefetch or self._decoder is None or self._ahead is not None:
            return
        if self._stop is not None and self._stop.is_set():
            return
        try:
            # A series that went quiet while this one was decoded is queued now, not at the
            # next step, so that it can be the one decoded ahead.
            self.store.jobs.promote_stable(self.config.stable_seconds)
            ahead = self.store.jobs.next_waiting()
            if ahead is None or self._rule(ahead).action == "ignore":
                return
        except Exception:  # only an optimisation: the series is decoded when claimed
            logger.warning("event=prefetch_skipped", exc_info=True)
            return
        self._decoder.submit(ahead, self._series_files(ahead))
        self._decoder.start()
        self._ahead = ahead
        logger.debug(
            "event=prefetch_started study=%s series=%s generation=%d",
            ahead.study_instance_uid,
            ahead.series_instance_uid,
            ahead.generation,
        )

    def _take_ahead(self, record: SeriesRecord) -> Decoded | None:
        """The series decoded ahead (waited for), when it is ``record`` as claimed: the same
        series at the same generation, so the same files. None otherwise (what was decoded
        is dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or self._decoder is None:
            return None
        while not (collected := self._decoder.collect(timeout=None)):
            pass  # a decoder died: the series runs again alone
        decoded = collected[0]
        ids = f"study={ahead.study_instance_uid} series={ahead.series_instance_uid}"
        if (ahead.study_instance_uid, ahead.series_instance_uid) != (
            record.study_instance_uid,
            record.series_instance_uid,
        ):
            logger.info("event=prefetch_dropped %s reason=another_series_claimed", ids)
            return None
        if ahead.generation != record.generation:
            logger.info(
                "event=prefetch_dropped %s reason=series_changed generation=%d claimed=%d",
                ids,
                ahead.generation,
                record.generation,
            )
            return None
        logger.debug("event=prefetch_used %s", ids)
        return decoded

    # -- send -------------------------------------------------------------------------------

    def send(self, record: SeriesRecord, cancel: StopFlag | None = None) -> None:
        """Send one classified series' SR; on failure back off or give up (never raises).

        A refusal that sending again cannot change (STOW-RS answered 4xx, say) fails the job
        at once; ``ctcovid queue --retry`` sends it again once the cause is fixed.
        """
        from ctcovid.net.sender import SendCancelled
        from ctcovid.net.stow import StowRefused

        sender = self.sender
        assert sender is not None
        destination = self.config.sr_destination
        log_ids = (
            f"study={record.study_instance_uid} series={record.series_instance_uid} "
            f"revision={record.revision} sr={record.sr_sop_instance_uid}"
        )
        start = time.perf_counter()
        try:
            outcome = sender.send(
                self.store.root / record.sr_path,
                cancel,
                result_cards(self.config, self.store, record),
            )
        except SendCancelled:
            logger.info("event=send_abandoned %s reason=stopping", log_ids)
            return
        except Exception as exc:  # refused, unreachable, TLS failure, failure status: retry
            state, next_try = self.store.jobs.mark_send_failed(
                record,
                str(exc),
                retry_seconds=self.config.retry_seconds,
                max_retry_seconds=self.config.max_retry_seconds,
                max_attempts=self.config.max_attempts,
                permanent=isinstance(exc, StowRefused),
            )
            if next_try is None:
                if self.audit is not None:
                    self.audit.sr_sent(self.store.root / record.sr_path, failure=str(exc))
                logger.error(
                    "event=send_failed %s peer=%s attempts=%d state=%s error=%r",
                    log_ids,
                    destination,
                    record.attempts + 1,
                    state,
                    str(exc),
                )
            else:
                logger.warning(
                    "event=send_retry %s peer=%s attempt=%d next_try_in=%.1fs error=%r",
                    log_ids,
                    destination,
                    record.attempts + 1,
                    next_try - time.time(),
                    str(exc),
                )
            return
        seconds = time.perf_counter() - start
        self.store.jobs.mark_sent(record)
        if self.audit is not None:
            self.audit.sr_sent(self.store.root / record.sr_path)
        self.observe("send_seconds", seconds)
        logger.info(
            "event=sr_sent %s peer=%s %s seconds=%.2f", log_ids, destination, outcome, seconds
        )


def _encoded(ds: Any) -> bytes:
    """``ds`` as a DICOM Part 10 file, in memory."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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
    heartbeat: Any = None,
) -> None:
    """Entry point of the worker process (multiprocessing, spawn).

    ``heartbeat``, a shared double, receives ``time.monotonic()`` whenever the worker makes
    progress; the node restarts a worker whose heartbeat stops.
    """
    import multiprocessing

    _die_with_parent()
    from ctcovid.logs import configure_logging, quiet_libraries

    configure_logging(level=log_level)
    quiet_libraries(log_level)
    # The listener decides when to stop: SIGTERM here only asks to finish the current job.
    stop = SignalStop(stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop.handle_signal)
    parent = multiprocessing.parent_process()

    def parent_alive() -> bool:
        return parent is None or parent.is_alive()

    def beat() -> None:
        if heartbeat is not None:
            heartbeat.value = time.monotonic()

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
        from ctcovid.node.auditing import node_audit

        audit = node_audit(config, deliver=False)  # the listener's process delivers the spool
        try:
            Worker(config, store, classifier, observe, beat, audit).run(stop, parent_alive)
        finally:
            if audit is not None:
                audit.close()
    store.close()
    # Every job is recorded and the store closed. The deep-learning runtime's teardown at
    # interpreter exit takes seconds (measured about 9 s with a loaded model on 2 busy cores),
    # which a node stopping on SIGTERM cannot afford: flush what is left and leave at once.
    with contextlib.suppress(Exception):
        events.close()
        events.join_thread()
    logging.shutdown()
    os._exit(0)
