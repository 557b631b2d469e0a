"""The node's alerts: conditions read from a real store, delivered to a webhook and an SMTP
server on loopback; a hung channel never holds up the caller. No model is loaded."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from node_helpers import clean_exit_supervisor, free_port, wait_for

from ctcovid.errors import ConfigError
from ctcovid.node.alerts import (
    Alert,
    AlertMonitor,
    AlertSettings,
    AlertSink,
    SmtpChannel,
    WebhookChannel,
    WorkerState,
)
from ctcovid.node.store import Store

SENTINEL_NAME = "SENTINEL^PATIENTNAME"
SENTINEL_ID = "SENTINELPID4711"
SENTINEL_BIRTH = "19010203"
SENTINELS = (SENTINEL_NAME, "SENTINEL", SENTINEL_ID, SENTINEL_BIRTH)
STUDY = "1.2.826.0.1.3680043.8.498.101"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DESTINATION = "127.0.0.1:104:PACS"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- helpers ----------------------------------------------------------------------------------


class Recorder:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def submit(self, alert: Alert) -> bool:
        self.alerts.append(alert)
        return True

    def keys(self) -> list[tuple[str, str]]:
        return [(a.key, a.status) for a in self.alerts]


def settings(**kwargs: Any) -> AlertSettings:
    return AlertSettings(webhook="http://127.0.0.1:9/hook", **kwargs)


def put_series(store: Store, series: str, *, study: str = STUDY, n: int = 2) -> None:
    """Instances carrying sentinel patient data, stored through the store's own method."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    for index in range(n):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = f"{series}.{index + 1}"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.PatientName = SENTINEL_NAME
        ds.PatientID = SENTINEL_ID
        ds.PatientBirthDate = SENTINEL_BIRTH
        ds.AccessionNumber = "ACC123"
        ds.Modality = "CT"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        store.put_instance(
            buffer.getvalue(),
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=CT_IMAGE_STORAGE,
            calling_aet="MODALITY",
        )


def classify(store: Store, series: str, *, label: str = "non-covid", study: str = STUDY):
    """The series through the worker's transitions up to ``classified`` (its SR 'built')."""
    store.jobs.promote_stable(0.0, now=time.time() + 1)
    record = store.jobs.claim_next()
    assert record is not None and record.series_instance_uid == series
    sr_uid = f"{series}.9"
    assert store.finish_classified(
        record,
        revision=1,
        sr_path=store.files.sr_path(series, sr_uid),
        sr_sop_instance_uid=sr_uid,
        probability_covid=0.875 if label == "covid" else 0.125,
        label=label,
        classify_seconds=1.0,
    )
    return store.jobs.get(series, study)


def fail_send(store: Store, series: str, *, max_attempts: int = 8, study: str = STUDY):
    record = store.jobs.get(series, study)
    store.jobs.mark_send_failed(
        record,
        f"association rejected while sending for {SENTINEL_NAME} ({SENTINEL_ID})",
        retry_seconds=30,
        max_retry_seconds=3600,
        max_attempts=max_attempts,
    )
    return store.jobs.get(series, study)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "store")
    yield store
    store.close()


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append(json.loads(body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An incoming-webhook sink on loopback: the JSON bodies it was posted."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.posts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T000/SECRET", server.posts  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, list[str]]]:
    """aiosmtpd on loopback: the messages it received, as text."""
    from aiosmtpd.controller import Controller

    messages: list[str] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            messages.append(envelope.content.decode("utf-8", "replace"))
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, messages
    controller.stop()


# -- sending failing: both channels, once per incident, no patient data --------------------------


