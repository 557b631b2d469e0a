"""The listener with real associations: dcmtk and pynetdicom clients, statuses, TLS, the sender.

The listener runs in this process on a free loopback port (it needs no model); every client
is a real DICOM peer. Where memory or signals are measured it runs alone in a child process
(``listener_process.py``), or as the whole ``ctcovid listen``. Hostile peers speak over raw
sockets so that any byte can be sent (``node_helpers.raw_associate`` and friends).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_helpers import (
    NODE_AET,
    ListenerProcess,
    NodeProcess,
    associate_rq_pdu,
    c_store_pdus,
    closed_by_peer,
    echoscu,
    free_port,
    make_test_ca,
    raw_associate,
    raw_c_store,
    release,
    storescu,
    wait_for,
)
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from ctcovid.errors import PacsError
from ctcovid.net.sender import send_file
from ctcovid.net.tls import client_ssl_context
from ctcovid.node.config import NodeConfig, Peer
from ctcovid.node.scp import Listener
from ctcovid.node.store import Store

pytestmark = pytest.mark.network


@pytest.fixture
def start_listener(tmp_path: Path) -> Iterator:
    """Start a listener with the given settings; stopped after the test."""
    started: list[Listener] = []

    def start(**settings: object) -> Listener:
        settings = {"min_free_mb": 0, **settings}
        config = NodeConfig(
            store=tmp_path / "store", host="127.0.0.1", port=0, ae_title=NODE_AET,
            **settings,  # type: ignore[arg-type]
        )
        listener = Listener(config, Store(config.store, min_free_mb=config.min_free_mb))
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop(drain_seconds=5)
        listener.store.close()


def ct_files(studies_root: Path) -> list[Path]:
    return sorted((studies_root / "study_000" / "ct").glob("*.dcm"))


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def scu_store(
    port: int, dataset: pydicom.Dataset | Path, *, sop_class: str = CTImageStorage,
    ssl_context: ssl.SSLContext | None = None,
) -> int | None:
    """C-STORE with pynetdicom; the status, or None when no association/response."""
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    tls = (ssl_context, "localhost") if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, tls_args=tls)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    return int(status.Status) if status and "Status" in status else None


def test_echo_and_store_from_dcmtk_land_in_the_store(start_listener, studies_root: Path):
    listener = start_listener()
    files = ct_files(studies_root)

    echo = echoscu(listener.port)
    store = storescu(listener.port, files)

    assert echo.returncode == 0, echo.stderr
    assert store.returncode == 0, store.stderr
    assert listener.store.jobs.count_instances() == len(files)
    (series,) = listener.store.jobs.list_series()
    assert series.n_instances == len(files) and series.state == "received"
    assert listener.stats.stored == len(files)


def test_calling_aet_outside_the_allow_list_is_rejected_at_association(
    start_listener, studies_root: Path
):
    listener = start_listener(allow_aet=("PACS",))
    files = ct_files(studies_root)[:2]

    allowed = storescu(listener.port, files, calling="PACS")
    refused = storescu(listener.port, files, calling="INTRUDER")
    refused_echo = echoscu(listener.port, calling="INTRUDER")

    assert allowed.returncode == 0, allowed.stderr
    assert refused.returncode != 0
    assert "Rejected" in refused.stderr or "rejected" in refused.stderr.lower()
    assert refused_echo.returncode != 0
    assert listener.store.jobs.count_instances() == 2


def test_mr_image_is_refused_at_association(start_listener, tmp_path: Path):
    import dicom_fixtures
    from dicom_fixtures.identity import make_identity

    listener = start_listener()
    mr = dicom_fixtures.writer.write_mr_series(tmp_path / "mr", make_identity(3, 0), n=1)

    result = storescu(listener.port, mr)
    status = scu_store(listener.port, mr[0], sop_class=MRImageStorage)

    assert result.returncode != 0
    assert "no presentation context" in (result.stderr + result.stdout).lower()
    assert status is None  # pynetdicom finds no accepted context either
    assert listener.store.jobs.count_instances() == 0


@pytest.mark.parametrize("crafted", ["../../etc/ctcovid_escape", "1.2." + "3" * 66])
def test_crafted_sop_instance_uid_writes_nothing(
    start_listener, studies_root: Path, tmp_path: Path, crafted: str
):
    listener = start_listener()
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    ds.SOPInstanceUID = crafted
    ds.file_meta.MediaStorageSOPInstanceUID = crafted
    path = tmp_path / "crafted.dcm"
    ds.save_as(path)
    before = set(files_under(tmp_path.parent))

    # pynetdicom would not even send a 70-character UID; dcmtk sends what the file says.
    result = storescu(listener.port, [path], extra=("-v",))

    assert "Received Store Response (Error: CannotUnderstand)" in result.stderr, result.stderr
    assert listener.store.jobs.count_instances() == 0
    new_files = set(files_under(tmp_path.parent)) - before
    assert all(p.name.startswith("node.sqlite") for p in new_files), new_files
    assert not Path("/etc/ctcovid_escape.dcm").exists()


def test_missing_pixel_data_and_garbage_leave_the_node_answering(
    start_listener, studies_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import pynetdicom._config

    listener = start_listener()
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    del ds.PixelData
    no_pixels = tmp_path / "no_pixels.dcm"
    ds.save_as(no_pixels)
    # Valid file meta followed by bytes that are no data set: noise, and a sequence that never
    # ends (the one kind of garbage pydicom's tolerant reader gives up on).
    good = pydicom.dcmread(ct_files(studies_root)[1])
    buffer = DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, good.file_meta, enforce_standard=True)
    header = b"\0" * 128 + b"DICM" + buffer.getvalue()
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(header + b"\xff\xfe\x07" * 999)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(
        header + b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\x01\x02\x03\x04" * 10
    )

    no_pixels_status = scu_store(listener.port, no_pixels)
    # Send the file's bytes as they are instead of decoding and re-encoding them.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    noise_status = scu_store(listener.port, noise)
    broken_status = scu_store(listener.port, broken)
    echo = echoscu(listener.port)

    assert no_pixels_status == 0xA900
    assert noise_status in (0xA900, 0xC210)  # decodes to nonsense lacking every UID, or not
    assert broken_status == 0xC210
    assert echo.returncode == 0, echo.stderr
    assert listener.store.jobs.count_instances() == 0


def test_free_space_floor_answers_out_of_resources(start_listener, studies_root: Path):
    listener = start_listener(min_free_mb=1e12)  # more than any disk has

    status = scu_store(listener.port, ct_files(studies_root)[0])

    assert status == 0xA700
    assert files_under(listener.store.files.instances_dir) == []


def test_disk_error_answers_out_of_resources(start_listener, studies_root: Path):
    listener = start_listener()
    src = ct_files(studies_root)[0]
    study_uid = pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID
    # A file where the study folder must go: mkdir fails like a broken disk would.
    (listener.store.files.instances_dir / study_uid).write_bytes(b"")

    status = scu_store(listener.port, src)
    echo = echoscu(listener.port)

    assert status == 0xA700
    assert echo.returncode == 0


def test_associations_beyond_the_limit_are_rejected(start_listener):
    listener = start_listener(max_associations=1)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AET)
    try:
        second = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AET)
        assert first.is_established
        assert second.is_rejected
    finally:
        first.release()


def test_tls_listener_accepts_tls_clients_with_our_ca_only(
    start_listener, studies_root: Path, tmp_path: Path
):
    pki = make_test_ca(tmp_path / "pki")
    listener = start_listener(tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"])
    client = client_ssl_context(cert=pki["cert"], key=pki["key"], ca=pki["ca"])
    no_cert = ssl.create_default_context(cafile=str(pki["ca"]))

    assert scu_store(listener.port, ct_files(studies_root)[0], ssl_context=client) == 0
    assert scu_store(listener.port, ct_files(studies_root)[1]) is None  # plain TCP
    assert scu_store(listener.port, ct_files(studies_root)[1], ssl_context=no_cert) is None
    assert listener.store.jobs.count_instances() == 1


@pytest.fixture
def sr_file(tmp_path: Path) -> Path:
    """A small DICOM file of the SR storage class to send (content does not matter here)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = "2.25.1234"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.1", "2.25.2"
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def sr_peer() -> Iterator:
    """A pynetdicom SR storage SCP answering with a chosen status."""
    servers = []

    def start(status: int, ssl_context: ssl.SSLContext | None = None) -> tuple[Peer, list]:
        received: list = []

        def handle(event: evt.Event) -> int:
            received.append(event.dataset.SOPInstanceUID)
            return status

        ae = AE(ae_title="PACS")
        ae.add_supported_context(Comprehensive3DSRStorage)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, ssl_context=ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, handle)],
        )
        servers.append(server)
        return Peer("127.0.0.1", int(server.server_address[1]), "PACS"), received

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB006, 0xB007])
def test_success_and_warning_statuses_count_as_delivered(sr_peer, sr_file: Path, status: int):
    peer, received = sr_peer(status)
    assert send_file(sr_file, peer, calling_ae_title=NODE_AET) == status
    assert received == ["2.25.1234"]


