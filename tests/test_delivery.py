"""One current result per series at each destination: the delivery plan, the node's race, and
batch and the node sending to a real Orthanc (C-STORE in, C-FIND asked first)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from node_helpers import LOOPBACK, Orthanc, orthanc_with_dicomweb, put

from ctcovid.batch import BatchOptions, run_batch
from ctcovid.batch.results import CLASSIFIED as ROW_CLASSIFIED
from ctcovid.batch.results import RESULTS_FILE, read_results
from ctcovid.net.peers import Peer
from ctcovid.net.sender import SendSettings
from ctcovid.node.config import NodeConfig
from ctcovid.node.jobs import CLASSIFIED, CLASSIFYING, SENT, PredecessorChanged
from ctcovid.node.store import Store
from ctcovid.node.worker import Worker
from ctcovid.report.delivery import Delivered, plan_delivery
from ctcovid.report.uids import sr_revision_uid

FIRST = "2.25.1001"


@dataclass(frozen=True)
class Held:
    sop_instance_uid: str
    instance_number: int | None


# -- the plan ----------------------------------------------------------------------------------


def test_nothing_delivered_is_revision_1() -> None:
    plan = plan_delivery(FIRST, "covid", 0.9, recorded=None, held=[])
    assert (plan.revision, plan.predecessor_sop_instance_uid) == (1, None)
    assert plan_delivery(FIRST, "covid", 0.9, recorded=None, held=None).revision == 1


def test_the_very_report_held_is_not_sent_again_at_any_revision() -> None:
    assert not plan_delivery(FIRST, "covid", 0.9, recorded=None, held=[Held(FIRST, 1)]).needed
    second = sr_revision_uid(FIRST, 2, "2.25.7")
    plan = plan_delivery(
        FIRST, "covid", 0.9, recorded=None, held=[Held("2.25.7", 1), Held(second, 2)]
    )
    assert not plan.needed
    assert plan.stands == Delivered(second, 2, "covid", 0.9, "2.25.7")


def test_another_report_held_gets_the_next_revision_naming_the_newest() -> None:
    held = [Held("2.25.8", 2), Held("2.25.7", 1), Held("2.25.99", None)]
    plan = plan_delivery(FIRST, "covid", 0.9, recorded=None, held=held)
    assert (plan.revision, plan.predecessor_sop_instance_uid) == (3, "2.25.8")


def test_the_record_tells_a_clinically_unchanged_result() -> None:
    recorded = Delivered("2.25.7", 1, "covid", 0.9)
    same = plan_delivery(FIRST, "covid", 0.9004, recorded=recorded, held=[Held("2.25.7", 1)])
    assert not same.needed and same.stands == recorded
    changed = plan_delivery(FIRST, "covid", 0.91, recorded=recorded, held=[Held("2.25.7", 1)])
    assert (changed.revision, changed.predecessor_sop_instance_uid) == (2, "2.25.7")
    flipped = plan_delivery(FIRST, "non-covid", 0.9, recorded=recorded, held=None)
    assert (flipped.revision, flipped.predecessor_sop_instance_uid) == (2, "2.25.7")
    # The destination holds a newer revision than the record knows: its content is unknown.
    newer = plan_delivery(
        FIRST, "covid", 0.9, recorded=recorded, held=[Held("2.25.7", 1), Held("2.25.8", 2)]
    )
    assert (newer.revision, newer.predecessor_sop_instance_uid) == (3, "2.25.8")


# -- the node's race, replayed on the job database ---------------------------------------------


def _store_with_series(tmp_path: Path, files: list[Path]) -> Store:
    store = Store(tmp_path / "store")
    for path in files:
        put(store, path)
    return store


def _finish(store: Store, record, revision: int, sop: str, label: str) -> bool:
    path = store.files.sr_path(record.series_instance_uid, sop)
    store.files.write_file(path, b"sr")
    return store.finish_classified(
        record, revision=revision, sr_path=path, sr_sop_instance_uid=sop,
        probability_covid=0.9 if label == "covid" else 0.1, label=label, classify_seconds=1.0,
    )


def _revision_1_due(tmp_path: Path, studies_root: Path, sop: str):
    """A series without its last instance classified as revision 1 (SR ``sop``), its send
    due; the store, that send's record and the late instance."""
    files = sorted((studies_root / "study_000" / "ct").glob("*.dcm"))
    store = _store_with_series(tmp_path, files[:-1])
    store.jobs.promote_stable(0.0)
    assert _finish(store, store.jobs.claim_next(), 1, sop, "covid")
    (sending,) = store.jobs.due_sends()
    return store, sending, files[-1]


