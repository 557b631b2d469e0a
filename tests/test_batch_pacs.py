"""``ctcovid batch`` against a real archive: Orthanc (+ DICOMweb plugin) on loopback ports.

The same studies are classified from a folder and from the PACS (C-GET, C-MOVE, QIDO-RS +
WADO-RS): the rows, probabilities and SR UIDs must be the same, the SRs must land in their
studies in the PACS, and the cache must stay within its bound.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from lxml import etree
from node_helpers import Orthanc, free_port, require_tool
from typer.testing import CliRunner

from ctcovid.batch import (
    CLASSIFIED,
    FAILED,
    INCOMPLETE,
    SKIPPED,
    BatchOptions,
    read_results,
    run_batch,
)
from ctcovid.batch.auditing import STUDY_ROOT_FIND
from ctcovid.batch.results import RESULTS_FILE
from ctcovid.batch.sources import PacsSource
from ctcovid.cli.main import app
from ctcovid.errors import ConfigError
from ctcovid.inference import Classifier
from ctcovid.net import SeriesMatch, SeriesRules, StudyQuery
from ctcovid.net.dicomweb import DicomWebArchive, HttpAuth
from ctcovid.net.dimse import DimseArchive, MoveReceiver
from ctcovid.net.peers import Peer
from ctcovid.net.sender import SendSettings

pytestmark = pytest.mark.network

N_SLICES = 8
SIZE = 64
OUR_AET = "CTCOVIDB"
USER = ("ctcovid", "not-a-real-secret")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


# -- rules and query parsing (no network) ---------------------------------------------------------


def test_series_rules_say_why_a_series_is_not_retrieved() -> None:
    rules = SeriesRules(body_parts=("CHEST", "THORAX"), descriptions=("*lung*", "*thorax*"))
    ok = SeriesMatch("1.2", "1.2.3", modality="CT", body_part="chest",
                     series_description="Lung 1.0 B70f")
    assert rules.reason(ok) == ""
    assert rules.reason(SeriesMatch("1.2", "1.2.4", modality="MR")) == "modality MR is not CT"
    head = SeriesMatch("1.2", "1.2.5", modality="CT", body_part="HEAD",
                       series_description="lung")
    assert "BodyPartExamined 'HEAD' matches none of CHEST, THORAX" in rules.reason(head)
    dose = SeriesMatch("1.2", "1.2.6", modality="CT", body_part="CHEST",
                       series_description="Dose Report")
    assert "SeriesDescription 'Dose Report'" in rules.reason(dose)


def test_study_query_makes_one_query_per_accession(tmp_path: Path) -> None:
    acc = tmp_path / "acc.txt"
    acc.write_text("A100\n# a comment\n\nA101  # trailing\nA100\n")
    query = StudyQuery.parse(["StudyDate=20200301-20210630"], accessions_file=acc)
    assert query.study_queries() == [
        {"StudyDate": "20200301-20210630", "ModalitiesInStudy": "CT", "AccessionNumber": "A100"},
        {"StudyDate": "20200301-20210630", "ModalitiesInStudy": "CT", "AccessionNumber": "A101"},
    ]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("StudyDat=20200101", "not a DICOM keyword"),
        ("StudyDate=2020-03-01", "YYYYMMDD"),
        ("StudyDate", "KEY=VALUE"),
        ("StudyInstanceUID=1.2.3", "set by ctcovid"),
    ],
)
def test_bad_query_items_are_refused_with_the_key(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StudyQuery.parse([item])


def test_credentials_come_from_a_file_or_the_environment(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "auth"
    secret.write_text("Basic user:pa:ss\n")
    auth = HttpAuth.load("CTCOVID_TEST_AUTH", secret)
    assert auth is not None and auth.header() == "Basic dXNlcjpwYTpzcw=="
    assert "pa:ss" not in repr(auth)
    monkeypatch.setenv("CTCOVID_TEST_AUTH", "Bearer abc.def")
    env_auth = HttpAuth.load("CTCOVID_TEST_AUTH")
    assert env_auth is not None and env_auth.header() == "Bearer abc.def"
    monkeypatch.setenv("CTCOVID_TEST_AUTH", "token-without-scheme")
    with pytest.raises(ConfigError, match="Bearer TOKEN"):
        HttpAuth.load("CTCOVID_TEST_AUTH")


# -- a real archive -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three studies: A (CT + a localizer-only series + an MR series), B (CT), C (a CT series too
    short to classify)."""
    from dicom_fixtures import StudySpec, write_study

    root = tmp_path_factory.mktemp("pacs_studies")
    a = write_study(root / "A", StudySpec(positive=True, n_slices=N_SLICES, size=SIZE,
                                          add_localizer=True, add_mr_series=True),
                    seed=21, index=0)
    b = write_study(root / "B", StudySpec(positive=False, n_slices=N_SLICES, size=SIZE),
                    seed=21, index=1)
    c = write_study(root / "C", StudySpec(positive=True, n_slices=3, size=SIZE), seed=21, index=2)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {"root": root, "files": files, "a": a, "b": b, "c": c}