def test_sending_failing_alerts_once_after_alert_after_then_resolves_without_phi(
    store: Store, webhook, smtp_server
):
    url, posts = webhook
    smtp_port, mails = smtp_server
    series = "1.2.826.0.1.3680043.8.498.102"
    put_series(store, series)
    classify(store, series)
    record = fail_send(store, series)
    assert record.attempts == 1
    failed_at = record.updated_at
    config = AlertSettings(
        webhook=url, smtp_host="127.0.0.1", smtp_port=smtp_port, to=("it@example.org",),
        after_minutes=15,
    )
    sink = AlertSink(
        [WebhookChannel(url, opener=NO_PROXY),
         SmtpChannel("127.0.0.1", smtp_port, ("it@example.org",), "node@example.org")],
        node="CTCOVID@test",
    )
    monitor = AlertMonitor(config, sink, store.jobs, destination=DESTINATION, check_seconds=0)
    try:
        monitor.check(now=failed_at + 60)
        fail_send(store, series)
        monitor.check(now=failed_at + 14 * 60)
        assert sink.pending() == 0 and posts == [] and mails == []  # not yet 15 minutes
        monitor.check(now=failed_at + 15 * 60 + 1)
        fail_send(store, series)
        monitor.check(now=failed_at + 16 * 60)
        monitor.check(now=failed_at + 60 * 60)  # still failing: no second message
        wait_for(lambda: len(posts) == 1 and len(mails) == 1, 20, "the alert to arrive")

        store.jobs.mark_sent(store.jobs.get(series, STUDY))
        monitor.check(now=failed_at + 61 * 60)
        monitor.check(now=failed_at + 62 * 60)
        wait_for(lambda: len(posts) == 2 and len(mails) == 2, 20, "the resolution to arrive")
    finally:
        sink.close(5)
    assert (sink.delivered, sink.failed, sink.dropped) == (4, 0, 0)
    firing, resolved = (p["text"] for p in posts)
    assert "ALERT: Sending SRs to 127.0.0.1:104:PACS has been failing for 15 min" in firing
    assert f"series={series}" in firing and f"study={STUDY}" in firing
    assert "RESOLVED: Sending SRs to 127.0.0.1:104:PACS" in resolved
    assert "1 SR(s) delivered" in resolved
    assert "Subject: [ctcovid CTCOVID@test] ALERT: Sending SRs" in mails[0]
    assert "Subject: [ctcovid CTCOVID@test] RESOLVED: Sending SRs" in mails[1]
    everything = json.dumps(posts) + "".join(mails)
    for sentinel in SENTINELS:
        assert sentinel not in everything
    assert "ACC123" not in everything  # not even the accession number is needed


def test_a_job_failed_for_good_is_one_event_without_resolution(store: Store):
    series = "1.2.826.0.1.3680043.8.498.103"
    put_series(store, series)
    classify(store, series)
    sink = Recorder()
    monitor = AlertMonitor(settings(), sink, store.jobs, destination=DESTINATION, check_seconds=0)
    fail_send(store, series, max_attempts=1)  # gave up: failed
    monitor.check()
    monitor.check()
    assert sink.keys() == [(f"job-failed:{STUDY}/{series}", "event")]
    assert "sending its SR gave up" in sink.alerts[0].summary
    text = sink.alerts[0].text("N")
    assert not any(s in text for s in SENTINELS)  # the stored reason quotes them: not copied

    # A classification failure of another series: its own event.
    other = "1.2.826.0.1.3680043.8.498.104"
    put_series(store, other)
    store.jobs.promote_stable(0.0, now=time.time() + 1)
    record = store.jobs.claim_next()
    store.jobs.finish_failed(record, f"classification failed: ValueError: {SENTINEL_NAME}")
    monitor.check()
    assert sink.keys()[1:] == [(f"job-failed:{STUDY}/{other}", "event")]
    assert "classification failed" in sink.alerts[1].summary
    assert not any(s in sink.alerts[1].text("N") for s in SENTINELS)


def test_failures_before_the_node_started_are_not_announced_again(store: Store):
    series = "1.2.826.0.1.3680043.8.498.105"
    put_series(store, series)
    classify(store, series)
    fail_send(store, series, max_attempts=1)
    sink = Recorder()
    monitor = AlertMonitor(settings(), sink, store.jobs, check_seconds=0)
    monitor.check()
    assert sink.alerts == []


# -- disk, worker, refusals, positives --------------------------------------------------------


def test_free_disk_under_the_floor_alerts_once_and_resolves(store: Store):
    sink = Recorder()
    monitor = AlertMonitor(
        settings(), sink, store.jobs, check_seconds=0,
        disk=lambda: (__import__("shutil").disk_usage(store.root).free, store.min_free_bytes),
    )
    monitor.check()
    store.min_free_bytes = 1 << 62  # a floor no disk reaches
    monitor.check()
    monitor.check()
    store.min_free_bytes = 0
    monitor.check()
    assert sink.keys() == [("disk", "firing"), ("disk", "resolved")]
    assert "Free disk under the floor" in sink.alerts[0].summary


