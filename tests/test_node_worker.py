"""The worker in this process: real store, real (tiny) model, real SR peer on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_helpers import (
    clean_exit_supervisor,
    ct_files,
    free_port,
    put,
    run_until_idle,
    wait_for,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage

from ctcovid.node.auditing import NodeAudit
from ctcovid.node.config import NodeConfig, Peer
from ctcovid.node.jobs import CLASSIFIED, FAILED, SENT, UNUSABLE, WAITING
from ctcovid.node.store import Store
from ctcovid.node.worker import Worker

pytestmark = pytest.mark.network


@pytest.fixture
def stalled_pacs() -> Iterator[Peer]:
    """A PACS that accepts the association, then never answers the C-STORE (until teardown)."""
    release = threading.Event()

    def handle(event: evt.Event) -> int:
        release.wait(120)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 300
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    yield Peer("127.0.0.1", int(server.server_address[1]), "PACS")
    release.set()
    server.shutdown()


@pytest.fixture
def silent_peer() -> Iterator[Peer]:
    """A TCP peer that accepts connections and never sends a byte (raw socket)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield Peer("127.0.0.1", listener.getsockname()[1], "PACS")
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    listener.close()


def make_worker(tmp_path: Path, classifier, peer: Peer | None, **settings) -> Worker:
    config = NodeConfig(
        store=tmp_path / "store", peer=peer, stable_seconds=0, retry_seconds=0,
        min_free_mb=0, **settings,
    )
    return Worker(config, Store(config.store), classifier)


def test_complete_series_is_classified_and_its_sr_sent(
    tmp_path: Path, studies_root: Path, classifier, pacs
):
    peer, received = pacs
    worker = make_worker(tmp_path, classifier, peer)
    files = ct_files(studies_root, "study_000")
    for path in files:
        put(worker.store, path)

    run_until_idle(worker)

    (record,) = worker.store.jobs.list_series()
    assert (record.state, record.revision, record.sent_revision) == (SENT, 1, 1)
    assert [str(ds.SOPInstanceUID) for ds in received] == [record.sr_sop_instance_uid]
    sr = received[0]
    assert sr.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    assert sr.Modality == "SR"
    assert (worker.store.root / record.sr_path).is_file()
    # Shown on the node's page: the per-slice result and how the job got here.
    assert len(json.loads(record.slice_probabilities)) >= 4
    history = worker.store.jobs.history(record.series_instance_uid, record.study_instance_uid)
    assert [h["state"] for h in history] == ["received", "waiting", "classifying", "classified",
                                             "sent"]
    # And its key slices' heatmaps: one PNG per key slice, at the model's input size.
    from PIL import Image

    from ctcovid.scans import KEY_SLICES

    study, series = record.study_instance_uid, record.series_instance_uid
    keys = min(KEY_SLICES, len(json.loads(record.slice_probabilities)))
    assert worker.store.files.heatmap_count(study, series) == keys
    for number in range(1, keys + 1):
        with Image.open(worker.store.files.heatmap_path(study, series, number)) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))


def test_late_instance_sends_a_revised_sr_naming_its_predecessor(
    tmp_path: Path, studies_root: Path, classifier, pacs
):
    peer, received = pacs
    worker = make_worker(tmp_path, classifier, peer)
    files = ct_files(studies_root, "study_001")
    for path in files[:-1]:
        put(worker.store, path)
    run_until_idle(worker)

    put(worker.store, files[-1])
    run_until_idle(worker)

    assert len(received) == 2
    first, revised = received
    assert first.SOPInstanceUID != revised.SOPInstanceUID
    assert first.SeriesInstanceUID == revised.SeriesInstanceUID
    predecessor = revised.PredecessorDocumentsSequence[0]
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert len(revised.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence) == len(files)
    (record,) = worker.store.jobs.list_series()
    assert (record.state, record.revision, record.sent_revision) == (SENT, 2, 2)