def test_failure_status_and_unreachable_peer_raise_pacs_error(sr_peer, sr_file: Path):
    peer, _ = sr_peer(0xA700)
    with pytest.raises(PacsError, match="0xA700"):
        send_file(sr_file, peer, calling_ae_title=NODE_AET)
    with pytest.raises(PacsError, match="association"):
        send_file(sr_file, Peer("127.0.0.1", free_port(), "PACS"), calling_ae_title=NODE_AET,
                  timeout_seconds=5)


def test_sender_speaks_tls_to_a_tls_peer(sr_peer, sr_file: Path, tmp_path: Path):
    pki = make_test_ca(tmp_path / "pki")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    server_context.load_cert_chain(str(pki["cert"]), str(pki["key"]))
    server_context.verify_mode = ssl.CERT_REQUIRED
    peer, received = sr_peer(0x0000, server_context)
    client = client_ssl_context(cert=pki["cert"], key=pki["key"], ca=pki["ca"])

    status = send_file(sr_file, peer, calling_ae_title=NODE_AET, ssl_context=client)

    assert status == 0 and received == ["2.25.1234"]
    with pytest.raises(PacsError):  # without TLS the TLS peer does not talk to us
        send_file(sr_file, peer, calling_ae_title=NODE_AET, timeout_seconds=5)


