"""Runtimes behind the Classifier: choosing a graph, refusing a tampered one, the int8 gate, and
the runtime's place in the result's identity (JSON, SR parameters, device and SR UIDs)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ctcovid.cli.main import app
from ctcovid.errors import ConfigError, ModelError
from ctcovid.model.artifact import (
    WEIGHTS_FILE,
    read_artifact,
    sha256_file,
    write_metadata,
)
from ctcovid.model.export import INT8_TOLERANCE, judge
from ctcovid.model.runtimes import AUTO_ORDER, GRAPH_FILES, resolve_runtime
from ctcovid.report.uids import sr_uids
from ctcovid.results import ScanResult

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def model_copy(source: Path, dest: Path) -> Path:
    """A model folder sharing the (large) weights file of ``source`` by a symbolic link."""
    dest.mkdir(parents=True)
    shutil.copy(source / "ctcovid.json", dest / "ctcovid.json")
    (dest / WEIGHTS_FILE).symlink_to(source / WEIGHTS_FILE)
    for name in GRAPH_FILES.values():
        if (source / name).exists():
            (dest / name).symlink_to(source / name)
    return dest


def record_graph(folder: Path, runtime: str, content: bytes, *, sha256: str | None = None) -> str:
    """Put a graph file in ``folder`` and record it in ctcovid.json (as export does)."""
    path = folder / GRAPH_FILES[runtime]
    path.write_bytes(content)
    artifact = read_artifact(folder)
    digest = sha256 or sha256_file(path)
    graphs = {
        **artifact.graphs,
        runtime: {
            "file": path.name,
            "sha256": digest,
            "weights_sha256": artifact.weights_sha256,
        },
    }
    write_metadata(dataclasses.replace(artifact, graphs=graphs), folder)
    return digest


# -- choosing a runtime (metadata and files only: nothing is loaded) ---------------------------


def test_auto_picks_int8_then_onnx_then_keras(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path / "m")
    assert AUTO_ORDER == ("int8", "onnx", "keras")
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "keras"
    onnx_sha = record_graph(folder, "onnx", b"fp32 graph")
    choice = resolve_runtime(folder, read_artifact(folder), "auto")
    assert (choice.name, choice.graph_sha256) == ("onnx", onnx_sha)
    record_graph(folder, "int8", b"int8 graph")
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "int8"
    # An explicit choice wins over auto.
    assert resolve_runtime(folder, read_artifact(folder), "onnx").name == "onnx"
    assert resolve_runtime(folder, read_artifact(folder), "keras").name == "keras"


def test_auto_falls_back_to_keras_without_onnxruntime(tiny_model_dir, tmp_path, monkeypatch):
    import ctcovid.model.runtimes as runtimes

    folder = model_copy(tiny_model_dir, tmp_path / "m")
    record_graph(folder, "onnx", b"fp32 graph")
    monkeypatch.setattr(runtimes, "onnxruntime_available", lambda: False)
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "keras"


def test_graph_whose_sha256_differs_is_refused(tiny_model_dir, tmp_path):
    from ctcovid.inference import Classifier

    folder = model_copy(tiny_model_dir, tmp_path / "m")
    record_graph(folder, "onnx", b"fp32 graph")
    (folder / GRAPH_FILES["onnx"]).write_bytes(b"fp32 graph, modified")
    for runtime in ("onnx", "auto"):
        with pytest.raises(ModelError, match=r"model\.onnx: graph does not match ctcovid\.json"):
            Classifier.from_file(folder, runtime=runtime)
    result = invoke("classify", folder, "--model", folder, "--runtime", "onnx")
    assert result.exit_code == 1
    assert "sha256 differs" in result.output


def test_graph_exported_from_other_weights_is_refused(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path / "m")
    record_graph(folder, "int8", b"int8 graph")
    artifact = read_artifact(folder)
    graphs = {"int8": {**artifact.graphs["int8"], "weights_sha256": "0" * 64}}
    write_metadata(dataclasses.replace(artifact, graphs=graphs), folder)
    with pytest.raises(ModelError, match="exported from other weights"):
        resolve_runtime(folder, read_artifact(folder), "int8")


def test_missing_graph_says_how_to_export(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path / "m")
    with pytest.raises(ModelError, match=r"ctcovid export .* --int8 --calibration DATA"):
        resolve_runtime(folder, read_artifact(folder), "int8")
    with pytest.raises(ModelError, match="unknown runtime 'fp16'"):
        resolve_runtime(folder, read_artifact(folder), "fp16")


def test_artifact_with_graphs_keeps_the_existing_format(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path / "m")
    before = json.loads((folder / "ctcovid.json").read_text())
    record_graph(folder, "onnx", b"fp32 graph")
    after = json.loads((folder / "ctcovid.json").read_text())
    # Only a new key: older readers ignore it and keep using the Keras weights.
    assert {k: v for k, v in after.items() if k != "graphs"} == before
    assert after["graphs"]["onnx"]["sha256"] == sha256_file(folder / "model.onnx")


def test_node_config_takes_a_runtime(tmp_path):
    from ctcovid.node.config import load_config

    toml = tmp_path / "node.toml"
    toml.write_text(f'store = "{tmp_path / "store"}"\nruntime = "int8"\n')
    assert load_config(toml, {}).runtime == "int8"
    assert load_config(toml, {"runtime": "keras"}).runtime == "keras"
    assert load_config(None, {"store": tmp_path}).runtime == "auto"
    toml.write_text(f'store = "{tmp_path / "store"}"\nruntime = "tensorrt"\n')
    with pytest.raises(ConfigError, match="runtime must be one of"):
        load_config(toml, {})


def test_export_int8_needs_calibration_data(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path / "m")
    result = invoke("export", folder, "--int8")
    assert result.exit_code == 1
    assert "--int8 needs --calibration DATA" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["ctcovid.json", WEIGHTS_FILE]


# -- identity: the runtime changes the numbers, so it changes the UIDs ---------------------------


def test_device_uid_changes_with_runtime_and_graph(tiny_model_dir):
    artifact = read_artifact(tiny_model_dir)
    keras_uid = artifact.with_runtime("keras").device_uid
    assert keras_uid == artifact.device_uid == artifact.base_device_uid  # unchanged for Keras
    onnx_uid = artifact.with_runtime("onnx", "a" * 64).device_uid
    int8_uid = artifact.with_runtime("int8", "a" * 64).device_uid
    other_graph = artifact.with_runtime("int8", "b" * 64).device_uid
    assert len({keras_uid, onnx_uid, int8_uid, other_graph}) == 4
    info = artifact.with_runtime("int8", "a" * 64).info
    assert (info.runtime, info.device_uid) == ("int8", int8_uid)
    # SR UIDs derive from the result's content, which carries the model's device UID and runtime.
    result = ScanResult(
        "1.2", "1.2.3", 0.5, "covid", 0.5, 1, 1, [0.5], ["1.2.3.4"], [1], [0.0], [0],
        artifact.with_runtime("keras").info, -600.0, 1500.0, "all", 0.0,
    )  # fmt: skip
    on_int8 = dataclasses.replace(result, model=info)
    assert sr_uids(result) != sr_uids(on_int8)


# -- the int8 accuracy gate -----------------------------------------------------------------------


def rows(*pairs: tuple[float, float]) -> list[dict]:
    return [{"scan": f"s{i}", "fp32": a, "int8": b} for i, (a, b) in enumerate(pairs)]


def test_gate_accepts_close_probabilities_with_the_same_labels():
    result = judge("minmax", rows((0.10, 0.11), (0.90, 0.885), (0.70, 0.70)), threshold=0.5)
    assert result.passed
    assert result.max_probability_difference == pytest.approx(0.015)


def test_gate_refuses_a_difference_over_the_tolerance():
    result = judge("minmax", rows((0.10, 0.10), (0.90, 0.90 - INT8_TOLERANCE - 0.001)), 0.5)
    assert not result.passed
    assert result.max_probability_difference == pytest.approx(INT8_TOLERANCE + 0.001)
    assert result.label_flips == []


def test_gate_refuses_a_label_flip_within_the_tolerance():
    # A scan sitting on the threshold: 0.005 apart, but on either side of it.
    result = judge("minmax", rows((0.10, 0.10), (0.502, 0.497)), threshold=0.5)
    assert not result.passed
    assert result.label_flips == ["s1"]
    assert "1 label(s) flipped: s1" in result.summary()


def test_gate_refuses_an_empty_set():
    assert not judge("minmax", [], 0.5).passed


# -- real exports (tf2onnx and ONNX Runtime on the tiny 32 px model) -----------------------------


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four COV19-CT-DB-layout phantom scans, six slices each."""
    import dicom_fixtures

    out = tmp_path_factory.mktemp("calibration")
    dicom_fixtures.write_cov19_layout(out, n_per_class=2, n_slices=6, size=64, seed=3)
    return out


