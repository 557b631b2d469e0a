"""The node's store and job states, its settings, and ``ctcovid queue`` (no network, no model)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest
from node_helpers import put
from typer.testing import CliRunner

from ctcovid.cli.main import app
from ctcovid.dicom.uids import InvalidUidError, valid_uid
from ctcovid.errors import ConfigError
from ctcovid.node.config import NodeConfig, Peer, load_config
from ctcovid.node.files import OutOfSpaceError
from ctcovid.node.jobs import CLASSIFIED, CLASSIFYING, FAILED, RECEIVED, SENT, WAITING
from ctcovid.node.store import Store


def _ct_files(studies_root: Path) -> list[Path]:
    return sorted((studies_root / "study_000" / "ct").glob("*.dcm"))


def _classified(store: Store, series_uid: str, revision: int = 1) -> None:
    """Walk one series through the worker's store calls up to 'classified'."""
    store.jobs.promote_stable(0.0)
    record = store.jobs.claim_next()
    assert record is not None and record.series_instance_uid == series_uid
    sr = store.files.sr_path(series_uid, f"2.25.{revision}")
    store.files.write_file(sr, b"sr")
    assert store.finish_classified(
        record, revision=revision, sr_path=sr, sr_sop_instance_uid=f"2.25.{revision}",
        probability_covid=0.5, label="covid", classify_seconds=1.0,
    )


@pytest.mark.parametrize(
    ("uid", "ok"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("2.25.123", True),
        ("../../etc", False),
        ("1.2/3", False),
        ("1." + "2" * 63, False),  # 65 characters
        ("1.2.", False),
        ("", False),
        ("1.2\x00", False),
    ],
)
def test_only_digit_and_dot_uids_of_at_most_64_chars_are_valid(uid: str, ok: bool) -> None:
    assert valid_uid(uid) is ok


def test_instance_is_stored_under_its_uids_and_recorded(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    src = _ct_files(studies_root)[0]
    ds = pydicom.dcmread(src, stop_before_pixels=True)

    assert put(store, src) is True
    assert put(store, src) is False  # the same instance again is not new

    path = store.root / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID
    assert (path / f"{ds.SOPInstanceUID}.dcm").read_bytes() == src.read_bytes()
    assert list(store.files.tmp_dir.iterdir()) == []
    record = store.jobs.get(ds.SeriesInstanceUID)
    assert record is not None and (record.state, record.n_instances) == (RECEIVED, 1)


def test_crafted_uid_is_refused_before_anything_is_written(tmp_path: Path):
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidUidError, match="SOPInstanceUID"):
        store.put_instance(
            b"x", study_instance_uid="1.2", series_instance_uid="1.2.3",
            sop_instance_uid="../../../escaped", sop_class_uid="1.2",
        )
    with pytest.raises(InvalidUidError, match="StudyInstanceUID"):
        store.put_instance(
            b"x", study_instance_uid="/tmp", series_instance_uid="1.2.3",
            sop_instance_uid="1.2.3.4", sop_class_uid="1.2",
        )
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".sqlite"
            and "sqlite" not in p.name] == []
    assert store.jobs.count_instances() == 0


def test_free_space_floor_refuses_to_write(tmp_path: Path):
    store = Store(tmp_path / "store", min_free_mb=1e12)  # more than any disk has
    with pytest.raises(OutOfSpaceError, match="floor"):
        store.put_instance(
            b"x", study_instance_uid="1.2", series_instance_uid="1.2.3",
            sop_instance_uid="1.2.3.4", sop_class_uid="1.2",
        )
    assert not (store.files.instances_dir / "1.2").exists()