def test_metrics_endpoint_reports_instances_jobs_and_latencies(
    start_listener, studies_root: Path
):
    import urllib.request

    pytest.importorskip("prometheus_client")
    from ctcovid.node.metrics import Metrics

    listener = start_listener()
    metrics = Metrics(0, "127.0.0.1", listener.store, listener.stats)
    try:
        storescu(listener.port, ct_files(studies_root)[:3])
        metrics.observe("classify_seconds", 1.5)
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=30) as resp:
            text = resp.read().decode()
    finally:
        metrics.close()

    assert "ctcovid_instances_received_total 3.0" in text
    assert 'ctcovid_jobs{state="received"} 1.0' in text
    assert "ctcovid_classify_seconds_count 1.0" in text
    assert "ctcovid_send_seconds_count 0.0" in text


# -- hostile and broken peers ---------------------------------------------------------------
# Raw sockets speak exactly the bytes an attacker would; the listener runs in a child process
# where its memory is measured (VmHWM, the peak resident set).

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
MEMORY_LIMIT_MB = 512


def encode_dataset(ds: pydicom.Dataset) -> bytes:
    """A data set as a C-STORE carries it: Explicit VR Little Endian, no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.fixture
def listener_process(tmp_path: Path) -> Iterator:
    """Start the listener alone in a child process; killed after the test."""
    started: list[ListenerProcess] = []

    def start(**settings: object) -> ListenerProcess:
        index = len(started)
        process = ListenerProcess(tmp_path / f"store{index}", tmp_path / f"listener{index}.log",
                                  **settings)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def test_raw_c_store_helper_stores_an_instance(start_listener, studies_root: Path):
    listener = start_listener()
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    sock = raw_associate(listener.port, contexts=((CTImageStorage, (EXPLICIT_LE,)),))
    try:
        status = raw_c_store(sock, encode_dataset(ds), sop_class=CTImageStorage,
                             sop_instance=ds.SOPInstanceUID)
    finally:
        release(sock)

    assert status == 0
    assert listener.store.jobs.count_instances() == 1
    assert list(listener.store.files.tmp_dir.iterdir()) == []  # the spool file is gone


def test_deflated_transfer_syntaxes_are_refused_at_association(start_listener):
    listener = start_listener()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [DEFLATED_LE])
    ae.add_requested_context(Verification, [DEFLATED_LE, EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AET)
    try:
        accepted = [(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
    finally:
        assoc.release()

    # Deflate inflates without bound: the CT context is refused, Verification gets Explicit VR.
    assert accepted == [(Verification, EXPLICIT_LE)]


def test_the_node_accepts_exactly_the_syntaxes_the_ingest_decodes(start_listener):
    """One proposed context per transfer syntax pynetdicom knows (46): the CT contexts accepted
    are exactly ctcovid.dicom.DECODABLE_TRANSFER_SYNTAXES, so a sender whose first choice cannot
    be decoded falls back to one that can, instead of storing series that never classify."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    from ctcovid.dicom import DECODABLE_TRANSFER_SYNTAXES

    listener = start_listener()
    accepted: set[str] = set()
    syntaxes = list(ALL_TRANSFER_SYNTAXES)
    for start in range(0, len(syntaxes), 100):  # at most 128 contexts an association
        ae = AE(ae_title="TESTSCU")
        for uid in syntaxes[start : start + 100]:
            ae.add_requested_context(CTImageStorage, [uid])
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AET)
        try:
            accepted |= {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        finally:
            assoc.release()
    assert accepted == {str(uid) for uid in DECODABLE_TRANSFER_SYNTAXES}


@pytest.mark.parametrize("when", ["before association", "after association"])
def test_pdu_longer_than_the_maximum_is_refused_before_it_is_read(listener_process, when: str):
    listener = listener_process()
    if when == "before association":
        sock = socket.create_connection(("127.0.0.1", listener.port), timeout=30)
        header = b"\x01\x00\xff\xff\xff\xff"  # an A-ASSOCIATE-RQ of 4 GiB
    else:
        sock = raw_associate(listener.port)
        header = b"\x04\x00\xff\xff\xff\xff"  # a P-DATA-TF of 4 GiB
    peak_before = listener.peak_rss_mb()
    sent = 0
    try:
        sock.sendall(header)
        chunk = b"\0" * (1 << 20)
        for _ in range(64):  # 64 MiB of the promised 4 GiB
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the listener closed the connection: what it should do
    closed = closed_by_peer(sock, 10)
    sock.close()
    peak_after = listener.peak_rss_mb()
    echo = echoscu(listener.port)

    assert closed
    assert peak_after - peak_before < 16, (peak_before, peak_after, sent)
    assert peak_after < MEMORY_LIMIT_MB
    assert echo.returncode == 0, echo.stderr
    assert "event=association_rejected reason=pdu_too_large" in listener.text()


def big_ct(studies_root: Path, pixel_mb: int) -> pydicom.Dataset:
    """A CT instance of the fixture study with ``pixel_mb`` MiB of (uncompressed) pixel data."""
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    ds.Rows, ds.Columns = 1024, 512 * pixel_mb
    ds.PixelData = bytes(1024 * 1024 * pixel_mb)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{pixel_mb}{ds.Rows}77"
    return ds


def test_large_instances_go_to_disk_and_beyond_the_cap_are_refused(
    listener_process, studies_root: Path
):
    listener = listener_process(max_instance_mb=64)
    baseline = listener.rss_mb()
    sizes_mb = (48, 96)

    statuses = [scu_store(listener.port, big_ct(studies_root, mb)) for mb in sizes_mb]
    peak = listener.peak_rss_mb()
    stored = list((listener.store / "instances").rglob("*.dcm"))
    leftovers = list((listener.store / "tmp").iterdir())

    assert statuses == [0x0000, 0xA700]
    assert len(stored) == 1 and stored[0].stat().st_size > 48 * 1024 * 1024
    assert leftovers == []
    # Held in memory and copied, 48 MiB cost a multiple of itself; mapped from disk, at most once.
    assert peak - baseline < 48 + 16, (baseline, peak)
    assert peak < MEMORY_LIMIT_MB


def test_stalled_peers_lose_their_slot_after_the_network_timeout(start_listener):
    listener = start_listener(max_associations=2, network_timeout_seconds=4)
    stallers = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", listener.port), timeout=30)
        sock.sendall(b"\x01")  # the first byte of an A-ASSOCIATE-RQ, then nothing
        stallers.append(sock)
    # One byte a second keeps a per-read timeout from ever firing; the PDU deadline does.
    trickler = socket.create_connection(("127.0.0.1", listener.port), timeout=30)
    pdu = iter(associate_rq_pdu())
    wait_for(lambda: len(listener.ae.active_associations) >= 4, 10, "4 connections")

    refused = echoscu(listener.port)
    for byte in pdu:
        trickler.sendall(bytes([byte]))
        if closed_by_peer(trickler, 0.5):
            break
    closed = [closed_by_peer(sock, 10) for sock in stallers]
    accepted = echoscu(listener.port)
    for sock in [*stallers, trickler]:
        sock.close()

    assert refused.returncode != 0  # every slot held by a staller
    assert closed == [True, True, True]
    assert next(pdu, None) is not None  # the trickler was cut before it finished its PDU
    assert accepted.returncode == 0, accepted.stderr
    assert listener.stats.rejected.get("peer_stalled", 0) >= 4


def test_stop_returns_promptly_whatever_peers_do(start_listener, studies_root: Path):
    import threading
    import time

    listener = start_listener(network_timeout_seconds=600)
    stallers = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", listener.port), timeout=30)
        sock.sendall(b"\x01")
        stallers.append(sock)
    # A C-STORE cut off after its command and the first part of its data set.
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    half = raw_associate(listener.port, contexts=((CTImageStorage, (EXPLICIT_LE,)),))
    pdus = c_store_pdus(encode_dataset(ds), sop_class=CTImageStorage,
                        sop_instance=ds.SOPInstanceUID, max_pdu=4096)
    for pdu in pdus[: len(pdus) // 2]:
        half.sendall(pdu)
    spool_dir = listener.store.files.tmp_dir
    wait_for(lambda: list(spool_dir.glob("recv-*")), 10, "the spool file of the cut C-STORE")

    started = time.monotonic()
    stopper = threading.Thread(target=listener.stop, kwargs={"drain_seconds": 1}, daemon=True)
    stopper.start()
    stopper.join(15)
    seconds = time.monotonic() - started
    closed = [closed_by_peer(sock, 5) for sock in [*stallers, half]]
    for sock in [*stallers, half]:
        sock.close()

    assert not stopper.is_alive(), "Listener.stop() hung on peers that do not send"
    assert seconds < 10
    assert all(closed)
    assert list(spool_dir.glob("recv-*")) == []


def test_silent_tcp_client_does_not_block_tls_associations(
    start_listener, studies_root: Path, tmp_path: Path
):
    pki = make_test_ca(tmp_path / "pki")
    listener = start_listener(tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"],
                              network_timeout_seconds=20)
    client = client_ssl_context(cert=pki["cert"], key=pki["key"], ca=pki["ca"])
    silent = socket.create_connection(("127.0.0.1", listener.port), timeout=30)

    status = scu_store(listener.port, ct_files(studies_root)[0], ssl_context=client)
    still_waiting = not closed_by_peer(silent, 0.2)
    cut = closed_by_peer(silent, 30)
    silent.close()

    # The store went through while the silent client still held its handshake open.
    assert status == 0 and still_waiting
    assert cut
    assert listener.stats.rejected == {"tls_timeout": 1}


def test_tls_client_certificate_from_another_ca_is_refused_and_counted(
    start_listener, studies_root: Path, tmp_path: Path
):
    pki = make_test_ca(tmp_path / "pki")
    other = make_test_ca(tmp_path / "other")
    listener = start_listener(tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"])
    stranger = ssl.create_default_context(cafile=str(pki["ca"]))  # trusts us, signed elsewhere
    stranger.load_cert_chain(str(other["cert"]), str(other["key"]))

    status = scu_store(listener.port, ct_files(studies_root)[0], ssl_context=stranger)

    assert status is None
    assert listener.store.jobs.count_instances() == 0
    wait_for(lambda: listener.stats.rejected.get("tls_handshake_failed") == 1, 10,
             "the refused handshake to be counted")


def test_rejected_association_is_logged_and_counted(
    start_listener, caplog: pytest.LogCaptureFixture
):
    import urllib.request

    pytest.importorskip("prometheus_client")
    from ctcovid.node.metrics import Metrics

    listener = start_listener(allow_aet=("PACS",))
    metrics = Metrics(0, "127.0.0.1", listener.store, listener.stats)
    try:
        with caplog.at_level("WARNING", logger="ctcovid.node.scp"):
            refused = echoscu(listener.port, calling="INTRUDER")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{metrics.port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    finally:
        metrics.close()

    assert refused.returncode != 0
    (line,) = [r.getMessage() for r in caplog.records if "association_rejected" in r.getMessage()]
    assert "reason=calling_aet_not_allowed" in line
    assert "from=127.0.0.1:" in line and "calling_aet=INTRUDER" in line
    assert 'ctcovid_associations_rejected_total{reason="calling_aet_not_allowed"} 1.0' in text


def swallowing_uid_dataset(ds: pydicom.Dataset) -> bytes:
    """``ds`` encoded with a SOPInstanceUID whose length swallows the elements up to PatientID.

    A UI element longer than it should be makes pydicom's validation warning quote the bytes
    that follow it: here the patient's name and ID.
    """
    ds.PatientName, ds.PatientID = "DOE^JOHN", "PID-4711"
    data = encode_dataset(ds)
    sop_tag = b"\x08\x00\x18\x00UI"
    start = data.index(sop_tag)
    patient_id = data.index(b"PID-4711")
    end = patient_id + len(b"PID-4711")
    length = end - (start + 8)
    return data[:start + 6] + length.to_bytes(2, "little") + data[start + 8:]


def test_library_warnings_never_carry_received_values_into_the_log(
    listener_process, studies_root: Path
):
    listener = listener_process()
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    data = swallowing_uid_dataset(ds)
    assert b"DOE^JOHN" in data

    sock = raw_associate(listener.port, contexts=((CTImageStorage, (EXPLICIT_LE,)),))
    try:
        status = raw_c_store(sock, data, sop_class=CTImageStorage,
                             sop_instance=ds.SOPInstanceUID)
    finally:
        release(sock)
    listener.terminate()
    log = listener.text()

    assert status == 0xC211  # the swallowing SOPInstanceUID is no UID
    assert "event=store_refused status=0xC211" in log
    assert "event=library_message" in log  # pydicom did warn, reduced to what is safe
    assert "DOE" not in log and "PID-4711" not in log


def test_fuzz_campaign_leaves_the_listener_up_bounded_and_truthful(tmp_path: Path):
    """About 200 malformed and edge-case C-STOREs (see tests/fuzz_node.py; ``make fuzz``)."""
    from fuzz_node import run_campaign

    report = run_campaign(tmp_path / "fuzz", count=200, seed=0, time_limit_s=240)

    assert report.problems == [], report.summary()
    assert report.sent == 200 and not report.notes
    # The campaign reached both sides: instances stored and every kind of refusal.
    assert report.statuses["0x0000"] > 20
    assert {"0xA900", "0xC210", "0xC211"} <= set(report.statuses)


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_node_exits_within_10_seconds_of_sigterm_whatever_peers_do(
    tmp_path: Path, tiny_model_dir: Path, studies_root: Path
):
    """The real ``ctcovid listen``: stalled peers and a cut C-STORE do not hold SIGTERM.

    The DICOM port is on 127.0.0.2 (loopback too), so the metrics port shows that it binds
    127.0.0.1 by default rather than following the DICOM address.
    """
    import re
    import time

    node = NodeProcess(tmp_path / "store", tiny_model_dir, tmp_path / "node.log", "--port", "0",
                       "--host", "127.0.0.2", "--metrics-port", "0", "--network-timeout", "600")
    try:
        node.wait_worker_ready()
        metrics_port = int(re.search(r"event=metrics_listening host=\S+ port=(\d+)",
                                     node.text()).group(1))
        peers = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.2", node.port), timeout=30)
            sock.sendall(b"\x01")
            peers.append(sock)
        ds = pydicom.dcmread(ct_files(studies_root)[0])
        half = raw_associate(node.port, host="127.0.0.2",
                             contexts=((CTImageStorage, (EXPLICIT_LE,)),))
        pdus = c_store_pdus(encode_dataset(ds), sop_class=CTImageStorage,
                            sop_instance=ds.SOPInstanceUID, max_pdu=4096)
        for pdu in pdus[: len(pdus) // 2]:
            half.sendall(pdu)
        peers.append(half)
        addresses = listening_addresses(metrics_port)

        started = time.monotonic()
        code = node.terminate(timeout=60)
        seconds = time.monotonic() - started
        for sock in peers:
            sock.close()
    finally:
        node.close()

    assert addresses == {"127.0.0.1"}
    assert code == 0
    assert seconds < 10, f"SIGTERM took {seconds:.1f} s"
    assert list((tmp_path / "store" / "tmp").glob("recv-*")) == []


@pytest.mark.parametrize("ending", ["A-ABORT", "connection closed"])
def test_c_store_cut_off_by_its_peer_leaves_no_spool_file(
    start_listener, studies_root: Path, ending: str
):
    listener = start_listener()
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    sock = raw_associate(listener.port, contexts=((CTImageStorage, (EXPLICIT_LE,)),))
    pdus = c_store_pdus(encode_dataset(ds), sop_class=CTImageStorage,
                        sop_instance=ds.SOPInstanceUID, max_pdu=4096)
    for pdu in pdus[: len(pdus) // 2]:
        sock.sendall(pdu)
    spool_dir = listener.store.files.tmp_dir
    wait_for(lambda: list(spool_dir.glob("recv-*")), 10, "the spool file")

    if ending == "A-ABORT":
        sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    sock.close()

    wait_for(lambda: not list(spool_dir.glob("recv-*")), 10, "the spool file to go")
    assert listener.store.jobs.count_instances() == 0
    assert echoscu(listener.port).returncode == 0


def test_established_association_that_goes_quiet_is_ended_after_the_network_timeout(
    start_listener,
):
    listener = start_listener(network_timeout_seconds=2)
    quiet = raw_associate(listener.port)
    silent = socket.create_connection(("127.0.0.1", listener.port), timeout=30)  # no bytes

    assert closed_by_peer(quiet, 15)
    assert closed_by_peer(silent, 15)
    quiet.close()
    silent.close()
    wait_for(lambda: not listener.ae.active_associations, 10, "the slots to be free")


def test_header_bomb_is_refused_without_parsing_it_all(
    start_listener, studies_root: Path, monkeypatch: pytest.MonkeyPatch
):
    """Millions of tiny elements would keep a handler busy for minutes: parsing is bounded."""
    from ctcovid.node import scp

    monkeypatch.setattr(scp, "MAX_HEADER_READS", 10_000)  # the real bound, scaled down
    listener = start_listener()
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    data = encode_dataset(ds)
    # 20,000 private elements (0009,1010) between the header and the pixel data.
    at = data.index(b"\xe0\x7f\x10\x00")
    bomb = data[:at] + b"\x09\x00\x10\x10LO\x02\x00ab" * 20_000 + data[at:]
    sock = raw_associate(listener.port, contexts=((CTImageStorage, (EXPLICIT_LE,)),))
    try:
        bomb_status = raw_c_store(sock, bomb, sop_class=CTImageStorage,
                                  sop_instance=ds.SOPInstanceUID)
        plain_status = raw_c_store(sock, data, sop_class=CTImageStorage,
                                   sop_instance=ds.SOPInstanceUID, message_id=2)
    finally:
        release(sock)

    assert bomb_status == 0xC210
    assert plain_status == 0x0000
    assert listener.store.jobs.count_instances() == 1


def test_library_records_are_reduced_to_tags_and_vr():
    import logging

    from ctcovid.logs import RedactLibraryRecords

    def reduced(name: str, level: int, msg: str, exc: BaseException | None = None) -> str:
        exc_info = (type(exc), exc, None) if exc else None
        record = logging.LogRecord(name, level, __file__, 1, msg, (), exc_info)
        assert RedactLibraryRecords().filter(record)
        return record.getMessage() + (record.exc_text or "") + str(record.exc_info or "")

    leak = "Invalid value for VR UI: '1.2.3\\x10\\x00\\x10\\x00PN\\x08\\x00DOE^JOHN' in (0008,0018)"
    warning = f"/x/pydicom/valuerep.py:440: UserWarning: {leak}"

    assert reduced("pydicom.valuerep", logging.WARNING, leak) == (
        "event=library_message source=pydicom.valuerep vr=UI tags=(0008,0018)"
    )
    assert "DOE" not in reduced("py.warnings", logging.WARNING, warning)
    assert "category=UserWarning" in reduced("py.warnings", logging.WARNING, warning)
    assert reduced("pynetdicom.dul", logging.ERROR, "x", ValueError("DOE^JOHN")) == (
        "event=library_message source=pynetdicom.dul error=ValueError"
    )
    assert reduced("pynetdicom.acse", logging.DEBUG, "Calling AE: PACS") == "Calling AE: PACS"
    assert reduced("ctcovid.node.scp", logging.WARNING, "our own") == "our own"


def next_pdu_type(sock: socket.socket) -> int | None:
    """Read one whole PDU; its type, or None when the connection was closed or reset."""
    from node_helpers import recv_exactly

    try:
        header = recv_exactly(sock, 6)
        recv_exactly(sock, int.from_bytes(header[2:6], "big"))
    except (ConnectionError, OSError):
        return None
    return header[0]


def test_peer_that_keeps_sending_small_pdus_is_aborted_at_the_association_cap(
    start_listener, caplog: pytest.LogCaptureFixture
):
    import time

    from node_helpers import c_echo_pdus

    # Each PDU comes well inside the network timeout: only the wall-clock cap can end this.
    listener = start_listener(network_timeout_seconds=30, max_association_seconds=2)
    sock = raw_associate(listener.port, calling="TRICKLER")
    answered, ended_with = 0, None
    with caplog.at_level("WARNING", logger="ctcovid.net.guard"):
        for message_id in range(1, 41):  # 40 echoes, 0.25 s apart: 10 s, five times the cap
            try:
                for pdu in c_echo_pdus(context_id=1, message_id=message_id):
                    sock.sendall(pdu)
            except OSError:
                break
            ended_with = next_pdu_type(sock)
            if ended_with != 0x04:  # not the C-ECHO response (P-DATA-TF)
                break
            answered += 1
            time.sleep(0.25)
    sock.close()

    assert 0 < answered < 40
    assert ended_with in (0x07, None)  # A-ABORT, or the closed connection behind it
    (line,) = [r.getMessage() for r in caplog.records if "association_aborted" in r.getMessage()]
    assert "reason=association_time_exceeded" in line
    assert "from=127.0.0.1:" in line and "calling_aet=TRICKLER" in line
    assert listener.stats.rejected == {"association_time_exceeded": 1}
    wait_for(lambda: not listener.ae.active_associations, 10, "the slot to be free")


def test_c_store_trickled_past_the_store_cap_is_aborted_and_leaves_nothing(
    start_listener, studies_root: Path
):
    listener = start_listener(network_timeout_seconds=30, max_store_seconds=1)
    ds = pydicom.dcmread(ct_files(studies_root)[0])
    sock = raw_associate(listener.port, contexts=((CTImageStorage, (EXPLICIT_LE,)),))
    pdus = c_store_pdus(encode_dataset(ds), sop_class=CTImageStorage,
                        sop_instance=ds.SOPInstanceUID, max_pdu=128)
    sent = 0
    for pdu in pdus[:50]:  # 50 PDUs 0.2 s apart: 10 s, ten times the cap
        if closed_by_peer(sock, 0.2):
            break
        try:
            sock.sendall(pdu)
        except OSError:
            break
        sent += 1
    sock.close()

    assert len(pdus) > 50 and 0 < sent < 50
    wait_for(lambda: listener.stats.rejected == {"store_time_exceeded": 1}, 10, "the abort")
    wait_for(lambda: not list(listener.store.files.tmp_dir.glob("recv-*")), 10, "the spool to go")
    assert listener.store.jobs.count_instances() == 0


def test_associations_beyond_the_limit_per_address_are_rejected_while_other_addresses_get_in(
    start_listener,
):
    listener = start_listener(max_associations=4, max_associations_per_address=1)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AET)
    second = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AET)
    elsewhere = ae.associate(
        "127.0.0.1", listener.port, ae_title=NODE_AET, bind_address=("127.0.0.2", 0)
    )
    try:
        assert first.is_established
        assert second.is_rejected
        # Transient, service provider (presentation), local limit exceeded: try again later.
        rejection = second.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        assert elsewhere.is_established
        assert listener.stats.rejected == {"too_many_associations_from_address": 1}
    finally:
        first.release()
        elsewhere.release()


def test_wall_clock_caps_and_the_per_address_limit_are_node_settings(tmp_path: Path):
    from ctcovid.errors import ConfigError
    from ctcovid.node.config import load_config
    from ctcovid.node.scp import transport_limits

    toml = tmp_path / "node.toml"
    toml.write_text(
        'store = "store"\nmax_association_seconds = 900\nmax_store_seconds = 120\n'
        "max_associations_per_address = 2\n"
    )
    config = load_config(toml, {"max_store_seconds": 60.0})
    store = Store(config.store, min_free_mb=0)
    limits = transport_limits(config, store)
    store.close()

    assert (limits.max_association_seconds, limits.max_store_seconds) == (900, 60.0)
    assert limits.max_associations_per_address == 2
    with pytest.raises(ConfigError, match="max_association_seconds"):
        NodeConfig(store=tmp_path, max_association_seconds=0)