def test_a_send_finishing_while_the_series_is_classified_again_makes_the_next_revision(
    tmp_path: Path, studies_root: Path
) -> None:
    store, sending, late = _revision_1_due(tmp_path, studies_root, "2.25.101")  # A in flight
    jobs = store.jobs
    _store_with_series(tmp_path, [late])  # a late instance: classify again
    jobs.promote_stable(0.0)
    again = jobs.claim_next()
    assert again is not None and again.sent_revision == 0
    assert jobs.mark_sent(sending) is False  # A delivered; the job has moved on
    with pytest.raises(PredecessorChanged) as raised:
        _finish(store, again, 1, "2.25.102", "non-covid")  # B built as revision 1: refused
    now = raised.value.record
    assert (now.state, now.sent_revision, now.sent_label) == (CLASSIFYING, 1, "covid")
    assert now.sent_sr_path.endswith("2.25.101.dcm")
    assert _finish(store, now, 2, "2.25.103", "non-covid")  # B as revision 2, naming A
    (record,) = jobs.list_series()
    assert (record.revision, record.sent_revision, record.sr_sop_instance_uid) == (
        2, 1, "2.25.103"
    )


def test_a_clinically_unchanged_result_is_not_sent_again(
    tmp_path: Path, studies_root: Path
) -> None:
    store, sending, late = _revision_1_due(tmp_path, studies_root, "2.25.201")
    jobs = store.jobs
    assert jobs.mark_sent(sending)
    _store_with_series(tmp_path, [late])
    jobs.promote_stable(0.0)
    again = jobs.claim_next()
    assert (again.sent_label, again.sent_probability) == ("covid", 0.9)
    assert jobs.finish_unchanged(again, probability_covid=0.9, label="covid", classify_seconds=1)
    (record,) = jobs.list_series()
    assert (record.state, record.revision, record.sent_revision) == (SENT, 1, 1)
    assert "revision 1 stands" in record.reason
    assert jobs.due_sends() == []


# -- batch and the node sending to Orthanc ------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc taking C-STORE and C-FIND, and STOW-RS and QIDO-RS at ``dicomweb_url``."""
    server = orthanc_with_dicomweb(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def classifier(tiny_classifier):
    from ctcovid.inference import Classifier

    return Classifier(tiny_classifier.model, tiny_classifier.artifact)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, studies_root: Path) -> Path:
    root = tmp_path_factory.mktemp("delivery-archive")
    for study in ("study_000", "study_001"):
        shutil.copytree(studies_root / study / "ct", root / study)
    return root


def _batch(
    classifier, model: Path, archive: Path, out: Path, orthanc: Orthanc, batch_size: int,
    *, stow: bool = False,
):
    classifier.batch_size = batch_size
    destination = (
        SendSettings.stow_rs(orthanc.dicomweb_url)
        if stow
        else SendSettings.c_store(f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}")
    )
    options = BatchOptions(
        archive, out, model, workers=0, batch_size=batch_size, destinations=(destination,)
    )
    summary = run_batch(options, classifier=classifier)
    rows = [r for r in read_results(out / RESULTS_FILE) if r.status == ROW_CLASSIFIED]
    return summary, {r.series_instance_uid: r for r in rows}


def _sr_files_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    """Every SR Orthanc holds in one study, read from its stored files."""
    found = orthanc.request(
        "POST", "/tools/find",
        json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid,
                                                    "Modality": "SR"}}).encode(),
    )
    out = []
    for instance in found:
        url = f"http://127.0.0.1:{orthanc.http_port}/instances/{instance}/file"
        with LOOPBACK.open(url, timeout=60) as response:
            out.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(response.read())))
    return sorted(out, key=lambda ds: (str(ds.SeriesInstanceUID), int(ds.InstanceNumber)))


def _predecessor(sr: pydicom.Dataset) -> str:
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (reference,) = series.ReferencedSOPSequence
    assert series.SeriesInstanceUID == sr.SeriesInstanceUID
    return str(reference.ReferencedSOPInstanceUID)


def _flipping_model(tiny_model_dir: Path, target: Path, probabilities: list[float]) -> Path:
    """A copy of the tiny model whose threshold flips the label of exactly one series: the
    one nearest the original threshold."""
    shutil.copytree(tiny_model_dir, target)
    meta = json.loads((target / "ctcovid.json").read_text())
    threshold = meta["threshold"]
    nearest = min(probabilities, key=lambda p: abs(p - threshold))
    assert probabilities.count(nearest) == 1
    meta["threshold"] = round(nearest + 0.001, 3) if nearest >= threshold else nearest
    (target / "ctcovid.json").write_text(json.dumps(meta))
    return target