def test_unusable_series_is_recorded_with_its_reason_and_not_retried(
    tmp_path: Path, studies_root: Path, classifier
):
    worker = make_worker(tmp_path, classifier, None)
    for path in ct_files(studies_root, "study_002")[:2]:
        put(worker.store, path)  # 2 slices; the model needs at least 4

    run_until_idle(worker)
    again = worker.step()

    (record,) = worker.store.jobs.list_series()
    assert record.state == UNUSABLE
    assert "too few slices" in record.reason
    assert again is False


def test_unreachable_peer_is_retried_then_the_job_fails_visibly(
    tmp_path: Path, studies_root: Path, classifier
):
    worker = make_worker(
        tmp_path, classifier, Peer("127.0.0.1", free_port(), "PACS"), max_attempts=2,
        network_timeout_seconds=5, audit_file=tmp_path / "audit.log",
    )
    worker.audit = NodeAudit(worker.config, deliver=False)
    for path in ct_files(studies_root, "study_003"):
        put(worker.store, path)

    worker.step()  # classify, first send fails
    (after_first,) = worker.store.jobs.list_series()
    worker.step()  # second send fails: max_attempts reached
    worker.audit.close()

    (record,) = worker.store.jobs.list_series()
    assert (after_first.state, after_first.attempts) == (CLASSIFIED, 1)
    assert "association" in after_first.reason
    assert (record.state, record.attempts) == (FAILED, 2)
    assert "2 time(s)" in record.reason
    assert (worker.store.root / record.sr_path).is_file()  # kept for a retry
    # Given up: audited once, an Instances Transferred that failed (serious failure, 8).
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    assert 'csd-code="110104"' in line and 'EventOutcomeIndicator="8"' in line
    assert record.study_instance_uid in line and 'UserID="PACS"' in line


def _store_over_association(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    """C-STORE ``datasets`` over one real association; the statuses."""
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="CTCOVID")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_changed_instance_under_the_same_uid_is_kept_and_the_series_revised(
    tmp_path: Path, studies_root: Path, classifier, pacs
):
    from ctcovid.node.scp import Listener

    peer, received = pacs
    worker = make_worker(tmp_path, classifier, peer)
    listener = Listener(
        NodeConfig(store=worker.config.store, host="127.0.0.1", port=0, min_free_mb=0),
        Store(worker.config.store),
    )
    listener.start()
    try:
        files = ct_files(studies_root, "study_000")
        assert set(_store_over_association(listener.port, [pydicom.dcmread(f) for f in files]))\
            == {0}
        run_until_idle(worker)
        changed = pydicom.dcmread(files[2])
        pixels = bytearray(changed.PixelData)
        pixels[:64] = bytes(255 - b for b in pixels[:64])
        changed.PixelData = bytes(pixels)

        statuses = _store_over_association(listener.port, [pydicom.dcmread(files[1]), changed])
        run_until_idle(worker)
    finally:
        listener.stop(drain_seconds=5)
        listener.store.close()

    assert statuses == [0, 0]
    (record,) = worker.store.jobs.list_series()
    assert (record.state, record.revision, record.sent_revision) == (SENT, 2, 2)
    assert len(received) == 2  # the identical resend changed nothing; the changed one revised
    (replaced,) = worker.store.jobs.replaced_instances()
    assert replaced["sop_instance_uid"] == changed.SOPInstanceUID
    kept = pydicom.dcmread(worker.store.root / replaced["path"])
    assert kept.PixelData == pydicom.dcmread(files[2]).PixelData  # the old content, not lost
    stored = pydicom.dcmread(worker.store.root / "instances" / changed.StudyInstanceUID
                             / changed.SeriesInstanceUID / f"{changed.SOPInstanceUID}.dcm")
    assert stored.PixelData == changed.PixelData


