"""The pseudonymised research export: ``ctcovid batch --pseudonymize`` and ``ctcovid pseudonymize``.

The fixture studies carry a sentinel in every text attribute of the source (the patient and
study modules the SR copies, the series and equipment attributes, nested sequences and private
attributes), sentinel dates, and their own UIDs; after the export none of them, nor the key,
may be found in any byte of any file the export wrote or in what the commands printed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from test_report import _dciodvfy_errors
from typer.testing import CliRunner

import dicom_fixtures
from ctcovid.cli.main import app
from ctcovid.config import IngestConfig
from ctcovid.dicom.modules import REPORT_HEADER_KEYWORDS
from ctcovid.report.deid import Deidentifier, PseudonymKey

KEY_TEXT = hashlib.sha256(b"ctcovid research export test key").hexdigest()
OTHER_KEY_TEXT = hashlib.sha256(b"another research key").hexdigest()

#: Text attributes the export keeps, and so are not given sentinels: PS3.15 Annex E keeps them
#: (they describe the scanner, not the patient) and the SR states them (equipment, stack).
KEPT = {"Manufacturer", "ManufacturerModelName", "SoftwareVersions", "ConvolutionKernel"}
#: Text attributes the ingest and the report read as values (not free text).
STRUCTURAL = {"RescaleType", "TimezoneOffsetFromUTC"}
#: Series, equipment and request attributes that name people, places and procedures.
EXTRA = (
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "OperatorsName",
    "PerformingPhysicianName",
    "ProtocolName",
    "ImageComments",
    "DeviceSerialNumber",
    "RequestingPhysician",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "SeriesDescription",
    "ContrastBolusAgent",
)
TEXT_VRS = {"LO", "SH", "PN", "ST", "LT", "UT", "UC"}
SENTINEL_DATES = {
    "PatientBirthDate": "19471123",
    "StudyDate": "20110817",
    "SeriesDate": "20110818",
    "AcquisitionDate": "20110819",
    "ContentDate": "20110821",
}
SENTINEL_DATETIME = "20110819093017.250000"  # AcquisitionDateTime


class Sentinels:
    """Unique strings handed out per (study, attribute), remembered for the checks."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}

    def new(self, study: int, what: str) -> str:
        value = f"SNTL{study}{len(self.where):03d}"  # 8 characters: fits SH, AE, CS
        self.where[value] = what
        return value


def _text_item(sentinels: Sentinels, study: int, *keywords: str) -> Dataset:
    item = Dataset()
    for keyword in keywords:
        setattr(item, keyword, sentinels.new(study, f"nested {keyword}"))
    return item


def _code_item(sentinels: Sentinels, study: int, what: str) -> Dataset:
    item = Dataset()
    item.CodeValue = sentinels.new(study, f"{what} CodeValue")
    item.CodingSchemeDesignator = "99SITE"
    item.CodeMeaning = sentinels.new(study, f"{what} CodeMeaning")
    return item