def test_series_is_queued_only_after_stable_seconds_of_quiet(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    put(store, _ct_files(studies_root)[0])
    assert store.jobs.promote_stable(60.0) == 0
    assert store.jobs.promote_stable(60.0, now=time.time() + 61) == 1
    assert store.jobs.list_series()[0].state == WAITING


def test_jobs_are_claimed_in_arrival_order(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    first = _ct_files(studies_root)[0]
    second = sorted((studies_root / "study_001" / "ct").glob("*.dcm"))[0]
    put(store, first)
    put(store, second)
    store.jobs.promote_stable(0.0)
    claimed = store.jobs.claim_next()
    assert claimed is not None
    assert claimed.series_instance_uid == pydicom.dcmread(first).SeriesInstanceUID
    assert claimed.state == CLASSIFYING


def test_late_instance_reopens_a_sent_series_for_the_next_revision(
    tmp_path: Path, studies_root: Path
):
    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    put(store, files[0])
    _classified(store, series_uid)
    store.jobs.mark_sent(store.jobs.due_sends()[0])
    assert store.jobs.get(series_uid).state == SENT  # type: ignore[union-attr]

    put(store, files[1])

    record = store.jobs.get(series_uid)
    assert record is not None
    assert (record.state, record.sent_revision, record.n_instances) == (RECEIVED, 1, 2)


def test_result_of_a_series_that_changed_while_classifying_is_discarded(
    tmp_path: Path, studies_root: Path
):
    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    put(store, files[0])
    store.jobs.promote_stable(0.0)
    record = store.jobs.claim_next()
    assert record is not None
    put(store, files[1])  # arrives while the worker classifies

    kept = store.finish_classified(
        record, revision=1, sr_path=store.files.sr_path(series_uid, "2.25.1"),
        sr_sop_instance_uid="2.25.1", probability_covid=0.5, label="covid", classify_seconds=1,
    )

    assert kept is False
    assert store.jobs.get(series_uid).state == RECEIVED  # type: ignore[union-attr]


def test_send_failures_back_off_exponentially_then_fail(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    put(store, files[0])
    _classified(store, series_uid)
    waits = []
    for _ in range(2):
        record = store.jobs.list_series(CLASSIFIED)[0]
        before = time.time()
        state, next_try = store.jobs.mark_send_failed(
            record, "refused", retry_seconds=10, max_retry_seconds=100, max_attempts=3
        )
        assert state == CLASSIFIED and next_try is not None
        waits.append(next_try - before)
    assert waits[0] == pytest.approx(10, abs=1) and waits[1] == pytest.approx(20, abs=1)

    state, next_try = store.jobs.mark_send_failed(
        store.jobs.list_series(CLASSIFIED)[0], "refused", retry_seconds=10, max_retry_seconds=100,
        max_attempts=3,
    )

    record = store.jobs.get(series_uid)
    assert (state, next_try) == (FAILED, None)
    assert record is not None and record.state == FAILED and "3 time(s)" in record.reason


def test_resume_puts_interrupted_jobs_back_in_the_queue(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    put(store, _ct_files(studies_root)[0])
    store.jobs.promote_stable(0.0)
    assert store.jobs.claim_next() is not None
    store.close()

    reopened = Store(tmp_path / "store")  # as after kill -9 of the node
    assert reopened.jobs.resume(max_classify_attempts=3) == 1
    assert reopened.jobs.list_series()[0].state == WAITING


def test_reconcile_records_files_the_database_missed(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    src = _ct_files(studies_root)[0]
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    # A crash between rename and commit: the file is in place, the row is not.
    store.files.write_file(store.files.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID), src.read_bytes())
    (store.files.tmp_dir / "half.part").write_bytes(b"half")

    assert store.reconcile() == 1
    assert store.jobs.count_instances() == 1
    assert list(store.files.tmp_dir.iterdir()) == []


def _modified(path: Path, **changes: str) -> bytes:
    """The instance at ``path`` with other pixel bytes (same SOPInstanceUID) or other UIDs."""
    from pydicom.filebase import DicomBytesIO

    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    if not changes:
        pixels = bytearray(ds.PixelData)
        pixels[:64] = bytes(255 - b for b in pixels[:64])
        ds.PixelData = bytes(pixels)
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _put_bytes(store: Store, data: bytes) -> bool:
    from pydicom.filebase import DicomBytesIO

    ds = pydicom.dcmread(DicomBytesIO(data), stop_before_pixels=True)
    return store.put_instance(
        data, study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
    )


def _sent_series(store: Store, files: list[Path]) -> str:
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    for path in files:
        put(store, path)
    _classified(store, series_uid)
    store.jobs.mark_sent(store.jobs.due_sends()[0])
    return series_uid


def test_identical_resend_of_an_instance_changes_nothing(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)[:3]
    series_uid = _sent_series(store, files)
    before = store.jobs.get(series_uid)

    again = put(store, files[1])

    assert again is False
    assert store.jobs.get(series_uid) == before  # still sent, same generation, same counts
    assert store.jobs.replaced_instances() == []
    assert list(store.files.replaced_dir.rglob("*.dcm")) == []


def test_same_uid_with_other_content_keeps_both_and_reruns_the_series(
    tmp_path: Path, studies_root: Path
):
    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)[:3]
    series_uid = _sent_series(store, files)
    before = store.jobs.get(series_uid)
    assert before is not None
    new_bytes = _modified(files[1])

    changed = _put_bytes(store, new_bytes)

    ds = pydicom.dcmread(files[1], stop_before_pixels=True)
    path = store.files.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert changed is True
    assert path.read_bytes() == new_bytes  # the new instance is the one the series now holds
    (replaced,) = store.jobs.replaced_instances()
    assert replaced["sop_instance_uid"] == ds.SOPInstanceUID
    assert (store.root / replaced["path"]).read_bytes() == files[1].read_bytes()  # not lost
    record = store.jobs.get(series_uid)
    assert record is not None
    # Re-run as a revision: back in the queue, same instance count, next revision after 1.
    assert (record.state, record.n_instances, record.sent_revision) == (RECEIVED, 3, 1)
    assert record.generation == before.generation + 1
    assert store.jobs.count_instances() == 3


def test_same_series_uid_in_two_studies_is_two_series(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)[:2]
    for path in files:
        put(store, path)
    other_study = "2.25.4242"
    for i, path in enumerate(files):
        _put_bytes(store, _modified(path, StudyInstanceUID=other_study,
                                    SOPInstanceUID=f"2.25.4242.{i}"))

    records = store.jobs.list_series()
    assert len(records) == 2
    assert {r.series_instance_uid for r in records} == {str(pydicom.dcmread(files[0])
                                                           .SeriesInstanceUID)}
    assert sorted(r.n_instances for r in records) == [2, 2]
    other = store.jobs.get(records[0].series_instance_uid, other_study)
    assert other is not None and other.study_instance_uid == other_study
    assert len(store.instance_paths(other.series_instance_uid, other_study)) == 2


def test_series_uid_shared_by_two_studies_is_classified_twice(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    path = _ct_files(studies_root)[0]
    put(store, path)
    _put_bytes(store, _modified(path, StudyInstanceUID="2.25.77", SOPInstanceUID="2.25.77.1"))
    store.jobs.promote_stable(0.0)

    first, second = store.jobs.claim_next(), store.jobs.claim_next()

    assert first is not None and second is not None
    assert {first.study_instance_uid, second.study_instance_uid} == {
        str(pydicom.dcmread(path).StudyInstanceUID), "2.25.77"}


def test_new_study_and_series_folders_are_fsynced_in_their_parents(
    tmp_path: Path, studies_root: Path, monkeypatch: pytest.MonkeyPatch
):
    import ctcovid.fsio
    import ctcovid.node.files as files_module

    store = Store(tmp_path / "store")
    synced: list[Path] = []
    real = ctcovid.fsio.fsync_dir
    # The file store fsyncs directly and through ctcovid.fsio.make_dirs_durable: record both.
    for module in (files_module, ctcovid.fsio):
        monkeypatch.setattr(module, "fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    path = _ct_files(studies_root)[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    put(store, path)

    study_dir = store.files.instances_dir / ds.StudyInstanceUID
    # The new study folder's entry lives in instances/, the new series folder's in the study's.
    assert store.files.instances_dir in synced
    assert study_dir in synced
    assert study_dir / ds.SeriesInstanceUID in synced  # the instance's rename


def test_receipts_are_committed_with_synchronous_full(tmp_path: Path):
    store = Store(tmp_path / "store")
    assert store.jobs._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_store_keyed_by_series_alone_is_migrated(tmp_path: Path, studies_root: Path):
    import sqlite3

    root = tmp_path / "store"
    root.mkdir()
    old = sqlite3.connect(root / "node.sqlite")
    old.executescript(
        "CREATE TABLE series (series_instance_uid TEXT PRIMARY KEY, study_instance_uid TEXT "
        "NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', n_instances INTEGER "
        "NOT NULL DEFAULT 0, first_received REAL NOT NULL, last_received REAL NOT NULL, "
        "generation INTEGER NOT NULL DEFAULT 0, classify_attempts INTEGER NOT NULL DEFAULT 0, "
        "revision INTEGER NOT NULL DEFAULT 0, sent_revision INTEGER NOT NULL DEFAULT 0, sr_path "
        "TEXT NOT NULL DEFAULT '', sr_sop_instance_uid TEXT NOT NULL DEFAULT '', "
        "probability_covid REAL, label TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL "
        "DEFAULT 0, next_try REAL NOT NULL DEFAULT 0, classify_seconds REAL, updated_at REAL "
        "NOT NULL);"
        "INSERT INTO series (series_instance_uid, study_instance_uid, state, first_received, "
        "last_received, updated_at, sent_revision) VALUES ('1.2.3', '1.2', 'sent', 1, 1, 1, 1);"
    )
    old.commit()
    old.close()

    store = Store(root)
    store.record_instance(study_instance_uid="1.9", series_instance_uid="1.2.3",
                          sop_instance_uid="1.2.3.4", sop_class_uid="1.2", path=root / "x.dcm")

    assert store.jobs.get("1.2.3", "1.2").sent_revision == 1  # type: ignore[union-attr]
    assert len(store.jobs.list_series()) == 2


def test_job_states_are_the_strings_existing_databases_hold(tmp_path: Path):
    import sqlite3

    from ctcovid.node.jobs import JobState

    assert [s.value for s in JobState] == ["received", "waiting", "classifying", "classified",
                                           "sent", "failed", "unusable", "shadow", "ignored"]
    store = Store(tmp_path / "store")
    store.record_instance(study_instance_uid="1.2", series_instance_uid="1.2.3",
                          sop_instance_uid="1.2.3.4", sop_class_uid="1.2",
                          path=store.root / "x.dcm")
    store.close()
    raw = sqlite3.connect(tmp_path / "store" / "node.sqlite")
    raw.execute("UPDATE series SET state = 'sent'")  # as a store written before the enum
    raw.commit()
    assert raw.execute("SELECT typeof(state) FROM series").fetchone()[0] == "text"
    raw.close()

    record = Store(tmp_path / "store").jobs.get("1.2.3")

    assert record is not None and record.state is JobState.SENT and record.state == "sent"


def test_the_state_table_names_every_state_and_each_transition_has_its_method():
    import ctcovid.node.jobs as jobs

    doc = jobs.__doc__ or ""
    for state in jobs.JobState:
        assert f"``{state.value}``" in doc
    for name in jobs.TRANSITIONS:
        method = "_reopen" if name == "reopen" else name
        assert callable(getattr(jobs.JobDatabase, method)), name
        if name != "reopen":
            assert f"{name}`" in doc, f"the state table does not name {name}"


def test_a_transition_the_state_table_does_not_allow_is_refused(
    tmp_path: Path, studies_root: Path
):
    from ctcovid.node.jobs import JobStateError

    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    put(store, files[0])
    store.jobs.promote_stable(0.0)
    waiting = store.jobs.get(series_uid)
    assert waiting is not None and waiting.state == WAITING

    with pytest.raises(JobStateError, match="mark_sent applies to a job in state classified"):
        store.jobs.mark_sent(waiting)
    with pytest.raises(JobStateError, match="not waiting"):
        store.jobs.finish_unusable(waiting, "not a CT")
    _classified(store, series_uid)
    classified = store.jobs.get(series_uid)
    with pytest.raises(JobStateError, match="finish_classified"):
        store.finish_classified(
            classified, revision=2, sr_path=store.files.sr_path(series_uid, "2.25.2"),  # type: ignore[arg-type]
            sr_sop_instance_uid="2.25.2", probability_covid=0.1, label="non-covid",
            classify_seconds=1.0,
        )

    after = store.jobs.get(series_uid)
    assert after is not None and (after.state, after.revision) == (CLASSIFIED, 1)


def test_a_send_that_ends_after_the_series_changed_leaves_it_in_its_new_state(
    tmp_path: Path, studies_root: Path
):
    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    put(store, files[0])
    _classified(store, series_uid)
    (sending,) = store.jobs.due_sends()
    put(store, files[1])  # arrives while the SR is on its way

    moved = store.jobs.mark_sent(sending)

    record = store.jobs.get(series_uid)
    assert moved is False
    assert record is not None and (record.state, record.sent_revision) == (RECEIVED, 1)
    assert record.sent_sr_path == sending.sr_path  # the predecessor of the next revision


def test_toml_settings_are_overridden_by_flags(tmp_path: Path):
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[node]\nstore = "data"\nport = 4242\nae_title = "FROMFILE"\n'
        'peer = "pacs.example:104:PACS"\nallow_aet = ["A", "B"]\nstable_seconds = 5\n'
    )

    config = load_config(toml, {"port": 11112, "ae_title": None, "allow_aet": None})

    assert config.port == 11112
    assert config.ae_title == "FROMFILE"
    assert config.store == tmp_path / "data"  # relative to the file
    assert config.peer == Peer("pacs.example", 104, "PACS")
    assert config.allow_aet == ("A", "B")
    assert config.stable_seconds == 5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"store": "s", "peer": "nohost"}, "HOST:PORT:AET"),
        ({"store": "s", "ae_title": "A" * 17}, "16"),
        ({"store": "s", "stable_secnds": 3}, "stable_secnds"),
        ({"store": "s", "tls_cert": "c.pem"}, "tls_key"),
        ({"port": 1}, "store is required"),
        ({"store": "s", "max_pdu_bytes": 0}, "max_pdu_bytes"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(settings: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_dict(settings)


def test_queue_lists_jobs_and_retries_failed_sends(tmp_path: Path, studies_root: Path):
    store = Store(tmp_path / "store")
    files = _ct_files(studies_root)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    put(store, files[0])
    _classified(store, series_uid)
    store.jobs.mark_send_failed(
        store.jobs.due_sends()[0], "association rejected", retry_seconds=1, max_retry_seconds=1,
        max_attempts=1,
    )
    store.close()
    runner = CliRunner()

    listed = runner.invoke(app, ["queue", "--store", str(tmp_path / "store"), "--json"])
    retried = runner.invoke(
        app, ["queue", "--store", str(tmp_path / "store"), "--json", "--retry", series_uid]
    )

    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.stdout)
    assert data["counts"][FAILED] == 1 and data["instances"] == 1
    assert "association rejected" in data["series"][0]["reason"]
    assert retried.exit_code == 0, retried.output
    after = json.loads(retried.stdout)
    assert after["requeued"] == [series_uid]
    assert after["series"][0]["state"] == CLASSIFIED and after["series"][0]["attempts"] == 0


def test_queue_on_a_folder_that_is_no_store_exits_1(tmp_path: Path):
    result = CliRunner().invoke(app, ["queue", "--store", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a node store" in result.output