def test_sr_below_the_disk_floor_waits_for_space_instead_of_failing(
    tmp_path: Path, studies_root: Path, classifier, pacs
):
    peer, received = pacs
    worker = make_worker(tmp_path, classifier, peer)
    for path in ct_files(studies_root, "study_003"):
        put(worker.store, path)
    worker.store.min_free_bytes = 1 << 60  # no disk has that much free

    worker.step()

    (record,) = worker.store.jobs.list_series()
    assert record.state == WAITING
    assert "disk space" in record.reason and record.classify_attempts == 0
    assert received == []
    worker.store.min_free_bytes = 0  # space returns
    time.sleep(worker.config.poll_seconds + 0.1)  # the deferred job is due again after a pause
    run_until_idle(worker)
    (record,) = worker.store.jobs.list_series()
    assert record.state == SENT and len(received) == 1


def _an_sr(tmp_path: Path, studies_root: Path, classifier) -> Path:
    worker = make_worker(tmp_path / "sr-maker", classifier, None)
    for path in ct_files(studies_root, "study_000"):
        put(worker.store, path)
    run_until_idle(worker)
    (record,) = worker.store.jobs.list_series()
    return worker.store.root / record.sr_path


@pytest.mark.parametrize("peer_fixture", ["stalled_pacs", "silent_peer"])
def test_a_send_to_a_stalled_peer_ends_at_its_deadline(
    tmp_path: Path, studies_root: Path, classifier, peer_fixture: str, request
):
    from ctcovid.errors import PacsError
    from ctcovid.net.sender import send_file

    peer = request.getfixturevalue(peer_fixture)
    sr = _an_sr(tmp_path, studies_root, classifier)
    start = time.monotonic()

    with pytest.raises(PacsError, match="within 2 s; association aborted"):
        send_file(sr, peer, calling_ae_title="CTCOVID", timeout_seconds=120, deadline_seconds=2)

    assert time.monotonic() - start < 10


def test_a_stalled_send_neither_blocks_classification_nor_stopping(
    tmp_path: Path, studies_root: Path, classifier, stalled_pacs: Peer
):
    worker = make_worker(
        tmp_path, classifier, stalled_pacs, network_timeout_seconds=120,
        send_deadline_seconds=300, poll_seconds=0.1,
    )
    for path in ct_files(studies_root, "study_000"):
        put(worker.store, path)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: worker.store.jobs.counts_by_state()["classified"] == 1, 120,
                 "the first series to be classified (its send then stalls)")
        time.sleep(1.0)  # the sender thread is now inside the stalled C-STORE
        for path in ct_files(studies_root, "study_001"):
            put(worker.store, path)

        wait_for(lambda: worker.store.jobs.counts_by_state()["classified"] == 2, 120,
                 "the second series to be classified while the first send stalls")
    finally:
        stopped_at = time.monotonic()
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - stopped_at < 10  # the stalled send is abandoned, not waited for
    # Abandoned sends are not failed attempts: both SRs stay due for the next worker.
    assert [(r.state, r.attempts) for r in worker.store.jobs.list_series()] == [
        (CLASSIFIED, 0), (CLASSIFIED, 0)]


def _beats_then_hangs(heartbeat) -> None:
    """A worker process that makes progress once and then never again."""
    heartbeat.value = time.monotonic()
    time.sleep(600)


def test_supervisor_restarts_a_worker_whose_heartbeat_stops() -> None:
    import multiprocessing

    from ctcovid.node.service import WorkerSupervisor

    mp = multiprocessing.get_context("spawn")
    started: list = []
    lost: list[float] = []

    def start(heartbeat):
        process = mp.Process(target=_beats_then_hangs, args=(heartbeat,), daemon=True)
        process.start()
        started.append(process)
        return process

    supervisor = WorkerSupervisor(
        start, lambda: mp.Value("d", 0.0, lock=False), stall_seconds=1.0,
        on_lost=lambda: lost.append(time.monotonic()),
    )
    supervisor.start()
    try:
        wait_for(lambda: (supervisor.poll(), len(started) >= 2)[1], 60,
                 "the stalled worker to be replaced", interval=0.1)
    finally:
        for process in started:
            process.kill()
            process.join(10)
    assert supervisor.stalls >= 1 and len(lost) >= 1
    assert started[0].exitcode is not None  # the stalled one was killed, not left running


