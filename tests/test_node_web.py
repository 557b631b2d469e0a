"""The node's HTTP server: page, JSON API, probes, metrics, PHI and access rules.

In-process (Starlette's test client) over a real store filled by the store's own methods, no
model; one test drives a running node (listener, worker with the tiny model, HTTP server) with
storescu, Orthanc as its peer and a real headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import free_port, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctcovid.errors import ConfigError
from ctcovid.node.config import NodeConfig
from ctcovid.node.health import DestinationProbe
from ctcovid.node.jobs import CLASSIFIED, FAILED
from ctcovid.node.store import Store

pytest.importorskip("starlette")
pytest.importorskip("jinja2")
pytest.importorskip("uvicorn")

from starlette.testclient import TestClient

from ctcovid.node.web import WebContext, WebServer, create_app

PATIENT_NAME = "SENTINEL^PATIENTNAME"
PATIENT_ID = "SENTINEL-PID-4711"
BIRTH_DATE = "19450102"
MODEL = {"name": "tiny", "version": "0.1.0", "sha256": "ab" * 32, "runtime": "keras",
         "threshold": 0.5}
SLICES = [0.1, 0.5, 0.9, 0.95, 0.8]


def instance_bytes(study: str, series: str, accession: str) -> tuple[str, bytes]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.AccessionNumber, ds.Modality = accession, "CT"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return sop, buffer.getvalue()


def receive(store: Store, accession: str, n: int = 3) -> tuple[str, str]:
    study, series = generate_uid(), generate_uid()
    for _ in range(n):
        sop, data = instance_bytes(study, series, accession)
        store.put_instance(data, study_instance_uid=study, series_instance_uid=series,
                           sop_instance_uid=sop, sop_class_uid=CTImageStorage,
                           accession_number=accession)
    return study, series


def classify(store: Store, probability: float, label: str) -> Any:
    """What the worker does with the next waiting series: an SR file and the result."""
    store.jobs.promote_stable(0)
    record = store.jobs.claim_next()
    sr_uid = generate_uid()
    sr_path = store.files.sr_path(record.series_instance_uid, sr_uid)
    store.files.write_file(sr_path, b"not really an SR")
    assert store.finish_classified(record, revision=1, sr_path=sr_path,
                                   sr_sop_instance_uid=sr_uid, probability_covid=probability,
                                   label=label, classify_seconds=1.0)
    store.jobs.note_slice_probabilities(record, SLICES)
    store.files.write_heatmaps(record.study_instance_uid, record.series_instance_uid,
                               [heatmap_png(p) for p in sorted(SLICES, reverse=True)[:3]])
    return store.jobs.get(record.series_instance_uid, record.study_instance_uid)


def heatmap_png(probability: float) -> bytes:
    """A key-slice heatmap as the worker makes one: a CAM blended over a grey slice."""
    import numpy as np

    from ctcovid.report import overlay_rgb, png_bytes

    grey = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    return png_bytes(overlay_rgb(grey, np.full((2, 2), probability, np.float32)))


@pytest.fixture
def filled(tmp_path: Path) -> dict[str, Any]:
    """Three series: classified (ACC-OK), failed sending (ACC-FAIL), still arriving (ACC-NEW)."""
    store = Store(tmp_path / "store")
    ok = receive(store, "ACC-OK")
    classify(store, 0.87, "covid")
    failed = receive(store, "ACC-FAIL")
    record = classify(store, 0.12, "non-covid")
    store.jobs.mark_send_failed(record, "association with PACS rejected", retry_seconds=1,
                                max_retry_seconds=1, max_attempts=1)
    new = receive(store, "ACC-NEW", n=1)
    yield {"store": store, "ok": ok, "failed": failed, "new": new, "root": tmp_path / "store"}
    store.close()


def context(filled: dict[str, Any], **settings: Any) -> WebContext:
    config = NodeConfig(store=filled["root"], http_port=0, min_free_mb=0, **settings)
    return WebContext(config=config, store=filled["store"], model=MODEL,
                      heartbeat=time.monotonic,
                      destination=DestinationProbe(config, interval_seconds=0))


def client(ctx: WebContext, **kwargs: Any) -> TestClient:
    return TestClient(create_app(ctx, csrf_token="the-token", **kwargs),
                      base_url="http://127.0.0.1")


def test_api_lists_series_newest_first_filters_and_shows_one_with_history(filled) -> None:
    web = client(context(filled))

    listing = web.get("/api/series").json()
    one = web.get("/api/series/{}/{}".format(*filled["ok"])).json()

    assert listing["total"] == 3
    assert [s["accession_number"] for s in listing["series"]] == ["ACC-NEW", "ACC-FAIL", "ACC-OK"]
    first = listing["series"][2]
    assert set(first) == {"study_instance_uid", "series_instance_uid", "accession_number",
                          "state", "reason", "rule", "received", "updated", "instances",
                          "probability_covid", "label", "sr_instance_uid", "attempts"}
    assert (first["state"], first["probability_covid"], first["label"]) == (
        "classified", 0.87, "covid")
    assert first["instances"] == 3 and first["sr_instance_uid"]
    failed = web.get("/api/series?state=failed").json()
    assert failed["total"] == 1 and "rejected" in failed["series"][0]["reason"]
    assert web.get("/api/series?accession=FAIL").json()["total"] == 1
    page = web.get("/api/series?limit=1&offset=1").json()
    assert page["total"] == 3 and [s["accession_number"] for s in page["series"]] == ["ACC-FAIL"]
    assert web.get("/api/series?state=bogus").status_code == 400
    assert one["slice_probabilities"] == SLICES
    assert [h["state"] for h in one["history"]] == ["received", "waiting", "classifying",
                                                     "classified"]
    assert web.get("/api/series/1.2.3/4.5.6").status_code == 404
    assert web.get("/api/series/x/y").status_code == 404


def test_page_shows_node_model_counts_results_failures_and_a_series(filled) -> None:
    web = client(context(filled, allow_aet=("PACS",)))

    html = web.get("/").text
    detail = web.get("/series/{}/{}".format(*filled["ok"]))
    search = web.get("/?accession=ACC-OK").text

    assert "CTCOVID" in html and "PACS" in html and "TLS off" in html
    assert "tiny 0.1.0" in html and "0.870" in html and "covid" in html
    assert "association with PACS rejected" in html and 'class="retry"' in html
    assert 'http-equiv="refresh"' in html and "<script" not in html
    assert "classified</a> 1" in html and "failed</a> 1" in html
    assert "ACC-OK" in search and "ACC-NEW" not in search
    assert detail.status_code == 200 and "<svg" in detail.text and "<polyline" in detail.text
    assert "classifying" in detail.text  # the history
    assert web.get("/series/1.2.3/4.5.6").status_code == 404
    assert "default-src 'none'" in web.get("/").headers["content-security-policy"]


def test_status_and_series_show_every_destination_and_its_delivery(tmp_path: Path) -> None:
    """The RIS and the named destinations are on the status page and in /api/status; a
    series shows its delivery to each, with its own state and attempts."""
    store = Store(tmp_path / "store")
    try:
        study, series = receive(store, "ACC-DEST")
        store.jobs.promote_stable(0)
        record = store.jobs.claim_next()
        sr_uid = generate_uid()
        sr_path = store.files.sr_path(record.series_instance_uid, sr_uid)
        store.files.write_file(sr_path, b"not really an SR")
        assert store.finish_classified(
            record, revision=1, sr_path=sr_path, sr_sop_instance_uid=sr_uid,
            probability_covid=0.9, label="covid", classify_seconds=1.0,
            deliveries=(("ris", "hl7"), ("research", "dicom")))
        (ris,) = [d for d in store.jobs.deliveries() if d.destination == "ris"]
        store.jobs.mark_delivery_failed(ris, "AR: unknown patient", retry_seconds=1,
                                        max_retry_seconds=1, max_attempts=1, permanent=True)
        config = NodeConfig(store=tmp_path / "store", http_port=0, min_free_mb=0,
                            hl7="127.0.0.1:2575",
                            destination={"research": {"kind": "dicom",
                                                      "peer": "127.0.0.1:11112:RESEARCH"}})
        web = client(WebContext(config=config, store=store, model=MODEL,
                                heartbeat=time.monotonic,
                                destination=DestinationProbe(config, interval_seconds=0)))
        status = web.get("/api/status").json()
        assert status["node"]["destinations"] == [
            {"name": "ris", "kind": "hl7", "address": "127.0.0.1:2575"},
            {"name": "research", "kind": "dicom", "address": "127.0.0.1:11112:RESEARCH"},
        ]
        page = web.get("/").text
        assert "Also to:" in page and "research</code> (dicom, 127.0.0.1:11112:RESEARCH)" in page
        one = web.get(f"/api/series/{study}/{series}").json()
        shown = {d["destination"]: d for d in one["deliveries"]}
        assert set(shown) == {"ris", "research"}
        assert (shown["ris"]["kind"], shown["ris"]["state"], shown["ris"]["attempts"]) == (
            "hl7", "failed", 1)
        assert "unknown patient" in shown["ris"]["reason"]
        assert (shown["research"]["kind"], shown["research"]["state"]) == ("dicom", "pending")
        assert all(d["revision"] == 1 for d in shown.values())
        detail = web.get(f"/series/{study}/{series}").text
        assert 'id="deliveries"' in detail and "unknown patient" in detail
    finally:
        store.close()


def test_page_draws_series_received_and_classified_per_hour_today(filled) -> None:
    jobs = filled["store"].jobs
    # The fixture's three series arrived within the last minute; two were classified.
    assert jobs.per_hour(time.time() - 60, hours=1) == {
        "received": [3], "classified": [2], "sent": [0]}
    assert jobs.per_hour(time.time() + 1, hours=1)["received"] == [0]
    html = client(context(filled)).get("/").text
    assert 'class="hourly"' in html
    assert ":00 received 3</title>" in html and ":00 classified 2</title>" in html


def test_series_page_shows_its_key_slice_heatmaps_served_as_png_by_checked_uids(
    filled, tmp_path: Path
) -> None:
    from PIL import Image

    study, series = filled["ok"]
    web = client(context(filled))
    page = web.get(f"/series/{study}/{series}").text
    api = web.get(f"/api/series/{study}/{series}").json()
    first = web.get(f"/series/{study}/{series}/heatmap/1.png")

    urls = [f"/series/{study}/{series}/heatmap/{n}.png" for n in (1, 2, 3)]
    assert api["heatmaps"] == urls and all(f'<img src="{url}"' in page for url in urls)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content == filled["store"].files.heatmap_path(study, series, 1).read_bytes()
    image = Image.open(io.BytesIO(first.content))
    assert image.size == (32, 32) and not image.text  # pixels only: no text chunk
    new_study, new_series = filled["new"]
    assert "No heatmaps yet" in web.get(f"/series/{new_study}/{new_series}").text
    for path in (f"/series/{study}/{series}/heatmap/4.png",  # only three key slices
                 f"/series/{study}/{series}/heatmap/0.png",
                 f"/series/{study}/{series}/heatmap/99999999999999999999.png",
                 f"/series/{new_study}/{new_series}/heatmap/1.png",
                 f"/series/{study}/1.2.3/heatmap/1.png",  # no such series
                 f"/series/{study}/{series}x/heatmap/1.png",
                 f"/series/{study}/..%2F..%2Fsr/heatmap/1.png",
                 f"/series/{study}/{series}/heatmap/..%2F..%2F..%2Fnode.sqlite"):
        assert web.get(path).status_code == 404, path
    # The same access rules as the page: with credentials configured, none: no image.
    from ctcovid.node.webauth import token_line

    secret, line = token_line("ci")
    (tmp_path / "users").write_text(line + "\n")
    guarded = client(context(filled, http_auth_file=tmp_path / "users"))
    url = f"/series/{study}/{series}/heatmap/1.png"
    assert guarded.get(url).status_code == 401
    assert guarded.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 200


def test_no_patient_name_id_or_birth_date_unless_show_phi(filled) -> None:
    paths = ["/", "/api/series", "/api/status", "/api/series/{}/{}".format(*filled["ok"]),
             "/series/{}/{}".format(*filled["ok"])]
    from ctcovid.node.metrics import Metrics
    from ctcovid.node.scp import ReceiveStats

    hidden_ctx = context(filled)
    hidden_ctx.metrics = Metrics(None, "127.0.0.1", filled["store"], ReceiveStats())
    hidden = client(hidden_ctx)
    shown = client(context(filled, http_show_phi=True))

    for path in ("/healthz", "/readyz", "/metrics", "/series/{}/{}/heatmap/1.png".format(
            *filled["ok"])):
        answer = hidden.get(path)
        assert answer.status_code == 200, path
        assert PATIENT_NAME.encode() not in answer.content, path
        assert PATIENT_ID.encode() not in answer.content, path
    for path in paths:
        text = hidden.get(path).text
        assert PATIENT_NAME not in text and PATIENT_ID not in text and BIRTH_DATE not in text
        assert "ACC-" in text or path == "/api/status"
    assert PATIENT_NAME in shown.get("/").text and PATIENT_ID in shown.get("/").text
    api = shown.get("/api/series/{}/{}".format(*filled["ok"])).json()
    assert api["patient"] == {"name": PATIENT_NAME, "id": PATIENT_ID, "birth_date": BIRTH_DATE}


def test_retry_needs_the_csrf_token_and_takes_the_queue_path(filled) -> None:
    web = client(context(filled))
    study, series = filled["failed"]
    url = f"/api/series/{study}/{series}/retry"

    refused = web.post(url)
    wrong = web.post(url, headers={"X-CSRF-Token": "guess"})
    assert (refused.status_code, wrong.status_code) == (403, 403)
    assert filled["store"].jobs.get(series, study).state == FAILED
    accepted = web.post(url, headers={"X-CSRF-Token": "the-token"})
    assert accepted.status_code == 200 and accepted.json() == {"requeued": [series]}
    assert filled["store"].jobs.get(series, study).state == CLASSIFIED  # its SR is resent
    assert web.post(url, headers={"X-CSRF-Token": "the-token"}).status_code == 409
    # The page's form: token in the body, answered with a redirect to the page.
    form = web.post(f"/series/{study}/{series}/retry", data={"csrf_token": "nope"},
                    follow_redirects=False)
    assert form.status_code == 403


def test_readyz_names_the_failing_check_and_recovers(filled) -> None:
    from pynetdicom import AE

    pacs_port = free_port()
    ctx = context(filled, peer=f"127.0.0.1:{pacs_port}:PACS")
    beat = {"value": time.monotonic()}
    ctx.heartbeat = lambda: beat["value"]
    web = client(ctx)

    down = web.get("/readyz")
    assert down.status_code == 503 and down.json()["ready"] is False
    checks = down.json()["checks"]
    assert set(checks) == {"database", "disk", "worker", "destination", "model"}
    assert not checks["destination"]["ok"] and "PACS" in checks["destination"]["detail"]
    assert all(checks[name]["ok"] for name in ("database", "disk", "worker", "model"))
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context("1.2.840.10008.1.1")
    server = pacs.start_server(("127.0.0.1", pacs_port), block=False)
    try:
        assert web.get("/readyz").status_code == 200
        filled["store"].min_free_bytes = shutil.disk_usage(filled["root"]).free * 2
        disk = web.get("/readyz")
        assert disk.status_code == 503 and not disk.json()["checks"]["disk"]["ok"]
        assert "below floor" in disk.json()["checks"]["disk"]["detail"]
        filled["store"].min_free_bytes = 0
        beat["value"] = time.monotonic() - ctx.config.worker_stall_seconds - 5
        stale = web.get("/readyz")
        assert stale.status_code == 503 and "stale" in stale.json()["checks"]["worker"]["detail"]
        beat["value"] = time.monotonic()
        assert web.get("/readyz").status_code == 200
    finally:
        server.shutdown()
    assert web.get("/healthz").json() == {"status": "ok"}


def test_destination_is_asked_at_most_once_a_minute(filled) -> None:
    asked: list[float] = []
    config = NodeConfig(store=filled["root"], peer="127.0.0.1:1:PACS")
    probe = DestinationProbe(config, ask=lambda c: asked.append(time.time()))

    assert probe.check().ok and probe.check().ok and len(asked) == 1


def test_stow_destination_is_reachable_unless_it_refuses_our_credentials(tmp_path) -> None:
    pytest.importorskip("requests")
    import http.server
    import threading

    status = {"code": 200}

    class Service(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Service)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    config = NodeConfig(store=tmp_path / "s", stow=f"http://127.0.0.1:{httpd.server_port}/dicom-web")
    probe = DestinationProbe(config, interval_seconds=0)
    try:
        reachable = probe.check()
        status["code"] = 401
        refused = probe.check()
    finally:
        httpd.shutdown()
        httpd.server_close()
    gone = probe.check()

    assert reachable.ok and "stow-rs" in reachable.detail
    assert not refused.ok and "HTTP 401" in refused.detail
    assert not gone.ok


def test_metrics_are_served_at_slash_metrics(filled) -> None:
    pytest.importorskip("prometheus_client")
    from ctcovid.node.metrics import Metrics
    from ctcovid.node.scp import ReceiveStats

    ctx = context(filled)
    ctx.metrics = Metrics(None, "127.0.0.1", filled["store"], ReceiveStats())
    ctx.metrics.observe("classify_seconds", 2.0)

    text = client(ctx).get("/metrics").text

    assert 'ctcovid_jobs{state="failed"} 1.0' in text
    assert "ctcovid_classify_seconds_count 1.0" in text


def test_loopback_only_names_and_non_loopback_needs_tls_and_credentials(filled, tmp_path) -> None:
    web = client(context(filled))
    assert web.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400

    with pytest.raises(ConfigError, match="--http-tls-cert and --http-tls-key and "
                                          "--http-auth-file"):
        NodeConfig(store=tmp_path / "s", http_port=8080, http_host="0.0.0.0")
    auth = tmp_path / "users"
    auth.write_text("user a scrypt$1$1$1$AA==$AA==\n")
    with pytest.raises(ConfigError, match="--http-tls-cert"):
        NodeConfig(store=tmp_path / "s", http_port=8080, http_host="0.0.0.0",
                   http_auth_file=auth)
    # The deprecated flag is an alias of --http-port.
    assert NodeConfig(store=tmp_path / "s", metrics_port=9108).http_port == 9108


def test_credentials_basic_and_bearer_failures_counted_logged_and_slowed(
    filled, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    from ctcovid.node.webauth import Credentials, LoginGuard, hash_password, token_line

    token, line = token_line("script")
    auth = tmp_path / "users"
    auth.write_text(f"# node users\nuser alice {hash_password('correct horse')}\n{line}\n")
    credentials = Credentials.load(auth)
    ctx = context(filled, http_auth_file=auth)
    web = client(ctx, credentials=credentials)

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode())
                .decode()}

    assert web.get("/api/series").status_code == 401
    assert web.get("/readyz").status_code == 200  # probes stay open
    assert web.get("/api/series", headers=basic("alice", "correct horse")).status_code == 200
    with caplog.at_level(logging.WARNING, logger="ctcovid.node.webauth"):
        started = time.monotonic()
        assert web.get("/", headers=basic("alice", "wrong-secret-1")).status_code == 401
        assert web.get("/", headers=basic("alice", "wrong-secret-2")).status_code == 401
        slowed = time.monotonic() - started
    assert slowed >= 0.5 + 1.0 - 0.05  # 0.5 s after the first failure, 1 s after the second
    log = caplog.text
    assert "event=http_login_failed user=alice" in log and "wrong-secret" not in log
    study, series = filled["failed"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert web.post(f"/api/series/{study}/{series}/retry", headers=bearer).status_code == 200
    assert web.post(f"/api/series/{study}/{series}/retry",
                    headers=basic("alice", "correct horse")).status_code == 403  # no CSRF
    guard = LoginGuard(credentials)
    assert guard.authenticate("Bearer nope", "10.0.0.1") is None and guard.failures_total == 1


def test_a_failing_request_is_answered_500_and_the_server_goes_on(
    filled, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(filled)
    web = TestClient(create_app(ctx), base_url="http://127.0.0.1", raise_server_exceptions=False)

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("database gone")

    monkeypatch.setattr(ctx.store.jobs, "page", broken)

    assert web.get("/api/series").status_code == 500
    assert web.get("/healthz").status_code == 200
    assert web.get("/readyz").status_code == 200


def test_https_with_credentials_beyond_loopback_settings(filled, tmp_path) -> None:
    """The settings a non-loopback address needs (TLS and credentials), served on loopback."""
    import ssl

    from node_helpers import make_test_ca

    from ctcovid.node.webauth import hash_password

    pki = make_test_ca(tmp_path / "pki")
    auth = tmp_path / "users"
    auth.write_text(f"user alice {hash_password('correct horse')}\n")
    NodeConfig(store=filled["root"], http_port=0, http_host="0.0.0.0", http_tls_cert=pki["cert"],
               http_tls_key=pki["key"], http_auth_file=auth)  # accepted
    ctx = context(filled, http_tls_cert=pki["cert"], http_tls_key=pki["key"],
                  http_auth_file=auth)
    server = WebServer(ctx)
    server.start()
    https = ssl.create_default_context(cafile=str(pki["ca"]))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=https))
    url = f"https://127.0.0.1:{server.port}/api/series"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(url, timeout=10)
        request = urllib.request.Request(url, headers={
            "Authorization": "Basic " + base64.b64encode(b"alice:correct horse").decode()})
        with opener.open(request, timeout=10) as response:
            listing = json.loads(response.read())
    finally:
        server.stop()
    assert refused.value.code == 401
    assert listing["total"] == 3


def test_200_page_loads_and_slow_clients_neither_stop_receiving_nor_classifying(
    filled, tmp_path: Path, tiny_classifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 clients loading the page at once and 64 connections that never finish their
    headers, while storescu sends a series of 100 instances to the listener and a worker
    classifies: all 100 are received and the series classified; the server answers beyond
    ``MAX_CONNECTIONS`` with 503 at once, serves every client in the end and cuts the slow
    connections."""
    import random
    import socket
    import threading

    from node_helpers import closed_by_peer, storescu

    import dicom_fixtures
    from ctcovid.node.scp import Listener
    from ctcovid.node.web import MAX_CONNECTIONS
    from ctcovid.node.worker import Worker
    from ctcovid.scans import KEY_SLICES

    monkeypatch.setattr("ctcovid.node.web.HEADER_SECONDS", 2.0)
    dicom_fixtures.generate_studies(tmp_path / "big", 1, seed=3, n_slices=100, size=64)
    files = sorted((tmp_path / "big" / "study_000" / "ct").iterdir())
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    config = NodeConfig(store=filled["root"], host="127.0.0.1", port=0, min_free_mb=0,
                        stable_seconds=1, poll_seconds=0.2, decoder_memory_mb=0)
    server = WebServer(context(filled))
    listener = Listener(config, Store(filled["root"]))
    worker = Worker(config, Store(filled["root"]), tiny_classifier)
    slow: list[socket.socket] = []
    stop, stop_worker = threading.Event(), threading.Event()
    answers: list[int] = []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = f"http://127.0.0.1:{server.port}"

    def load_page() -> None:
        """Load the page once; a 503 (server full) is tried again shortly, as a browser would."""
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                with opener.open(base + "/", timeout=10) as response:
                    response.read()
                    answers.append(response.status)
                    return
            except urllib.error.HTTPError as exc:
                answers.append(exc.code)
            except OSError:
                answers.append(0)
            time.sleep(random.uniform(0.05, 0.3))

    def big_series() -> Any:
        return listener.store.jobs.get(str(source.SeriesInstanceUID),
                                       str(source.StudyInstanceUID))

    clients = [threading.Thread(target=load_page, daemon=True) for _ in range(200)]
    working = threading.Thread(target=worker.run, args=(stop_worker,), daemon=True)
    server.start()
    listener.start()
    working.start()
    try:
        for _ in range(2 * MAX_CONNECTIONS):  # headers started, never finished
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            slow.append(sock)
        for thread in clients:
            thread.start()
        started = time.monotonic()
        sent = storescu(listener.port, files)
        seconds = time.monotonic() - started
        for thread in clients:
            thread.join(100)
        # Headers never finished: the server closes those connections after HEADER_SECONDS.
        cut = [closed_by_peer(sock, 10) for sock in slow]
        assert sent.returncode == 0, sent.stderr
        classified = wait_for(
            lambda: (r := big_series()) is not None and r.state == CLASSIFIED
            and r.n_instances == len(files) and r, 120, "the 100 instances to be classified")
        wait_for(lambda: opener.open(base + "/healthz", timeout=10).status == 200, 15,
                 "the server to serve again")
    finally:
        stop.set()
        stop_worker.set()
        for sock in slow:
            sock.close()
        working.join(60)
        listener.stop(drain_seconds=1)
        server.stop()
        listener.store.close()
        worker.store.close()
    assert len(files) == 100 and classified.probability_covid is not None
    # Decoded in the worker's own process here (decoder_memory_mb=0): heatmaps all the same.
    assert filled["store"].files.heatmap_count(str(source.StudyInstanceUID),
                                               str(source.SeriesInstanceUID)) == KEY_SLICES
    assert seconds < 60  # the send was not held up (about 5 s on 2 busy cores)
    assert answers.count(200) == len(clients)  # every client got its page
    assert set(answers) == {200, 503}  # beyond MAX_CONNECTIONS: answered at once, unserved
    assert all(cut)


