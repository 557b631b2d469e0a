"""``ctcovid batch``: archive index, one row per series, SRs, equality with classify, resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctcovid.batch import (
    CLASSIFIED,
    FAILED,
    INCOMPLETE,
    SKIPPED,
    BatchOptions,
    ResultRow,
    ResultsWriter,
    read_results,
    run_batch,
)
from ctcovid.batch.results import RESULTS_FILE
from ctcovid.cli.main import app
from ctcovid.inference import Classifier

N_SLICES = 8
SIZE = 64


def _break_pixels(paths: list[Path]) -> None:
    """Make every RLE file's header declare 3 segments: the header reads, the pixels do not."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    for path in paths:
        ds = pydicom.dcmread(path)
        [frame] = generate_frames(ds.PixelData, number_of_frames=1)
        ds.PixelData = encapsulate([(3).to_bytes(4, "little") + frame[4:]])
        ds.save_as(path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A messy archive: nested folders, a duplicated series, a localizer, an MR series, junk and
    truncated files, a series too short to classify and one whose pixels are all broken."""
    from dicom_fixtures import StudySpec, write_study

    root = tmp_path_factory.mktemp("archive")
    a = write_study(
        root / "site1" / "2020" / "A",
        StudySpec(positive=True, n_slices=N_SLICES, size=SIZE, add_localizer=True,
                  add_mr_series=True, add_junk=True),
        seed=11, index=0,
    )
    b = write_study(root / "site2" / "deep" / "er" / "B",
                    StudySpec(positive=False, n_slices=N_SLICES, size=SIZE), seed=11, index=1)
    shutil.copytree(b.ct_dir, root / "exports" / "B_again")  # every instance twice
    c = write_study(root / "site2" / "C", StudySpec(positive=True, n_slices=3, size=SIZE),
                    seed=11, index=2)
    d = write_study(root / "site3" / "D", StudySpec(positive=False, n_slices=6, size=SIZE,
                                                     transfer_syntax="rle"), seed=11, index=3)
    _break_pixels(d.paths)
    import pydicom

    localizer_uid = str(pydicom.dcmread(a.localizer_path).SeriesInstanceUID)
    mr_uid = str(pydicom.dcmread(a.mr_paths[0]).SeriesInstanceUID)
    expected = {
        a.ct_series_instance_uid: CLASSIFIED,
        b.ct_series_instance_uid: CLASSIFIED,
        localizer_uid: SKIPPED,
        mr_uid: SKIPPED,
        c.ct_series_instance_uid: SKIPPED,
        d.ct_series_instance_uid: FAILED,
    }
    return {"root": root, "expected": expected, "a": a, "b": b, "c": c, "d": d}


@pytest.fixture(scope="module")
def classifier(tiny_classifier) -> Classifier:
    """The tiny model, loaded once for the session (loading is most of a small run's time)."""
    return Classifier(tiny_classifier.model, tiny_classifier.artifact)


@pytest.fixture(scope="module")
def local_run(archive: dict, tiny_model_dir: Path, classifier: Classifier,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("batch") / "run"
    summary = run_batch(BatchOptions(archive["root"], out, tiny_model_dir, workers=1),
                        classifier=classifier)
    return out, summary


def _rows(out: Path) -> dict[str, ResultRow]:
    rows = read_results(out / RESULTS_FILE)
    return {r.series_instance_uid: r for r in rows}


def test_one_row_per_series_with_its_status(archive: dict, local_run: tuple[Path, dict]) -> None:
    out, _ = local_run
    rows = read_results(out / RESULTS_FILE)
    assert sorted(r.series_instance_uid for r in rows) == sorted(archive["expected"])
    assert {r.series_instance_uid: r.status for r in rows} == archive["expected"]


def test_rows_say_why_a_series_was_skipped_or_failed(archive: dict, local_run: tuple) -> None:
    rows = _rows(local_run[0])
    assert any("ImageType is LOCALIZER" in r.reason for r in rows.values())
    assert any("modality MR is not CT" in r.reason for r in rows.values())
    assert rows[archive["c"].ct_series_instance_uid].reason.startswith("too few slices: 3")
    failed = rows[archive["d"].ct_series_instance_uid]
    assert "no slice could be decoded" in failed.reason
    assert failed.probability_covid is None and failed.sr_path == ""


def test_csv_has_the_contract_columns(local_run: tuple[Path, dict]) -> None:
    with open(local_run[0] / RESULTS_FILE, newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:9] == [
        "study_instance_uid", "series_instance_uid", "patient_id", "status", "reason",
        "probability_covid", "label", "n_slices_used", "sr_path",
    ]


def test_index_records_bad_files_and_duplicates(archive: dict, local_run: tuple) -> None:
    out, summary = local_run
    with sqlite3.connect(out / "index.sqlite") as conn:
        bad = dict(conn.execute("SELECT path, reason FROM bad_files").fetchall())
        dups = conn.execute("SELECT path FROM duplicates").fetchall()
        n_b = conn.execute(
            "SELECT n_instances, duplicates FROM series WHERE series_instance_uid = ?",
            (archive["b"].ct_series_instance_uid,),
        ).fetchone()
    junk = archive["a"].junk
    assert "not a DICOM file" in bad[str(junk["text"])]
    assert str(junk["empty"]) in bad
    # B's eight instances plus its eight copies, and A's duplicate file: counted once each.
    assert len(dups) == N_SLICES + 1
    assert n_b == (N_SLICES, N_SLICES)
    assert summary["index"]["bad_files"] == len(bad)


def test_one_sr_per_classified_series(archive: dict, local_run: tuple, tiny_model_dir: Path
                                      ) -> None:
    import pydicom

    from ctcovid.model.artifact import read_artifact
    from ctcovid.report import sr_summary

    out, _ = local_run
    rows = _rows(out)
    classified = [r for r in rows.values() if r.status == CLASSIFIED]
    assert len(list((out / "sr").glob("*.dcm"))) == len(classified) == 2
    device_uid = read_artifact(tiny_model_dir).device_uid
    for row in classified:
        sr = sr_summary(pydicom.dcmread(out / row.sr_path))
        assert sr["study_instance_uid"] == row.study_instance_uid
        assert sr["probability_covid"] == pytest.approx(row.probability_covid, abs=1e-6)
        assert sr["device_uid"] == device_uid


def test_batch_gives_the_numbers_of_classify(archive: dict, local_run: tuple,
                                             classifier: Classifier) -> None:
    from ctcovid.dicom import load_series

    rows = _rows(local_run[0])
    for study in (archive["a"], archive["b"]):
        result = classifier.classify(load_series(study.ct_dir, classifier.ingest_config))
        row = rows[study.ct_series_instance_uid]
        assert row.probability_covid == pytest.approx(result.probability_covid, abs=1e-6)
        assert (row.label, row.n_slices_used) == (result.label, result.n_slices_used)


def test_summary_counts_statuses(local_run: tuple) -> None:
    out, summary = local_run
    on_disk = json.loads((out / "summary.json").read_text())
    expected = {CLASSIFIED: 2, SKIPPED: 3, FAILED: 1, INCOMPLETE: 0}
    assert on_disk["counts"] == summary["counts"] == expected
    assert on_disk["this_run"]["slices_classified"] == 2 * N_SLICES


def test_torn_last_line_is_cut_and_rows_stay_unique(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_FILE
    with ResultsWriter(path) as writer:
        writer.append(ResultRow("1.2", "1.2.3", "P1", SKIPPED, reason="modality MR is not CT"))
    with open(path, "a") as fh:
        fh.write("1.2,1.2.4,P1,classi")  # a power cut in the middle of a row
    with ResultsWriter(path) as writer:
        assert writer.done == {("1.2", "1.2.3")}
        with pytest.raises(ValueError, match=r"1\.2\.3 already has a row"):
            writer.append(ResultRow("1.2", "1.2.3", "P1", SKIPPED))
        writer.append(ResultRow("1.2", "1.2.4", "P1", FAILED, reason="broken"))
    assert [r.series_instance_uid for r in read_results(path)] == ["1.2.3", "1.2.4"]


def test_out_folder_of_another_model_is_refused(local_run: tuple, archive: dict,
                                                tiny_model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    meta = json.loads((other / "ctcovid.json").read_text())
    meta["weights_sha256"] = "0" * 64  # another model identity (device UID)
    (other / "ctcovid.json").write_text(json.dumps(meta))
    out = local_run[0]
    result = CliRunner().invoke(
        app, ["batch", str(archive["root"]), "--out", str(out), "--model", str(other),
              "--resume", "--quiet"],
    )
    assert result.exit_code == 1
    assert "another model" in result.output
    assert "new --out" in result.output


def test_out_folder_with_results_needs_resume(local_run: tuple, archive: dict,
                                              tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["batch", str(archive["root"]), "--out", str(local_run[0]), "--model",
              str(tiny_model_dir), "--quiet"],
    )
    assert result.exit_code == 1
    assert "--resume" in result.output


def test_resume_is_a_no_op_when_everything_is_done(local_run: tuple, archive: dict,
                                                   tiny_model_dir: Path) -> None:
    out = local_run[0]
    before = (out / RESULTS_FILE).read_bytes()
    summary = run_batch(BatchOptions(archive["root"], out, tiny_model_dir, resume=True,
                                     workers=1))
    assert (out / RESULTS_FILE).read_bytes() == before
    assert summary["this_run"]["series"] == 0
    assert summary["index"]["reused"] is True


def test_resume_after_an_interruption_finishes_the_rest(
    archive: dict, local_run: tuple, tiny_model_dir: Path, classifier: Classifier, tmp_path: Path
) -> None:
    full_out = local_run[0]
    out = tmp_path / "run"
    shutil.copytree(full_out, out)
    lines = (out / RESULTS_FILE).read_text().splitlines(keepends=True)
    # An interrupted run: header and two finished rows, then a row torn by a power cut.
    (out / RESULTS_FILE).write_text("".join(lines[:3]) + lines[3][:25])
    summary = run_batch(BatchOptions(archive["root"], out, tiny_model_dir, resume=True, workers=1),
                        classifier=classifier)
    rows = read_results(out / RESULTS_FILE)
    uids = [r.series_instance_uid for r in rows]
    assert len(uids) == len(set(uids))
    assert summary["resumed_rows"] == 2
    full = _rows(full_out)
    assert sorted(uids) == sorted(full)
    for row in rows:
        assert row.status == full[row.series_instance_uid].status
        if row.probability_covid is not None:
            assert row.probability_covid == pytest.approx(
                full[row.series_instance_uid].probability_covid, abs=1e-6
            )


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight plain series: enough work after the first row that a kill lands midway."""
    from dicom_fixtures import generate_studies

    root = tmp_path_factory.mktemp("big_archive")
    generate_studies(root, 8, seed=5, n_slices=N_SLICES, size=SIZE)
    (root / "manifest.json").unlink()  # not DICOM; keep the archive to the studies
    return root


@pytest.mark.slow  # a real process loads the model: about 75 s on two cores
def test_kill_9_then_resume_finishes_without_duplicates(big_archive: Path, tiny_model_dir: Path,
                                                        classifier: Classifier, tmp_path: Path
                                                        ) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ctcovid.cli.main", "batch", str(big_archive), "--out",
           str(out), "--model", str(tiny_model_dir), "--workers", "0", "--batch-size", "2",
           "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    results = out / RESULTS_FILE
    deadline = time.monotonic() + 300
    killed_midway = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and CLASSIFIED in results.read_text():
                os.killpg(proc.pid, signal.SIGKILL)
                killed_midway = True
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert killed_midway or proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    rows_before = read_results(results)
    if len(rows_before) == 8:  # finished before the kill landed: cut it back ourselves
        lines = results.read_text().splitlines(keepends=True)
        results.write_text("".join(lines[:3]))
        rows_before = read_results(results)
    assert 0 < len(rows_before) < 8
    print(f"killed midway: {killed_midway}, rows before resume: {len(rows_before)}")
    with open(results, "a") as fh:
        fh.write("2.25.1,2.25.2,FX,classif")  # and a row torn by the power going
    summary = run_batch(BatchOptions(big_archive, out, tiny_model_dir, resume=True, workers=1),
                        classifier=classifier)
    rows = read_results(results)
    uids = [r.series_instance_uid for r in rows]
    assert len(uids) == len(set(uids)) == 8
    assert rows[: len(rows_before)] == rows_before  # finished rows were not redone
    assert all(r.status == CLASSIFIED for r in rows)
    assert summary["resumed_rows"] == len(rows_before)
    assert len(list((out / "sr").glob("*.dcm"))) == 8
    assert not list((out / "sr").glob(".*"))  # no temp files left by the kill


def test_ray_engine_gives_the_results_of_the_local_engine(
    archive: dict, local_run: tuple, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ctcovid[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed")
    out = tmp_path / "ray_run"
    try:
        summary = run_batch(BatchOptions(archive["root"], out, tiny_model_dir, engine="ray",
                                         workers=1, ray_num_cpus=2))
    finally:
        ray.shutdown()
    local = _rows(local_run[0])
    remote = _rows(out)
    assert summary["counts"] == local_run[1]["counts"]
    assert remote.keys() == local.keys()
    for uid, row in local.items():
        other = remote[uid]
        assert (other.status, other.reason, other.label, other.n_slices_used, other.sr_path) == (
            row.status, row.reason, row.label, row.n_slices_used, row.sr_path
        )
        if row.probability_covid is not None:
            assert other.probability_covid == pytest.approx(row.probability_covid, abs=1e-6)


@pytest.fixture(scope="module")
def bomb_archive(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One healthy study and, beside it, a series of JPEG-LS decompression bombs."""
    from bombs import write_bomb_series

    from dicom_fixtures import StudySpec, write_study

    root = tmp_path_factory.mktemp("bombs")
    healthy = write_study(root / "healthy", StudySpec(positive=True, n_slices=N_SLICES, size=SIZE),
                          seed=5, index=0)
    bomb_uid = write_bomb_series(sorted(healthy.paths), root / "bomb")
    return {"root": root, "healthy": healthy.ct_series_instance_uid, "bomb": bomb_uid}


def test_a_bomb_fails_its_series_alone_and_resume_does_not_retry_it(
    bomb_archive: dict, unbounded_model_dir: Path, tmp_path: Path
) -> None:
    """The decoders' memory limit is the backstop behind the ingest's size checks (which refuse
    this bomb from its header with the default limits): a model whose limits let it through."""
    out = tmp_path / "run"
    options = BatchOptions(bomb_archive["root"], out, unbounded_model_dir, workers=1,
                           decoder_memory_mb=1536)
    classifier = Classifier.from_file(unbounded_model_dir)

    summary = run_batch(options, classifier=classifier)
    again = run_batch(dataclasses.replace(options, resume=True), classifier=classifier)

    rows = _rows(out)
    assert rows[bomb_archive["healthy"]].status == CLASSIFIED
    bomb = rows[bomb_archive["bomb"]]
    assert bomb.status == FAILED
    assert "allocate" in bomb.reason or "memory" in bomb.reason
    assert summary["counts"] == {CLASSIFIED: 1, SKIPPED: 0, FAILED: 1, INCOMPLETE: 0}
    assert again["this_run"]["series"] == 0  # a failed row is final: --resume moves on


def test_a_decoder_process_killed_mid_run_is_replaced_and_every_series_finishes(
    archive: dict, classifier: Classifier, tmp_path: Path
) -> None:
    import threading

    from ctcovid.batch.engine import BatchSink, run_local
    from ctcovid.batch.index import build_index, iter_series
    from ctcovid.batch.results import BatchProgress
    from ctcovid.decoder import decoder_pool

    out = tmp_path / "run"
    out.mkdir()
    build_index(archive["root"], out / "index.sqlite", classifier.ingest_config)
    usable = [e for e in iter_series(out / "index.sqlite") if e.usable]
    pool = decoder_pool(1)
    killed: list[int] = []

    def kill_while_decoding() -> None:  # as the kernel's OOM killer would
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if pool._pending_work_items and pool._processes:
                for pid in list(pool._processes):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_while_decoding, daemon=True)
    killer.start()
    with pool, ResultsWriter(out / RESULTS_FILE) as writer:
        run_local(usable, classifier, BatchSink(out, classifier.artifact, writer, BatchProgress()),
                  workers=1, pool=pool)
    killer.join(5)

    assert killed  # a decoder really died in the middle of the run
    rows = _rows(out)
    assert sorted(rows) == sorted(e.series_instance_uid for e in usable)  # every series, once
    for entry in usable:  # the series in flight was re-run alone, and decodes fine
        assert rows[entry.series_instance_uid].status == archive["expected"][
            entry.series_instance_uid]


def _messy_rows() -> list[ResultRow]:
    return [
        ResultRow("1.2", "1.2.3", "P1", FAILED, reason="decode error:\nline two, \"quoted\"\n"),
        ResultRow("1.2", "1.2.4", "P1", SKIPPED, reason="modality MR is not CT"),
        ResultRow("1.2", "1.2.5", "P,2", FAILED, reason="a\r\nb\n\n\"c\""),
    ]


def test_a_torn_record_with_newlines_in_quoted_fields_is_cut(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_FILE
    first, second, _ = _messy_rows()
    with ResultsWriter(path) as writer:
        writer.append(first)
        writer.append(dataclasses.replace(second, reason="error at byte 7:\nunexpected end"))
    data = path.read_bytes()
    # A power cut right after a newline *inside* the second record's quoted reason.
    path.write_bytes(data[: data.index(b"\n", data.index(b"byte 7:")) + 1])

    with ResultsWriter(path) as writer:
        assert writer.done == {first.key}
        writer.append(second)

    assert read_results(path) == [first, second]  # nothing swallowed, newlines intact


def test_results_survive_a_crash_at_any_byte(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_FILE
    rows = _messy_rows()
    with ResultsWriter(path) as writer:
        for row in rows:
            writer.append(row)
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    for cut in range(header_end, len(data) + 1):
        path.write_bytes(data[:cut])
        with ResultsWriter(path) as writer:
            kept = list(writer.rows)
            assert kept == rows[: len(kept)], cut  # a prefix of what was written, never garbage
            for row in rows[len(kept):]:
                writer.append(row)
        assert read_results(path) == rows, cut


def test_two_runs_on_one_out_folder_are_refused(
    archive: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import fcntl

    from ctcovid.errors import ConfigError

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another run holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="in use by another 'ctcovid batch' run"):
            run_batch(BatchOptions(archive["root"], out, tiny_model_dir, workers=0))
    assert not (out / RESULTS_FILE).exists()



# Holds the out folder's lock as a running batch would, until its stdin closes (at most 60 s).
_LOCK_HOLDER = """
import fcntl, signal, sys
signal.alarm(60)
with open(sys.argv[1], "a+") as fh:
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_batch_on_an_out_folder_in_use_by_another_process_exits_1_naming_it(
    archive: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(out / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        result = CliRunner().invoke(
            app, ["batch", str(archive["root"]), "--out", str(out), "--model",
                  str(tiny_model_dir), "--workers", "0", "--quiet"],
        )
    finally:
        holder.communicate(timeout=30)  # closes its stdin: the lock goes with the process

    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert f"error: {out} is in use by another 'ctcovid batch' run" in line
    assert not (out / RESULTS_FILE).exists()

@pytest.fixture
def small_archive(tmp_path: Path) -> Path:
    from dicom_fixtures import StudySpec, write_study

    root = tmp_path / "archive"
    write_study(root / "A", StudySpec(positive=True, n_slices=N_SLICES, size=SIZE), seed=3,
                index=0)
    return root


def _index(archive_root: Path, out: Path) -> tuple:
    from ctcovid.batch.index import build_index
    from ctcovid.config import IngestConfig

    db = out / "index.sqlite"
    summary = build_index(archive_root, db, IngestConfig())
    conn = sqlite3.connect(db)
    try:
        bad = dict(conn.execute("SELECT path, reason FROM bad_files").fetchall())
        notes = dict(conn.execute("SELECT path, note FROM walk_notes").fetchall())
        series = conn.execute("SELECT COUNT(*) FROM series").fetchone()[0]
    finally:
        conn.close()
    return summary, bad, notes, series


def test_a_fifo_in_the_archive_is_reported_and_never_opened(
    small_archive: Path, tmp_path: Path
) -> None:
    import threading

    fifo = small_archive / "A" / "zz_pipe.dcm"
    os.mkfifo(fifo)
    found: list = []
    indexer = threading.Thread(target=lambda: found.append(_index(small_archive, tmp_path)),
                               daemon=True)
    indexer.start()
    indexer.join(60)
    if indexer.is_alive():  # it opened the FIFO: give it an end of file so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("indexing blocked on a FIFO in the archive")

    summary, bad, _, series = found[0]
    assert "FIFO" in bad[str(fifo)] and "not opened" in bad[str(fifo)]
    assert series == 1 and summary.n_instances == N_SLICES


def test_symlinked_folders_are_followed_once_and_reported(
    small_archive: Path, tmp_path: Path
) -> None:
    from dicom_fixtures import StudySpec, write_study

    elsewhere = tmp_path / "other_volume"
    write_study(elsewhere / "B", StudySpec(positive=False, n_slices=N_SLICES, size=SIZE), seed=3,
                index=1)
    (small_archive / "linked").symlink_to(elsewhere, target_is_directory=True)
    (small_archive / "second_link").symlink_to(elsewhere, target_is_directory=True)
    (small_archive / "A" / "loop").symlink_to(small_archive, target_is_directory=True)
    (small_archive / "dangling").symlink_to(tmp_path / "gone")

    summary, bad, notes, series = _index(small_archive, tmp_path)

    assert series == 2  # the linked volume's study is indexed
    assert summary.n_duplicates == 0  # ... once, though two links lead to it
    assert summary.n_symlinked_folders == 3
    assert notes[str(small_archive / "linked")].startswith("followed to")
    assert "not followed" in notes[str(small_archive / "second_link")]
    assert "loop" in notes[str(small_archive / "A" / "loop")]
    assert "broken link" in bad[str(small_archive / "dangling")]


def test_resume_reindexes_an_archive_that_changed(
    small_archive: Path, tiny_model_dir: Path, classifier: Classifier, tmp_path: Path
) -> None:
    from dicom_fixtures import StudySpec, write_study

    out = tmp_path / "run"
    options = BatchOptions(small_archive, out, tiny_model_dir, workers=0)
    first = run_batch(options, classifier=classifier)
    added = write_study(small_archive / "B", StudySpec(positive=False, n_slices=N_SLICES,
                                                        size=SIZE), seed=3, index=1)

    second = run_batch(dataclasses.replace(options, resume=True), classifier=classifier)

    assert first["series"] == 1
    assert second["index"]["reused"] is False
    assert second["this_run"]["series"] == 1
    assert _rows(out)[added.ct_series_instance_uid].status == CLASSIFIED


def test_a_series_whose_decoder_dies_when_run_alone_fails_with_the_reason(
    archive: dict, classifier: Classifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import ctcovid.batch.engine as engine
    import ctcovid.decoder as decoder
    from ctcovid.batch.engine import BatchSink
    from ctcovid.batch.index import build_index, iter_series
    from ctcovid.batch.results import BatchProgress
    from ctcovid.decoder import decoder_pool

    out = tmp_path / "run"
    out.mkdir()
    build_index(archive["root"], out / "index.sqlite", classifier.ingest_config)
    usable = [e for e in iter_series(out / "index.sqlite") if e.usable]
    pools = [decoder_pool(1)]

    def recorded_pool(workers: int, memory_mb: int, niceness: int = 0):  # the real pool, kept
        pools.append(decoder_pool(workers, memory_mb, niceness))
        return pools[-1]

    monkeypatch.setattr(decoder, "decoder_pool", recorded_pool)
    killed: list[int] = []

    def kill_twice() -> None:
        """Kill a decoder while it decodes (the series in flight become suspects), then kill
        the decoder of the first suspect re-run alone: that series is the one to fail."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(killed) < 2:
            pool = pools[-1]
            if len(pools) == len(killed) + 1 and pool._pending_work_items and pool._processes:
                for pid in list(pool._processes):
                    os.kill(pid, signal.SIGKILL)
                killed.append(len(pools))
            time.sleep(0.01)

    killer = threading.Thread(target=kill_twice, daemon=True)
    killer.start()
    with pools[0], ResultsWriter(out / RESULTS_FILE) as writer:
        sink = BatchSink(out, classifier.artifact, writer, BatchProgress())
        engine.run_local(usable, classifier, sink, workers=1, pool=pools[0])
    killer.join(5)

    assert len(killed) == 2
    rows = _rows(out)
    assert sorted(rows) == sorted(e.series_instance_uid for e in usable)
    crashed = [r for r in rows.values() if "decoder process died" in r.reason]
    assert len(crashed) == 1 and crashed[0].status == FAILED  # alone, with the reason
    others = [r for r in rows.values() if r not in crashed]
    assert all(r.status == archive["expected"][r.series_instance_uid] for r in others)


# -- the index streams ----------------------------------------------------------------------------


def _index_in_memory(root: Path, config) -> dict:
    """The index as it was built before it streamed: every header read, then grouped at once."""
    from ctcovid.batch.index import ArchiveWalk, walk_archive
    from ctcovid.dicom.scan import group_instances, read_header
    from ctcovid.dicom.series import assess
    from ctcovid.dicom.types import BadFile, Instance

    walk = ArchiveWalk([], [])
    items = [read_header(p) for p in walk_archive(root, walk)]
    instances = [it for it in items if isinstance(it, Instance)]
    series_list, _ = group_instances(instances)
    kept = {id(inst) for s in series_list for inst in s.instances}
    for series in series_list:
        assess(series, config)
    return {
        "series": [(s.study_instance_uid, s.series_instance_uid, s.patient_id, s.modality,
                    s.n_instances, s.n_slices, s.usable, s.reason,
                    tuple(str(i.path) for i in s.instances), s.duplicates)
                   for s in series_list],
        "duplicates": sorted((str(i.path), i.sop_instance_uid) for i in instances
                             if id(i) not in kept),
        "bad_files": sorted((str(b.path), b.reason)
                            for b in walk.skipped + [it for it in items
                                                     if isinstance(it, BadFile)]),
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_the_streamed_index_is_the_index_grouped_in_memory(
    archive: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Series (order, verdicts, reasons, files), duplicates and bad files of the messy archive,
    with batches of 3 rows and, with two workers, chunks of 4 files finishing in any order."""
    import ctcovid.batch.index as index
    from ctcovid.config import IngestConfig

    monkeypatch.setattr(index, "CHUNK_FILES", 4)
    config = IngestConfig()
    db = tmp_path / "index.sqlite"
    summary = index.build_index(archive["root"], db, config, workers=workers, batch_rows=3)

    expected = _index_in_memory(archive["root"], config)
    got = [(e.study_instance_uid, e.series_instance_uid, e.patient_id, e.modality,
            e.n_instances, e.n_slices, e.usable, e.reason, e.paths, e.duplicates)
           for e in index.iter_series(db)]
    assert got == expected["series"]
    with sqlite3.connect(db) as conn:
        assert sorted(conn.execute("SELECT path, sop_instance_uid FROM duplicates")) == \
            expected["duplicates"]
        assert sorted(conn.execute("SELECT path, reason FROM bad_files")) == \
            expected["bad_files"]
    assert (summary.n_series, summary.n_duplicates, summary.n_bad_files) == (
        len(expected["series"]), len(expected["duplicates"]), len(expected["bad_files"]))
    assert index.index_is_complete(db, archive["root"], config)
    assert not index.scratch_path(db).exists()  # the headers read went with the working file


def test_indexing_holds_a_batch_of_rows_and_one_series_of_headers_at_most(
    archive: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the archive's size: never more than ``batch_rows`` rows waiting to be written,
    and no more headers alive than the series being judged has instances."""
    import gc

    import ctcovid.batch.index as index
    from ctcovid.config import IngestConfig
    from ctcovid.dicom.types import Instance

    def live_headers() -> int:
        gc.collect()
        return sum(isinstance(o, Instance) for o in gc.get_objects())

    baseline = live_headers()
    held: list[int] = []  # rows held at each write
    alive: list[tuple[int, int]] = []  # (headers alive, instances of the series judged)
    flush, assess = index.Batched.flush, index.assess

    def recorded_flush(self) -> None:
        held.append(len(self.rows))
        if "scratch.headers" in self.sql:
            alive.append((live_headers() - baseline, 0))
        flush(self)

    def recorded_assess(series, config):
        alive.append((live_headers() - baseline, series.n_instances))
        return assess(series, config)

    monkeypatch.setattr(index.Batched, "flush", recorded_flush)
    monkeypatch.setattr(index, "assess", recorded_assess)
    summary = index.build_index(archive["root"], tmp_path / "index.sqlite", IngestConfig(),
                                batch_rows=4)

    assert max(held) <= 4
    assert len(held) >= summary.n_files / 4  # written as the walk and the reads went
    largest = max(n for _, n in alive)
    assert largest < summary.n_instances  # so the bound below is not the whole archive
    assert all(n_alive <= n for n_alive, n in alive), [a for a in alive if a[0] > a[1]]


def test_send_to_over_tls_delivers_every_sr_to_a_peer_that_requires_it(
    archive: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The batch's C-STORE is the node's sender: with the TLS options it speaks TLS (and shows
    our certificate to a peer that asks for one); a plain association is refused there."""
    import ssl

    from node_helpers import make_test_ca
    from pydicom.uid import Comprehensive3DSRStorage
    from pynetdicom import AE, evt

    pki = make_test_ca(tmp_path / "pki")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    server_tls.load_cert_chain(str(pki["cert"]), str(pki["key"]))
    server_tls.verify_mode = ssl.CERT_REQUIRED
    received: list[str] = []

    def store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_tls,
                             evt_handlers=[(evt.EVT_C_STORE, store)])  # fmt: skip
    try:
        peer = f"127.0.0.1:{server.server_address[1]}:PACS"
        result = CliRunner().invoke(app, [
            "batch", str(archive["root"]), "--out", str(tmp_path / "run"),
            "--model", str(tiny_model_dir), "--workers", "1", "--send-to", peer,
            "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
            "--tls-ca", str(pki["ca"]), "--json",
        ])  # fmt: skip
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    srs = {p.stem for p in (tmp_path / "run" / "sr").rglob("*.dcm")}
    assert srs and set(received) == srs


def test_result_card_goes_with_every_sr_to_a_real_pacs(
    archive: dict, tiny_model_dir: Path, classifier: Classifier, tmp_path: Path
) -> None:
    """``result_card`` (``--result-card``): a card per SR in out/cards, sent with its SR;
    dcmtk's storescp gets each SR and the card made for it."""
    import pydicom
    from node_helpers import PACS_AET, free_port, storescp
    from pydicom.uid import SecondaryCaptureImageStorage

    from ctcovid.net.sender import SendSettings
    from ctcovid.report.uids import card_sop_instance_uid

    port, out = free_port(), tmp_path / "run"
    pacs = SendSettings.c_store(f"127.0.0.1:{port}:{PACS_AET}")
    with storescp(tmp_path / "pacs", port):
        summary = run_batch(BatchOptions(archive["root"], out, tiny_model_dir, workers=1,
                                         destinations=(pacs,), result_card=True),
                            classifier=classifier)  # fmt: skip
    assert summary["card_dir"] == str(out / "cards")
    assert summary["sent"][str(pacs)]["sent"] == 2
    srs = {p.stem for p in (out / "sr").glob("*.dcm")}
    cards = {p.stem for p in (out / "cards").glob("*.dcm")}
    assert len(srs) == 2 and cards == {card_sop_instance_uid(uid) for uid in srs}
    received = [pydicom.dcmread(p) for p in (tmp_path / "pacs").iterdir()]
    assert {str(ds.SOPInstanceUID) for ds in received if ds.Modality == "SR"} == srs
    assert {str(ds.SOPInstanceUID) for ds in received
            if ds.SOPClassUID == SecondaryCaptureImageStorage} == cards  # fmt: skip


def test_result_card_is_refused_on_the_ray_engine(
    archive: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(app, [
        "batch", str(archive["root"]), "--out", str(tmp_path / "run"),
        "--model", str(tiny_model_dir), "--engine", "ray", "--result-card",
    ])  # fmt: skip
    assert result.exit_code == 1
    assert "--result-card needs --engine local" in result.output
