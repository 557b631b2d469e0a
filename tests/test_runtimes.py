"""Runtimes behind the Classifier: choosing a graph, refusing a tampered one, the int8 gate (what
it selects and confirms on which scans, and when it refuses), the int8 load check, the bf16 run
on OpenVINO (its gate, its load check, its refusal on a CPU without BF16), and the runtime's
place in the result's identity (JSON, SR parameters, device and SR UIDs).

The gate and load-check tests run on a small hand-built ONNX graph with the exported graphs'
interface (slices in, probability and logit out), recorded as the folder's fp32 graph: export
then quantises it without converting the Keras model, in well under a second. Nothing here
asserts speed, or int8 numbers that depend on the CPU's int8 kernels (AVX2, VNNI, AMX): the
int8 graph is checked on the machine that quantised it, and where another CPU is the point the
CPU's description is substituted. bf16 is gated where this CPU has BF16 (Zen 4, Intel with AMX);
on one without (Zen 3) those tests skip, saying so, and its refusal is tested on every CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ctcovid.cli.main import app
from ctcovid.errors import ConfigError, InvalidInputError, ModelError
from ctcovid.model.artifact import (
    WEIGHTS_FILE,
    ModelArtifact,
    read_artifact,
    sha256_file,
    write_metadata,
)
from ctcovid.model.export import (
    INT8_LOGIT_TOLERANCE,
    INT8_SLICE_TOLERANCE,
    INT8_TOLERANCE,
    RECIPES,
    GateRequirements,
    Recipe,
    flip_rate_upper_bound,
    judge,
)
from ctcovid.model.runtimes import (
    AUTO_ORDER,
    BF16_FLAGS,
    CHECK_FILE,
    CHECK_FILES,
    COMPILED_FILES,
    GRAPH_FILES,
    auto_order,
    bf16_missing,
    bf16_passed_over,
    cpu_description,
    current_cpu,
    load_runtime,
    resolve_runtime,
)
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
    for name in {*GRAPH_FILES.values(), *CHECK_FILES.values(), *COMPILED_FILES.values()}:
        if (source / name).exists():
            (dest / name).symlink_to(source / name)
    return dest


def record_graph(
    folder: Path, runtime: str, content: bytes, *, sha256: str | None = None, **extra: object
) -> str:
    """Put a graph file in ``folder`` and record it in ctcovid.json (as export does)."""
    path = folder / GRAPH_FILES[runtime]
    if path.is_symlink():
        path.unlink()
    path.write_bytes(content)
    artifact = read_artifact(folder)
    digest = sha256 or sha256_file(path)
    graphs = {
        **artifact.graphs,
        runtime: {
            "file": path.name,
            "sha256": digest,
            "weights_sha256": artifact.weights_sha256,
            **extra,
        },
    }
    write_metadata(dataclasses.replace(artifact, graphs=graphs), folder)
    return digest


def drop_record(folder: Path, runtime: str) -> None:
    """Remove ``runtime``'s record from ctcovid.json (its files stay), as an export that never
    gated it would have left the folder."""
    artifact = read_artifact(folder)
    graphs = {k: v for k, v in artifact.graphs.items() if k != runtime}
    write_metadata(dataclasses.replace(artifact, graphs=graphs), folder)


# -- choosing a runtime (metadata and files only: nothing is loaded) ---------------------------


def test_auto_picks_openvino_int8_then_int8_then_onnx_then_keras(
    tiny_model_dir, verified_dir, tmp_path, caplog
):
    folder = model_copy(tiny_model_dir, tmp_path / "m")
    assert AUTO_ORDER == ("bf16", "openvino-int8", "int8", "onnx", "keras")
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "keras"
    onnx_sha = record_graph(folder, "onnx", b"fp32 graph")
    choice = resolve_runtime(folder, read_artifact(folder), "auto")
    assert (choice.name, choice.graph_sha256) == ("onnx", onnx_sha)
    # An int8 graph recorded without a confirmed gate (an older export's record) is passed over.
    record_graph(folder, "int8", b"int8 graph")
    with caplog.at_level(logging.INFO, logger="ctcovid.model.runtimes"):
        assert resolve_runtime(folder, read_artifact(folder), "auto").name == "onnx"
    assert "older ctcovid" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # A verified one that passes its load check is taken: the int8 graph on OpenVINO first,
    # then on ONNX Runtime.
    copy = model_copy(verified_dir, tmp_path / "verified")
    choice = resolve_runtime(copy, read_artifact(copy), "auto")
    assert choice.name == "openvino-int8" and choice.loaded is not None  # opened once, reused
    drop_record(copy, "openvino-int8")
    choice = resolve_runtime(copy, read_artifact(copy), "auto")
    assert choice.name == "int8" and choice.loaded is not None
    # An explicit choice wins over auto.
    assert resolve_runtime(copy, read_artifact(copy), "onnx").name == "onnx"
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


def test_gate_refuses_a_slice_whose_probability_or_logit_moved():
    """Scan means within the tolerance, the same labels, but one slice moved: refused."""
    close = rows((0.10, 0.10), (0.90, 0.90))
    assert judge("minmax", close, 0.5).passed
    for key, limit in (
        ("max_slice_dp", INT8_SLICE_TOLERANCE),
        ("max_slice_dz", INT8_LOGIT_TOLERANCE),
    ):
        moved = [dict(r) for r in close]
        moved[1][key] = limit * 1.01
        result = judge("minmax", moved, 0.5)
        assert not result.passed and not result.label_flips
        assert result.max_probability_difference == 0.0
    result = judge("minmax", moved, 0.5)
    assert result.max_slice_logit_difference == pytest.approx(INT8_LOGIT_TOLERANCE * 1.01)
    assert "logit" in result.summary()


def test_flip_rate_upper_bound_is_the_exact_clopper_pearson_bound():
    # No flip in n scans: 1 - 0.05 ** (1 / n), about 3 / n.
    for n in (1, 10, 100, 300):
        assert flip_rate_upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-12)
    assert flip_rate_upper_bound(0, 100) == pytest.approx(0.0295, abs=1e-4)
    assert flip_rate_upper_bound(0, 1) == pytest.approx(0.95)
    # With flips: the p at which P(X <= k | n, p) = 0.05, e.g. 1 flip in 10 -> 0.3942.
    assert flip_rate_upper_bound(1, 10) == pytest.approx(0.39416, abs=1e-5)
    for k, n in ((1, 10), (3, 50), (7, 300)):
        bound = flip_rate_upper_bound(k, n)
        cdf = sum(math.comb(n, i) * bound**i * (1 - bound) ** (n - i) for i in range(k + 1))
        assert cdf == pytest.approx(0.05, abs=1e-9)
    assert flip_rate_upper_bound(5, 5) == 1.0
    assert flip_rate_upper_bound(0, 0) == 1.0
    with pytest.raises(ValueError, match=r"flips must be within 0\.\.3"):
        flip_rate_upper_bound(4, 3)


def test_requirements_say_what_they_have_and_need():
    requirements = GateRequirements(min_scans=100, min_per_class=10, min_near_threshold=10)
    probabilities = [0.05] * 30 + [0.45] * 3 + [0.95] * 7
    counts = requirements.counts(probabilities, 0.5)
    assert counts == {"n_scans": 40, "n_positive": 7, "n_negative": 33, "n_near_threshold": 3}
    assert requirements.shortfall(counts, 0.5) == [
        "40 scan(s), needs 100",
        "7 scan(s) at or above the threshold 0.5 by fp32, needs 10",
        "3 scan(s) within 0.1 of the threshold by fp32, needs 10",
    ]


def test_cpu_description_names_the_int8_flags():
    cpu = cpu_description()
    assert set(cpu) == {"model", "machine", "flags", "source"}
    assert cpu["source"] in ("/proc/cpuinfo", "numpy", "none")
    assert set(cpu["flags"]) <= {
        "avx2",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "amx_int8",
        "avx512_bf16",
        "amx_bf16",
    }


# -- the int8 gate and load check on a small hand-built graph -----------------------------------

GATE_SIZE = 32
# What the 16 validation scans can hold: the defaults (100 scans...) scaled down.
SMALL = GateRequirements(min_scans=12, min_per_class=3, min_near_threshold=3)
# The convolution in int8 (ONNX Runtime's integer kernels), the head in float: on the small graph
# it moves a scan's probability by about 0.007 with or without 7-bit weights (CPUs without VNNI).
CONVOLUTION = Recipe("convolution", "MinMax", keep_ends_float=False, op_types=("Conv",))


def small_graph(path: Path, scale: float = 1.0, offset: float = 0.0) -> None:
    """slices (N, S, S, 1) -> Conv 3x3 (8 channels), ReLU, global average, MatMul: the logit
    ``scale * m + offset``, and its sigmoid: an exported graph's interface and operators."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.normal(0, 1, (8, 1, 3, 3)).astype(np.float32) / 255, "w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b"),
        numpy_helper.from_array(scale * rng.normal(0, 1, (8, 1)).astype(np.float32), "v"),
        numpy_helper.from_array(np.array([offset], np.float32), "c"),
    ]
    nodes = [
        helper.make_node("Transpose", ["slice"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("MatMul", ["flat", "v"], ["mm"]),
        helper.make_node("Add", ["mm", "c"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
    ]
    shape = ["N", GATE_SIZE, GATE_SIZE, 1]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("slice", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


@pytest.fixture(scope="module")
def gate_data(tmp_path_factory) -> dict:
    """A model folder whose fp32 graph is :func:`small_graph` (no Keras), 4 calibration scans
    and 16 validation scans (other phantoms), and a threshold that splits the validation scans
    in a wide gap between two of them: int8 moves them far less, on any CPU."""
    import dicom_fixtures
    from ctcovid.config import IngestConfig, ModelConfig
    from ctcovid.model.export import score
    from ctcovid.model.runtimes import OnnxRuntime
    from ctcovid.training.export import read_scans

    root = tmp_path_factory.mktemp("gate")
    calibration, validation = root / "calibration", root / "validation"
    dicom_fixtures.write_cov19_layout(calibration, n_per_class=2, n_slices=6, size=64, seed=3)
    dicom_fixtures.write_cov19_layout(validation, n_per_class=8, n_slices=6, size=64, seed=21)
    folder = root / "model"
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes(b"weights")
    artifact = ModelArtifact(
        model_config=ModelConfig(input_size=GATE_SIZE),
        ingest_config=IngestConfig(image_size=GATE_SIZE, min_slices=4),
        weights_sha256=sha256_file(folder / WEIGHTS_FILE),
    )
    write_metadata(artifact, folder)
    # Spread the validation scans' mean logits over 1 around 0 (probabilities about 0.38-0.62).
    scans, _ = read_scans(validation, artifact.ingest_config)
    graph = folder / GRAPH_FILES["onnx"]
    small_graph(graph)
    raw = [s.z.mean() for s in score(OnnxRuntime(graph, "onnx", ""), scans).values()]
    scale = 1.0 / float(np.ptp(raw))
    small_graph(graph, scale, -scale * float(np.median(raw)))
    record_graph(folder, "onnx", graph.read_bytes(), outputs={"probability": 0, "logit": "logit"})
    fp32 = sorted(s.scan_probability for s in score(OnnxRuntime(graph, "onnx", ""), scans).values())
    middle = fp32[4:12]
    gap, low = max((b - a, a) for a, b in itertools.pairwise(middle))
    threshold = low + gap / 2
    write_metadata(dataclasses.replace(read_artifact(folder), threshold=threshold), folder)
    return {
        "folder": folder,
        "calibration": calibration,
        "validation": validation,
        "threshold": threshold,
        "margin": gap / 2,
        "fp32": fp32,
    }


def gate_copy(gate_data: dict, dest: Path) -> Path:
    folder = dest / "model"
    shutil.copytree(gate_data["folder"], folder)
    return folder


def gate_copy_with_cam(gate_data: dict, dest: Path) -> Path:
    """:func:`gate_copy` whose fp32 graph has the class-activation output of an export."""
    from ctcovid.model.export import add_cam_output

    folder = gate_copy(gate_data, dest)
    graph = folder / GRAPH_FILES["onnx"]
    add_cam_output(graph)
    record = read_artifact(folder).graphs["onnx"]
    record_graph(folder, "onnx", graph.read_bytes(), outputs={**record["outputs"], "cam": "cam"})
    return folder


@pytest.fixture(scope="module")
def verified_dir(gate_data, tmp_path_factory) -> Path:
    from ctcovid.training.export import export_model

    folder = gate_copy(gate_data, tmp_path_factory.mktemp("verified"))
    export_model(
        folder,
        int8=True,
        calibration=gate_data["calibration"],
        validation=gate_data["validation"],
        recipes=[CONVOLUTION],
        requirements=SMALL,
    )
    return folder


def warnings_of(caplog) -> list[str]:
    """Warnings logged, less TensorFlow's note on its threads (other tests may start it)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.getMessage().startswith("TensorFlow started")
    ]


def test_gate_data_has_a_margin(gate_data):
    # The int8 numbers on this graph are some 1e-3 (any CPU); the threshold sits further away.
    assert gate_data["margin"] > 0.01
    below = sum(p < gate_data["threshold"] for p in gate_data["fp32"])
    assert 4 <= below <= 12


def test_verified_int8_records_what_gated_it(verified_dir, gate_data, caplog):
    record = read_artifact(verified_dir).graphs["int8"]
    assert record["recipe"]["name"] == CONVOLUTION.name
    assert record["recipe"]["activations"] == "uint8"
    assert isinstance(record["recipe"]["reduce_range"], bool)
    # Selected on the calibration scans, confirmed on the (other) validation scans.
    assert record["selection"]["source"] == str(gate_data["calibration"])
    assert record["selection"]["n_scans"] == 4
    verification = record["verification"]
    assert verification["status"] == "verified"
    confirmation = verification["confirmation"]
    assert confirmation["source"] == str(gate_data["validation"])
    assert confirmation["n_scans"] == 16 and len(confirmation["scans"]) == 16
    assert confirmation["n_slices"] == sum(s["n_slices"] for s in confirmation["scans"])
    assert confirmation["n_positive"] + confirmation["n_negative"] == 16
    assert confirmation["n_near_threshold"] >= SMALL.min_near_threshold
    assert confirmation["label_flips"] == []
    assert confirmation["max_probability_difference"] <= INT8_TOLERANCE
    assert confirmation["max_slice_probability_difference"] <= INT8_SLICE_TOLERANCE
    assert confirmation["max_slice_logit_difference"] <= INT8_LOGIT_TOLERANCE
    bound = confirmation["flip_rate_upper_bound"]
    assert bound["all_scans"] == pytest.approx(1 - 0.05 ** (1 / 16))
    assert bound["near_threshold"] == pytest.approx(
        1 - 0.05 ** (1 / confirmation["n_near_threshold"])
    )
    assert record["cpu"] == cpu_description()
    # The load check: 4 uint8 slices with their fp32 and int8 logits, its sha256 recorded.
    check = record["load_check"]
    assert check["sha256"] == sha256_file(verified_dir / CHECK_FILE)
    assert check["from"] == "validation scans" and len(check["slices"]) == 4
    scans = {s["scan"] for s in confirmation["scans"]}
    assert {name.rsplit("[", 1)[0] for name in check["slices"]} <= scans
    with np.load(verified_dir / CHECK_FILE) as data:
        assert data["slices"].shape == (4, GATE_SIZE, GATE_SIZE)
        assert data["slices"].dtype == np.uint8
        assert data["fp32_logit"].shape == data["int8_logit"].shape == (4,)
    # What Classifier.from_file does (without starting TensorFlow, which it pins first). auto
    # takes the same graph on OpenVINO (its own gate passed too); asked for, int8 is int8.
    caplog.clear()
    choice = resolve_runtime(verified_dir, read_artifact(verified_dir), "auto")
    assert (choice.name, load_runtime(choice).name) == ("openvino-int8", "openvino-int8")
    choice = resolve_runtime(verified_dir, read_artifact(verified_dir), "int8")
    assert (choice.name, load_runtime(choice).name) == ("int8", "int8")
    assert warnings_of(caplog) == []


def test_export_without_validation_is_unverified_and_auto_uses_fp32(gate_data, tmp_path, caplog):
    folder = gate_copy(gate_data, tmp_path)
    result = invoke("export", folder, "--int8", "--calibration", gate_data["calibration"])
    assert result.exit_code == 0, result.output
    assert "int8 UNVERIFIED (no --validation)" in result.output
    record = read_artifact(folder).graphs["int8"]
    assert record["verification"]["status"] == "unverified"
    assert record["verification"]["confirmed_on"] is None
    assert (folder / GRAPH_FILES["int8"]).is_file() and (folder / CHECK_FILE).is_file()
    caplog.clear()
    choice = resolve_runtime(folder, read_artifact(folder), "auto")
    assert (choice.name, load_runtime(choice).name) == ("onnx", "onnx")
    assert warnings_of(caplog) == []
    # Asked for explicitly it runs, with one warning saying why it should not be trusted.
    caplog.clear()
    choice = resolve_runtime(folder, read_artifact(folder), "int8")
    assert load_runtime(choice).name == "int8"
    (warning,) = warnings_of(caplog)
    assert "running the int8 graph as asked" in warning and "no validation scans" in warning


def test_export_json_and_summary_say_what_gated_int8(gate_data, tmp_path):
    from ctcovid.cli.export import int8_summary

    folder = gate_copy(gate_data, tmp_path)
    args = ["--calibration", gate_data["calibration"], "--validation", gate_data["validation"]]
    args += ["--min-scans", 12, "--min-per-class", 3, "--min-near-threshold", 3]
    result = invoke("export", folder, "--int8", *args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["confirmation"]["passed"] and data["attempts"][-1]["passed"]
    record = data["graphs"]["int8"]
    assert record == read_artifact(folder).graphs["int8"]
    selected, verified, gated = int8_summary(record)
    assert "selected on 4 calibration scan(s)" in selected
    assert f"VERIFIED on 16 validation scan(s) of {gate_data['validation']}" in verified
    assert f"upper bound on the flip rate {1 - 0.05 ** (1 / 16):.2%} (all scans)" in verified
    assert "0 labels flipped" in verified and "per slice" in verified
    assert "each load re-checks 4 slices" in gated


def test_validation_scans_shared_with_calibration_are_refused(gate_data, tmp_path):
    from ctcovid.training.export import export_model

    folder = gate_copy(gate_data, tmp_path)
    before = (folder / "ctcovid.json").read_text()
    # The same folder (same files), and a copy of it elsewhere (same pixels).
    copy = tmp_path / "copy"
    shutil.copytree(gate_data["calibration"], copy / "more")
    shutil.copytree(gate_data["validation"], copy / "val")
    for validation, why in ((gate_data["calibration"], "same file"), (copy, "same slice pixels")):
        with pytest.raises(InvalidInputError, match="disjoint from the calibration scans") as err:
            export_model(
                folder, int8=True, calibration=gate_data["calibration"], validation=validation
            )
        assert "4 of its" in str(err.value) and why in str(err.value)
    assert (folder / "ctcovid.json").read_text() == before
    assert not (folder / GRAPH_FILES["int8"]).exists()


def test_too_few_scans_near_the_threshold_refuses(gate_data, tmp_path):
    folder = gate_copy(gate_data, tmp_path)
    before = (folder / "ctcovid.json").read_text()
    args = ["export", folder, "--int8", "--calibration", gate_data["calibration"]]
    args += ["--validation", gate_data["validation"], "--min-scans", "12"]
    result = invoke(*args, "--min-per-class", "3", "--min-near-threshold", "40")
    assert result.exit_code == 1
    assert "cannot state a bound on the label flip rate" in result.output
    assert "of the threshold by fp32, needs 40" in " ".join(result.output.split())
    # With the default minimum of 100 scans it says that too.
    result = invoke(*args[:-2])
    assert "16 scan(s), needs 100" in " ".join(result.output.split())
    assert (folder / "ctcovid.json").read_text() == before
    assert not (folder / GRAPH_FILES["int8"]).exists() and not (folder / CHECK_FILE).exists()


@pytest.mark.parametrize("method", ["minmax", "minmax, convolutions only", "percentile", "entropy"])
def test_bounded_calibration_writes_the_graph_of_quantize_statics_own(gate_data, tmp_path, method):
    """The export's calibration on its own lean session (the default) and ONNX Runtime's
    quantize_static calibrating on its own session write the same bytes, for every calibration
    method, over 20 slices (two batches and a partial third): the ranges are the same to the bit.
    Other slices give another graph, so the equality is the ranges', not an empty calibration's.
    """
    from ctcovid.model.export import quantize, sample_slices
    from ctcovid.training.export import read_scans

    recipe = {
        "minmax": RECIPES[0],
        "minmax, convolutions only": CONVOLUTION,
        # The small graph's ends are all of it: these quantise them.
        "percentile": Recipe("percentile", "Percentile", keep_ends_float=False, percentile=99.9),
        "entropy": Recipe("entropy", "Entropy", keep_ends_float=False),
    }[method].resolved(cpu_description())
    ingest = read_artifact(gate_data["folder"]).ingest_config
    scans, _ = read_scans(gate_data["calibration"], ingest)
    slices = sample_slices(scans, 20)
    assert len(slices) == 20
    fp32 = gate_data["folder"] / GRAPH_FILES["onnx"]
    written = {}
    for name, calibration, bounded in (
        ("bounded", slices, True),
        ("quantize_static", slices, False),
        ("other slices", slices // 2, True),
    ):
        quantize(fp32, tmp_path / f"{name}.onnx", calibration, recipe, bounded=bounded)
        written[name] = sha256_file(tmp_path / f"{name}.onnx")
    assert written["bounded"] == written["quantize_static"]
    assert written["other slices"] != written["bounded"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary file left behind
        "bounded.onnx",
        "other slices.onnx",
        "quantize_static.onnx",
    ]


def damage_int8_graph(folder: Path, keep_blob: bool = False) -> None:
    """Scale the int8 graph's first weight scale by 1.5 and record the new file's sha256, as if
    the graph had changed after its gate (another quantiser, another ONNX Runtime). The
    openvino-int8 record's compiled model goes too unless ``keep_blob`` (it was compiled from
    the previous file)."""
    import onnx
    from onnx import numpy_helper

    path = folder / GRAPH_FILES["int8"]
    model = onnx.load(str(path))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "w" in n.input[0])
    scale = next(i for i in model.graph.initializer if i.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
    record = read_artifact(folder).graphs["int8"]
    digest = record_graph(folder, "int8", model.SerializeToString(), **{
        k: v for k, v in record.items() if k not in ("file", "sha256", "weights_sha256")
    })  # fmt: skip
    artifact = read_artifact(folder)
    if "openvino-int8" in artifact.graphs:  # the same file, gated on OpenVINO as well
        artifact.graphs["openvino-int8"]["sha256"] = digest
        if not keep_blob:
            del artifact.graphs["openvino-int8"]["compiled"]
        write_metadata(artifact, folder)


def test_int8_graph_that_fails_its_load_check_falls_back_with_one_warning(
    verified_dir, tmp_path, caplog
):
    folder = model_copy(verified_dir, tmp_path / "m")
    damage_int8_graph(folder)
    caplog.clear()
    choice = resolve_runtime(folder, read_artifact(folder), "auto")
    assert (choice.name, load_runtime(choice).name) == ("onnx", "onnx")
    # The file fails both engines' load checks: one warning for each graph passed over.
    on_openvino, warning = warnings_of(caplog)
    assert "openvino-int8 graph not used" in on_openvino and "falls back to int8" in on_openvino
    assert CHECK_FILES["openvino-int8"] in on_openvino
    assert "int8 graph not used" in warning and CHECK_FILE in warning
    assert "the fp32 graph model.onnx" in warning
    # Asked for explicitly: it runs, with one warning.
    caplog.clear()
    choice = resolve_runtime(folder, read_artifact(folder), "int8")
    assert load_runtime(choice).name == "int8"
    (warning,) = warnings_of(caplog)
    assert "running the int8 graph as asked" in warning and "differ from those" in warning


def test_check_slices_that_disagree_fall_back_with_one_warning(verified_dir, tmp_path, caplog):
    folder = model_copy(verified_dir, tmp_path / "m")
    drop_record(folder, "openvino-int8")  # ONNX Runtime's int8 alone (its own test below)
    (folder / CHECK_FILE).unlink()
    with np.load(verified_dir / CHECK_FILE) as data:
        arrays = dict(data)
    arrays["int8_logit"] = arrays["int8_logit"] + 0.5
    np.savez(folder / CHECK_FILE, **arrays)
    artifact = read_artifact(folder)
    record = artifact.graphs["int8"]
    record["load_check"]["sha256"] = sha256_file(folder / CHECK_FILE)
    write_metadata(artifact, folder)
    caplog.clear()
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "onnx"
    (warning,) = warnings_of(caplog)
    assert "differ from those measured at export by up to" in warning
    # A check file that no longer matches its recorded sha256 is a failed check as well.
    np.savez(folder / CHECK_FILE, **dict(arrays, int8_logit=arrays["int8_logit"] - 0.5))
    caplog.clear()
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "onnx"
    (warning,) = warnings_of(caplog)
    assert "sha256 differs" in warning


@pytest.mark.parametrize("change", ["vnni", "amx"])
def test_other_int8_arithmetic_falls_back_with_one_warning(
    verified_dir, tmp_path, caplog, monkeypatch, change
):
    """The gate's CPU and this one differ in VNNI or AMX (whatever this machine has): auto
    does not trust the int8 numbers measured on the other one."""
    import ctcovid.model.runtimes as runtimes

    gated = read_artifact(verified_dir).graphs["int8"]["cpu"]
    if change == "amx" and gated["source"] != "/proc/cpuinfo":
        pytest.skip("AMX is known from /proc/cpuinfo only")
    flags = set(gated["flags"])
    toggled = {"vnni": {"avx512_vnni", "avx_vnni"}, "amx": {"amx_int8"}}[change]
    flags = flags - toggled if flags & toggled else flags | {min(toggled)}
    other = {**gated, "source": "/proc/cpuinfo", "flags": sorted(flags)}
    folder = model_copy(verified_dir, tmp_path / "m")
    drop_record(folder, "openvino-int8")  # ONNX Runtime's int8 alone (its own test below)
    monkeypatch.setattr(runtimes, "current_cpu", lambda: other)
    caplog.clear()
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "onnx"
    (warning,) = warnings_of(caplog)
    assert change.upper() in warning and "int8 arithmetic differs" in warning
    # The same flags: taken.
    monkeypatch.setattr(runtimes, "current_cpu", lambda: dict(gated))
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "int8"


# -- bf16 on OpenVINO: gated like int8, refused without BF16 -------------------------------------

NO_BF16 = bf16_missing(cpu_description())
needs_bf16 = pytest.mark.skipif(
    bool(NO_BF16), reason=f"bf16 is gated only on a CPU with BF16: {NO_BF16}"
)


def without_bf16(cpu: dict) -> dict:
    """``cpu`` as a CPU without BF16 (AMD Zen 3: AVX2 only) would describe itself."""
    flags = [f for f in cpu["flags"] if f not in BF16_FLAGS]
    return {**cpu, "source": "/proc/cpuinfo", "flags": flags, "model": "AMD EPYC 7B13"}


@pytest.fixture(scope="module")
def bf16_dir(verified_dir, tmp_path_factory) -> Path:
    """The verified int8 folder with bf16 gated on the 16 validation scans too."""
    from ctcovid.training.export import export_model

    if NO_BF16:
        pytest.skip(f"bf16 is gated only on a CPU with BF16: {NO_BF16}")
    folder = tmp_path_factory.mktemp("bf16") / "model"
    shutil.copytree(verified_dir, folder)
    data = read_artifact(verified_dir).graphs["int8"]["verification"]["confirmation"]["source"]
    export_model(folder, bf16=True, validation=Path(data), requirements=SMALL)
    return folder


def test_openvino_f32_runs_the_fp32_graph_as_onnx_runtime_does(verified_dir, tmp_path):
    """OpenVINO at f32 on model.onnx: the fp32 graph's numbers (within the fp32 export check's
    tolerances), under its own name and identity; on any CPU."""
    from ctcovid.model.export import FP32_LOGIT_TOLERANCE, FP32_TOLERANCE

    artifact = read_artifact(verified_dir)
    ov = load_runtime(resolve_runtime(verified_dir, artifact, "openvino"))
    onnx = load_runtime(resolve_runtime(verified_dir, artifact, "onnx"))
    assert (ov.name, ov.graph_sha256) == ("openvino", artifact.graphs["onnx"]["sha256"])
    x = np.random.default_rng(2).integers(0, 256, (16, GATE_SIZE, GATE_SIZE, 1)).astype(np.float32)
    p_ov, z_ov = ov.predict_with_logits(x)  # type: ignore[attr-defined]
    p_ort, z_ort = onnx.predict_with_logits(x)  # type: ignore[attr-defined]
    assert np.abs(p_ov - p_ort).max() <= FP32_TOLERANCE
    assert (np.abs(z_ov - z_ort) / np.maximum(1, np.abs(z_ort))).max() <= FP32_LOGIT_TOLERANCE
    onnx_uid = artifact.with_runtime("onnx", onnx.graph_sha256).device_uid
    assert artifact.with_runtime("openvino", ov.graph_sha256).device_uid != onnx_uid


def test_openvino_runs_any_number_of_slices_on_its_static_batch(gate_data, tmp_path):
    """OpenVINO compiles for the scoring batch (16); 0, 5, 16 and 21 slices are run in chunks of
    16 and give, per slice, the numbers of the same graph compiled with a dynamic batch."""
    from ctcovid.model.export import FP32_LOGIT_TOLERANCE, FP32_TOLERANCE
    from ctcovid.model.runtimes import SCORING_BATCH_SIZE, OpenVinoRuntime

    path = gate_copy_with_cam(gate_data, tmp_path) / GRAPH_FILES["onnx"]
    static = OpenVinoRuntime(path, "openvino", "", precision="f32")
    dynamic = OpenVinoRuntime(path, "openvino", "", precision="f32", batch=None)
    assert static.batch == SCORING_BATCH_SIZE and dynamic.batch is None
    assert static.compiled.inputs[0].get_partial_shape()[0].get_length() == SCORING_BATCH_SIZE
    x = np.random.default_rng(3).integers(0, 256, (21, GATE_SIZE, GATE_SIZE, 1)).astype(np.float32)
    for n in (0, 5, 16, 21):
        (p_s, z_s), (p_d, z_d) = (
            static.predict_with_logits(x[:n]),
            dynamic.predict_with_logits(x[:n]),
        )
        assert p_s.shape == p_d.shape == (n,)
        assert np.abs(p_s - p_d).max(initial=0) <= FP32_TOLERANCE
        assert (np.abs(z_s - z_d) / np.maximum(1, np.abs(z_d))).max(
            initial=0
        ) <= FP32_LOGIT_TOLERANCE
    maps = static.class_activation(x[:5])
    assert maps.shape[0] == 5 and np.allclose(maps, dynamic.class_activation(x[:5]), atol=1e-4)
    # A slice's chunk is the same whatever follows it: the first 16 of 21 are the 16 alone.
    assert np.array_equal(static.predict(x)[:16], static.predict(x[:16]))


@needs_bf16
def test_verified_bf16_records_its_gate_and_auto_takes_it_first(bf16_dir, gate_data, caplog):
    artifact = read_artifact(bf16_dir)
    record = artifact.graphs["bf16"]
    assert record["file"] == GRAPH_FILES["onnx"]
    assert (
        record["sha256"]
        == artifact.graphs["onnx"]["sha256"]
        == sha256_file(bf16_dir / "model.onnx")
    )
    assert record["cpu"] == cpu_description() and set(record["cpu"]["flags"]) & set(BF16_FLAGS)
    confirmation = record["verification"]["confirmation"]
    assert record["verification"]["status"] == "verified"
    assert confirmation["source"] == str(gate_data["validation"]) and confirmation["n_scans"] == 16
    assert confirmation["label_flips"] == []
    assert confirmation["max_probability_difference"] <= INT8_TOLERANCE
    assert record["load_check"]["sha256"] == sha256_file(bf16_dir / CHECK_FILES["bf16"])
    with np.load(bf16_dir / CHECK_FILES["bf16"]) as data:
        assert data["bf16_logit"].shape == data["fp32_logit"].shape == (4,)
    # The int8 records are kept; auto takes bf16 first, opened once by its load check.
    assert artifact.graphs["int8"]["verification"]["status"] == "verified"
    assert artifact.graphs["openvino-int8"]["verification"]["status"] == "verified"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ctcovid.model.runtimes"):
        auto = resolve_runtime(bf16_dir, artifact, "auto")
    assert warnings_of(caplog) == []
    if auto_order(current_cpu())[0] == "bf16":  # AMX-BF16: bf16 first, opened once
        assert auto.name == "bf16" and auto.loaded is not None
    else:  # AVX512-BF16 alone (Zen 4): passed over, said once
        assert auto.name == "openvino-int8" and "auto passes over the bf16 graph" in caplog.text
    choice = resolve_runtime(bf16_dir, artifact, "bf16")
    assert choice.loaded is not None
    # Its numbers: within the gate of fp32 on the gate's own slices, under its own identity.
    fp32 = load_runtime(resolve_runtime(bf16_dir, artifact, "onnx"))
    x = np.random.default_rng(3).integers(0, 256, (16, GATE_SIZE, GATE_SIZE, 1)).astype(np.float32)
    assert np.abs(choice.loaded.predict(x) - fp32.predict(x)).max() <= INT8_SLICE_TOLERANCE
    bf16_uid = artifact.with_runtime("bf16", choice.graph_sha256).device_uid
    assert bf16_uid != artifact.with_runtime("onnx", choice.graph_sha256).device_uid


@needs_bf16
def test_bf16_whose_check_slices_disagree_falls_back_to_openvino_int8(bf16_dir, tmp_path, caplog):
    """A simulated mismatch: the recorded bf16 logits moved (as another OpenVINO's kernels
    would move them); auto says why and takes the next verified runtime."""
    folder = model_copy(bf16_dir, tmp_path / "m")
    check = folder / CHECK_FILES["bf16"]
    check.unlink()
    with np.load(bf16_dir / CHECK_FILES["bf16"]) as data:
        arrays = dict(data)
    arrays["bf16_logit"] = arrays["bf16_logit"] + 0.5
    np.savez(check, **arrays)
    artifact = read_artifact(folder)
    artifact.graphs["bf16"]["load_check"]["sha256"] = sha256_file(check)
    write_metadata(artifact, folder)
    caplog.clear()
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "openvino-int8"
    if auto_order(current_cpu())[0] == "bf16":  # where auto tries bf16 (AMX-BF16)
        (warning,) = warnings_of(caplog)
        assert "bf16 graph not used" in warning and "differ from those measured" in warning
        assert "falls back to openvino-int8" in warning
    # Asked for by name it runs, with one warning.
    caplog.clear()
    assert load_runtime(resolve_runtime(folder, read_artifact(folder), "bf16")).name == "bf16"
    (warning,) = warnings_of(caplog)
    assert "running the bf16 graph as asked" in warning


@needs_bf16
def test_other_bf16_arithmetic_falls_back(bf16_dir, tmp_path, caplog, monkeypatch):
    """Gated where only AVX512-BF16 is, loaded on a CPU with AMX-BF16 (which auto tries bf16
    on): other kernels, other arithmetic; auto says so and takes the next runtime."""
    import ctcovid.model.runtimes as runtimes

    folder = model_copy(bf16_dir, tmp_path / "m")
    artifact = read_artifact(folder)
    gated = artifact.graphs["bf16"]["cpu"]
    flags = set(gated["flags"]) | {"avx512_bf16"}
    artifact.graphs["bf16"]["cpu"] = {**gated, "flags": sorted(flags - {"amx_bf16"})}
    write_metadata(artifact, folder)
    amx = {**gated, "flags": sorted(flags | {"amx_bf16"})}
    monkeypatch.setattr(runtimes, "current_cpu", lambda: amx)
    assert auto_order(amx)[0] == "bf16"
    caplog.clear()
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "openvino-int8"
    (warning,) = warnings_of(caplog)
    assert "AMX_BF16" in warning and "bf16 arithmetic differs" in warning


def test_auto_takes_bf16_first_only_where_amx_bf16_runs_it():
    """AMX-BF16 (Intel Xeon since Sapphire Rapids): bf16 first. AVX512-BF16 alone (AMD Zen 4),
    no BF16 (Zen 3) or flags that cannot be read: bf16 left out, with the reason."""
    base = {"model": "x", "machine": "x86_64", "source": "/proc/cpuinfo"}
    amx = {**base, "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"]}
    zen4 = {**base, "flags": ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]}
    zen3 = {**base, "flags": ["avx2"]}
    unknown = {**base, "flags": [], "source": "none"}
    assert auto_order(amx) == AUTO_ORDER and bf16_passed_over(amx) == ""
    for cpu in (zen4, zen3, unknown):
        assert auto_order(cpu) == ("openvino-int8", "int8", "onnx", "keras")
    assert "no AMX-BF16" in bf16_passed_over(zen4)
    assert "no BF16 instructions" in bf16_passed_over(zen3)
    assert "cannot be read" in bf16_passed_over(unknown)


def test_bf16_is_refused_on_a_cpu_without_bf16(
    verified_dir, gate_data, tmp_path, caplog, monkeypatch
):
    """Zen 3 (AVX2 only): export refuses bf16 and writes nothing; --runtime bf16 is refused
    with the reason; auto passes over a bf16 record gated elsewhere and says why."""
    import ctcovid.model.runtimes as runtimes
    import ctcovid.training.export as training_export

    zen3 = without_bf16(cpu_description())
    monkeypatch.setattr(runtimes, "current_cpu", lambda: zen3)
    monkeypatch.setattr(training_export, "cpu_description", lambda: zen3)
    folder = model_copy(verified_dir, tmp_path / "m")
    before = (folder / "ctcovid.json").read_text()
    result = invoke("export", folder, "--bf16", "--validation", gate_data["validation"])
    assert result.exit_code == 1
    assert "bf16 refused" in result.output and "has no BF16 instructions" in result.output
    assert (folder / "ctcovid.json").read_text() == before
    assert not (folder / CHECK_FILES["bf16"]).exists()
    # A folder whose bf16 was gated on an AMX machine, copied here.
    artifact = read_artifact(folder)
    amx = {**zen3, "flags": [*zen3["flags"], "amx_bf16"], "model": "Intel(R) Xeon(R)"}
    onnx = artifact.graphs["onnx"]
    bf16 = {
        "file": onnx["file"],
        "sha256": onnx["sha256"],
        "weights_sha256": artifact.weights_sha256,
        "verification": {"status": "verified"},
        "cpu": amx,
        "load_check": {"file": CHECK_FILES["bf16"], "sha256": "0" * 64},
    }
    write_metadata(dataclasses.replace(artifact, graphs={**artifact.graphs, "bf16": bf16}), folder)
    with pytest.raises(ModelError, match=r"runtime 'bf16' refused: .* has no BF16 instructions"):
        resolve_runtime(folder, read_artifact(folder), "bf16")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ctcovid.model.runtimes"):
        assert resolve_runtime(folder, read_artifact(folder), "auto").name == "openvino-int8"
    assert warnings_of(caplog) == []
    assert "auto passes over the bf16 graph" in caplog.text
    assert "no BF16 instructions" in caplog.text


# -- the int8 graph on OpenVINO: its own gate and load check --------------------------------------

OV_INT8 = "openvino-int8"


def test_verified_openvino_int8_records_its_own_gate(verified_dir, gate_data, caplog):
    """``export --int8`` also gated the int8 graph on OpenVINO, on the same validation scans by
    the same tolerances; its numbers are re-computable from the record's files."""
    from ctcovid.model.export import gate, score
    from ctcovid.model.runtimes import OnnxRuntime, OpenVinoRuntime
    from ctcovid.training.export import read_scans

    artifact = read_artifact(verified_dir)
    record, int8 = artifact.graphs[OV_INT8], artifact.graphs["int8"]
    assert record["file"] == int8["file"] == GRAPH_FILES[OV_INT8] == "model.int8.onnx"
    assert record["sha256"] == int8["sha256"] == sha256_file(verified_dir / "model.int8.onnx")
    assert record["weights_sha256"] == artifact.weights_sha256
    assert record["engine"].startswith("openvino ") and "f32" in record["precision"]
    assert record["cpu"] == cpu_description()
    assert record["tolerances"] == int8["tolerances"] and record["threshold"] == int8["threshold"]
    verification = record["verification"]
    assert verification["status"] == "verified"
    confirmation = verification["confirmation"]
    assert confirmation["source"] == str(gate_data["validation"]) and confirmation["n_scans"] == 16
    assert confirmation["label_flips"] == []
    # Its own load check, its sha256 recorded, its logits under its own name.
    check = record["load_check"]
    assert check["file"] == CHECK_FILES[OV_INT8] != CHECK_FILES["int8"]
    assert check["sha256"] == sha256_file(verified_dir / CHECK_FILES[OV_INT8])
    with np.load(verified_dir / CHECK_FILES[OV_INT8]) as data:
        assert data[f"{OV_INT8}_logit"].shape == data["fp32_logit"].shape == (4,)
    # The recorded gate, again: OpenVINO on the int8 graph against fp32 on the same scans.
    scans, _ = read_scans(gate_data["validation"], artifact.ingest_config)
    fp32 = score(OnnxRuntime(verified_dir / GRAPH_FILES["onnx"], "onnx", ""), scans)
    ov = OpenVinoRuntime(verified_dir / GRAPH_FILES[OV_INT8], OV_INT8, "", precision="f32")
    again = gate(OV_INT8, scans, fp32, ov, artifact.threshold, candidate=OV_INT8)
    assert again.passed and again.label_flips == []
    assert again.max_probability_difference <= INT8_TOLERANCE
    assert again.max_slice_probability_difference <= INT8_SLICE_TOLERANCE
    assert again.max_slice_logit_difference <= INT8_LOGIT_TOLERANCE
    for key in ("max_probability_difference", "max_slice_logit_difference"):
        assert getattr(again, key) == pytest.approx(confirmation[key], abs=1e-5)
    # Without a bf16 graph auto takes it, opened once by its load check; no warning.
    caplog.clear()
    choice = resolve_runtime(verified_dir, artifact, "auto")
    assert choice.name == OV_INT8 and choice.loaded is not None
    assert choice.graph_sha256 == record["sha256"]
    assert warnings_of(caplog) == []


def test_openvino_int8_whose_check_slices_disagree_falls_back_to_int8(
    verified_dir, tmp_path, caplog
):
    """A simulated mismatch: the recorded OpenVINO logits moved (as other kernels would move
    them); auto says why, once, and takes ONNX Runtime's int8 run of the same file."""
    folder = model_copy(verified_dir, tmp_path / "m")
    check = folder / CHECK_FILES[OV_INT8]
    check.unlink()
    with np.load(verified_dir / CHECK_FILES[OV_INT8]) as data:
        arrays = dict(data)
    arrays[f"{OV_INT8}_logit"] = arrays[f"{OV_INT8}_logit"] + 0.5
    np.savez(check, **arrays)
    artifact = read_artifact(folder)
    artifact.graphs[OV_INT8]["load_check"]["sha256"] = sha256_file(check)
    write_metadata(artifact, folder)
    caplog.clear()
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "int8"
    (warning,) = warnings_of(caplog)
    assert f"{OV_INT8} graph not used" in warning and "differ from those measured" in warning
    assert "falls back to int8" in warning
    # Asked for by name it runs, with one warning.
    caplog.clear()
    assert load_runtime(resolve_runtime(folder, read_artifact(folder), OV_INT8)).name == OV_INT8
    (warning,) = warnings_of(caplog)
    assert f"running the {OV_INT8} graph as asked" in warning


@pytest.mark.parametrize("change", ["amx_int8", "vnni", "avx512f"])
def test_other_openvino_int8_arithmetic_falls_back(
    verified_dir, tmp_path, caplog, monkeypatch, change
):
    """The gate's CPU and this one differ in AMX-INT8, VNNI or AVX-512 (whichever way this
    machine has it): OpenVINO would pick other int8 kernels, so auto passes over it. AVX-512
    alone leaves ONNX Runtime's int8 arithmetic as it was (int8 is taken); AMX and VNNI change
    that too (the fp32 graph is)."""
    import ctcovid.model.runtimes as runtimes

    gated = read_artifact(verified_dir).graphs[OV_INT8]["cpu"]
    if gated["source"] != "/proc/cpuinfo":
        pytest.skip("AMX and AVX-VNNI are known from /proc/cpuinfo only")
    flags = set(gated["flags"])
    toggled = {"amx_int8": {"amx_int8"}, "vnni": {"avx512_vnni", "avx_vnni"}}.get(change, {change})
    flags = flags - toggled if flags & toggled else flags | {min(toggled)}
    other = {**gated, "flags": sorted(flags)}
    monkeypatch.setattr(runtimes, "current_cpu", lambda: other)
    caplog.clear()
    taken = resolve_runtime(verified_dir, read_artifact(verified_dir), "auto").name
    assert taken == ("int8" if change == "avx512f" else "onnx")
    first, *rest = warnings_of(caplog)
    assert f"{OV_INT8} graph not used" in first and f"{OV_INT8} arithmetic differs" in first
    assert change.upper() in first
    assert len(rest) == (0 if change == "avx512f" else 1)
    # The same flags: taken.
    monkeypatch.setattr(runtimes, "current_cpu", lambda: dict(gated))
    assert resolve_runtime(verified_dir, read_artifact(verified_dir), "auto").name == OV_INT8


def test_classify_on_openvino_int8_has_its_own_device_uid(verified_dir, studies_root, study_infos):
    """The same int8 file on two engines: two runtimes, two device UIDs, scores within the
    int8 tolerance of each other."""
    ct = studies_root / study_infos[0]["study_dir"] / "ct"
    results = {}
    for runtime in ("int8", OV_INT8):
        result = invoke("classify", ct, "--model", verified_dir, "--runtime", runtime, "--json")
        assert result.exit_code == 0, result.output
        results[runtime] = json.loads(result.stdout)
        assert results[runtime]["runtime"] == results[runtime]["model"]["runtime"] == runtime
    ort, ov = results["int8"], results[OV_INT8]
    assert ov["model"]["device_uid"] != ort["model"]["device_uid"]
    assert abs(ov["probability_covid"] - ort["probability_covid"]) <= 2 * INT8_TOLERANCE


def test_openvino_int8_refused_keeps_int8_and_a_re_export_drops_a_stale_record(
    gate_data, verified_dir, tmp_path, monkeypatch
):
    """OpenVINO's gate refusing (here on a graph whose weight scale moved, as other kernels
    could move it) keeps ONNX Runtime's int8 graph and says why in the report and --json; the
    refused export also drops the record that gated the previous model.int8.onnx."""
    import onnx
    from onnx import numpy_helper

    import ctcovid.training.export as training_export

    folder = gate_copy(gate_data, tmp_path)
    for name in (GRAPH_FILES["int8"], CHECK_FILES[OV_INT8], "ctcovid.json"):
        shutil.copy(verified_dir / name, folder / name)
    assert OV_INT8 in read_artifact(folder).graphs
    moved = tmp_path / "moved.int8.onnx"
    real_run = training_export._openvino_int8_run

    def moved_run(path: Path, sha256: str):
        model = onnx.load(str(path))
        dq = next(
            n for n in model.graph.node if n.op_type == "DequantizeLinear" and "w" in n.input[0]
        )
        scale = next(i for i in model.graph.initializer if i.name == dq.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3, scale.name))
        onnx.save(model, str(moved))
        return real_run(moved, sha256)

    monkeypatch.setattr(training_export, "_openvino_int8_run", moved_run)
    args = ["--calibration", gate_data["calibration"], "--validation", gate_data["validation"]]
    args += ["--min-scans", 12, "--min-per-class", 3, "--min-near-threshold", 3]
    result = invoke("export", folder, "--int8", *args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    reason = data["not_recorded"][OV_INT8]
    assert f"{OV_INT8} refused on the scans of {gate_data['validation']}" in reason
    assert "kept for ONNX Runtime" in reason and "\n" not in reason
    graphs = read_artifact(folder).graphs
    assert OV_INT8 not in graphs and OV_INT8 not in data["graphs"]
    assert graphs["int8"]["verification"]["status"] == "verified"
    assert graphs["int8"]["sha256"] == sha256_file(folder / GRAPH_FILES["int8"])
    assert resolve_runtime(folder, read_artifact(folder), "auto").name == "int8"
    # Without --json the reason is one printed line.
    result = invoke("export", folder, "--int8", *args)
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith(f"{OV_INT8} not recorded")]
    assert "kept for ONNX Runtime" in line


# -- OpenVINO's compiled model: saved at export, imported at load --------------------------------


def ov_folder(request, runtime: str) -> Path:
    """The exported folder holding ``runtime``'s record (bf16's skips on a CPU without BF16)."""
    return request.getfixturevalue("bf16_dir" if runtime == "bf16" else "verified_dir")


def compiled_from_graph(folder: Path, runtime: str):
    """``runtime``'s graph read and compiled as a load without a saved model does."""
    from ctcovid.model.runtimes import open_graph

    return open_graph(runtime, folder / GRAPH_FILES[runtime], "")


def assert_same_outputs(a, b, folder: Path, runtime: str) -> None:
    """``a`` and ``b`` give the same bytes (probability and logit) on the check slices and on
    0, 5, 16 and 21 random slices (the static batch of 16 padded, whole, chunked)."""
    with np.load(folder / CHECK_FILES[runtime]) as data:
        check = data["slices"][..., None].astype(np.float32)
    x = np.random.default_rng(5).integers(0, 256, (21, GATE_SIZE, GATE_SIZE, 1)).astype(np.float32)
    for slices in (check, *(x[:n] for n in (0, 5, 16, 21))):
        (p_a, z_a), (p_b, z_b) = a.predict_with_logits(slices), b.predict_with_logits(slices)
        assert p_a.shape == (len(slices),)
        assert p_a.tobytes() == p_b.tobytes() and z_a.tobytes() == z_b.tobytes()


def infos_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


@pytest.mark.parametrize("runtime", [OV_INT8, pytest.param("bf16", marks=needs_bf16)])
def test_export_saves_the_compiled_model_and_a_load_imports_it(request, runtime, caplog):
    """The export records the compiled model with what it is tied to; a load here imports it
    (no warning), and it computes the bytes of the graph compiled at load."""
    import openvino as ov

    from ctcovid.model.runtimes import SCORING_BATCH_SIZE, openvino_config, scoring_threads

    folder = ov_folder(request, runtime)
    record = read_artifact(folder).graphs[runtime]["compiled"]
    blob = folder / COMPILED_FILES[runtime]
    assert record["file"] == blob.name == f"model.{runtime}.blob"
    assert record["sha256"] == sha256_file(blob)
    assert record["openvino"] == ov.get_version() and record["cpu"] == cpu_description()
    assert record["threads"] == scoring_threads() and record["batch"] == SCORING_BATCH_SIZE
    assert record["config"] == openvino_config("bf16" if runtime == "bf16" else "f32")
    caplog.set_level(logging.INFO, logger="ctcovid.model.runtimes")
    caplog.clear()
    imported = load_runtime(resolve_runtime(folder, read_artifact(folder), runtime))
    assert imported.opened == "imported"  # type: ignore[attr-defined]
    (line,) = [m for m in infos_of(caplog) if "compiled model" in m]
    assert "imported its compiled model" in line
    assert warnings_of(caplog) == []
    compiled = compiled_from_graph(folder, runtime)
    assert compiled.opened == "compiled"  # type: ignore[union-attr]
    assert_same_outputs(imported, compiled, folder, runtime)


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_changed_or_missing_blob_is_compiled_from_the_graph_with_one_warning(
    verified_dir, tmp_path, caplog, damage
):
    """One byte of the blob rewritten (its record kept), or the file gone: the graph is compiled
    instead, one warning names the file, and the numbers are those of the imported blob."""
    folder = model_copy(verified_dir, tmp_path / "m")
    blob = folder / COMPILED_FILES[OV_INT8]
    blob.unlink()
    if damage == "changed":
        data = bytearray((verified_dir / blob.name).read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
    caplog.clear()
    runtime = load_runtime(resolve_runtime(folder, read_artifact(folder), OV_INT8))
    assert runtime.opened == "compiled"  # type: ignore[attr-defined]
    (warning,) = warnings_of(caplog)
    assert str(blob) in warning and "compiling the graph instead" in warning
    assert ("sha256 differs" if damage == "changed" else "is missing") in warning
    imported = load_runtime(resolve_runtime(verified_dir, read_artifact(verified_dir), OV_INT8))
    assert imported.opened == "imported"  # type: ignore[attr-defined]
    assert_same_outputs(runtime, imported, folder, OV_INT8)


def test_a_blob_compiled_from_another_graph_is_not_imported(verified_dir, tmp_path, caplog):
    """The int8 graph changed and its record follows it, the blob stayed: it computes the old
    graph, so it is not imported (one warning); the new graph is compiled and fails its check."""
    folder = model_copy(verified_dir, tmp_path / "m")
    damage_int8_graph(folder, keep_blob=True)
    caplog.clear()
    runtime = load_runtime(resolve_runtime(folder, read_artifact(folder), OV_INT8))
    assert runtime.opened == "compiled"  # type: ignore[attr-defined]
    blob_warning, check_warning = warnings_of(caplog)
    assert str(folder / COMPILED_FILES[OV_INT8]) in blob_warning
    assert "compiled from another graph" in blob_warning
    assert "differ from those measured" in check_warning


@pytest.mark.parametrize("other", ["OpenVINO version", "CPU", "thread count"])
def test_a_blob_compiled_elsewhere_is_compiled_from_the_graph_with_an_info_line(
    verified_dir, tmp_path, caplog, other
):
    """A record saying another OpenVINO, CPU model or thread count: the blob does not apply
    here (not an error: the folder was copied); the graph is compiled, one info line says why."""
    folder = model_copy(verified_dir, tmp_path / "m")
    artifact = read_artifact(folder)
    compiled = artifact.graphs[OV_INT8]["compiled"]
    if other == "OpenVINO version":
        compiled["openvino"] = "2025.0.0-17942-1f68be9f594-releases/2025/0"
    elif other == "CPU":
        compiled["cpu"] = {**compiled["cpu"], "model": "AMD EPYC 9B14 96-Core Processor"}
    else:
        compiled["threads"] += 1
        compiled["config"]["INFERENCE_NUM_THREADS"] += 1
    write_metadata(artifact, folder)
    caplog.set_level(logging.INFO, logger="ctcovid.model.runtimes")
    caplog.clear()
    runtime = load_runtime(resolve_runtime(folder, read_artifact(folder), OV_INT8))
    assert runtime.opened == "compiled"  # type: ignore[attr-defined]
    assert warnings_of(caplog) == []
    (line,) = [m for m in infos_of(caplog) if COMPILED_FILES[OV_INT8] in m]
    assert f"compiled for another {other}" in line and "compiling the graph instead" in line


def test_export_names_the_blob_and_a_re_export_drops_a_stale_one(
    gate_data, verified_dir, tmp_path, monkeypatch
):
    """``export --json`` lists the blob it wrote and its record; a plain export prints it as
    kept; a re-export whose new model.int8.onnx is not gated on OpenVINO (not installed there)
    drops the openvino-int8 record and removes its blob."""
    import ctcovid.training.export as training_export

    folder = tmp_path / "model"
    shutil.copytree(verified_dir, folder)
    blob = folder / COMPILED_FILES[OV_INT8]
    args = ["--calibration", gate_data["calibration"], "--validation", gate_data["validation"]]
    args += ["--min-scans", 12, "--min-per-class", 3, "--min-near-threshold", 3]
    result = invoke("export", folder, "--int8", *args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert blob.name in data["written"]
    record = data["graphs"][OV_INT8]["compiled"]
    assert record["file"] == blob.name and record["sha256"] == sha256_file(blob)
    result = invoke("export", folder)
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith(f"{OV_INT8}: compiled")]
    assert f"{blob} (kept, " in line and record["sha256"][:12] in line
    monkeypatch.setattr(training_export, "openvino_available", lambda: False)
    result = invoke("export", folder, "--int8", *args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert OV_INT8 not in data["graphs"] and "not installed" in data["not_recorded"][OV_INT8]
    assert not blob.exists() and OV_INT8 not in read_artifact(folder).graphs
    assert "int8" in data["graphs"] and (folder / GRAPH_FILES["int8"]).is_file()


# -- a cheap start: a graph's runtime imports neither TensorFlow nor Keras ------------------------

FRESH_CLASSIFY = """
import json, sys
from ctcovid.cli.main import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx"))
    print(json.dumps(heavy))
"""


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_classify_on_a_graph_imports_neither_tensorflow_nor_keras(
    gate_data, studies_root, study_infos, tmp_path, runtime
):
    """A fresh process, as a user starts it: classify with heatmaps on a graph whose export
    added the class-activation output; its modules are read from inside when it ends."""
    import subprocess
    import sys

    folder = gate_copy_with_cam(gate_data, tmp_path)
    ct = studies_root / study_infos[0]["study_dir"] / "ct"
    args = ["classify", ct, "--model", folder, "--runtime", runtime, "--json"]
    args += ["--heatmaps", tmp_path / "heatmaps"]
    done = subprocess.run(
        [sys.executable, "-c", FRESH_CLASSIFY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *result, modules = done.stdout.strip().splitlines()
    assert json.loads(modules) == []
    data = json.loads("\n".join(result))
    assert data["runtime"] == runtime and len(data["slice_probabilities"]) == 12
    assert data["heatmaps"] and all(Path(p).is_file() for p in data["heatmaps"])


def test_overlapped_classify_gives_the_bytes_of_the_sequential_one(
    gate_data, studies_root, study_infos
):
    """Decoding ahead of the model (a bounded look-ahead, fixed-size batches) against decoding
    the whole series first and scoring it after: the same probability bytes, on a graph."""
    from ctcovid.dicom import load_series
    from ctcovid.inference import Classifier
    from ctcovid.scans import prepare_scan

    folder = gate_data["folder"]
    ct = studies_root / study_infos[2]["study_dir"] / "ct"
    for runtime in ("onnx", "openvino"):
        overlapped = Classifier.from_file(folder, runtime=runtime, batch_size=3)
        series = load_series(ct, overlapped.ingest_config)
        _, streamed = overlapped.run(series)
        prepared = prepare_scan(series, overlapped.ingest_config)
        sequential = overlapped.predict_slices(prepared.used.slices)
        assert len(streamed.slice_probabilities) == len(sequential) == series.n_slices
        assert np.asarray(streamed.slice_probabilities, np.float32).tobytes() == (
            sequential.astype(np.float32).tobytes()
        )


def test_model_loaded_in_the_background_gives_the_same_result(
    gate_data, studies_root, study_infos, tmp_path
):
    """``classify`` loads the model while the series is read and decoded: the same runtime,
    device UID and probability bytes as a load in the foreground; a graph that fails its
    verification is refused when the model is first used, naming the file."""
    from ctcovid.dicom import load_series
    from ctcovid.errors import ModelError
    from ctcovid.inference import Classifier
    from ctcovid.model.artifact import read_artifact

    folder = gate_data["folder"]
    ct = studies_root / study_infos[2]["study_dir"] / "ct"
    results = {}
    for background in (False, True):
        classifier = Classifier.from_file(folder, runtime="onnx", background=background)
        series = load_series(ct, classifier.ingest_config)
        _, results[background] = classifier.run(series)
    assert results[True].model == results[False].model
    assert results[True].model.runtime == "onnx"
    assert np.asarray(results[True].slice_probabilities, np.float32).tobytes() == (
        np.asarray(results[False].slice_probabilities, np.float32).tobytes()
    )
    broken = gate_copy(gate_data, tmp_path / "broken")
    graph = broken / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"tampered")
    classifier = Classifier.from_file(broken, runtime="onnx", background=True)
    assert classifier.ingest_config == read_artifact(folder).ingest_config  # before the load
    with pytest.raises(ModelError, match=r"model\.onnx: graph does not match"):
        classifier.run(load_series(ct, classifier.ingest_config))


def test_heatmaps_come_from_the_scoring_run(gate_data, studies_root, study_infos, tmp_path):
    """A graph computes the class-activation map in the run that scores a slice: the scoring
    run keeps it, and the key slices' heatmaps equal those of a second run on them alone."""
    from ctcovid.dicom import load_series
    from ctcovid.inference import Classifier

    folder = gate_copy_with_cam(gate_data, tmp_path)
    ct = studies_root / study_infos[2]["study_dir"] / "ct"
    classifier = Classifier.from_file(folder, runtime="onnx")
    prepared, result = classifier.run(load_series(ct, classifier.ingest_config))
    assert prepared.cams is not None and len(prepared.cams) == len(prepared.used)
    keys = list(result.key_slice_indices)
    kept = classifier.key_slice_maps(prepared, keys)
    again = classifier.class_activation_maps(prepared.used.slices[keys])
    assert kept.shape == again.shape and kept.max() == pytest.approx(1.0)
    np.testing.assert_allclose(kept, again, atol=1e-4)
    probabilities, cams = classifier.score(prepared.used.slices)
    assert probabilities.tobytes() == np.asarray(result.slice_probabilities, np.float32).tobytes()
    assert cams is not None and cams.tobytes() == prepared.cams.tobytes()


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
    """The tiny model with model.onnx and an int8 graph selected on the calibration scans, exported
    once. No validation scans: the int8 graph is recorded unverified (the tiny untrained model's
    int8 numbers depend on the CPU too much to confirm it on any set of scans)."""
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
    check = artifact.graphs["onnx"]["check"]
    assert check["max_slice_difference_vs_keras"] <= 1e-4
    assert check["max_slice_logit_difference_vs_keras"] <= 1e-3
    assert check["source"] == str(calibration_dir)  # real scans, not noise
    assert artifact.graphs["onnx"]["outputs"]["logit"]
    int8 = artifact.graphs["int8"]
    assert int8["verification"]["status"] == "unverified"
    assert int8["calibration"]["source"] == str(calibration_dir)
    assert int8["calibration"]["n_scans"] == 4
    selection = int8["selection"]
    assert selection["label_flips"] == []
    assert selection["max_probability_difference"] <= INT8_TOLERANCE
    assert selection["max_slice_probability_difference"] <= INT8_SLICE_TOLERANCE
    assert selection["max_slice_logit_difference"] <= INT8_LOGIT_TOLERANCE
    assert len(selection["scans"]) == 4
    for scan in selection["scans"]:
        assert abs(scan["int8"] - scan["fp32"]) <= INT8_TOLERANCE
    assert int8["load_check"]["sha256"] == sha256_file(exported_dir / CHECK_FILE)


@pytest.mark.slow
def test_a_new_model_onnx_drops_the_openvino_int8_record(exported_dir, tmp_path):
    """openvino-int8 was gated against the previous model.onnx: a re-export that converts it
    again (and gates no int8) drops that record and its compiled model; ONNX Runtime's int8
    record stays."""
    folder = model_copy(exported_dir, tmp_path / "m")
    artifact = read_artifact(folder)
    if OV_INT8 not in artifact.graphs:  # OpenVINO's gate refused the untrained model's graph
        record = {**artifact.graphs["int8"], "verification": {"status": "unverified"}}
        graphs = {**artifact.graphs, OV_INT8: record}
        write_metadata(dataclasses.replace(artifact, graphs=graphs), folder)
    result = invoke("export", folder, "--force", "--json")
    assert result.exit_code == 0, result.output
    graphs = read_artifact(folder).graphs
    assert OV_INT8 not in graphs and "int8" in graphs
    assert "model.onnx" in json.loads(result.stdout)["written"]
    assert not (folder / COMPILED_FILES[OV_INT8]).exists()


@pytest.mark.slow
def test_onnx_matches_keras_per_slice(exported_dir):
    from ctcovid.inference import Classifier

    slices = np.random.default_rng(1).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    keras_probs = Classifier.from_file(exported_dir, runtime="keras").predict_slices(slices)
    onnx = Classifier.from_file(exported_dir, runtime="onnx")
    assert onnx.runtime is not None and onnx.runtime.name == "onnx"
    np.testing.assert_allclose(onnx.predict_slices(slices), keras_probs, atol=1e-4, rtol=0)
    # The int8 graph is unverified: auto takes fp32; asked for, int8 runs.
    assert Classifier.from_file(exported_dir, runtime="auto").artifact.runtime == "onnx"
    int8 = Classifier.from_file(exported_dir, runtime="int8")
    assert int8.artifact.runtime == "int8"
    assert np.abs(int8.predict_slices(slices) - keras_probs).max() < 0.1


def canonical_graph(path: Path) -> tuple[list[bytes], list[tuple[str, bytes, tuple, int]]]:
    """The graph in ``path`` with its tensors renamed in order of first use and its node names
    dropped: tf2onnx names the constants it merges differently from one conversion to the next
    (which of two equal constants survives), so two conversions of one model differ in names.
    Returns each node's bytes in order, and each initializer's new name, values and type."""
    import onnx

    graph = onnx.load(str(path)).graph
    names: dict[str, str] = {}

    def rename(tensor: str) -> str:
        return names.setdefault(tensor, f"t{len(names)}") if tensor else tensor

    for value in graph.input:
        rename(value.name)
    nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = ""
        del copy.input[:], copy.output[:]
        copy.input.extend(rename(t) for t in node.input)
        copy.output.extend(rename(t) for t in node.output)
        nodes.append(copy.SerializeToString(deterministic=True))
    initializers = sorted(
        (
            names.get(i.name, f"unused {i.name}"),
            onnx.numpy_helper.to_array(i).tobytes(),
            tuple(i.dims),
            i.data_type,
        )
        for i in graph.initializer
    )
    return nodes, initializers


def test_bounded_conversion_writes_tf2onnxs_own_graph(tmp_path):
    """convert_to_onnx rebuilds tf2onnx's node protobufs so that its optimisers do not pile up
    copies of the weights, and lets the frozen function go before grappler (memory only): the
    graph, and its outputs to the bit, are those of tf2onnx converting alone. A small network
    stands in for the Res-Dense Net: convolutions, BatchNormalization (folded into constants),
    pooling and the sigmoid head."""
    import keras
    from tf2onnx.graph import Node

    from ctcovid.model.export import FP32_TOLERANCE, add_logit_output, convert_to_onnx
    from ctcovid.model.runtimes import OnnxRuntime

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 1), name="slice")
    x = keras.layers.Rescaling(1 / 255, name="scale")(inputs)  # probabilities off 0 and 1
    x = keras.layers.Conv2D(8, 3, name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="p_covid")(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn1")  # statistics that are not the identity, as after training
    rng = np.random.default_rng(2)
    bn.moving_mean.assign(rng.normal(size=8).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=8).astype(np.float32))
    update_proto = Node.update_proto
    bounded, alone = tmp_path / "bounded.onnx", tmp_path / "tf2onnx.onnx"
    convert_to_onnx(model, bounded, 32)
    assert Node.update_proto is update_proto  # tf2onnx is left as it was
    convert_to_onnx(model, alone, 32, bounded=False)
    assert canonical_graph(bounded) == canonical_graph(alone)
    for path in (bounded, alone):
        add_logit_output(path)  # the logit: a saturated sigmoid would hide a difference
    slices = rng.integers(0, 256, (6, 32, 32, 1)).astype(np.float32)
    ours = OnnxRuntime(bounded, "onnx", sha256_file(bounded)).predict_with_logits(slices)
    theirs = OnnxRuntime(alone, "onnx", sha256_file(alone)).predict_with_logits(slices)
    assert ours[1].tobytes() == theirs[1].tobytes() and ours[0].tobytes() == theirs[0].tobytes()
    np.testing.assert_allclose(
        ours[0], np.asarray(model.predict_on_batch(slices)).reshape(-1), atol=FP32_TOLERANCE, rtol=0
    )


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
    # One SR series per study, series and model, whatever runtime computed the result: a
    # revision after an auto -> int8 switch lands beside its predecessor.
    assert keras_sr.SeriesInstanceUID == int8_sr.SeriesInstanceUID
    equipment = int8_sr.ContributingEquipmentSequence[-1]
    assert equipment.DeviceUID == int8_json["model"]["device_uid"]
    assert abs(keras_json["probability_covid"] - int8_json["probability_covid"]) <= INT8_TOLERANCE


@pytest.mark.slow
def test_int8_refused_when_a_scan_sits_on_the_threshold(exported_dir, calibration_dir, tmp_path):
    """Move the model's threshold between a calibration scan's fp32 and int8 probabilities (the
    recipe that was selected, which quantises deterministically): the label flips, so selection
    refuses with the measured numbers and leaves the folder as it was."""
    from ctcovid.training.export import export_model

    artifact = read_artifact(exported_dir)
    int8 = artifact.graphs["int8"]
    recipe = next(r for r in RECIPES if r.name == int8["recipe"]["name"])
    scan = max(int8["selection"]["scans"], key=lambda s: abs(s["int8"] - s["fp32"]))
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