def test_batch_runs_at_other_batch_sizes_then_a_changed_model_keep_one_current_sr(
    classifier, tiny_model_dir: Path, archive: Path, orthanc: Orthanc, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ctcovid.batch.destinations")
    _, first = _batch(classifier, tiny_model_dir, archive, tmp_path / "run1", orthanc, 7)
    summary, second = _batch(classifier, tiny_model_dir, archive, tmp_path / "run2", orthanc, 32)
    assert len(first) == 2
    # The second run asked Orthanc (C-FIND), found this very report and sent nothing.
    assert caplog.text.count("is this very report") == 2
    (outcome,) = summary["sent"].values()
    assert (outcome["sent"], outcome["unchanged"], outcome["failed"]) == (0, 2, 0)
    for uid, row in first.items():
        (sr,) = _sr_files_in_orthanc(orthanc, row.study_instance_uid)
        assert Path(second[uid].sr_path).name == Path(row.sr_path).name
        assert Path(row.sr_path).name == f"{sr.SOPInstanceUID}.dcm"
        assert sr.InstanceNumber == 1

    model = _flipping_model(
        tiny_model_dir, tmp_path / "model2", [r.probability_covid for r in first.values()]
    )
    _, third = _batch(classifier, model, archive, tmp_path / "run3", orthanc, 16)
    flipped = [uid for uid in first if third[uid].label != first[uid].label]
    assert len(flipped) == 1
    for row in first.values():
        revisions = _sr_files_in_orthanc(orthanc, row.study_instance_uid)
        # A new run folder knows revision 1 only by its UID: the result it states now (another
        # threshold; for one series another label) goes as revision 2 naming revision 1.
        assert [int(sr.InstanceNumber) for sr in revisions] == [1, 2]
        old, new = revisions
        assert new.SeriesInstanceUID == old.SeriesInstanceUID
        assert _predecessor(new) == old.SOPInstanceUID
        assert new.SOPInstanceUID != old.SOPInstanceUID
    # The changed model again, in a fourth folder at another batch size: revision 2 there is
    # this very report (its UID derives from the content, 2 and revision 1), so nothing is sent.
    caplog.clear()
    _batch(classifier, model, archive, tmp_path / "run4", orthanc, 32)
    assert caplog.text.count("revision 2 (") == 2
    assert caplog.text.count("is this very report") == 2
    for row in first.values():
        assert len(_sr_files_in_orthanc(orthanc, row.study_instance_uid)) == 2


def test_batch_by_stow_asks_qido_first_and_sends_one_sr_per_series(
    classifier, tiny_model_dir: Path, studies_root: Path, orthanc: Orthanc, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("dicomweb_client", reason="pip install 'ctcovid[dicomweb]'")
    caplog.set_level(logging.INFO, logger="ctcovid.batch.destinations")
    archive = tmp_path / "archive"
    shutil.copytree(studies_root / "study_003" / "ct", archive / "study_003")
    _, first = _batch(classifier, tiny_model_dir, archive, tmp_path / "a", orthanc, 7, stow=True)
    _, again = _batch(classifier, tiny_model_dir, archive, tmp_path / "b", orthanc, 32, stow=True)
    (row,) = first.values()
    (sr,) = _sr_files_in_orthanc(orthanc, row.study_instance_uid)
    assert Path(row.sr_path).name == f"{sr.SOPInstanceUID}.dcm"
    assert again[row.series_instance_uid].sr_path == row.sr_path
    assert caplog.text.count("is this very report") == 1
    assert "destination_not_queryable" not in caplog.text


def test_node_then_batch_over_the_same_study_put_one_sr_into_orthanc(
    classifier, tiny_model_dir: Path, studies_root: Path, orthanc: Orthanc, tmp_path: Path,
) -> None:
    files = sorted(p for p in (studies_root / "study_002" / "ct").iterdir() if p.is_file())
    worker = _worker(
        tmp_path, files, classifier, Peer("127.0.0.1", orthanc.dicom_port, orthanc.aet)
    )
    _until_idle(worker)
    (record,) = worker.store.jobs.list_series()
    assert record.state == SENT
    study = record.study_instance_uid
    (sent,) = _sr_files_in_orthanc(orthanc, study)

    archive = tmp_path / "archive"
    shutil.copytree(studies_root / "study_002" / "ct", archive / "study_002")
    _, rows = _batch(classifier, tiny_model_dir, archive, tmp_path / "run", orthanc, 32)
    assert Path(rows[record.series_instance_uid].sr_path).name == f"{sent.SOPInstanceUID}.dcm"
    assert [sr.SOPInstanceUID for sr in _sr_files_in_orthanc(orthanc, study)] == [
        sent.SOPInstanceUID
    ]


def test_a_result_stored_while_the_previous_sr_was_in_flight_goes_as_the_next_revision(
    tmp_path: Path, studies_root: Path
) -> None:
    store, sending, late = _revision_1_due(tmp_path, studies_root, "2.25.301")  # A in flight
    jobs = store.jobs
    _store_with_series(tmp_path, [late])
    jobs.promote_stable(0.0)
    assert _finish(store, jobs.claim_next(), 1, "2.25.302", "non-covid")  # B, before A lands
    assert jobs.mark_sent(sending) is False  # A delivered: B named no predecessor
    (record,) = jobs.list_series()
    assert (record.state, record.sent_revision) == ("waiting", 1)
    assert "classifying again" in record.reason
    again = jobs.claim_next()
    assert again is not None and again.sent_sr_path.endswith("2.25.301.dcm")


@dataclass
class Pacs:
    """An SR storage SCP on loopback that keeps what it receives; with ``hold_first`` it holds
    the first C-STORE until ``release`` is set (``in_flight`` tells it arrived)."""

    peer: Peer
    received: list[pydicom.Dataset]
    in_flight: threading.Event
    release: threading.Event
    hold_first: bool = False


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage

    state = Pacs(Peer("127.0.0.1", 0, "PACS"), [], threading.Event(), threading.Event())

    def handle(event: evt.Event) -> int:
        if state.hold_first and not state.received and not state.release.is_set():
            state.in_flight.set()
            state.release.wait(120)
        state.received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    state.peer = Peer("127.0.0.1", server.server_address[1], "PACS")
    yield state
    state.release.set()
    server.shutdown()


def _worker(tmp_path: Path, files: list[Path], classifier, peer: Peer, **settings) -> Worker:
    """A node worker in this process over a store holding ``files``, sending to ``peer``."""
    config = NodeConfig(
        store=tmp_path / "store", peer=peer, retry_seconds=0, min_free_mb=0,
        **({"stable_seconds": 0} | settings),
    )
    return Worker(config, _store_with_series(tmp_path, files), classifier)


def _until_idle(worker: Worker) -> None:
    for _ in range(5):
        if not worker.step():
            return
    pytest.fail("the worker still had work after 5 steps")


def test_node_race_end_to_end_with_a_pacs_that_holds_the_first_send(
    tmp_path: Path, studies_root: Path, classifier, pacs: Pacs
) -> None:
    """The first SR's send outlasts ``stable_seconds``; a late instance is classified meanwhile.
    The PACS ends up with revision 1 and a revision 2 that names it, never two revisions 1."""
    pacs.hold_first = True
    files = sorted(p for p in (studies_root / "study_001" / "ct").iterdir() if p.is_file())
    worker = _worker(
        tmp_path, files[:-1], classifier, pacs.peer, stable_seconds=0.5, poll_seconds=0.1
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert pacs.in_flight.wait(120), "the first SR never reached the PACS"
        (a,) = worker.store.jobs.list_series()
        _store_with_series(tmp_path, files[-1:])  # the late instance, while A is in flight
        deadline = time.monotonic() + 120

        def now():
            (record,) = worker.store.jobs.list_series()
            return record

        while now().state != CLASSIFIED or now().sr_sop_instance_uid == a.sr_sop_instance_uid:
            assert time.monotonic() < deadline, f"the late instance was not classified: {now()}"
            time.sleep(0.1)
        assert now().revision == 1  # B, built while A was not yet delivered
        pacs.release.set()  # A lands after B was stored
        while len(pacs.received) < 2 or now().state != SENT:
            assert time.monotonic() < deadline, f"no revision 2 was sent: {now()}"
            time.sleep(0.1)
    finally:
        pacs.release.set()
        stop.set()
        thread.join(60)
    first, revised = pacs.received
    assert (first.InstanceNumber, revised.InstanceNumber) == (1, 2)
    assert revised.SeriesInstanceUID == first.SeriesInstanceUID
    assert _predecessor(revised) == first.SOPInstanceUID
    (record,) = worker.store.jobs.list_series()
    assert (record.revision, record.sent_revision) == (2, 2)


def test_the_node_does_not_resend_a_result_that_states_the_same(
    tmp_path: Path, studies_root: Path, classifier, pacs: Pacs
) -> None:
    """An instance replaced by one that differs outside its pixels reopens the series; the
    result is the same, so the PACS gets nothing new and the job says which revision stands."""
    files = sorted(p for p in (studies_root / "study_000" / "ct").iterdir() if p.is_file())
    worker = _worker(tmp_path, files, classifier, pacs.peer)
    _until_idle(worker)
    (sent,) = worker.store.jobs.list_series()
    ds = pydicom.dcmread(files[0])
    ds.ImageComments = "corrected header"  # new bytes, same pixels
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert worker.store.put_instance(
        buffer.getvalue(), study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID, sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
    )
    (reopened,) = worker.store.jobs.list_series()
    assert reopened.state == "received" and reopened.generation > sent.generation
    _until_idle(worker)
    (record,) = worker.store.jobs.list_series()
    assert len(pacs.received) == 1
    assert (record.state, record.revision, record.sent_revision) == (SENT, 1, 1)
    assert record.sr_sop_instance_uid == pacs.received[0].SOPInstanceUID
    assert "revision 1 stands" in record.reason
