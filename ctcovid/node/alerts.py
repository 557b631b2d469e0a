"""Alerts of the node: a webhook (JSON POST with a ``text`` key, as Slack and Teams incoming
webhooks accept) and/or e-mail (SMTP, STARTTLS whenever the server offers it).

Two halves, both in the node's main process:

- :class:`AlertMonitor` evaluates conditions where the node can see them, with no plumbing from
  the worker process: the job database (jobs newly ``failed``; SRs whose sending has been
  failing for longer than ``alert_after_minutes``; with ``alert_positive``, every positive
  result), the free disk against the store's floor, the worker supervisor's restarts and stalls,
  and the listener's count of refused associations. The node's main loop calls
  :meth:`AlertMonitor.check`, which throttles itself to one evaluation every few seconds.
  A condition is an *incident* with a key (``send:<destination>``, ``disk``, ``worker``,
  ``refusals``): one message when it opens, one "resolved" message when it clears. A key that
  opens again within the cooldown of its last message is announced only once the cooldown has
  passed (a flapping condition does not flood the channel). ``job-failed:<study>/<series>`` and
  ``positive:<study>/<series>`` are events: one message each, no resolution.
- :class:`AlertSink` delivers from a daemon thread of its own through a bounded queue: submitting
  never blocks (a full queue drops the new message, counted and logged), and each delivery has a
  timeout, so a hung webhook or mail server never holds up the listener or the node's loop (the
  worker, in its own process, never waits for alerts at all).

No alert carries patient data: messages name study and series UIDs and counts, read from the
job database, which holds no patient name, ID or birth date. Free-text reasons (an exception's
text, a PACS's error comment) may quote received values, so they are never copied into an
alert: ``ctcovid queue`` shows them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import shutil
import smtplib
import socket
import ssl
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol
from urllib.parse import urlsplit

from ctcovid.errors import ConfigError
from ctcovid.node.jobs import CLASSIFIED, FAILED, SENT, JobDatabase, SeriesRecord

logger = logging.getLogger(__name__)

# Seconds one delivery may wait on each network operation (connect, send, answer).
DELIVERY_TIMEOUT_SECONDS = 10.0
# Messages waiting for delivery; more are dropped (counted and logged).
MAX_QUEUED_ALERTS = 100
# A key announced less than this long ago is not announced again.
COOLDOWN_SECONDS = 1800.0
# How often the node's loop evaluates the conditions.
CHECK_SECONDS = 5.0
# This many refused associations (or cut connections) within the window is a burst.
REFUSAL_BURST = 20
REFUSAL_WINDOW_SECONDS = 60.0
# Job records that changed this long before the previous check are read again (a commit may
# carry a timestamp taken just before that check); what was announced is remembered.
OVERLAP_SECONDS = 60.0
# Positive results are remembered this long, so that the send of one is not a second alert.
POSITIVE_MEMORY_SECONDS = 7 * 86400.0
POSITIVE_LABEL = "covid"
DEFAULT_SMTP_PORT = 25
# 'USER:PASSWORD' for the mail server, from the environment only (never a flag or the file);
# sent only once STARTTLS is in place.
SMTP_AUTH_ENV = "CTCOVID_ALERT_SMTP_AUTH"


@dataclass(frozen=True)
class Alert:
    """One message: ``status`` is ``firing``, ``resolved`` or ``event`` (no resolution)."""

    key: str
    status: str
    summary: str
    detail: str = ""

    def subject(self, node: str) -> str:
        word = {"firing": "ALERT", "resolved": "RESOLVED"}.get(self.status, "NOTICE")
        return f"[ctcovid {node}] {word}: {self.summary}"

    def text(self, node: str) -> str:
        lines = [self.subject(node)]
        if self.detail:
            lines.append(self.detail)
        lines.append(f"(incident {self.key})")
        return "\n".join(lines)


# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go and what raises them (the ``alert_*`` settings of the node)."""

    webhook: str | None = None
    smtp_host: str | None = None
    smtp_port: int = DEFAULT_SMTP_PORT
    to: tuple[str, ...] = ()
    sender: str | None = None
    after_minutes: float = 15.0
    positive: bool = False
    smtp_auth: tuple[str, str] | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        *,
        webhook: str | None,
        smtp: str | None,
        to: Iterable[str],
        sender: str | None,
        after_minutes: float,
        positive: bool,
    ) -> AlertSettings | None:
        """Checked settings; None when no channel is configured. Raises ConfigError.

        With a mail server, its credentials come from ``$CTCOVID_ALERT_SMTP_AUTH``
        (``USER:PASSWORD``) when set.
        """
        to = tuple(to)
        if not after_minutes > 0:
            raise ConfigError(f"alert_after_minutes must be positive. Received: {after_minutes}.")
        webhook = webhook or None
        smtp = smtp or None
        if webhook is not None:
            parts = urlsplit(webhook)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # The URL is a secret (its path carries the token): never echoed.
                raise ConfigError("alert_webhook must be an http(s):// URL.")
        host, port, auth = None, DEFAULT_SMTP_PORT, None
        if smtp is not None:
            auth_text = os.environ.get(SMTP_AUTH_ENV, "")
            if auth_text:
                user, colon, password = auth_text.partition(":")
                if not (user and colon and password):
                    raise ConfigError(f"${SMTP_AUTH_ENV} must be USER:PASSWORD.")
                auth = (user, password)
            host, _, port_text = smtp.rpartition(":") if ":" in smtp else (smtp, ":", "")
            try:
                port = int(port_text) if port_text else DEFAULT_SMTP_PORT
            except ValueError:
                raise ConfigError(f"alert_smtp must be HOST:PORT. Received: {smtp!r}.") from None
            if not host or not 0 < port < 65536:
                raise ConfigError(f"alert_smtp must be HOST:PORT. Received: {smtp!r}.")
            if not to:
                raise ConfigError("alert_smtp needs alert_to (one or more addresses).")
        elif to or sender:
            raise ConfigError("alert_to and alert_from need alert_smtp (the mail server).")
        for address in (*to, *((sender,) if sender else ())):
            if "@" not in address or any(c in address for c in "\r\n,;<> "):
                raise ConfigError(f"not an e-mail address: {address!r}.")
        if webhook is None and host is None:
            if positive:
                raise ConfigError("alert_positive needs alert_webhook or alert_smtp.")
            return None
        return cls(
            webhook=webhook,
            smtp_host=host,
            smtp_port=port,
            to=to,
            sender=sender,
            after_minutes=float(after_minutes),
            positive=bool(positive),
            smtp_auth=auth,
        )


