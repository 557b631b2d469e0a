"""The command line as a user meets it: series, preprocess, classify, fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ctcovid.cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ct_dir(studies_root: Path, study_infos: list, index: int) -> Path:
    return studies_root / study_infos[index]["study_dir"] / "ct"


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("series", "preprocess", "classify", "fixtures"):
        assert command in result.output


def test_series_json_lists_every_series_with_usability(studies_root, study_infos):
    result = invoke("series", studies_root, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    uids = {s["series_instance_uid"] for s in data["series"]}
    assert uids == {s["series_instance_uid"] for s in study_infos}
    for s in data["series"]:
        assert set(s) >= {
            "series_instance_uid",
            "study_instance_uid",
            "modality",
            "n_instances",
            "usable",
            "reason",
        }
        assert s["usable"] is True and s["modality"] == "CT"


def test_preprocess_writes_slices_positions_and_uids(studies_root, study_infos, tmp_path):
    out = tmp_path / "ct.npz"
    result = invoke("preprocess", ct_dir(studies_root, study_infos, 0), "--out", out)
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert data["slices"].shape == (12, 256, 256) and data["slices"].dtype == np.uint8
    assert list(data["z_mm"]) == sorted(data["z_mm"])
    assert len(set(data["sop_instance_uids"])) == 12


def test_preprocess_of_a_mixed_folder_names_the_candidates(studies_root, study_infos, tmp_path):
    result = invoke("preprocess", studies_root, "--out", tmp_path / "x.npz")
    assert result.exit_code == 1
    assert "usable CT series" in result.output
    assert study_infos[0]["series_instance_uid"] in result.output.replace("\n", "")


def test_classify_json_has_the_contract_keys(studies_root, study_infos, tiny_model_dir):
    result = invoke(
        "classify", ct_dir(studies_root, study_infos, 0), "--model", tiny_model_dir, "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in (
        "series_instance_uid",
        "study_instance_uid",
        "probability_covid",
        "label",
        "threshold",
        "n_slices_total",
        "n_slices_used",
        "slice_probabilities",
        "model",
        "seconds",
    ):
        assert key in data
    assert data["series_instance_uid"] == study_infos[0]["series_instance_uid"]
    assert data["probability_covid"] == pytest.approx(np.mean(data["slice_probabilities"]))
    assert data["label"] == (
        "covid" if data["probability_covid"] >= data["threshold"] else "non-covid"
    )
    assert data["n_slices_used"] == len(data["slice_probabilities"]) == 12
    assert set(data["model"]) == {"name", "version", "device_uid", "runtime"}
    assert data["runtime"] == data["model"]["runtime"] == "keras"


def test_classify_writes_a_readable_sr_and_heatmaps(
    studies_root, study_infos, tiny_model_dir, tmp_path
):
    sr = tmp_path / "sr.dcm"
    result = invoke(
        "classify",
        ct_dir(studies_root, study_infos, 1),
        "--model",
        tiny_model_dir,
        "--json",
        "--sr",
        sr,
        "--heatmaps",
        tmp_path / "hm",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ds = pydicom.dcmread(sr)
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == data["study_instance_uid"]
    pngs = sorted((tmp_path / "hm").glob("*.png"))
    assert len(pngs) == min(5, data["n_slices_used"])


def test_classify_without_a_model_says_how_to_get_one(
    studies_root, study_infos, tmp_path, monkeypatch
):
    monkeypatch.setenv("CTCOVID_MODEL", str(tmp_path / "missing"))
    result = invoke("classify", ct_dir(studies_root, study_infos, 0))
    assert result.exit_code == 1
    assert "ctcovid train" in result.output
    assert "Traceback" not in result.output


def test_classify_a_folder_without_usable_ct_exits_1_with_one_line(tmp_path, tiny_model_dir):
    import dicom_fixtures

    dicom_fixtures.write_mr_series(tmp_path / "mr", dicom_fixtures.make_identity(0, 0))
    result = invoke("classify", tmp_path, "--model", tiny_model_dir)
    assert result.exit_code == 1
    assert "no usable CT series" in result.output
    assert "modality MR is not CT" in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_fixtures_command_writes_studies_and_cov19_layout(tmp_path):
    result = invoke(
        "fixtures",
        tmp_path,
        "--studies",
        "2",
        "--slices",
        "4",
        "--size",
        "32",
        "--cov19-per-class",
        "1",
        "--cov19-slices",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["label"] for s in data["studies"]] == ["covid", "non-covid"]
    assert sorted(p.name for p in (tmp_path / "cov19" / "train").iterdir()) == [
        "covid",
        "non-covid",
    ]
    scan = tmp_path / "cov19" / "val" / "covid" / "ct_scan_0"
    assert sorted(p.name for p in scan.iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