@pytest.fixture(scope="session")
def exported_dir(tiny_model_dir: Path, calibration_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with model.onnx and a gated model.int8.onnx, exported once."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(tiny_model_dir, folder)
    result = invoke("export", folder, "--int8", "--calibration", calibration_dir, "--json")
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.slow
def test_export_records_both_graphs_with_sha256_and_agreement(exported_dir, calibration_dir):
    artifact = read_artifact(exported_dir)
    for runtime in ("onnx", "int8"):
        record = artifact.graphs[runtime]
        assert record["sha256"] == sha256_file(exported_dir / GRAPH_FILES[runtime])
        assert record["weights_sha256"] == artifact.weights_sha256
    assert artifact.graphs["onnx"]["check"]["max_slice_difference_vs_keras"] <= 1e-4
    int8 = artifact.graphs["int8"]
    assert int8["calibration"]["source"] == str(calibration_dir)
    assert int8["calibration"]["n_scans"] == 4
    agreement = int8["agreement"]
    assert agreement["labels_agree"] is True
    assert agreement["max_probability_difference"] <= INT8_TOLERANCE
    assert len(agreement["scans"]) == 4
    for scan in agreement["scans"]:
        assert abs(scan["int8"] - scan["fp32"]) <= INT8_TOLERANCE


@pytest.mark.slow
def test_onnx_matches_keras_per_slice(exported_dir):
    from ctcovid.inference import Classifier

    slices = np.random.default_rng(1).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    keras_probs = Classifier.from_file(exported_dir, runtime="keras").predict_slices(slices)
    onnx = Classifier.from_file(exported_dir, runtime="onnx")
    assert onnx.runtime is not None and onnx.runtime.name == "onnx"
    np.testing.assert_allclose(onnx.predict_slices(slices), keras_probs, atol=1e-4, rtol=0)
    int8 = Classifier.from_file(exported_dir, runtime="auto")
    assert int8.artifact.runtime == "int8"
    assert np.abs(int8.predict_slices(slices) - keras_probs).max() < 0.1


@pytest.mark.slow
def test_classify_json_and_sr_name_the_runtime(exported_dir, studies_root, study_infos, tmp_path):
    ct = studies_root / study_infos[0]["study_dir"] / "ct"
    outputs = {}
    for runtime in ("keras", "int8"):
        sr = tmp_path / f"{runtime}.dcm"
        result = invoke(
            "classify", ct, "--model", exported_dir, "--runtime", runtime, "--json", "--sr", sr
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["runtime"] == data["model"]["runtime"] == runtime
        ds = pydicom.dcmread(sr)
        texts = {item.TextValue for item in _iter(ds) if "TextValue" in item}
        assert f"runtime={runtime}" in texts
        outputs[runtime] = (data, ds)
    (keras_json, keras_sr), (int8_json, int8_sr) = outputs["keras"], outputs["int8"]
    assert keras_json["model"]["device_uid"] != int8_json["model"]["device_uid"]
    assert keras_sr.SOPInstanceUID != int8_sr.SOPInstanceUID
    assert keras_sr.SeriesInstanceUID != int8_sr.SeriesInstanceUID
    equipment = int8_sr.ContributingEquipmentSequence[-1]
    assert equipment.DeviceUID == int8_json["model"]["device_uid"]
    assert abs(keras_json["probability_covid"] - int8_json["probability_covid"]) <= INT8_TOLERANCE


@pytest.mark.slow
def test_int8_refused_when_a_scan_sits_on_the_threshold(exported_dir, calibration_dir, tmp_path):
    """Move the model's threshold between a scan's fp32 and int8 probabilities (the recipe that
    passed, which quantises deterministically): the label flips, so export refuses with the
    measured numbers and leaves the folder as it was."""
    from ctcovid.model.export import RECIPES
    from ctcovid.training.export import export_model

    artifact = read_artifact(exported_dir)
    int8 = artifact.graphs["int8"]
    recipe = next(r for r in RECIPES if r.name == int8["recipe"]["name"])
    scan = max(int8["agreement"]["scans"], key=lambda s: abs(s["int8"] - s["fp32"]))
    assert scan["int8"] != scan["fp32"]
    folder = model_copy(exported_dir, tmp_path / "m")
    (folder / GRAPH_FILES["int8"]).unlink()
    threshold = (scan["int8"] + scan["fp32"]) / 2
    graphs = {"onnx": artifact.graphs["onnx"]}  # the fp32 graph is kept and reused
    write_metadata(dataclasses.replace(artifact, graphs=graphs, threshold=threshold), folder)
    before = (folder / "ctcovid.json").read_text()
    with pytest.raises(ModelError, match="int8 refused") as refused:
        export_model(folder, int8=True, calibration=calibration_dir, recipes=[recipe])
    assert f"label(s) flipped: {scan['scan']}" in str(refused.value)
    assert (folder / "ctcovid.json").read_text() == before
    assert not (folder / GRAPH_FILES["int8"]).exists()
    assert not list(folder.glob(".export-*"))


def _iter(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _iter(item)