# -- delivery ---------------------------------------------------------------------------------


class Channel(Protocol):
    name: str

    def deliver(self, alert: Alert, node: str) -> None: ...


class WebhookChannel:
    """POST ``{"text": ...}`` as JSON; any 2xx answer is a delivery."""

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DELIVERY_TIMEOUT_SECONDS,
        opener: urllib.request.OpenerDirector | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        # The environment's proxy settings apply, as for any outbound HTTP of the host.
        self.opener = opener or urllib.request.build_opener()

    def __repr__(self) -> str:  # never the URL: its path is the webhook's secret
        return f"WebhookChannel(host={urlsplit(self.url).hostname})"

    def deliver(self, alert: Alert, node: str) -> None:
        body = json.dumps({"text": alert.text(node)}).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "ctcovid-node"},
        )
        with self.opener.open(request, timeout=self.timeout) as response:
            response.read(65536)


class SmtpChannel:
    """One e-mail per alert; STARTTLS (certificate verified) whenever the server offers it.

    ``credentials`` (user, password) are sent only over STARTTLS: a server that does not offer
    it gets no mail rather than a password in clear.
    """

    name = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        to: tuple[str, ...],
        sender: str | None = None,
        *,
        timeout: float = DELIVERY_TIMEOUT_SECONDS,
        ssl_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.host, self.port, self.to = host, port, to
        self.credentials = credentials
        self.sender = sender or f"ctcovid@{socket.gethostname()}"
        self.timeout = timeout
        self.ssl_context = ssl_context

    def deliver(self, alert: Alert, node: str) -> None:
        message = EmailMessage()
        message["Subject"] = alert.subject(node)
        message["From"] = self.sender
        message["To"] = ", ".join(self.to)
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid(domain="ctcovid")
        message.set_content(alert.text(node))
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            smtp.ehlo()
            tls = smtp.has_extn("starttls")
            if tls:
                smtp.starttls(context=self.ssl_context or ssl.create_default_context())
                smtp.ehlo()
            if self.credentials is not None:
                if not tls:
                    raise smtplib.SMTPNotSupportedError(
                        "the server offers no STARTTLS: the credentials are not sent in clear"
                    )
                smtp.login(*self.credentials)
            smtp.send_message(message)