def _sentinel_values(study: int, sentinels: Sentinels) -> dict[str, object]:
    """Every attribute a study's instances get, sentinel valued; the same for each instance."""
    values: dict[str, object] = {}
    for keyword in (*REPORT_HEADER_KEYWORDS, *EXTRA):
        if keyword in KEPT or keyword in STRUCTURAL:
            continue
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if tag is None:
            continue
        if dictionary_VR(tag) in TEXT_VRS:
            values[keyword] = sentinels.new(study, keyword)
            if dictionary_VR(tag) == "PN":
                values[keyword] += "^"  # a family name (highdicom warns of a bare one)
    values.update(SENTINEL_DATES)
    values["AcquisitionDateTime"] = SENTINEL_DATETIME
    other_id = Dataset()
    other_id.PatientID = sentinels.new(study, "OtherPatientIDsSequence PatientID")
    other_id.IssuerOfPatientID = sentinels.new(study, "OtherPatientIDsSequence Issuer")
    other_id.TypeOfPatientID = "TEXT"
    values["OtherPatientIDsSequence"] = [other_id]
    request = _text_item(
        sentinels,
        study,
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepID",
        "ScheduledProcedureStepDescription",
    )
    request.AccessionNumber = sentinels.new(study, "RequestAttributesSequence AccessionNumber")
    request.RequestedProcedureCodeSequence = [_code_item(sentinels, study, "requested procedure")]
    values["RequestAttributesSequence"] = [request]
    values["ProcedureCodeSequence"] = [_code_item(sentinels, study, "procedure")]
    referring = _text_item(sentinels, study, "InstitutionName", "InstitutionAddress")
    referring.PersonIdentificationCodeSequence = [_code_item(sentinels, study, "person")]
    values["ReferringPhysicianIdentificationSequence"] = [referring]
    values["_private"] = tuple(
        sentinels.new(study, what)
        for what in ("private creator", "private LO", "private sequence PatientComments")
    )
    values["IssuerOfAccessionNumberSequence"] = [
        _text_item(sentinels, study, "LocalNamespaceEntityID")
    ]
    return values


def _add_sentinels(ds: Dataset, values: dict[str, object]) -> None:
    private = values.pop("_private")
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    values["_private"] = private
    creator, text, nested = private  # type: ignore[misc]
    # Private attributes: a creator, a text value, and a private sequence with a nested text.
    block = ds.private_block(0x0011, creator, create=True)
    block.add_new(0x01, "LO", text)
    inner = Dataset()
    inner.PatientComments = nested
    block.add_new(0x02, "SQ", [inner])


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two fixture studies with sentinels; the sentinels and every UID of the source files."""
    root = tmp_path_factory.mktemp("sentinels")
    dicom_fixtures.generate_studies(root, 2, seed=5, n_slices=8, size=64)
    sentinels = Sentinels()
    uids: set[str] = set()
    per_study: dict[int, dict[str, object]] = {}
    for path in sorted(root.rglob("*.dcm")):
        study = int(path.relative_to(root).parts[0].split("_")[1])
        values = per_study.setdefault(study, _sentinel_values(study, sentinels))
        ds = pydicom.dcmread(path)
        _add_sentinels(ds, values)
        ds.save_as(path, enforce_file_format=True)
        uids.update(
            str(ds[keyword].value)
            for keyword in (
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "SOPInstanceUID",
                "FrameOfReferenceUID",
            )
            if keyword in ds
        )
    return {"root": root, "sentinels": sentinels.where, "uids": uids}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    paths = {}
    for name, text in (("key", KEY_TEXT), ("other", OTHER_KEY_TEXT)):
        paths[name] = folder / f"{name}.key"
        paths[name].write_text(text + "\n")
        paths[name].chmod(0o600)
    paths["short"] = folder / "short.key"
    paths["short"].write_text("0123456789abcdef0123456789abcde\n")  # 31 bytes
    paths["missing"] = folder / "missing.key"
    return paths


def _invoke(args: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    """Run the CLI; its exit code and everything it said (stdout, stderr, log records)."""
    with caplog.at_level(logging.DEBUG):
        result = CliRunner().invoke(app, args)
    said = result.output + (result.stderr if result.stderr_bytes else "") + caplog.text
    return result.exit_code, said


@pytest.fixture(scope="module")
def batch_run(
    archive: dict,
    keys: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """``ctcovid batch ARCHIVE --out RUN --pseudonymize KEY``, once for the module."""
    folder = tmp_path_factory.mktemp("run")
    out = folder / "run"
    with pytest.MonkeyPatch.context() as mp:
        # caplog is function-scoped: capture the logs with a handler of our own.
        records: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(self.format(record))

        handler = Keep(logging.DEBUG)
        logging.getLogger().addHandler(handler)
        mp.setattr(logging.getLogger(), "level", logging.DEBUG)
        try:
            result = CliRunner().invoke(
                app,
                [
                    "batch",
                    str(archive["root"]),
                    "--out",
                    str(out),
                    "--model",
                    str(tiny_model_dir),
                    "--workers",
                    "0",
                    "--pseudonymize",
                    str(keys["key"]),
                    "--json",
                    "--audit-file",
                    str(folder / "audit.log"),
                ],
            )
        finally:
            logging.getLogger().removeHandler(handler)
    assert result.exit_code == 0, result.output
    said = result.output + "\n".join(records)
    return {
        "audit": folder / "audit.log",
        "out": out,
        "research": out / "research",
        "summary": json.loads(result.stdout),
        "said": said,
    }


def _export_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    return files


def _secrets(key_text: str) -> dict[bytes, str]:
    """The key in every form it could leak in: its text, the text's hex, the bytes it names."""
    raw = key_text.encode()
    return {
        raw: "key (raw)",
        raw.hex().encode(): "key (hex of raw)",
        bytes.fromhex(key_text): "key (decoded)",
        key_text.upper().encode(): "key (HEX)",
    }