def test_worker_loss_alerts_once_and_resolves_when_it_beats_again(store: Store):
    state = WorkerState(restarts=0, stalls=0, healthy=True)
    sink = Recorder()
    monitor = AlertMonitor(
        settings(), sink, store.jobs, check_seconds=0, worker=lambda: state
    )
    monitor.check(now=1000)
    state = WorkerState(restarts=1, stalls=1, healthy=False)  # killed for a stall, restarting
    monitor.check(now=1005)
    state = WorkerState(restarts=2, stalls=1, healthy=False)  # and then the new one died
    monitor.check(now=1010)
    state = WorkerState(restarts=2, stalls=1, healthy=True)
    monitor.check(now=1015)
    monitor.check(now=1020)
    assert sink.keys() == [("worker", "firing"), ("worker", "resolved")]
    assert "stalled" in sink.alerts[0].summary
    # A restart fast enough to beat again before the next check is still announced.
    state = WorkerState(restarts=3, stalls=1, healthy=True)
    monitor.check(now=5000)
    monitor.check(now=5005)
    assert sink.keys()[2:] == [("worker", "firing"), ("worker", "resolved")]
    assert "died" in sink.alerts[2].summary


def test_a_flapping_condition_is_announced_once_per_cooldown(store: Store):
    free = [0]
    sink = Recorder()
    monitor = AlertMonitor(
        settings(), sink, store.jobs, check_seconds=0, cooldown_seconds=600,
        disk=lambda: (free[0], 100),
    )
    for minute in range(0, 20, 2):  # under, over, under, over ... every minute
        free[0] = 0
        monitor.check(now=minute * 60)
        free[0] = 200
        monitor.check(now=minute * 60 + 60)
    # Announced at 0 and again once the 10-minute cooldown had passed, each with its resolution.
    assert sink.keys() == [("disk", "firing"), ("disk", "resolved")] * 2
    # Opened silently within the cooldown and still open after it: announced then.
    free[0] = 0
    monitor.check(now=1150)
    assert len(sink.alerts) == 4
    monitor.check(now=1250)
    assert sink.keys()[4:] == [("disk", "firing")]