_STOP = object()


class AlertSink:
    """Delivers alerts to every channel from a daemon thread; :meth:`submit` never blocks."""

    def __init__(
        self, channels: list[Channel], *, node: str, max_queued: int = MAX_QUEUED_ALERTS
    ) -> None:
        self.channels = channels
        self.node = node
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queued)
        self._lock = threading.Lock()
        self.dropped = 0
        self.delivered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="ctcovid-alerts", daemon=True)
        self._thread.start()

    def submit(self, alert: Alert) -> bool:
        """Queue ``alert``; False (counted, logged) when the queue is full and it is dropped."""
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                dropped = self.dropped
            logger.warning(
                "event=alert_dropped key=%s status=%s dropped_total=%d reason='queue full: "
                "deliveries are slower than alerts arrive'",
                alert.key,
                alert.status,
                dropped,
            )
            return False
        logger.info(
            "event=alert key=%s status=%s summary=%r", alert.key, alert.status, alert.summary
        )
        return True

    def pending(self) -> int:
        """Alerts queued or being delivered."""
        return self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._deliver(item)
            finally:
                self._queue.task_done()

    def _deliver(self, alert: Alert) -> None:
        for channel in self.channels:
            try:
                channel.deliver(alert, self.node)
            except Exception as exc:
                with self._lock:
                    self.failed += 1
                # The exception's type and text (an HTTP status, a socket error), never the URL.
                logger.error(
                    "event=alert_failed channel=%s key=%s status=%s error=%s: %s",
                    channel.name,
                    alert.key,
                    alert.status,
                    type(exc).__name__,
                    str(exc)[:200],
                )
            else:
                with self._lock:
                    self.delivered += 1

    def close(self, timeout: float) -> None:
        """Deliver what is queued within ``timeout`` seconds, then leave the rest (logged)."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=max(0.0, timeout))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.warning(
                "event=alerts_abandoned pending=%d reason='delivery did not finish in %.0fs'",
                max(0, self.pending() - 1),
                timeout,
            )


def channels_for(settings: AlertSettings) -> list[Channel]:
    channels: list[Channel] = []
    if settings.webhook is not None:
        channels.append(WebhookChannel(settings.webhook))
    if settings.smtp_host is not None:
        channels.append(
            SmtpChannel(
                settings.smtp_host,
                settings.smtp_port,
                settings.to,
                settings.sender,
                credentials=settings.smtp_auth,
            )
        )
    return channels


# -- conditions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerState:
    """What the supervisor knows: restarts so far, of which stalls; whether a worker is alive
    and beating (past its model load)."""

    restarts: int
    stalls: int
    healthy: bool


def supervisor_state(supervisor: Any) -> WorkerState:
    """The :class:`WorkerState` of a ``WorkerSupervisor`` (read, never changed)."""
    process, heartbeat = supervisor.process, supervisor.heartbeat
    healthy = False
    if process is not None and heartbeat is not None and process.is_alive():
        beat = float(heartbeat.value)
        healthy = beat > 0 and time.monotonic() - beat < supervisor.stall_seconds
    return WorkerState(int(supervisor.restarts), int(supervisor.stalls), healthy)


@dataclass
class _Incident:
    opened: float
    announced: bool = False


def _duration(seconds: float) -> str:
    """``45 s``, ``16 min``, ``2.5 h``: how long, as an operator reads it."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _ids(record: SeriesRecord) -> str:
    return f"study={record.study_instance_uid} series={record.series_instance_uid}"


def _failure_kind(reason: str) -> str:
    """What failed, from the fixed start of a job's reason (its variable tail is not shown)."""
    if reason.startswith(("sending the SR failed", "the SR was refused")):
        return "sending its SR gave up"
    return "classification failed"