def test_a_worker_stopping_with_the_node_is_not_a_death(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lost: list[float] = []
    supervisor, stopping = clean_exit_supervisor(
        monkeypatch, on_lost=lambda: lost.append(time.monotonic())
    )
    supervisor.start()
    threading.Timer(0.1, stopping.set).start()  # the node's SIGTERM handler, a moment later
    supervisor.poll()
    assert (lost, supervisor.restarts, supervisor.process) == ([], 0, None)
    assert "worker_died" not in caplog.text

    # The same clean exit while the node runs on (a SIGTERM to the worker alone): restarted.
    stopping.clear()
    supervisor.start()
    supervisor.poll()
    assert supervisor.restarts == 1 and len(lost) == 1
    assert "event=worker_died exitcode=0" in caplog.text


def test_a_decompression_bomb_fails_its_series_alone_under_the_memory_limit(
    tmp_path: Path, studies_root: Path, unbounded_model_dir: Path, pacs
):
    """The memory limit is the backstop behind the ingest's size checks (which refuse this
    bomb from its header with the default limits): a model whose limits let it through."""
    from bombs import write_bomb_series

    from ctcovid.inference import Classifier

    peer, received = pacs
    classifier = Classifier.from_file(unbounded_model_dir)
    worker = make_worker(tmp_path, classifier, peer, decoder_memory_mb=1536)
    bomb_uid = write_bomb_series(ct_files(studies_root, "study_001"), tmp_path / "bomb")
    for path in sorted((tmp_path / "bomb").iterdir()):
        put(worker.store, path)
    for path in ct_files(studies_root, "study_000"):
        put(worker.store, path)

    run_until_idle(worker)
    worker.close()

    by_uid = {r.series_instance_uid: r for r in worker.store.jobs.list_series()}
    bomb = by_uid.pop(bomb_uid)
    (healthy,) = by_uid.values()
    assert bomb.state in (FAILED, UNUSABLE)
    assert "allocate" in bomb.reason or "memory" in bomb.reason  # the reason, not a crash
    assert healthy.state == SENT and len(received) == 1  # the other series went through


def test_a_killed_decoder_process_is_replaced_and_the_next_series_classified(
    tmp_path: Path, studies_root: Path, classifier
):
    import signal

    worker = make_worker(tmp_path, classifier, None)
    for path in ct_files(studies_root, "study_000"):
        put(worker.store, path)
    run_until_idle(worker)
    assert worker._decoder is not None
    for pid in list(worker._decoder._executor._processes):  # as the kernel's OOM killer would
        os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    for path in ct_files(studies_root, "study_001"):
        put(worker.store, path)

    run_until_idle(worker)
    worker.close()

    assert [r.state for r in worker.store.jobs.list_series()] == [CLASSIFIED, CLASSIFIED]


def test_node_classifies_on_and_stops_within_10_s_while_its_pacs_stalls(
    tmp_path: Path, studies_root: Path, tiny_model_dir: Path, stalled_pacs: Peer
):
    from node_helpers import WORKER_READY_SECONDS, NodeProcess, storescu

    node = NodeProcess(tmp_path / "store", tiny_model_dir, tmp_path / "node.log", "--port", "0",
                       "--stable-seconds", "1", "--peer", str(stalled_pacs), "--min-free-mb", "0")
    try:
        node.wait_worker_ready()
        assert storescu(node.port, ct_files(studies_root, "study_000")).returncode == 0
        wait_for(lambda: "event=classified" in node.text(), WORKER_READY_SECONDS,
                 "the first series to be classified")
        time.sleep(2.0)  # its SR is now stuck in the stalled C-STORE
        assert storescu(node.port, ct_files(studies_root, "study_001")).returncode == 0
        wait_for(lambda: node.text().count("event=classified") >= 2, WORKER_READY_SECONDS,
                 "the second series to be classified while the first send stalls")

        stopping = time.monotonic()
        code = node.terminate(timeout=60)
        seconds = time.monotonic() - stopping
    finally:
        node.close()
    assert code == 0
    assert seconds < 10, f"SIGTERM took {seconds:.1f} s"
    assert "event=send_abandoned" in node.text()


class _UpdatedModel:
    """The same classifier presenting another model (device UID, version): a model update."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def result(self, *args, **kwargs):
        result = self._inner.result(*args, **kwargs)
        model = dataclasses.replace(
            result.model, version="updated", device_uid=result.model.device_uid + ".7"
        )
        return dataclasses.replace(result, model=model)


def _predecessor_uids(sr: pydicom.Dataset) -> tuple[str, str]:
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    return str(series.SeriesInstanceUID), str(ref.ReferencedSOPInstanceUID)


def test_a_revision_after_a_model_change_names_the_sr_the_pacs_received(
    tmp_path: Path, studies_root: Path, classifier, pacs
):
    peer, received = pacs
    worker = make_worker(tmp_path, classifier, peer)
    files = ct_files(studies_root, "study_001")
    for path in files[:-1]:
        put(worker.store, path)
    run_until_idle(worker)

    worker.classifier = _UpdatedModel(classifier)
    put(worker.store, files[-1])
    run_until_idle(worker)

    first, revised = received
    assert revised.InstanceNumber == 2
    # Another version of the same model (another device UID) revises in the same SR series,
    # naming the SR the PACS holds.
    assert revised.SeriesInstanceUID == first.SeriesInstanceUID
    assert _predecessor_uids(revised) == (first.SeriesInstanceUID, first.SOPInstanceUID)


def test_a_revision_names_the_sent_sr_not_a_later_one_that_never_left(
    tmp_path: Path, studies_root: Path, classifier, pacs
):
    peer, received = pacs
    worker = make_worker(tmp_path, classifier, peer, max_attempts=1, network_timeout_seconds=5)
    files = ct_files(studies_root, "study_001")
    for path in files[:-2]:
        put(worker.store, path)
    run_until_idle(worker)  # revision 1 sent

    worker.config = dataclasses.replace(worker.config, peer=Peer("127.0.0.1", free_port(), "PACS"))
    put(worker.store, files[-2])
    run_until_idle(worker)  # revision 2 built, its only send fails
    (unsent,) = worker.store.jobs.list_series()
    assert (unsent.state, unsent.revision, unsent.sent_revision) == (FAILED, 2, 1)

    worker.config = dataclasses.replace(worker.config, peer=peer)
    put(worker.store, files[-1])
    run_until_idle(worker)  # revision 2 built again from all files, and sent

    first, revised = received
    assert revised.InstanceNumber == 2
    assert revised.SOPInstanceUID != unsent.sr_sop_instance_uid
    assert _predecessor_uids(revised) == (first.SeriesInstanceUID, first.SOPInstanceUID)
    (record,) = worker.store.jobs.list_series()
    assert record.sent_sr_path == record.sr_path


@pytest.mark.parametrize("where", ["peer", "named destination"])
def test_the_result_card_goes_with_each_revision_of_the_sr_to_a_real_pacs(
    tmp_path: Path, studies_root: Path, classifier, where: str
):
    """With result_card the SR's send carries the card of that revision, to the SR's peer and to
    a [destination.NAME] alike: dcmtk's storescp receives one card per SR, each the card of that
    SR (UID, revision), in the study."""
    from node_helpers import PACS_AET, storescp
    from pydicom.uid import SecondaryCaptureImageStorage

    from ctcovid.report.uids import card_sop_instance_uid

    port = free_port()
    with storescp(tmp_path / "pacs", port):
        if where == "peer":
            worker = make_worker(tmp_path, classifier, Peer("127.0.0.1", port, PACS_AET),
                                 result_card=True)  # fmt: skip
        else:
            worker = make_worker(tmp_path, classifier, None, result_card=True, destination={
                "pacs": {"kind": "dicom", "peer": f"127.0.0.1:{port}:{PACS_AET}"}})  # fmt: skip
        files = ct_files(studies_root, "study_001")
        for path in files[:-1]:
            put(worker.store, path)
        run_until_idle(worker)
        put(worker.store, files[-1])  # a late instance: revision 2, and its own card
        run_until_idle(worker)

    received = [pydicom.dcmread(p) for p in sorted((tmp_path / "pacs").iterdir())]
    srs = sorted((ds for ds in received if ds.Modality == "SR"), key=lambda ds: ds.InstanceNumber)
    cards = {str(ds.SOPInstanceUID): ds for ds in received
             if ds.SOPClassUID == SecondaryCaptureImageStorage}  # fmt: skip
    # The first result and the one after the late instance: revision 2, after what the peer
    # holds, or (named destinations only) after the SR handed to the deliveries.
    assert [int(sr.InstanceNumber) for sr in srs] == [1, 2]
    assert len({str(sr.SeriesInstanceUID) for sr in srs}) == 1
    assert set(cards) == {card_sop_instance_uid(str(sr.SOPInstanceUID)) for sr in srs}
    for sr in srs:
        card = cards[card_sop_instance_uid(str(sr.SOPInstanceUID))]
        assert card.InstanceNumber == sr.InstanceNumber
        assert card.StudyInstanceUID == sr.StudyInstanceUID
        assert card.BurnedInAnnotation == "YES"
    (record,) = worker.store.jobs.list_series()
    assert (record.state, record.sent_revision) == (SENT, 2)


def test_a_pacs_that_refuses_secondary_capture_fails_the_send_naming_it(
    tmp_path: Path, studies_root: Path, classifier, pacs
):
    """The card is part of the send: a peer that accepts the SR but not Secondary Capture fails
    it with that reason, visible in the job, rather than taking the SR alone silently."""
    peer, received = pacs  # accepts Comprehensive 3D SR only
    worker = make_worker(tmp_path, classifier, peer, result_card=True, max_attempts=1)
    for path in ct_files(studies_root, "study_000"):
        put(worker.store, path)

    run_until_idle(worker)

    (record,) = worker.store.jobs.list_series()
    assert record.state == FAILED
    assert "did not accept SOP class 1.2.840.10008.5.1.4.1.1.7 (result card" in record.reason
    assert received == []  # checked before anything is stored: not the SR alone either


@pytest.mark.parametrize("decoder_memory_mb", [4096, 0])
def test_the_classified_log_line_splits_decode_model_and_heatmap_seconds(
    tmp_path: Path,
    studies_root: Path,
    classifier,
    caplog: pytest.LogCaptureFixture,
    decoder_memory_mb: int,
):
    # What a profile of the node reads; without a decoder process decode overlaps the model,
    # so the line gives one figure for both and none for decode alone. The key slices' heatmaps
    # come from the scoring run where the graph keeps its maps, so theirs may round to 0.
    import re

    worker = make_worker(tmp_path, classifier, None, decoder_memory_mb=decoder_memory_mb)
    for path in ct_files(studies_root, "study_000"):
        put(worker.store, path)
    with caplog.at_level("INFO", logger="ctcovid.node.worker"):
        run_until_idle(worker)

    (line,) = [r.getMessage() for r in caplog.records if "event=classified" in r.getMessage()]
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    total, model = float(fields["seconds"]), float(fields["model_seconds"])
    heatmap = float(fields["heatmap_seconds"])
    rounding = 0.02  # each figure is stated to 0.01 s; a fast CPU may state 0.00
    if decoder_memory_mb:
        decode = float(fields["decode_seconds"])
        assert min(decode, model, heatmap) >= 0
        assert decode + model + heatmap <= total + rounding
    else:
        assert fields["decode_seconds"] == "-"
        assert min(model, heatmap) >= 0 and model + heatmap <= total + rounding