# -- a real browser -----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Headless Chromium through the distribution's chromedriver (never a downloaded one)."""
    pytest.importorskip("selenium")
    if CHROMIUM is None or not Path(CHROMEDRIVER).exists():
        pytest.skip("Chromium and its driver are not installed (Debian: chromium "
                    "chromium-driver)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900",
                     f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.network
def test_browser_follows_studies_from_storescu_to_orthanc_through_a_failure_and_a_retry(
    tmp_path: Path, browser: Any, tiny_classifier: Any, tiny_model_dir: Path,
    studies_root: Path,
) -> None:
    """storescu sends a study to a running node (listener, worker, HTTP server over one store):
    the page shows it sent with P(COVID) and its heatmaps load. Orthanc stops: the next study
    ends failed with its reason on the page. Orthanc starts again: Retry in the browser sends
    the SR (Orthanc's REST API has it) and the page shows the series sent."""
    import threading

    from node_helpers import Orthanc, storescu, study_of_instance_in_orthanc
    from selenium.webdriver.common.by import By

    from ctcovid.node.health import model_summary
    from ctcovid.node.scp import Listener
    from ctcovid.node.worker import Worker

    orthanc = Orthanc(tmp_path / "orthanc", free_port())
    config = NodeConfig(
        store=tmp_path / "store", host="127.0.0.1", port=0, http_port=0, min_free_mb=0,
        model=tiny_model_dir, peer=f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}",
        stable_seconds=1, poll_seconds=0.2, max_attempts=1, retry_seconds=1,
    )
    listener = Listener(config, Store(config.store))
    worker = Worker(config, Store(config.store), tiny_classifier)
    server = WebServer(WebContext(config=config, store=Store(config.store),
                                  model=model_summary(config), heartbeat=time.monotonic,
                                  dicom_port=lambda: listener.port))
    stop = threading.Event()
    working = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    api = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = f"http://127.0.0.1:{server.port}"

    def series(study: str) -> dict[str, Any] | None:
        with api.open(f"{base}/api/series", timeout=10) as response:
            listing = json.loads(response.read())["series"]
        return next((s for s in listing if s["study_instance_uid"] == study), None)

    def ends(study: str, state: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            found = series(study)
            return found if found is not None and found["state"] == state else None
        return wait_for(reached, 120, f"study {study} to be {state}")

    def send(name: str) -> str:
        files = sorted(p for p in (studies_root / name / "ct").iterdir() if p.is_file())
        assert storescu(listener.port, files).returncode == 0
        return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    listener.start()
    server.start()
    working.start()
    try:
        first = ends(send("study_000"), "sent")
        assert study_of_instance_in_orthanc(orthanc, first["sr_instance_uid"]) == \
            first["study_instance_uid"]
        browser.get(f"{base}/series/{first['study_instance_uid']}/"
                    f"{first['series_instance_uid']}")
        probability = f"{first['probability_covid']:.3f}"
        assert probability in browser.find_element(By.CSS_SELECTOR, "td.probability").text
        widths = browser.execute_script(
            "return Array.from(document.querySelectorAll('figure.heatmap img'), "
            "i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) >= 1 and all(w > 0 for w in widths), widths
        browser.save_screenshot(str(tmp_path / "series-page.png"))

        orthanc.close()
        second = ends(send("study_001"), "failed")
        browser.get(base + "/")
        rows = {r.get_attribute("data-series"): r.text
                for r in browser.find_elements(By.CSS_SELECTOR, "tr.series-row")}
        assert "sent" in rows[first["series_instance_uid"]]
        assert probability in rows[first["series_instance_uid"]]
        failed_row = browser.find_element(By.CSS_SELECTOR, "#failed tr.failed-row")
        assert failed_row.get_attribute("data-series") == second["series_instance_uid"]
        assert second["reason"] and second["reason"] in failed_row.text
        browser.save_screenshot(str(tmp_path / "status-page.png"))

        orthanc = Orthanc(tmp_path / "orthanc", free_port(), dicom_port=orthanc.dicom_port)
        failed_row.find_element(By.CSS_SELECTOR, "button.retry").click()
        wait_for(lambda: "re-queued" in browser.page_source, 15, "the page after Retry")
        resent = ends(second["study_instance_uid"], "sent")
        assert study_of_instance_in_orthanc(orthanc, resent["sr_instance_uid"]) == \
            second["study_instance_uid"]
        browser.get(base + "/")
        row = browser.find_element(
            By.CSS_SELECTOR, f"tr.series-row[data-series='{second['series_instance_uid']}']")
        assert "sent" in row.text
        assert not browser.find_elements(By.CSS_SELECTOR, "#failed tr.failed-row")
        source = pydicom.dcmread(next((studies_root / "study_001" / "ct").iterdir()),
                                 stop_before_pixels=True)
        assert str(source.PatientName) not in browser.page_source
    finally:
        stop.set()
        working.join(60)
        server.stop()
        listener.stop(drain_seconds=1)
        for store in (listener.store, worker.store, server.ctx.store):
            store.close()
        orthanc.close()
    assert (tmp_path / "status-page.png").stat().st_size > 1000


# -- the real node ------------------------------------------------------------------------


@pytest.mark.slow  # about 50 s: the worker loads TensorFlow and the model, twice
@pytest.mark.network
def test_listen_serves_probes_api_and_metrics_on_one_port(
    tmp_path: Path, tiny_model_dir: Path, studies_root: Path
) -> None:
    """``ctcovid listen --http-port 0``: not ready while the worker loads the model, ready
    after; a study sent by storescu shows in the API with its accession number and P(COVID),
    never with the patient's name; the worker process killed, not ready until it is back."""
    import os
    import re
    import signal

    from node_helpers import NodeProcess, storescu

    node = NodeProcess(tmp_path / "store", tiny_model_dir, tmp_path / "node.log", "--port", "0",
                       "--stable-seconds", "1", "--http-port", "0")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(path: str) -> tuple[int, Any]:
        try:
            with opener.open(base + path, timeout=30) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        return status, (json.loads(body) if path != "/metrics" else body.decode())

    try:
        port = wait_for(lambda: re.search(r"event=http_listening host=\S+ port=(\d+)",
                                          node.text()), 30, "the HTTP server")
        base = f"http://127.0.0.1:{port.group(1)}"
        assert get("/healthz") == (200, {"status": "ok"})
        wait_for(lambda: get("/readyz")[0] == 200, 240, "the node to be ready", interval=1.0)
        ready = get("/readyz")[1]
        assert ready["checks"]["model"]["ok"] and "Res-Dense" in ready["checks"]["model"]["detail"]
        files = sorted(p for p in (studies_root / "study_000" / "ct").iterdir() if p.is_file())
        assert storescu(node.port, files).returncode == 0
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        listing = wait_for(lambda: [s for s in get("/api/series?state=classified")[1]["series"]],
                           180, "the series to be classified", interval=1.0)
        status, metrics = get("/metrics")
        page = opener.open(base + "/", timeout=30).read().decode()
        # The worker process killed: not ready, naming the worker, until its restart is ready.
        worker_pid = int(re.findall(r"event=worker_started pid=(\d+)", node.text())[-1])
        os.kill(worker_pid, signal.SIGKILL)
        dead = wait_for(lambda: (r := get("/readyz"))[0] == 503 and r[1], 30,
                        "/readyz to report the killed worker")
        wait_for(lambda: get("/readyz")[0] == 200, 240, "the restarted worker", interval=1.0)
    finally:
        code = node.terminate()
    assert [name for name, check in dead["checks"].items() if not check["ok"]] == ["worker"]
    assert code == 0
    (series,) = listing
    assert series["accession_number"] == str(source.AccessionNumber)
    assert 0.0 <= series["probability_covid"] <= 1.0 and series["instances"] == len(files)
    assert status == 200 and 'ctcovid_jobs{state="classified"} 1.0' in metrics
    assert str(source.PatientName) not in page and str(source.PatientID) not in page
    assert str(source.AccessionNumber) in page


def test_a_store_from_before_gets_the_new_columns_and_history(tmp_path: Path) -> None:
    import sqlite3

    from ctcovid.node.jobs import JobDatabase

    store = Store(tmp_path / "store")
    study, series = receive(store, "ACC-1", n=1)
    store.close()
    conn = sqlite3.connect(tmp_path / "store" / "node.sqlite")
    for statement in ("DROP TRIGGER history_insert", "DROP TRIGGER history_update",
                      "DROP TABLE history", "ALTER TABLE series DROP COLUMN accession_number",
                      "ALTER TABLE series DROP COLUMN slice_probabilities"):
        conn.execute(statement)
    conn.commit()
    conn.close()

    jobs = JobDatabase(tmp_path / "store" / "node.sqlite")
    try:
        record = jobs.get(series, study)
        assert record is not None and record.accession_number == ""
        assert jobs.history(series, study) == []
        jobs.promote_stable(0)
        assert [h["state"] for h in jobs.history(series, study)] == ["waiting"]
    finally:
        jobs.close()


def test_http_credentials_prints_lines_the_server_accepts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctcovid.cli.main import app
    from ctcovid.node.webauth import Credentials, LoginGuard

    runner = CliRunner()
    user = runner.invoke(app, ["http-credentials", "alice"], input="long enough pw\n")
    token = runner.invoke(app, ["http-credentials", "ci", "--token"])
    assert user.exit_code == 0 and token.exit_code == 0, (user.output, token.output)
    secret = token.output.split("(shown once): ")[1].split()[0]
    lines = [line for line in (user.stdout + token.stdout).splitlines()
             if line.startswith(("user ", "token "))]
    (tmp_path / "users").write_text("\n".join(lines) + "\n")
    assert "long enough pw" not in (tmp_path / "users").read_text()

    guard = LoginGuard(Credentials.load(tmp_path / "users"))
    basic = "Basic " + base64.b64encode(b"alice:long enough pw").decode()
    assert guard.authenticate(basic, "127.0.0.1").name == "alice"
    assert guard.authenticate(f"Bearer {secret}", "127.0.0.1").by_token
    assert runner.invoke(app, ["http-credentials", "bob"], input="short\n").exit_code == 1