class AlertMonitor:
    """Turns the node's state into alerts for ``sink`` (anything with ``submit(alert)``).

    ``disk`` returns (free bytes, floor bytes) of the store's file system; ``worker`` the
    supervisor's :class:`WorkerState`; ``refusals`` the listener's cumulative refusal counts by
    reason. Each is optional. ``now`` (seconds since the epoch, like the job database's times)
    may be given to :meth:`check`, for tests.
    """

    def __init__(
        self,
        settings: AlertSettings,
        sink: Any,
        jobs: JobDatabase,
        *,
        destination: str | None = None,
        disk: Callable[[], tuple[int, int]] | None = None,
        worker: Callable[[], WorkerState] | None = None,
        refusals: Callable[[], Mapping[str, int]] | None = None,
        started_at: float | None = None,
        check_seconds: float | None = None,
        cooldown_seconds: float = COOLDOWN_SECONDS,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.jobs = jobs
        self.destination = destination
        self.disk = disk
        self.worker = worker
        self.refusals = refusals
        self.check_seconds = CHECK_SECONDS if check_seconds is None else check_seconds
        self.cooldown_seconds = cooldown_seconds
        now = time.time()
        self._last_check = -math.inf
        # Job records that changed at or after this time are read at the next check.
        self._started = now if started_at is None else started_at
        self._since = self._started
        self._open: dict[str, _Incident] = {}
        self._announced: dict[str, float] = {}
        self._failed_seen: dict[tuple[str, str], float] = {}
        self._positive_seen: dict[tuple[str, str, int], float] = {}
        self._send_since: float | None = None
        self._worker_restarts = 0
        self._worker_stalls = 0
        self._worker_lost: tuple[float, bool] | None = None
        self._refusal_samples: deque[tuple[float, int, dict[str, int]]] = deque()
        if refusals is not None:
            counts = dict(refusals())
            self._refusal_samples.append((now, sum(counts.values()), counts))
        if settings.positive:
            # Positive results classified before this start were announced then.
            for record in jobs.list_series(CLASSIFIED):
                if record.label == POSITIVE_LABEL:
                    self._positive_seen[self._positive_key(record)] = now

    # -- the loop ---------------------------------------------------------------------------

    def check(self, now: float | None = None) -> None:
        """Evaluate every condition (at most once per ``check_seconds``); never raises."""
        now = time.time() if now is None else now
        if now - self._last_check < self.check_seconds:
            return
        self._last_check = now
        since = self._since
        for name, evaluate in (
            ("failed_jobs", lambda: self._check_failed(now, since)),
            ("sending", lambda: self._check_sending(now)),
            ("disk", lambda: self._check_disk(now)),
            ("worker", lambda: self._check_worker(now)),
            ("refusals", lambda: self._check_refusals(now)),
            ("positive", lambda: self._check_positive(now, since)),
        ):
            try:
                evaluate()
            except Exception as exc:  # a busy database, say: the next check tries again
                logger.warning(
                    "event=alert_check_error condition=%s error=%s", name, type(exc).__name__
                )
        # Never before the start: what changed then was announced by the previous run.
        self._since = max(self._started, now - OVERLAP_SECONDS)

    # -- incidents and events ---------------------------------------------------------------

    def _emit(self, alert: Alert) -> None:
        self.sink.submit(alert)

    def _condition(
        self,
        key: str,
        active: bool,
        now: float,
        firing: Callable[[], Alert],
        resolved: Callable[[_Incident], Alert],
    ) -> None:
        incident = self._open.get(key)
        if active:
            if incident is None:
                incident = self._open[key] = _Incident(opened=now)
            last = self._announced.get(key, -math.inf)
            if not incident.announced and now - last >= self.cooldown_seconds:
                incident.announced = True
                self._announced[key] = now
                self._emit(firing())
        elif incident is not None:
            del self._open[key]
            if incident.announced:
                self._emit(resolved(incident))

    def _event(self, alert: Alert, now: float) -> None:
        if now - self._announced.get(alert.key, -math.inf) >= self.cooldown_seconds:
            self._announced[alert.key] = now
            self._emit(alert)
        # Forget event keys whose cooldown has passed, so that the map stays small.
        if len(self._announced) > 1000:
            for key, when in list(self._announced.items()):
                if now - when >= self.cooldown_seconds and key not in self._open:
                    del self._announced[key]

    # -- conditions ---------------------------------------------------------------------------

    def _check_failed(self, now: float, since: float) -> None:
        for record in self.jobs.updated_since(since, (FAILED,)):
            seen_key = (record.study_instance_uid, record.series_instance_uid)
            if self._failed_seen.get(seen_key) == record.updated_at:
                continue
            self._failed_seen[seen_key] = record.updated_at
            key = f"job-failed:{record.study_instance_uid}/{record.series_instance_uid}"
            self._event(
                Alert(
                    key,
                    "event",
                    f"A job failed for good ({_failure_kind(record.reason)})",
                    f"{_ids(record)} revision={record.revision}. It stays 'failed' until "
                    "retried: 'ctcovid queue --store STORE' shows the reason, "
                    "'ctcovid queue --retry' sends or classifies it again.",
                ),
                now,
            )
        for seen_key, updated in list(self._failed_seen.items()):
            if updated < since - OVERLAP_SECONDS:
                del self._failed_seen[seen_key]

    def _check_sending(self, now: float) -> None:
        if self.destination is None:
            return
        failing = [r for r in self.jobs.list_series(CLASSIFIED) if r.attempts >= 1]
        if failing and self._send_since is None:
            # A failing job's record changed at its last failed attempt: sending has been
            # failing at least since then.
            self._send_since = min(now, min(r.updated_at for r in failing))
        after = self.settings.after_minutes * 60.0
        since = self._send_since
        active = bool(failing) and since is not None and now - since >= after
        key = f"send:{self.destination}"

        def firing() -> Alert:
            oldest = min(failing, key=lambda r: r.updated_at)
            most = max(failing, key=lambda r: r.attempts)
            failing_for = _duration(now - since if since is not None else 0.0)
            return Alert(
                key,
                "firing",
                f"Sending SRs to {self.destination} has been failing for {failing_for}",
                f"{len(failing)} SR(s) wait to be sent again. Oldest: {_ids(oldest)}; most "
                f"attempts: {most.attempts} ({_ids(most)}). The node keeps retrying; "
                "'ctcovid queue' shows the errors.",
            )

        def resolved(incident: _Incident) -> Alert:
            start = since if since is not None else incident.opened
            delivered = len(self.jobs.updated_since(start, (SENT,)))
            gave_up = sum(
                1
                for r in self.jobs.updated_since(start, (FAILED,))
                if _failure_kind(r.reason) == "sending its SR gave up"
            )
            return Alert(
                key,
                "resolved",
                f"Sending SRs to {self.destination}: no SR waits to be sent again",
                f"Since sending began failing: {delivered} SR(s) delivered, {gave_up} job(s) "
                "failed for good (see 'ctcovid queue').",
            )

        self._condition(key, active, now, firing, resolved)
        if not failing:
            self._send_since = None

    def _check_disk(self, now: float) -> None:
        if self.disk is None:
            return
        free, floor = self.disk()
        active = floor > 0 and free < floor
        mb = 1024 * 1024
        self._condition(
            "disk",
            active,
            now,
            lambda: Alert(
                "disk",
                "firing",
                f"Free disk under the floor: {free // mb} MB free, floor {floor // mb} MB",
                "Instances are refused (0xA700) and classification waits until space is freed.",
            ),
            lambda _: Alert(
                "disk",
                "resolved",
                f"Free disk back above the floor: {free // mb} MB free, floor {floor // mb} MB",
            ),
        )

    def _check_worker(self, now: float) -> None:
        if self.worker is None:
            return
        state = self.worker()
        if state.restarts > self._worker_restarts:
            self._worker_lost = (now, state.stalls > self._worker_stalls)
        self._worker_restarts, self._worker_stalls = state.restarts, state.stalls
        lost = self._worker_lost
        active = lost is not None and not (state.healthy and now > lost[0])
        if lost is not None and not active:
            self._worker_lost = None

        def firing() -> Alert:
            stalled = lost is not None and lost[1]
            what = "stalled (no progress) and was killed" if stalled else "died"
            return Alert(
                "worker",
                "firing",
                f"The worker {what}; restarting it (restart {state.restarts} since start)",
                "Its job goes back to the queue; a job that stops the worker max_attempts "
                "times fails alone. The node's log says why (event=worker_died or "
                "worker_stalled).",
            )

        self._condition(
            "worker",
            active,
            now,
            firing,
            lambda _: Alert(
                "worker",
                "resolved",
                f"The worker runs again (restarts since start: {state.restarts})",
            ),
        )

    def _check_refusals(self, now: float) -> None:
        if self.refusals is None:
            return
        counts = dict(self.refusals())
        total = sum(counts.values())
        samples = self._refusal_samples
        samples.append((now, total, counts))
        # Keep one sample at or before the window's start: the baseline to count from.
        while len(samples) > 1 and samples[1][0] <= now - REFUSAL_WINDOW_SECONDS:
            samples.popleft()
        _, base_total, base_counts = samples[0]
        burst = total - base_total
        window = REFUSAL_WINDOW_SECONDS

        def firing() -> Alert:
            by_reason = ", ".join(
                f"{reason}={count - base_counts.get(reason, 0)}"
                for reason, count in sorted(counts.items())
                if count - base_counts.get(reason, 0) > 0
            )
            return Alert(
                "refusals",
                "firing",
                f"{burst} associations refused in the last {window:.0f} s",
                f"By reason: {by_reason}. The node's log names each peer address and calling "
                "AE title (event=association_rejected).",
            )

        self._condition(
            "refusals",
            burst >= REFUSAL_BURST,
            now,
            firing,
            lambda _: Alert(
                "refusals",
                "resolved",
                f"Refused associations back under {REFUSAL_BURST} in {window:.0f} s",
            ),
        )

    @staticmethod
    def _positive_key(record: SeriesRecord) -> tuple[str, str, int]:
        return (record.study_instance_uid, record.series_instance_uid, record.revision)

    def _check_positive(self, now: float, since: float) -> None:
        if not self.settings.positive:
            return
        for record in self.jobs.updated_since(since, (CLASSIFIED, SENT)):
            if record.label != POSITIVE_LABEL:
                continue
            seen_key = self._positive_key(record)
            if seen_key in self._positive_seen:
                continue
            self._positive_seen[seen_key] = now
            probability = record.probability_covid
            self._emit(
                Alert(
                    f"positive:{record.study_instance_uid}/{record.series_instance_uid}",
                    "event",
                    "Positive result (covid)",
                    f"{_ids(record)} revision={record.revision} probability_covid="
                    f"{probability if probability is not None else '-'}",
                )
            )
        for seen_key, when in list(self._positive_seen.items()):
            if now - when > POSITIVE_MEMORY_SECONDS:
                del self._positive_seen[seen_key]


# -- the node's alerts ------------------------------------------------------------------------


class NodeAlerts:
    """The monitor and its sink, as the node runs them: :meth:`check` in the main loop,
    :meth:`close` on stop."""

    def __init__(self, monitor: AlertMonitor, sink: AlertSink) -> None:
        self.monitor = monitor
        self.sink = sink

    def check(self) -> None:
        self.monitor.check()

    def close(self, timeout: float) -> None:
        self.sink.close(timeout)


def start_alerts(
    config: Any, store: Any, stats: Any, supervisor: Any, *, started_at: float | None = None
) -> NodeAlerts | None:
    """Start alerting for a node: its ``NodeConfig``, ``Store``, the listener's
    ``ReceiveStats`` and the ``WorkerSupervisor``. None when no channel is configured."""
    settings: AlertSettings | None = config.alert_settings()
    if settings is None:
        return None

    def refusals() -> dict[str, int]:
        with stats.lock:
            return dict(stats.rejected)

    channels = channels_for(settings)
    sink = AlertSink(channels, node=f"{config.ae_title}@{socket.gethostname()}")
    monitor = AlertMonitor(
        settings,
        sink,
        store.jobs,
        destination=config.sr_destination if config.sends else None,
        disk=lambda: (shutil.disk_usage(store.root).free, store.min_free_bytes),
        worker=lambda: supervisor_state(supervisor),
        refusals=refusals,
        started_at=started_at,
    )
    logger.info(
        "event=alerts channels=%s after_minutes=%g positive=%s",
        ",".join(c.name for c in channels),
        settings.after_minutes,
        settings.positive,
    )
    return NodeAlerts(monitor, sink)