def _leaks(data: bytes, archive: dict, key_text: str) -> list[str]:
    found = [what for sentinel, what in archive["sentinels"].items() if sentinel.encode() in data]
    found += [f"source UID {uid}" for uid in archive["uids"] if uid.encode() in data]
    found += [
        f"date {d}" for d in (*SENTINEL_DATES.values(), SENTINEL_DATETIME[:8]) if d.encode() in data
    ]
    found += [what for secret, what in _secrets(key_text).items() if secret in data]
    return found


def _research_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "results.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _site_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "results.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --- what the export holds ---------------------------------------------------------------


def test_the_sources_carry_the_sentinels_the_site_srs_copy(batch_run: dict, archive: dict) -> None:
    """The check below is only worth something if the site's own SRs hold the sentinels."""
    site = b"".join(p.read_bytes() for p in (batch_run["out"] / "sr").glob("*.dcm"))
    assert len(_leaks(site, archive, KEY_TEXT)) > 20


def test_no_sentinel_uid_or_key_in_any_file_of_the_batch_export(
    batch_run: dict, archive: dict
) -> None:
    for path in _export_files(batch_run["research"]):
        found = _leaks(path.read_bytes(), archive, KEY_TEXT)
        assert not found, f"{path}: {found}"


def test_no_sentinel_or_key_in_what_the_batch_run_said(batch_run: dict, archive: dict) -> None:
    said = batch_run["said"].encode()
    found = [what for sentinel, what in archive["sentinels"].items() if sentinel.encode() in said]
    found += [what for secret, what in _secrets(KEY_TEXT).items() if secret in said]
    assert found == []


def test_the_site_audit_trail_records_the_research_export(batch_run: dict) -> None:
    """The site's trail (not the export) says which patients went into the research export."""
    trail = batch_run["audit"].read_text(encoding="utf-8")
    research = str((batch_run["research"] / "results.csv").resolve())
    assert research in trail
    assert trail.count("110106") >= 2  # Export: the site's results.csv, then the research one


def test_research_csv_columns_and_pseudonyms(batch_run: dict) -> None:
    research = _research_rows(batch_run["research"])
    site = _site_rows(batch_run["out"])
    assert len(research) == len(site) == 2
    assert "patient_id" not in research[0] and "reason" not in research[0]
    assert "warnings" not in research[0]
    key = PseudonymKey(KEY_TEXT.encode())
    by_series = {key.uid(r["series_instance_uid"]): r for r in site}
    for row in research:
        original = by_series[row["series_instance_uid"]]
        assert row["patient_pseudonym"] == key.pseudonym("PatientID", original["patient_id"])
        assert re.fullmatch(r"[0-9A-F]{16}", row["patient_pseudonym"])
        assert re.fullmatch(r"[0-9A-F]{16}", row["accession_pseudonym"])
        assert row["study_instance_uid"] == key.uid(original["study_instance_uid"])
        assert row["probability_covid"] == original["probability_covid"]
        assert row["label"] == original["label"]