def start_orthanc(work: Path, files: list[Path], move_port: int) -> Orthanc:
    require_tool("Orthanc")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian: orthanc-dicomweb)")
    orthanc = Orthanc(
        work, free_port(), basic_auth=USER,
        extra_config={
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # Our AE title may query, C-GET, and be the destination of a C-MOVE.
            "DicomModalities": {"ctcovid": {"AET": OUR_AET, "Host": "127.0.0.1",
                                            "Port": move_port, "AllowFind": True,
                                            "AllowGet": True, "AllowMove": True,
                                            "AllowStore": True}},
            "DicomCheckModalityHost": False,
        },
    )
    for path in files:
        orthanc.upload(path)
    return orthanc


@pytest.fixture(scope="module")
def pacs(studies: dict, tmp_path_factory: pytest.TempPathFactory):
    move_port = free_port()
    orthanc = start_orthanc(tmp_path_factory.mktemp("orthanc"), studies["files"], move_port)
    orthanc.move_port = move_port
    yield orthanc
    orthanc.close()


@pytest.fixture(scope="module")
def classifier(tiny_classifier) -> Classifier:
    return Classifier(tiny_classifier.model, tiny_classifier.artifact)


@pytest.fixture(scope="module")
def folder_rows(studies: dict, tiny_model_dir: Path, classifier: Classifier,
                tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("folder") / "run"
    run_batch(BatchOptions(studies["root"], out, tiny_model_dir, workers=0),
              classifier=classifier)
    return {r.series_instance_uid: r for r in read_results(out / RESULTS_FILE)}


def dimse_source(pacs: Orthanc, *, cache_bytes: int = 10**9, move: MoveReceiver | None = None,
                 max_retrievals: int = 1, pause_seconds: float = 0.0) -> PacsSource:
    archive = DimseArchive(Peer("127.0.0.1", pacs.dicom_port, pacs.aet),
                           calling_ae_title=OUR_AET, timeout_seconds=20, move_receiver=move)
    return PacsSource(archive, StudyQuery(), SeriesRules(), cache_bytes=cache_bytes,
                      max_retrievals=max_retrievals, pause_seconds=pause_seconds)


def dicomweb_source(pacs: Orthanc, auth: HttpAuth | None) -> PacsSource:
    pytest.importorskip("dicomweb_client", reason="pip install 'ctcovid[dicomweb]'")
    url = f"http://127.0.0.1:{pacs.http_port}/dicom-web"
    return PacsSource(DicomWebArchive(url, auth, timeout_seconds=20), StudyQuery(),
                      SeriesRules(), cache_bytes=10**9, pause_seconds=0.0)


def run_from(source: PacsSource, out: Path, model: Path, classifier: Classifier,
             workers: int = 0, **kwargs) -> dict:
    try:
        return run_batch(BatchOptions(out / "cache", out, model, workers=workers, source=source,
                                      **kwargs), classifier=classifier)
    finally:
        source.close()


def rows_of(out: Path) -> dict:
    return {r.series_instance_uid: r for r in read_results(out / RESULTS_FILE)}


def assert_same_rows(pacs_rows: dict, folder_rows: dict) -> None:
    assert folder_rows.keys() <= pacs_rows.keys()
    # The SRs that earlier runs filed into the studies are found too, and turned away.
    extra = [r for uid, r in pacs_rows.items() if uid not in folder_rows]
    assert all((r.status, r.reason) == (SKIPPED, "modality SR is not CT") for r in extra)
    for uid, row in folder_rows.items():
        other = pacs_rows[uid]
        assert (other.status, other.reason, other.label, other.n_slices_used, other.sr_path,
                other.patient_id) == (row.status, row.reason, row.label, row.n_slices_used,
                                      row.sr_path, row.patient_id), uid
        if row.probability_covid is not None:
            assert other.probability_covid == pytest.approx(row.probability_covid, abs=1e-6)


def sr_study_in_pacs(pacs: Orthanc, sr_path: str) -> str | None:
    """The StudyInstanceUID under which the PACS holds the SR of ``sr_path``, or None."""
    sop = Path(sr_path).stem
    found = pacs.request("POST", "/tools/lookup", sop.encode())
    if not found:
        return None
    tags = pacs.get(f"/instances/{found[0]['ID']}/simplified-tags")
    return tags["StudyInstanceUID"]


@pytest.fixture(scope="module")
def dimse_run(pacs: Orthanc, tiny_model_dir: Path, classifier: Classifier,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dimse") / "run"
    summary = run_from(
        dimse_source(pacs), out, tiny_model_dir, classifier,
        destinations=(SendSettings.c_store(f"127.0.0.1:{pacs.dicom_port}:{pacs.aet}",
                                          calling_ae_title=OUR_AET),),
        audit_file=out.parent / "audit.log",
    )
    return out, summary


def audit_events(path: Path) -> list[tuple[str, etree._Element]]:
    """(EventID, message) of each audit message in ``path``, each valid against the schema."""
    schema = etree.RelaxNG(etree.parse(str(Path(__file__).with_name("audit_message.rng"))))
    events = []
    for line in path.read_text().splitlines():
        doc = etree.fromstring(line.encode())
        assert schema.validate(doc), f"{schema.error_log}\n{line}"
        events.append((doc.find("EventIdentification/EventID").get("csd-code"), doc))
    return events


def assert_batch_audited(path: Path, rows: dict, *, query_object: str, sent_to: str = "",
                         n_sent: int = 0) -> list:
    """Start, queries, a Begin Transferring and an Instances Transferred per series retrieved,
    an Instances Transferred per SR sent (to ``sent_to``), the Export of results.csv and the
    stop; returns the Query messages."""
    events = audit_events(path)
    ids = [event for event, _ in events]
    assert ids[0] == ids[-1] == "110100" and ids.count("110106") == 1
    actions = [(event, doc.find("EventIdentification").get("EventActionCode"))
               for event, doc in events]
    retrieved = [r for r in rows.values() if r.status == CLASSIFIED]  # and some unusable ones
    assert ids.count("110102") == actions.count(("110104", "C")) >= len(retrieved)
    assert actions.count(("110104", "R")) == n_sent
    transfers = [doc for event, doc in events if event == "110104"]
    assert {d.find("EventIdentification").get("EventOutcomeIndicator") for d in transfers} == {"0"}
    sr_destinations = {
        p.get("UserID")
        for d in transfers if d.find("EventIdentification").get("EventActionCode") == "R"
        for p in d.iter("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110152"
    }
    assert sr_destinations == ({sent_to} if n_sent else set())
    transferred = {
        o.get("ParticipantObjectID") for d in transfers
        for o in d.iter("ParticipantObjectIdentification")
    }
    assert {r.study_instance_uid for r in retrieved} <= transferred
    assert {r.patient_id for r in retrieved} <= transferred
    queries = [doc for event, doc in events if event == "110112"]
    assert queries and all(
        query_object in q.find("ParticipantObjectIdentification").get("ParticipantObjectID")
        for q in queries
    )
    return queries


def test_dimse_batch_gives_the_rows_and_sr_uids_of_a_folder_batch(dimse_run: tuple,
                                                                  folder_rows: dict) -> None:
    out, summary = dimse_run
    assert_same_rows(rows_of(out), folder_rows)
    assert summary["counts"] == {CLASSIFIED: 2, SKIPPED: 3, FAILED: 0, INCOMPLETE: 0}
    # Audited: C-FIND queries (the identifier as sent), the C-GETs, the export.
    # and the SRs sent back by C-STORE.
    queries = assert_batch_audited(out.parent / "audit.log", rows_of(out),
                                   query_object=STUDY_ROOT_FIND, sent_to="ORTHANC", n_sent=2)
    assert b"STUDY" in base64.b64decode(queries[0].findtext(
        "ParticipantObjectIdentification/ParticipantObjectQuery"))


def test_query_records_non_ct_localizer_and_unusable_series_with_reasons(
    dimse_run: tuple, studies: dict
) -> None:
    rows = rows_of(dimse_run[0])
    reasons = sorted(r.reason for r in rows.values() if r.status == SKIPPED)
    assert reasons[0] == "ImageType is LOCALIZER (scout image)"
    assert reasons[1] == "modality MR is not CT"
    assert reasons[2].startswith("too few slices: 3")
    # The MR series is turned away by the query: it was never retrieved.
    assert dimse_run[1]["source"]["retrieved_series"] == 4


def test_srs_sent_by_c_store_land_in_their_studies(dimse_run: tuple, pacs: Orthanc) -> None:
    out, summary = dimse_run
    classified = [r for r in rows_of(out).values() if r.status == CLASSIFIED]
    for row in classified:
        assert sr_study_in_pacs(pacs, row.sr_path) == row.study_instance_uid
    (sent,) = summary["sent"].values()
    assert sent == {"sent": 2, "unchanged": 0, "failed": 0, "errors": []}


def test_cache_is_emptied_and_nothing_on_the_pacs_changes(dimse_run: tuple, pacs: Orthanc,
                                                          studies: dict) -> None:
    out, summary = dimse_run
    assert not list((out / "cache").rglob("*.dcm"))
    # Every source instance is still there (the SRs were added, nothing removed).
    assert pacs.get("/statistics")["CountInstances"] >= len(studies["files"])
    assert summary["source"]["cache_peak_bytes"] > 0


def test_dicomweb_batch_with_stow_gives_the_same_rows(
    pacs: Orthanc, tiny_model_dir: Path, classifier: Classifier, folder_rows: dict,
    dimse_run: tuple, tmp_path: Path
) -> None:
    pytest.importorskip("dicomweb_client", reason="pip install 'ctcovid[dicomweb]'")
    secret = tmp_path / "auth"
    secret.write_text(f"Basic {USER[0]}:{USER[1]}\n")
    secret.chmod(0o600)
    auth = HttpAuth.load("CTCOVID_UNSET_VARIABLE", secret)
    url = f"http://127.0.0.1:{pacs.http_port}/dicom-web"
    summary = run_from(dicomweb_source(pacs, auth), tmp_path / "run", tiny_model_dir, classifier,
                       destinations=(SendSettings.stow_rs(url, auth=auth),),
                       audit_file=tmp_path / "audit.log")
    rows = rows_of(tmp_path / "run")
    assert_same_rows(rows, folder_rows)
    # Audited: QIDO-RS searches (the query string), the WADO-RS retrievals, the export.
    queries = assert_batch_audited(tmp_path / "audit.log", rows, query_object="/dicom-web/studies")
    assert queries[0].find("ParticipantObjectIdentification/ParticipantObjectIDTypeCode").get(
        "csd-code") == "12"  # a URI
    # The DIMSE run already stored these very SRs: QIDO-RS finds them, nothing is sent twice.
    assert summary["sent"][f"stow-rs {url}"]["unchanged"] == 2
    assert summary["sent"][f"stow-rs {url}"]["sent"] == 0
    for row in rows.values():
        if row.status == CLASSIFIED:
            assert sr_study_in_pacs(pacs, row.sr_path) == row.study_instance_uid


def test_dicomweb_with_wrong_credentials_fails_with_the_http_status(
    pacs: Orthanc, tiny_model_dir: Path, classifier: Classifier, tmp_path: Path
) -> None:
    from ctcovid.errors import PacsError

    with pytest.raises(PacsError, match="HTTP 401"):
        run_from(dicomweb_source(pacs, HttpAuth("Basic", "ctcovid:wrong")), tmp_path / "run",
                 tiny_model_dir, classifier)


def test_c_move_to_our_own_scp_gives_the_same_rows(
    pacs: Orthanc, tiny_model_dir: Path, classifier: Classifier, folder_rows: dict,
    tmp_path: Path
) -> None:
    receiver = MoveReceiver(OUR_AET, pacs.move_port, host="127.0.0.1",
                            allow_ae_titles=(pacs.aet,))
    summary = run_from(dimse_source(pacs, move=receiver), tmp_path / "run", tiny_model_dir,
                       classifier)
    assert_same_rows(rows_of(tmp_path / "run"), folder_rows)
    assert summary["source"]["retrieved_series"] == 4


def test_cache_never_exceeds_its_bound(pacs: Orthanc, tiny_model_dir: Path,
                                      classifier: Classifier, folder_rows: dict,
                                      studies: dict, tmp_path: Path) -> None:
    # Room for one and a half CT series: two retrievals at once must take turns.
    series_bytes = sum(p.stat().st_size for p in studies["a"].paths)
    bound = int(series_bytes * 1.5)
    summary = run_from(dimse_source(pacs, cache_bytes=bound, max_retrievals=2), tmp_path / "run",
                       tiny_model_dir, classifier)
    assert_same_rows(rows_of(tmp_path / "run"), folder_rows)
    assert 0 < summary["source"]["cache_peak_bytes"] <= bound


def test_a_series_larger_than_the_cache_fails_alone(pacs: Orthanc, tiny_model_dir: Path,
                                                   classifier: Classifier, folder_rows: dict,
                                                   studies: dict, tmp_path: Path) -> None:
    # Room for the 3-slice series and the localizer, not for an 8-slice series.
    bound = int(sum(p.stat().st_size for p in studies["a"].paths) * 0.6)
    summary = run_from(dimse_source(pacs, cache_bytes=bound), tmp_path / "run", tiny_model_dir,
                       classifier)
    rows = rows_of(tmp_path / "run")
    failed = [r for r in rows.values() if r.status == FAILED]
    assert {r.series_instance_uid for r in failed} == {
        studies["a"].ct_series_instance_uid, studies["b"].ct_series_instance_uid}
    assert all("does not fit in the cache" in r.reason and "--cache-gb" in r.reason
               for r in failed)
    assert summary["source"]["cache_peak_bytes"] <= bound
    assert folder_rows.keys() <= rows.keys()


def test_a_pacs_that_goes_down_mid_run_fails_the_rest_and_the_run_goes_on(
    studies: dict, tiny_model_dir: Path, classifier: Classifier, folder_rows: dict,
    tmp_path: Path
) -> None:
    from ctcovid.batch.results import BatchProgress

    orthanc = start_orthanc(tmp_path / "orthanc", studies["files"], free_port())

    class StopPacsAfterFirstResult(BatchProgress):
        def series_finished(self, row, n_slices: int) -> None:
            if row.status == CLASSIFIED and orthanc.proc.poll() is None:
                orthanc.close()

    # Room for one 8-slice series: the other one is retrieved after the first is classified,
    # that is after the PACS stopped.
    bound = int(sum(p.stat().st_size for p in studies["a"].paths) * 1.2)
    source = dimse_source(orthanc, cache_bytes=bound)
    try:
        summary = run_batch(BatchOptions(tmp_path / "run" / "cache", tmp_path / "run",
                                         tiny_model_dir, workers=0, source=source),
                            StopPacsAfterFirstResult(), classifier=classifier)
    finally:
        orthanc.close() if orthanc.proc.poll() is None else None
    rows = rows_of(tmp_path / "run")
    assert rows.keys() == folder_rows.keys()  # every series has its row
    failed = [r for r in rows.values() if r.status == FAILED]
    assert failed
    assert all(f"127.0.0.1:{orthanc.dicom_port}" in r.reason for r in failed)
    for uid, row in rows.items():
        if row.status == CLASSIFIED:
            assert row.probability_covid == pytest.approx(folder_rows[uid].probability_covid,
                                                          abs=1e-6)
    assert summary["counts"][FAILED] == len(failed)


def test_resume_reuses_the_query_and_a_retrieved_series_in_the_cache(
    dimse_run: tuple, pacs: Orthanc, tiny_model_dir: Path, classifier: Classifier,
    folder_rows: dict, studies: dict, tmp_path: Path
) -> None:
    full_out, _ = dimse_run
    out = tmp_path / "run"
    shutil.copytree(full_out, out)
    # An interrupted run: its first two rows written, B's series retrieved but not classified.
    lines = (out / RESULTS_FILE).read_text().splitlines(keepends=True)
    b_uid = studies["b"].ct_series_instance_uid
    kept = [ln for ln in lines[1:] if b_uid not in ln][:2]
    n_fetched_before = sum("modality" not in ln for ln in kept)  # query rejections: not fetched
    (out / RESULTS_FILE).write_text(lines[0] + "".join(kept))
    b_dir = out / "cache" / studies["b"].study_instance_uid / b_uid
    b_dir.mkdir(parents=True)
    for path in studies["b"].paths:
        ds = pydicom.dcmread(path)
        shutil.copy(path, b_dir / f"{ds.SOPInstanceUID}.dcm")
    (b_dir / ".complete").write_text(json.dumps({"instances": len(studies["b"].paths)}))
    (out / "sent.sqlite").unlink()
    run_info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(run_info | {"archive": str(out / "cache")}))
    summary = run_from(dimse_source(pacs), out, tiny_model_dir, classifier, resume=True)
    rows = read_results(out / RESULTS_FILE)
    assert len(rows) == len({r.series_instance_uid for r in rows})
    assert_same_rows(rows_of(out), folder_rows)
    assert summary["index"]["reused"] is True  # the PACS was not queried again
    assert summary["source"]["reused_from_cache"] == 1
    # Four series to fetch (all but the MR one): those with a row and B (in the cache) are not
    # retrieved again.
    assert summary["source"]["retrieved_series"] == 4 - n_fetched_before - 1
    assert not list((out / "cache").rglob("*.dcm"))


@pytest.mark.slow  # the command loads the model itself: about a minute on two busy cores
def test_cli_batch_from_pacs(pacs: Orthanc, tiny_model_dir: Path, folder_rows: dict,
                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "batch", "--from-pacs", f"127.0.0.1:{pacs.dicom_port}:{pacs.aet}", "--ae-title", OUR_AET,
        "--query", "StudyDate=19000101-21001231", "--modality", "CT", "--cache-gb", "0.5",
        "--query-pause", "0", "--out", str(out), "--model", str(tiny_model_dir), "--workers", "0",
        "--json", "--audit-file", str(tmp_path / "audit.log"),
    ])
    assert result.exit_code == 0, result.output
    assert_same_rows(rows_of(out), folder_rows)
    assert_batch_audited(tmp_path / "audit.log", rows_of(out), query_object=STUDY_ROOT_FIND)


def test_cli_reports_an_unreachable_pacs_in_one_line(tmp_path: Path, tiny_model_dir: Path
                                                     ) -> None:
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(app, [
        "batch", "--from-pacs", f"127.0.0.1:{port}:PACS", "--query", "StudyDate=20200301-",
        "--body-part", "CHEST", "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir),
        "--quiet"])
    assert result.exit_code == 1
    assert f"association with 127.0.0.1:{port}:PACS" in result.output


def test_cli_refuses_an_archive_and_a_pacs_together(tmp_path: Path, tiny_model_dir: Path
                                                    ) -> None:
    result = CliRunner().invoke(app, [
        "batch", str(tmp_path), "--from-pacs", "127.0.0.1:104:PACS", "--out", str(tmp_path / "o"),
        "--model", str(tiny_model_dir)])
    assert result.exit_code == 1
    assert "one of them" in result.output


@pytest.mark.slow  # a real process loads the model: a minute or more on two cores
def test_kill_9_then_resume_retrieves_no_classified_series_again(
    pacs: Orthanc, studies: dict, tiny_model_dir: Path, classifier: Classifier, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ctcovid.cli.main", "batch", "--from-pacs",
           f"127.0.0.1:{pacs.dicom_port}:{pacs.aet}", "--ae-title", OUR_AET, "--query-pause",
           "0", "--out", str(out), "--model", str(tiny_model_dir), "--workers", "0",
           "--batch-size", "2", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    results = out / RESULTS_FILE
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and CLASSIFIED in results.read_text():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    before = read_results(results)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    # The batch size no longer matters (series are scored in their own fixed batches): the
    # reference runs at the default one, unlike the killed run's 2.
    reference = tmp_path / "folder"
    run_batch(BatchOptions(studies["root"], reference, tiny_model_dir, workers=0),
              classifier=classifier)
    folder_rows = {r.series_instance_uid: r for r in read_results(reference / RESULTS_FILE)}
    # Series the PACS run must fetch: every series but the MR one (turned away by the query).
    to_fetch = {uid for uid, r in folder_rows.items() if r.reason != "modality MR is not CT"}
    left = to_fetch - {r.series_instance_uid for r in before}
    assert any(r.status == CLASSIFIED for r in before)
    assert left, "every series was finished before the kill landed"
    summary = run_from(dimse_source(pacs), out, tiny_model_dir, classifier, resume=True)
    rows = read_results(results)
    assert len(rows) == len({r.series_instance_uid for r in rows})
    assert rows[: len(before)] == before
    assert_same_rows(rows_of(out), folder_rows)
    source = summary["source"]
    assert source["retrieved_series"] + source["reused_from_cache"] == len(left)
    assert not list((out / "cache").rglob("*.dcm"))


def test_undelivered_srs_fail_with_the_reason_and_are_sent_on_resume(
    dimse_run: tuple, pacs: Orthanc, tmp_path: Path
) -> None:
    from ctcovid.batch.destinations import SrForwarder

    out = tmp_path / "run"
    shutil.copytree(dimse_run[0], out)
    (out / "sent.sqlite").unlink()
    down = f"127.0.0.1:{free_port()}:NOBODY"  # nothing listens there
    forwarder = SrForwarder(out, (SendSettings.c_store(down, calling_ae_title=OUR_AET),),
                            max_attempts=2, retry_seconds=0.05)
    outcome = forwarder.close()[f"c-store {down}"]
    assert (outcome["sent"], outcome["failed"]) == (0, 2)
    assert all(down in error for error in outcome["errors"])
    # The next run (--resume) sends what was not delivered, to the same or another peer; that
    # peer must not hold them already (the DIMSE run stored them there), or nothing is sent.
    for sr_path in {r.sr_path for r in rows_of(out).values() if r.status == CLASSIFIED}:
        (found,) = pacs.request("POST", "/tools/lookup", Path(sr_path).stem.encode())
        pacs.request("DELETE", f"/instances/{found['ID']}")
    up = f"127.0.0.1:{pacs.dicom_port}:{pacs.aet}"
    again = SrForwarder(out, (SendSettings.c_store(down, calling_ae_title=OUR_AET),
                              SendSettings.c_store(up, calling_ae_title=OUR_AET)),
                        max_attempts=1, retry_seconds=0.05).close()
    assert again[f"c-store {up}"]["sent"] == 2
    assert again[f"c-store {down}"]["failed"] == 2


def test_a_series_that_kills_its_decoder_fails_alone_and_resume_does_not_retry_it(
    pacs: Orthanc, studies: dict, tiny_model_dir: Path, classifier: Classifier,
    folder_rows: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a folder run: the decoder pool is rebuilt, the series is ``failed`` with the reason,
    the others are classified. The decoder dies as the kernel's OOM killer would make it die:
    SIGKILL, whenever it holds the series (in company first, then re-run alone)."""
    import os
    import signal
    import threading
    import time

    import ctcovid.batch.job as job
    import ctcovid.decoder as decoder
    from ctcovid.batch.index import SeriesEntry
    from ctcovid.decoder import decoder_pool

    target = studies["b"].ct_series_instance_uid
    pools: list = []

    def recorded_pool(workers: int, memory_mb: int, niceness: int = 0):  # the real pool, kept
        pools.append(decoder_pool(workers, memory_mb, niceness))
        return pools[-1]

    monkeypatch.setattr(job, "decoder_pool", recorded_pool)
    monkeypatch.setattr(decoder, "decoder_pool", recorded_pool)
    killed: list[int] = []  # the pools whose decoders were killed, by position
    finished = threading.Event()

    def holds_target(pool) -> bool:
        try:
            items = list(pool._pending_work_items.values())
        except RuntimeError:  # changed size while copied: look again
            return False
        return any(item.args and isinstance(item.args[0], SeriesEntry)
                   and item.args[0].series_instance_uid == target for item in items)

    def kill_the_target_decoder() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not finished.is_set():
            if pools and len(pools) - 1 not in killed:
                pool = pools[-1]
                if holds_target(pool) and pool._processes:
                    for pid in list(pool._processes):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    killed.append(len(pools) - 1)
            time.sleep(0.002)

    killer = threading.Thread(target=kill_the_target_decoder, daemon=True)
    killer.start()
    out = tmp_path / "run"
    try:
        summary = run_from(dimse_source(pacs), out, tiny_model_dir, classifier, workers=1)
    finally:
        finished.set()
        killer.join(5)

    rows = rows_of(out)
    assert len(killed) == 2  # once in company, once alone
    assert rows[target].status == FAILED
    assert "decoder process died" in rows[target].reason
    a_uid = studies["a"].ct_series_instance_uid
    assert rows[a_uid].status == CLASSIFIED
    assert rows[a_uid].probability_covid == pytest.approx(folder_rows[a_uid].probability_covid,
                                                          abs=1e-6)
    assert summary["counts"][CLASSIFIED] == 1 and summary["counts"][FAILED] == 1
    assert not list((out / "cache").rglob("*.dcm"))  # the failed series left the cache too

    again = run_from(dimse_source(pacs), out, tiny_model_dir, classifier, workers=1,
                     resume=True)
    assert again["this_run"]["series"] == 0  # a failed row is final: --resume moves on
    assert again["source"]["retrieved_series"] == 0
    assert rows_of(out)[target].reason == rows[target].reason