def test_a_clean_node_stop_is_no_alert_but_a_death_is(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    """The supervisor's and the alerts' view of a worker that exits with the node."""
    from ctcovid.node.alerts import supervisor_state

    supervisor, stopping = clean_exit_supervisor(monkeypatch, on_lost=lambda: None)
    sink = Recorder()
    monitor = AlertMonitor(
        settings(), sink, store.jobs, check_seconds=0,
        worker=lambda: supervisor_state(supervisor),
    )
    supervisor.start()
    monitor.check()
    threading.Timer(0.1, stopping.set).start()  # the node's SIGTERM handler, a moment later
    supervisor.poll()
    monitor.check()
    assert supervisor.restarts == 0 and sink.alerts == []

    # The same exit while the node runs on is a death: announced.
    stopping.clear()
    supervisor.start()
    supervisor.poll()
    monitor.check()
    assert supervisor.restarts == 1
    assert sink.keys() == [("worker", "firing")] and "died" in sink.alerts[0].summary


def test_a_burst_of_refused_associations_alerts_and_resolves(store: Store):
    counts = {"calling_aet_not_allowed": 3}
    sink = Recorder()
    monitor = AlertMonitor(
        settings(), sink, store.jobs, check_seconds=0, refusals=lambda: dict(counts)
    )
    start = time.time()
    monitor.check(now=start + 5)
    counts["calling_aet_not_allowed"] += 12
    monitor.check(now=start + 10)
    assert sink.alerts == []  # 12 in a minute: not a burst
    counts["too_many_associations_from_address"] = 9
    monitor.check(now=start + 15)
    monitor.check(now=start + 20)
    assert sink.keys() == [("refusals", "firing")]
    assert "21 associations refused in the last 60 s" in sink.alerts[0].summary
    assert "calling_aet_not_allowed=12, too_many_associations_from_address=9" in (
        sink.alerts[0].detail
    )
    monitor.check(now=start + 50)
    monitor.check(now=start + 90)  # the burst is out of the window
    assert sink.keys() == [("refusals", "firing"), ("refusals", "resolved")]


def test_positive_results_are_announced_only_when_asked(store: Store):
    positive, negative = "1.2.826.0.1.3680043.8.498.106", "1.2.826.0.1.3680043.8.498.107"
    off, on = Recorder(), Recorder()
    monitors = [
        AlertMonitor(settings(), off, store.jobs, check_seconds=0),
        AlertMonitor(settings(positive=True), on, store.jobs, check_seconds=0),
    ]
    put_series(store, positive)
    classify(store, positive, label="covid")
    put_series(store, negative)
    classify(store, negative, label="non-covid")
    for monitor in monitors:
        monitor.check()
    store.jobs.mark_sent(store.jobs.get(positive, STUDY))  # its send is not a second result
    for monitor in monitors:
        monitor.check()
    assert off.alerts == []
    assert on.keys() == [(f"positive:{STUDY}/{positive}", "event")]
    assert "probability_covid=0.875" in on.alerts[0].detail
    assert not any(s in on.alerts[0].text("N") for s in SENTINELS)


# -- the sink: never blocks, bounded --------------------------------------------------------------


@pytest.fixture
def hung_webhook() -> Iterator[str]:
    """A TCP port that accepts connections (in the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    listener.close()


def test_a_hung_webhook_never_delays_the_caller(store: Store, hung_webhook: str):
    sink = AlertSink([WebhookChannel(hung_webhook, timeout=30, opener=NO_PROXY)], node="N")
    free = [0]
    monitor = AlertMonitor(
        settings(), sink, store.jobs, check_seconds=0, disk=lambda: (free[0], 100),
        destination=DESTINATION,
    )
    series = "1.2.826.0.1.3680043.8.498.108"
    put_series(store, series)
    classify(store, series)
    slowest = 0.0
    for step in range(20):
        free[0] = 0 if step % 2 == 0 else 200  # an alert (or resolution) at every check
        began = time.perf_counter()
        monitor.check(now=step * 3600.0)
        slowest = max(slowest, time.perf_counter() - began)
    began = time.perf_counter()
    assert sink.submit(Alert("x", "event", "one more"))
    enqueue = time.perf_counter() - began
    # The worker's side of the database is not held up either.
    began = time.perf_counter()
    fail_send(store, series)
    slowest = max(slowest, time.perf_counter() - began)
    assert sink.pending() >= 20  # the first delivery hangs (30 s); the rest wait behind it
    assert enqueue < 0.1
    assert slowest < 2.0  # database reads and one fsynced write on a busy machine, not 30 s
    began = time.perf_counter()
    sink.close(0.5)  # the node's stop waits this long at most
    assert time.perf_counter() - began < 1.5


class _Blocked:
    name = "blocked"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.delivered: list[str] = []

    def deliver(self, alert: Alert, node: str) -> None:
        self.started.set()
        self.release.wait(30)
        self.delivered.append(alert.key)


def test_a_full_queue_drops_new_alerts_and_counts_them(caplog: pytest.LogCaptureFixture):
    channel = _Blocked()
    sink = AlertSink([channel], node="N", max_queued=2)
    try:
        assert sink.submit(Alert("a", "event", "first"))
        assert channel.started.wait(10)  # the thread holds "a": the queue is empty again
        with caplog.at_level(logging.WARNING, logger="ctcovid.node.alerts"):
            results = [sink.submit(Alert(k, "event", k)) for k in ("b", "c", "d", "e")]
        assert results == [True, True, False, False]
        assert sink.dropped == 2
        assert caplog.text.count("event=alert_dropped") == 2
        assert "key=e" in caplog.text and "dropped_total=2" in caplog.text
        channel.release.set()
        wait_for(lambda: sink.pending() == 0, 10, "the queue to drain")
    finally:
        channel.release.set()
        sink.close(5)
    assert channel.delivered == ["a", "b", "c"]


def test_a_failing_channel_is_logged_and_does_not_stop_the_others(
    webhook, caplog: pytest.LogCaptureFixture
):
    url, posts = webhook
    sink = AlertSink(
        [SmtpChannel("127.0.0.1", free_port(), ("it@example.org",), timeout=2),
         WebhookChannel(url, opener=NO_PROXY)],
        node="N",
    )
    with caplog.at_level(logging.ERROR, logger="ctcovid.node.alerts"):
        sink.submit(Alert("disk", "firing", "x"))
        sink.close(10)
    assert (sink.failed, sink.delivered, len(posts)) == (1, 1, 1)
    assert "event=alert_failed channel=smtp key=disk" in caplog.text
    assert "SECRET" not in caplog.text  # the webhook's URL is never logged


def test_mail_goes_over_starttls_with_credentials_only_when_offered(tmp_path: Path):
    """Credentials (from the environment) are sent after STARTTLS, the server's certificate
    verified; a server that offers no STARTTLS gets no mail and no password."""
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword
    from node_helpers import make_test_ca

    pki = make_test_ca(tmp_path / "pki")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki["cert"], pki["key"])
    logins: list[tuple[bytes, bytes, bool]] = []
    mails: list[str] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            mails.append(envelope.content.decode("utf-8", "replace"))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, data) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password, session.ssl is not None))
        return AuthResult(success=data.password == b"s3cret")

    servers = []
    for tls in (server_tls, None):
        port = free_port()
        controller = Controller(
            Handler(), hostname="127.0.0.1", port=port, server_hostname="localhost",
            tls_context=tls, require_starttls=tls is not None, authenticator=authenticator,
            auth_require_tls=False,
        )
        controller.start()
        servers.append((controller, port))
    client_tls = ssl.create_default_context(cafile=str(pki["ca"]))  # host name checked too
    try:
        channels = [
            SmtpChannel("127.0.0.1", port, ("it@example.org",), ssl_context=client_tls,
                        credentials=("ctcovid", "s3cret"), timeout=10)
            for _, port in servers
        ]
        channels[0].deliver(Alert("disk", "firing", "Free disk under the floor"), "N")
        with pytest.raises(Exception, match="no STARTTLS"):
            channels[1].deliver(Alert("disk", "firing", "Free disk under the floor"), "N")
    finally:
        for controller, _ in servers:
            controller.stop()
    assert logins == [(b"ctcovid", b"s3cret", True)]
    assert len(mails) == 1 and "Subject: [ctcovid N] ALERT: Free disk under the floor" in mails[0]


def test_smtp_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    from ctcovid.node.alerts import SMTP_AUTH_ENV
    from ctcovid.node.config import NodeConfig

    base = {"store": "s", "alert_smtp": "mx:587", "alert_to": ["a@example.org"]}
    monkeypatch.setenv(SMTP_AUTH_ENV, "ctcovid:pa:ss")
    alert = NodeConfig.from_dict(base).alert_settings()
    assert alert is not None and alert.smtp_auth == ("ctcovid", "pa:ss")
    assert "pa:ss" not in repr(alert)
    monkeypatch.setenv(SMTP_AUTH_ENV, "no-password")
    with pytest.raises(ConfigError, match="USER:PASSWORD"):
        NodeConfig.from_dict(base)


# -- settings -----------------------------------------------------------------------------------


def test_alert_settings_from_toml_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from ctcovid.node.alerts import SMTP_AUTH_ENV
    from ctcovid.node.config import load_config

    monkeypatch.delenv(SMTP_AUTH_ENV, raising=False)
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[node]\nstore = "s"\nalert_webhook = "https://hooks.example.org/services/T/B/X"\n'
        'alert_smtp = "mail.example.org:587"\nalert_to = ["a@example.org", "b@example.org"]\n'
        'alert_after_minutes = 30\nalert_positive = true\n'
    )
    config = load_config(toml, {"alert_from": "node@example.org"})
    alert = config.alert_settings()
    assert alert == AlertSettings(
        webhook="https://hooks.example.org/services/T/B/X", smtp_host="mail.example.org",
        smtp_port=587, to=("a@example.org", "b@example.org"), sender="node@example.org",
        after_minutes=30.0, positive=True,
    )
    # The worker gets the settings as plain values and back.
    from ctcovid.node.config import NodeConfig

    assert NodeConfig.from_dict(config.to_dict()).alert_settings() == alert
    assert load_config(None, {"store": "s", "alert_to": None}).alert_settings() is None
    one = load_config(None, {"store": "s", "alert_smtp": "mx", "alert_to": "x@example.org"})
    assert one.alert_settings() == AlertSettings(smtp_host="mx", to=("x@example.org",))


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"alert_webhook": "ftp://x/y"}, "alert_webhook must be an http"),
        ({"alert_smtp": "mx:25"}, "alert_smtp needs alert_to"),
        ({"alert_smtp": "mx:port", "alert_to": ["a@b"]}, "HOST:PORT"),
        ({"alert_to": ["a@b"]}, "need alert_smtp"),
        ({"alert_smtp": "mx:25", "alert_to": ["a@b\r\nBcc: c@d"]}, "not an e-mail address"),
        ({"alert_positive": True}, "alert_positive needs"),
        ({"alert_webhook": "http://h/x", "alert_after_minutes": 0}, "must be positive"),
    ],
)
def test_bad_alert_settings_fail_at_start(settings_: dict[str, Any], message: str):
    from ctcovid.node.config import NodeConfig

    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_dict({"store": "s", **settings_})


def test_the_webhook_url_is_never_echoed():
    from ctcovid.node.config import NodeConfig

    with pytest.raises(ConfigError) as caught:
        NodeConfig.from_dict({"store": "s", "alert_webhook": "hooks.example.org/SECRET"})
    assert "SECRET" not in str(caught.value)
    assert "SECRET" not in repr(WebhookChannel("https://h.example.org/SECRET"))


def test_listen_offers_the_alert_flags():
    from typer.testing import CliRunner

    from ctcovid.cli.main import app

    result = CliRunner().invoke(app, ["listen", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--alert-webhook", "--alert-smtp", "--alert-to", "--alert-from",
                 "--alert-after", "--alert-positive"):
        assert flag in result.output


# -- the node: alerts wired into its loop (a stand-in worker, no model) -------------------------


def _stand_in_worker(stop, heartbeat) -> None:
    """Beats until the node asks it to stop, then exits 0, as the real worker does."""
    while not stop.wait(0.1):
        heartbeat.value = time.monotonic()


def test_node_announces_a_refusal_burst_and_stops_without_an_alert(
    tmp_path: Path, webhook, monkeypatch: pytest.MonkeyPatch
):
    import signal

    from ctcovid.node import alerts, service
    from ctcovid.node.config import NodeConfig
    from ctcovid.node.service import Node

    url, posts = webhook
    monkeypatch.setattr(alerts, "CHECK_SECONDS", 0.25)
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # the node's own channel: loopback, no proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    def start_worker(node: Node, heartbeat: Any) -> Any:
        process = node._mp.Process(
            target=_stand_in_worker, args=(node._worker_stop, heartbeat), daemon=True
        )
        process.start()
        return process

    monkeypatch.setattr(Node, "_check_model", lambda node: None)
    monkeypatch.setattr(Node, "_start_worker", start_worker)
    monkeypatch.setattr(service, "WORKER_STOP_SECONDS", 30.0)
    config = NodeConfig(
        store=tmp_path / "store", host="127.0.0.1", port=0, allow_aet=("PACS",),
        min_free_mb=0, alert_webhook=url,
    )
    node = Node(config)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stopper = threading.Thread(target=_refuse_then_stop, args=(node, posts), daemon=True)
    stopper.start()
    try:
        # The node installs signal handlers, which only the main thread may: it runs here.
        code = node.run()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    stopper.join(30)
    assert code == 0
    texts = [p["text"] for p in posts]
    assert len(texts) == 1, texts  # the burst; the worker stopping with the node is no alert
    assert "ALERT: 20 associations refused in the last 60 s" in texts[0]
    assert "calling_aet_not_allowed=20" in texts[0]


def _refuse_then_stop(node: Any, posts: list[dict[str, Any]]) -> None:
    from node_helpers import associate_rq_pdu, recv_exactly

    try:
        wait_for(lambda: node.listener is not None and node.listener.server is not None, 30,
                 "the listener")
        port = node.listener.port
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(associate_rq_pdu(calling="INTRUDER"))
                assert recv_exactly(sock, 6)[0] == 0x03  # A-ASSOCIATE-RJ
        wait_for(lambda: posts, 30, "the refusal alert")
        time.sleep(1.0)  # a few more checks: nothing else to say
    finally:
        node.request_stop()