def test_srs_agree_with_the_research_csv(batch_run: dict) -> None:
    """The SR's patient, study, series and evidence are the CSV's pseudonyms and UIDs."""
    research = batch_run["research"]
    for row in _research_rows(research):
        sr = pydicom.dcmread(research / row["sr_path"])
        assert sr.PatientID == row["patient_pseudonym"]
        assert sr.AccessionNumber == row["accession_pseudonym"]
        assert sr.StudyInstanceUID == row["study_instance_uid"]
        (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
        assert evidence.StudyInstanceUID == row["study_instance_uid"]
        (series,) = evidence.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == row["series_instance_uid"]
        evidence_uids = {ref.ReferencedSOPInstanceUID for ref in series.ReferencedSOPSequence}
        content_uids = _content_references(sr.ContentSequence)
        assert content_uids and content_uids <= evidence_uids
        assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
        assert Path(row["sr_path"]).name == f"{sr.SOPInstanceUID}.dcm"
        device_uids = {item.get("DeviceUID") for item in sr.ContributingEquipmentSequence}
        assert row["model_device_uid"] in device_uids


def _content_references(items: list[Dataset]) -> set[str]:
    found: set[str] = set()
    for item in items:
        for ref in item.get("ReferencedSOPSequence", []):
            found.add(ref.ReferencedSOPInstanceUID)
        found |= _content_references(item.get("ContentSequence", []))
    return found


def _walk(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def test_srs_are_marked_deidentified_with_the_profile_and_options(batch_run: dict) -> None:
    for path in (batch_run["research"] / "sr").glob("*.dcm"):
        sr = pydicom.dcmread(path)
        assert sr.PatientIdentityRemoved == "YES"
        assert sr.LongitudinalTemporalInformationModified == "MODIFIED"
        codes = {
            (c.CodeValue, c.CodingSchemeDesignator) for c in sr.DeidentificationMethodCodeSequence
        }
        assert codes == {("113100", "DCM"), ("113104", "DCM"), ("113107", "DCM")}
        assert sr.DeidentificationMethod
        assert not [e.tag for e in _walk(sr) if e.tag.is_private]


def test_dates_move_back_by_one_number_of_days_per_patient_and_times_stay(
    batch_run: dict, archive: dict
) -> None:
    import datetime as dt

    research = batch_run["research"]
    site = {
        pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p)
        for p in (batch_run["out"] / "sr").glob("*.dcm")
    }
    key = PseudonymKey(KEY_TEXT.encode())
    shifts = set()
    for path in (research / "sr").glob("*.dcm"):
        sr = pydicom.dcmread(path)
        (original,) = [s for s in site.values() if key.uid(s.SOPInstanceUID) == sr.SOPInstanceUID]

        def day(value: str) -> dt.date:
            return dt.datetime.strptime(value, "%Y%m%d").date()

        study_shift = (day(sr.StudyDate) - day(original.StudyDate)).days
        content_shift = (day(sr.ContentDate) - day(original.ContentDate)).days
        assert study_shift == content_shift == key.day_offset(original.PatientID)
        assert -3652 <= study_shift <= -365
        assert sr.StudyTime == original.StudyTime and sr.ContentTime == original.ContentTime
        shifts.add(study_shift)
    assert len(shifts) == 2  # two patients, two keyed shifts


def test_dciodvfy_finds_no_errors_in_the_deidentified_srs(batch_run: dict) -> None:
    for path in (batch_run["research"] / "sr").glob("*.dcm"):
        errors, output = _dciodvfy_errors(path)
        assert errors == [], output


# --- ctcovid pseudonymize: the same key, another key, bad keys -------------------------------


def test_pseudonymize_with_the_same_key_gives_the_same_export(
    batch_run: dict,
    archive: dict,
    keys: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "again"
    code, said = _invoke(
        [
            "pseudonymize",
            str(batch_run["out"]),
            "--key",
            str(keys["key"]),
            "--out",
            str(out),
            "--json",
        ],
        caplog,
    )
    assert code == 0, said
    assert (out / "results.csv").read_bytes() == (
        batch_run["research"] / "results.csv"
    ).read_bytes()
    first = {p.name: p.read_bytes() for p in (batch_run["research"] / "sr").glob("*.dcm")}
    again = {p.name: p.read_bytes() for p in (out / "sr").glob("*.dcm")}
    assert again == first
    for path in _export_files(out):
        found = _leaks(path.read_bytes(), archive, KEY_TEXT)
        assert not found, f"{path}: {found}"
    assert _leaks(said.encode(), archive, KEY_TEXT) == []


def test_another_key_gives_other_pseudonyms_and_uids(
    batch_run: dict, keys: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "other"
    code, said = _invoke(
        [
            "pseudonymize",
            str(batch_run["out"]),
            "--key",
            str(keys["other"]),
            "--out",
            str(out),
            "--json",
        ],
        caplog,
    )
    assert code == 0, said
    first, other = _research_rows(batch_run["research"]), _research_rows(out)
    for column in (
        "patient_pseudonym",
        "accession_pseudonym",
        "study_instance_uid",
        "series_instance_uid",
        "sr_path",
    ):
        assert not {r[column] for r in first} & {r[column] for r in other}, column
    assert (
        json.loads(said[said.index("{") : said.rindex("}") + 1])["key_id"]
        != (batch_run["summary"]["research"]["key_id"])
    )


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        ("missing", "no such key file"),
        ("short", "the key has 31 bytes; at least 32 are needed"),
    ],
)
def test_a_missing_or_short_key_is_refused_with_the_reason(
    which: str,
    reason: str,
    batch_run: dict,
    keys: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    code, said = _invoke(
        [
            "pseudonymize",
            str(batch_run["out"]),
            "--key",
            str(keys[which]),
            "--out",
            str(tmp_path / "export"),
        ],
        caplog,
    )
    assert code == 1 and reason in said, said
    assert not (tmp_path / "export").exists()
    # batch refuses before it reads the archive or loads the model
    code, said = _invoke(
        [
            "batch",
            str(batch_run["out"]),
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(tiny_model_dir),
            "--pseudonymize",
            str(keys[which]),
        ],
        caplog,
    )
    assert code == 1 and reason in said, said
    assert not (tmp_path / "run").exists()
    if which == "short":
        assert "0123456789abcdef" not in said


def test_an_export_folder_of_another_key_is_refused(
    batch_run: dict, keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    code, said = _invoke(
        [
            "pseudonymize",
            str(batch_run["out"]),
            "--key",
            str(keys["other"]),
            "--out",
            str(batch_run["research"]),
        ],
        caplog,
    )
    assert code == 1 and "made with another key" in said, said


# --- Secondary Captures (heatmaps) ------------------------------------------------------------


def test_heatmap_secondary_captures_are_deidentified(archive: dict, tmp_path: Path) -> None:
    from ctcovid.dicom.series import load_series
    from ctcovid.report import build_heatmap_secondary_captures, overlay_rgb
    from ctcovid.results import ModelInfo, ScanResult

    series = load_series(
        archive["root"] / "study_000" / "ct", IngestConfig(image_size=32, min_slices=4)
    )
    uids = [s.sop_instance_uid for s in series.slices]
    result = ScanResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        probability_covid=0.75,
        label="covid",
        threshold=0.5,
        n_slices_total=len(uids),
        n_slices_used=len(uids),
        slice_probabilities=[0.75] * len(uids),
        sop_instance_uids=uids,
        frame_numbers=[s.frame_number for s in series.slices],
        z_mm=[float(s.z_mm or 0.0) for s in series.slices],
        key_slice_indices=[1, 2],
        model=ModelInfo(name="res-dense-net", version="1", device_uid="2.25.1234567"),
        window_center_hu=-600.0,
        window_width_hu=1500.0,
        slice_policy="all",
        seconds=1.0,
    )
    grey = np.full((16, 16), 100, dtype=np.uint8)
    overlays = [overlay_rgb(grey, np.eye(4, dtype=np.float32)) for _ in range(2)]
    captures = build_heatmap_secondary_captures(overlays, series, result)
    deidentifier = Deidentifier(PseudonymKey(KEY_TEXT.encode()))
    for i, capture in enumerate(captures):
        original = tmp_path / f"original_{i}.dcm"
        capture.save_as(original, enforce_file_format=True)
        assert _leaks(original.read_bytes(), archive, KEY_TEXT)  # the sentinels are there
        path = tmp_path / f"sc_{i}.dcm"
        from ctcovid.report.deid import deidentify_file

        copy = deidentify_file(original, path, deidentifier)
        assert _leaks(path.read_bytes(), archive, KEY_TEXT) == []
        assert copy.PatientIdentityRemoved == "YES"
        (source,) = copy.SourceImageSequence
        assert source.ReferencedSOPInstanceUID in {deidentifier.key.uid(u) for u in uids}
        errors, output = _dciodvfy_errors(path)
        assert errors == [], output


# --- helpers ------------------------------------------------------------------------------------


# --- the de-identifier's own checks -------------------------------------------------------------


def _minimal(patient_id: str) -> Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "2.25.42"
    ds.PatientID = patient_id
    return ds


def test_an_identifier_left_in_a_kept_attribute_stops_the_object() -> None:
    """Annex E keeps Manufacturer; a site that put the patient ID there gets no object, and the
    reason names the attribute, not the value."""
    from ctcovid.errors import ReportError

    ds = _minimal("PAT-778899")
    ds.Manufacturer = "PAT-778899"
    with pytest.raises(ReportError, match="PatientID") as caught:
        Deidentifier(PseudonymKey(KEY_TEXT.encode())).deidentify(ds)
    assert "778899" not in str(caught.value)


def test_the_key_is_not_in_its_repr() -> None:
    key = PseudonymKey(KEY_TEXT.encode())
    assert KEY_TEXT not in repr(key) and KEY_TEXT[:16] not in repr(key)


def test_clean_structured_content_keeps_ctcovid_text_and_replaces_any_other(
    batch_run: dict,
) -> None:
    (path, *_) = sorted((batch_run["out"] / "sr").glob("*.dcm"))
    sr = pydicom.dcmread(path)
    own = sorted(e.value for e in _walk(sr) if e.keyword == "TextValue")
    foreign = Dataset()
    foreign.RelationshipType = "CONTAINS"
    foreign.ValueType = "TEXT"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "121106", "DCM"
    concept.CodeMeaning = "Comment"
    foreign.ConceptNameCodeSequence = [concept]
    foreign.TextValue = "Seen by Dr SNTLX999 for patient SNTLX998"
    sr.ContentSequence[-1].ContentSequence.append(foreign)
    copy = Deidentifier(PseudonymKey(KEY_TEXT.encode())).deidentify(sr)
    texts = [e.value for e in _walk(copy) if e.keyword == "TextValue"]
    assert not [t for t in texts if "SNTLX99" in t]
    # ctcovid's own (algorithm name, version, parameters, tracking identifier) stay as they were
    assert sorted(t for t in texts if t != "ANONYMIZED") == own
    assert any(t.startswith("threshold=") for t in own)


def test_a_date_time_moves_its_date_and_keeps_its_time_and_offset() -> None:
    import datetime as dt

    from ctcovid.report.deid import shift_date, shift_datetime

    moved = (dt.date(2011, 8, 19) - dt.timedelta(days=400)).strftime("%Y%m%d")
    assert shift_datetime("20110819093017.25+0100", -400) == moved + "093017.25+0100"
    assert shift_date("20000301", -1) == "20000229"
    assert shift_date("2011", -1) is None and shift_datetime("201108", -1) is None
