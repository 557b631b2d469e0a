"""The worker in this process: real store, real (tiny) model, real SR peer on loopback."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_helpers import free_port
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage

from ctcovid.node.config import NodeConfig, Peer
from ctcovid.node.store import CLASSIFIED, FAILED, SENT, UNUSABLE, Store
from ctcovid.node.worker import Worker

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def classifier(tiny_model_dir: Path):
    from ctcovid.inference import Classifier

    return Classifier.from_file(tiny_model_dir)


@pytest.fixture
def pacs() -> Iterator[tuple[Peer, list[pydicom.Dataset]]]:
    """An SR storage SCP that keeps what it receives."""
    received: list[pydicom.Dataset] = []

    def handle(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    yield Peer("127.0.0.1", int(server.server_address[1]), "PACS"), received
    server.shutdown()


def put(store: Store, path: Path) -> None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store.put_instance(
        path.read_bytes(), study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID, sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
    )


def ct_files(studies_root: Path, study: str) -> list[Path]:
    """The CT files of a fixture study (some studies use names without an extension)."""
    return sorted(p for p in (studies_root / study / "ct").iterdir() if p.is_file())


def make_worker(tmp_path: Path, classifier, peer: Peer | None, **settings) -> Worker:
    config = NodeConfig(
        store=tmp_path / "store", peer=peer, stable_seconds=0, retry_seconds=0,
        min_free_mb=0, **settings,
    )
    return Worker(config, Store(config.store), classifier)


def run_until_idle(worker: Worker, max_steps: int = 10) -> None:
    for _ in range(max_steps):
        if not worker.step():
            return
    pytest.fail(f"the worker still had work after {max_steps} steps")


def test_complete_series_is_classified_and_its_sr_sent(
    tmp_path: Path, studies_root: Path, classifier, pacs
):
    peer, received = pacs
    worker = make_worker(tmp_path, classifier, peer)
    files = ct_files(studies_root, "study_000")
    for path in files:
        put(worker.store, path)

    run_until_idle(worker)

    (record,) = worker.store.list_series()
    assert (record.state, record.revision, record.sent_revision) == (SENT, 1, 1)
    assert [str(ds.SOPInstanceUID) for ds in received] == [record.sr_sop_instance_uid]
    sr = received[0]
    assert sr.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    assert sr.Modality == "SR"
    assert (worker.store.root / record.sr_path).is_file()


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
    (record,) = worker.store.list_series()
    assert (record.state, record.revision, record.sent_revision) == (SENT, 2, 2)


def test_unusable_series_is_recorded_with_its_reason_and_not_retried(
    tmp_path: Path, studies_root: Path, classifier
):
    worker = make_worker(tmp_path, classifier, None)
    for path in ct_files(studies_root, "study_002")[:2]:
        put(worker.store, path)  # 2 slices; the model needs at least 4

    run_until_idle(worker)
    again = worker.step()

    (record,) = worker.store.list_series()
    assert record.state == UNUSABLE
    assert "too few slices" in record.reason
    assert again is False


def test_unreachable_peer_is_retried_then_the_job_fails_visibly(
    tmp_path: Path, studies_root: Path, classifier
):
    worker = make_worker(
        tmp_path, classifier, Peer("127.0.0.1", free_port(), "PACS"), max_attempts=2,
        network_timeout_seconds=5,
    )
    for path in ct_files(studies_root, "study_003"):
        put(worker.store, path)

    worker.step()  # classify, first send fails
    (after_first,) = worker.store.list_series()
    worker.step()  # second send fails: max_attempts reached

    (record,) = worker.store.list_series()
    assert (after_first.state, after_first.attempts) == (CLASSIFIED, 1)
    assert "association" in after_first.reason
    assert (record.state, record.attempts) == (FAILED, 2)
    assert "2 time(s)" in record.reason
    assert (worker.store.root / record.sr_path).is_file()  # kept for a retry


class _UpdatedModel:
    """The same classifier presenting another model (device UID, version): a model update."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def classify(self, series):
        result = self._inner.classify(series)
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
    # Another model reports in another SR series, and still names the SR the PACS holds.
    assert revised.SeriesInstanceUID != first.SeriesInstanceUID
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
    (unsent,) = worker.store.list_series()
    assert (unsent.state, unsent.revision, unsent.sent_revision) == (FAILED, 2, 1)

    worker.config = dataclasses.replace(worker.config, peer=peer)
    put(worker.store, files[-1])
    run_until_idle(worker)  # revision 2 built again from all files, and sent

    first, revised = received
    assert revised.InstanceNumber == 2
    assert revised.SOPInstanceUID != unsent.sr_sop_instance_uid
    assert _predecessor_uids(revised) == (first.SeriesInstanceUID, first.SOPInstanceUID)
    (record,) = worker.store.list_series()
    assert record.sent_sr_path == record.sr_path
