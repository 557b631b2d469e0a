"""The listener with real associations: dcmtk and pynetdicom clients, statuses, TLS, the sender.

The listener runs in this process on a free loopback port (it needs no model); every client
is a real DICOM peer.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_helpers import NODE_AET, echoscu, free_port, make_test_ca, storescu
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from ctcovid.errors import PacsError
from ctcovid.node.config import NodeConfig, Peer
from ctcovid.node.scp import Listener
from ctcovid.node.sender import client_ssl_context, send_file
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
    assert listener.store.count_instances() == len(files)
    (series,) = listener.store.list_series()
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
    assert listener.store.count_instances() == 2


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
    assert listener.store.count_instances() == 0


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
    assert listener.store.count_instances() == 0
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
    assert listener.store.count_instances() == 0


def test_free_space_floor_answers_out_of_resources(start_listener, studies_root: Path):
    listener = start_listener(min_free_mb=1e12)  # more than any disk has

    status = scu_store(listener.port, ct_files(studies_root)[0])

    assert status == 0xA700
    assert files_under(listener.store.instances_dir) == []


def test_disk_error_answers_out_of_resources(start_listener, studies_root: Path):
    listener = start_listener()
    src = ct_files(studies_root)[0]
    study_uid = pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID
    # A file where the study folder must go: mkdir fails like a broken disk would.
    (listener.store.instances_dir / study_uid).write_bytes(b"")

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
    client = client_ssl_context(
        NodeConfig(store=tmp_path, tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"])
    )
    no_cert = ssl.create_default_context(cafile=str(pki["ca"]))

    assert scu_store(listener.port, ct_files(studies_root)[0], ssl_context=client) == 0
    assert scu_store(listener.port, ct_files(studies_root)[1]) is None  # plain TCP
    assert scu_store(listener.port, ct_files(studies_root)[1], ssl_context=no_cert) is None
    assert listener.store.count_instances() == 1


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
    config = NodeConfig(store=tmp_path, tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"])

    status = send_file(sr_file, peer, calling_ae_title=NODE_AET,
                       ssl_context=client_ssl_context(config))

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
