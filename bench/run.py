"""Benchmark harness: every figure side by side with its plain baseline, in the same run.

``make bench`` runs it; it writes ``bench/results/<machine>.json`` and prints a table. These
machines are shared and noisy, so each optimised path is timed alternately with its baseline over
several repeats and reported as a ratio of medians.

Sections (``--sections``, default all but ``gpu``):

- ``ingest``: decode + window a 300-slice 512x512 series, ``preprocess_series`` (the code behind
  ``ctcovid preprocess``) vs a plain per-file loop (pydicom read, modality LUT, window, PIL
  resize), for an uncompressed and for compressed series; and as whole processes, start-up
  included: ``ctcovid preprocess`` vs the plain loop as a script (``PLAIN_INGEST_SCRIPT``), each
  in a fresh interpreter, on the uncompressed series (wall and CPU seconds, load average);
- ``inference``: ``Classifier.predict_slices`` vs plain ``model.predict`` (batch 32), same model,
  same slices, per Keras backend (each in its own process: the backend is fixed at import);
- ``e2e``: ``ctcovid classify`` of a 300-slice series, slice policy ``all`` (default) and
  ``lung``, wall seconds of the command;
- ``runtimes``: ``ctcovid export`` (fp32 ONNX, gated int8 on ONNX Runtime and on OpenVINO, and
  gated bf16 where the CPU has BF16) of an untrained model, then plain Keras ``model.predict`` vs
  ``predict_slices`` on each runtime (keras, onnx, int8, openvino, openvino-int8, bf16) on the same
  phantom slices, with OpenVINO's compile seconds; and ``ctcovid classify`` of the 300-slice
  512x512 series per runtime (``BENCH_RUNTIME_E2E``, keras first: the baseline in the same run;
  whole process, model load included, peak RSS of the command itself), with the runtime ``auto``
  chose and the log line that says why; start-up (``classify --help``) and model load per
  runtime, each in fresh interpreters; the CPU's VNNI/AMX/BF16 flags are recorded with the
  rows;
- ``export``: peak RSS of ``ctcovid export`` of the untrained ``BENCH_INPUT_SIZE`` model, each in
  a fresh interpreter (its own VmHWM): the fp32 graph alone, beside tf2onnx converting alone
  (without the export's fresh node protobufs); ``--int8`` with the fp32 graph
  already exported and from the Keras model, each beside the baseline of ONNX Runtime's
  ``quantize_static`` calibrating on its own session (and whether both wrote the same int8
  bytes), and ``--bf16``; the CPU is recorded with the rows;
- ``memory``: peak RSS of ``ctcovid classify`` on a 700-slice series (small model input);
- ``hooks``: ``bench/node_bench.py``, ``bench/batch_bench.py`` and ``bench/pacs_bench.py`` when
  present (JSON on stdout); the node's receive rate and latency, then, on its own and under its
  own limit, its stream: ``BENCH_NODE_STREAM_SERIES`` series of ``BENCH_NODE_STREAM_SLICES``
  slices through ``storescu`` to ``ctcovid listen`` with the exported model loaded (series per
  hour, peak RSS, where a series' time goes);
- ``gpu``: the GPU path (bf16 policy, jit, large fixed batches) vs fp32 ``model.predict``, and
  DICOM folder to result; run by ``bench/gpu.sh``.

Sizes come from environment variables (``BENCH_*``, see ``SETTINGS``) so that a slow machine can
measure fewer slices; the results file records the settings used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

SETTINGS: dict[str, tuple[str, str]] = {
    # name: (default, meaning)
    "BENCH_REPEATS": ("3", "repeats per figure (median)"),
    "BENCH_INGEST_SLICES": ("300", "slices of the ingest series"),
    "BENCH_PIXELS": ("512", "rows and columns of the fixture series"),
    "BENCH_SYNTAXES": ("explicit,rle,jpegls", "transfer syntaxes of the ingest series"),
    "BENCH_INFER_SLICES": ("32", "slices per inference measurement"),
    "BENCH_INPUT_SIZE": ("256", "model input size for inference and end to end"),
    "BENCH_BACKENDS": ("tensorflow,jax", "Keras backends for inference (skipped if absent)"),
    "BENCH_E2E_SLICES": ("300", "slices of the end-to-end series (30% without lung)"),
    "BENCH_E2E_POLICIES": ("all,lung", "slice policies timed end to end"),
    "BENCH_MEMORY_SLICES": ("700", "slices of the memory series"),
    "BENCH_MEMORY_INPUT_SIZE": ("64", "model input size for the memory measurement"),
    "BENCH_RUNTIME_SLICES": ("32", "slices per runtime measurement (phantom slices)"),
    "BENCH_RUNTIME_E2E": ("keras,onnx,int8,openvino,openvino-int8,bf16,auto",
                          "--runtime values timed end to end by the runtimes section"),
    "BENCH_GPU_BATCH": ("256", "GPU batch size"),
    "BENCH_GPU_SLICES": ("4096", "slices per GPU throughput measurement"),
    "BENCH_HOOK_TIMEOUT_S": ("600", "limit for each of node_bench.py and batch_bench.py"),
    "BENCH_NODE_STREAM_SERIES": ("20", "series sent back to back by node_bench.py's stream"),
    "BENCH_NODE_STREAM_SLICES": ("300", "slices per series of the stream (BENCH_PIXELS square)"),
    "BENCH_NODE_STREAM_RUNTIME": ("auto", "--runtime of the node in the stream"),
    "BENCH_NODE_STREAM_TIMEOUT_S": ("3600", "limit for node_bench.py's stream"),
    "BENCH_DATA": ("", "where fixture series and models are cached (default bench/.data)"),
}


def setting(name: str) -> str:
    return os.environ.get(name, SETTINGS[name][0])


def int_setting(name: str) -> int:
    return int(setting(name))


def data_dir() -> Path:
    path = Path(setting("BENCH_DATA") or BENCH_DIR / ".data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine_name() -> str:
    return os.environ.get("BENCH_MACHINE") or f"cpu{os.cpu_count()}-{platform.machine()}"


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {}
    for pkg in ("numpy", "pydicom", "keras", "tensorflow-cpu", "tensorflow", "jax", "jaxlib",
                "torch", "openvino", "onnx", "onnxruntime", "tf2onnx"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return {
        "name": machine_name(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


# -- timing -------------------------------------------------------------------------------------


def side_by_side(
    baseline: Callable[[], Any], candidate: Callable[[], Any], repeats: int
) -> dict[str, float]:
    """Median seconds of both, alternating which runs first so drift hits both equally."""
    base_s: list[float] = []
    cand_s: list[float] = []
    for i in range(repeats):
        order = [(baseline, base_s), (candidate, cand_s)]
        for fn, sink in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    base, cand = statistics.median(base_s), statistics.median(cand_s)
    return {
        "baseline_s": round(base, 4),
        "candidate_s": round(cand, 4),
        "ratio": round(base / cand, 2),
        "baseline_runs_s": [round(t, 4) for t in base_s],
        "candidate_runs_s": [round(t, 4) for t in cand_s],
    }


# -- fixtures -----------------------------------------------------------------------------------


def fixture_series(
    name: str, n_slices: int, *, pixels: int, syntax: str = "explicit", margin: int = 0
) -> Path:
    """A cached synthetic CT series folder (``n_slices`` in all, ``margin`` lung-free each end)."""
    from dicom_fixtures import StudySpec, write_study

    out = data_dir() / f"{name}-{syntax}-{n_slices}x{pixels}"
    ct = out / "ct"
    if (out / ".done").exists():
        return ct
    logger.info("writing fixture series %s", out)
    spec = StudySpec(
        positive=True,
        n_slices=n_slices - 2 * margin,
        size=pixels,
        transfer_syntax=syntax,
        lung_margin_slices=margin,
    )
    write_study(out, spec, seed=11)
    (out / ".done").write_text("")
    return ct


def fixture_model(input_size: int, slice_policy: str = "all") -> Path:
    """A cached untrained Res-Dense Net artifact: speed does not depend on the weights."""
    out = data_dir() / f"model-{input_size}-{slice_policy}"
    if (out / "ctcovid.json").exists():
        return out
    code = (
        "import sys, keras\n"
        "from ctcovid.config import IngestConfig, ModelConfig\n"
        "from ctcovid.model.artifact import ModelArtifact, save_model\n"
        "from ctcovid.model.build import build_res_dense\n"
        "keras.utils.set_random_seed(0)\n"
        "size, policy, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
        "config = ModelConfig(input_size=size)\n"
        "ingest = IngestConfig(image_size=size, slice_policy=policy)\n"
        "save_model(build_res_dense(config), ModelArtifact(config, ingest), __import__('pathlib')"
        ".Path(out))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(input_size), slice_policy, str(out)],
        check=True,
        env=quiet_env(),
    )
    return out


def quiet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


# -- ingest -------------------------------------------------------------------------------------


def plain_ingest(files: list[Path], size: int, center_hu: float, width_hu: float) -> np.ndarray:
    """The baseline: one file after another, as a straightforward script would do it."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut

    out = []
    low = center_hu - width_hu / 2
    for f in files:
        ds = pydicom.dcmread(f)
        hu = apply_modality_lut(ds.pixel_array, ds)
        windowed = np.clip((hu - low) / width_hu * 255.0, 0, 255).astype(np.float32)
        img = Image.fromarray(windowed, mode="F").resize((size, size), Image.Resampling.BOX)
        out.append(np.rint(np.asarray(img)).astype(np.uint8))
    return np.stack(out)


def bench_ingest(repeats: int) -> list[dict[str, Any]]:
    from ctcovid.config import IngestConfig
    from ctcovid.dicom import load_series
    from ctcovid.preprocess import preprocess_series

    config = IngestConfig()
    rows = []
    n, pixels = int_setting("BENCH_INGEST_SLICES"), int_setting("BENCH_PIXELS")
    for syntax in setting("BENCH_SYNTAXES").split(","):
        try:
            ct = fixture_series("ingest", n, pixels=pixels, syntax=syntax)
        except Exception as exc:  # an encoder missing here: say so in the results
            rows.append({"figure": f"ingest {syntax}", "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        series = load_series(ct, config, for_classification=False)
        files = [ref.instance.path for ref in series.slices]
        fast = preprocess_series(series, config)
        plain = plain_ingest(files, config.image_size, config.window_center_hu,
                             config.window_width_hu)
        timing = side_by_side(
            lambda files=files: plain_ingest(
                files, config.image_size, config.window_center_hu, config.window_width_hu
            ),
            lambda series=series: preprocess_series(series, config),
            repeats,
        )
        rows.append({
            "figure": f"ingest {syntax} {n}x{pixels}",
            "baseline": "per-file loop",
            "candidate": "preprocess_series",
            "unit": "slices/s",
            "baseline_rate": round(n / timing["baseline_s"], 1),
            "candidate_rate": round(n / timing["candidate_s"], 1),
            "max_level_difference": int(np.abs(fast.slices.astype(int) - plain).max()),
            **timing,
        })
    rows.append(bench_ingest_process(repeats))
    return rows


# The baseline of the whole-process figure, run as ``python -c PLAIN_INGEST_SCRIPT SERIES OUT``:
# what a straightforward script does (one file after another, pydicom's modality LUT, the lung
# window, PIL's box resize), writing the same .npz as ``ctcovid preprocess``.
PLAIN_INGEST_SCRIPT = """\
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

series, out = Path(sys.argv[1]), sys.argv[2]
size, center, width = 256, -600.0, 1500.0
low = center - width / 2
rows = []
for path in sorted(series.iterdir()):
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    windowed = np.clip((hu - low) / width * 255.0, 0, 255).astype(np.float32)
    img = Image.fromarray(windowed, mode="F").resize((size, size), Image.Resampling.BOX)
    z = float(ds.ImagePositionPatient[2])
    rows.append((z, np.rint(np.asarray(img)).astype(np.uint8), str(ds.SOPInstanceUID)))
rows.sort(key=lambda row: row[0])
np.savez(
    out,
    slices=np.stack([row[1] for row in rows]),
    z_mm=np.array([row[0] for row in rows]),
    sop_instance_uids=np.array([row[2] for row in rows]),
    frame_numbers=np.ones(len(rows), np.int32),
)
"""


def bench_ingest_process(repeats: int) -> dict[str, Any]:
    """``ctcovid preprocess`` as a whole process (start-up included) vs the plain loop, also a
    fresh process, on the same uncompressed series; wall seconds, median of ``repeats``."""
    import tempfile

    from ctcovid.model.export import cpu_description

    n, pixels = int_setting("BENCH_INGEST_SLICES"), int_setting("BENCH_PIXELS")
    ct = fixture_series("ingest", n, pixels=pixels, syntax="explicit")
    env = quiet_env(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        plain_out, ours_out = Path(tmp) / "plain.npz", Path(tmp) / "ctcovid.npz"
        plain_cmd = [sys.executable, "-c", PLAIN_INGEST_SCRIPT, str(ct), str(plain_out)]
        ours_cmd = [sys.executable, "-m", "ctcovid.cli.main", "preprocess", str(ct),
                    "--out", str(ours_out), "--json"]

        cpu_s: dict[str, list[float]] = {"plain": [], "ours": []}

        def run(cmd: list[str], name: str) -> None:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"{' '.join(cmd[:4])} failed ({status})")
            cpu_s[name].append(usage.ru_utime + usage.ru_stime)

        load_before = os.getloadavg()
        timing = side_by_side(lambda: run(plain_cmd, "plain"), lambda: run(ours_cmd, "ours"),
                              repeats)
        with np.load(plain_out) as plain, np.load(ours_out) as ours:
            difference = int(np.abs(ours["slices"].astype(int) - plain["slices"]).max())
            same_order = bool((ours["sop_instance_uids"] == plain["sop_instance_uids"]).all())
    return {
        "figure": f"ingest whole process explicit {n}x{pixels}",
        "baseline": "plain per-file loop, fresh python process",
        "candidate": "ctcovid preprocess, fresh process",
        "unit": "slices/s",
        "baseline_rate": round(n / timing["baseline_s"], 1),
        "candidate_rate": round(n / timing["candidate_s"], 1),
        "max_level_difference": difference,
        "same_slice_order": same_order,
        "goal_ratio": 2.0,
        # CPU seconds (user + system) of each process: less sensitive to other jobs than wall.
        "baseline_cpu_s": round(statistics.median(cpu_s["plain"]), 3),
        "candidate_cpu_s": round(statistics.median(cpu_s["ours"]), 3),
        # 1, 5 and 15 minute load averages before and after: the machine may be shared.
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpu": cpu_description(),
        **timing,
    }


# -- inference ----------------------------------------------------------------------------------


def inference_worker(input_size: int, n_slices: int, repeats: int) -> dict[str, Any]:
    """Runs in a child process whose KERAS_BACKEND is already set; prints one JSON row."""
    import keras

    from ctcovid.config import IngestConfig, ModelConfig
    from ctcovid.inference import Classifier
    from ctcovid.model.artifact import ModelArtifact
    from ctcovid.model.build import build_res_dense

    keras.utils.set_random_seed(0)
    config = ModelConfig(input_size=input_size)
    model = build_res_dense(config)
    classifier = Classifier(model, ModelArtifact(config, IngestConfig(image_size=input_size)))
    slices = np.random.default_rng(0).integers(0, 256, (n_slices, input_size, input_size),
                                               dtype=np.uint8)

    def plain() -> np.ndarray:
        return model.predict(slices[..., None].astype(np.float32), batch_size=32, verbose=0)

    def fast() -> np.ndarray:
        return classifier.predict_slices(slices)

    start = time.perf_counter()
    reference, candidate = plain().reshape(-1), fast()  # warm-up: tracing and compilation
    warmup = time.perf_counter() - start
    timing = side_by_side(plain, fast, repeats)
    return {
        "figure": f"inference {keras.backend.backend()} {n_slices}x{input_size}px",
        "baseline": "model.predict batch 32",
        "candidate": "Classifier.predict_slices",
        "unit": "slices/s",
        "baseline_rate": round(n_slices / timing["baseline_s"], 2),
        "candidate_rate": round(n_slices / timing["candidate_s"], 2),
        "max_probability_difference": float(np.abs(reference - candidate).max()),
        "warmup_s": round(warmup, 1),
        **timing,
    }


def bench_inference(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for backend in setting("BENCH_BACKENDS").split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--inference-worker"],
            capture_output=True,
            text=True,
            env=quiet_env(KERAS_BACKEND=backend, BENCH_REPEATS=str(repeats)),
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"figure": f"inference {backend}", "skipped": last})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


# -- runtimes: Keras vs ONNX Runtime fp32 and int8 -----------------------------------------------


def round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per repeat, the order rotated each repeat so drift hits all."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def calibration_data(size: int) -> Path:
    """Cached calibration scans: 4 phantom scans of 8 slices, COV19-CT-DB layout."""
    calib = data_dir() / f"calibration-{size}"
    if not (calib / ".done").exists():
        from dicom_fixtures import write_cov19_layout

        write_cov19_layout(calib, n_per_class=2, n_slices=8, size=size, seed=5)
        (calib / ".done").write_text("")
    return calib


def exported_model(size: int) -> tuple[Path, Path, dict[str, Any]]:
    """The untrained fixture model with ONNX graphs, its calibration data, and the export report.

    The int8 gate runs as in ``ctcovid export``. An untrained network may fail it (its outputs
    mean nothing); then the int8 graph of the last recipe is written anyway, for timing only,
    and the row says so.
    """
    import shutil

    from ctcovid.errors import ModelError
    from ctcovid.model.artifact import read_artifact, write_metadata
    from ctcovid.training import export as ex

    calib = calibration_data(size)
    folder = data_dir() / f"model-{size}-runtimes"
    report_file = folder / "export-report.json"
    if report_file.exists():
        return folder, calib, json.loads(report_file.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(fixture_model(size), folder)
    start = time.perf_counter()
    bf16 = not ex.bf16_missing(ex.cpu_description())
    try:
        report = ex.export_model(folder, int8=True, calibration=calib).to_json()
    except ModelError as exc:
        logger.warning("int8 gate refused the untrained model: %s", exc)
        ex.export_model(folder)  # fp32 only
        artifact = read_artifact(folder)
        scans, _ = ex.read_scans(calib, artifact.ingest_config)
        int8_path = folder / ex.GRAPH_FILES["int8"]
        ex.quantize(folder / ex.GRAPH_FILES["onnx"], int8_path,
                    ex.sample_slices(scans, ex.DEFAULT_CALIBRATION_SLICES), ex.RECIPES[-1])
        graphs = {**artifact.graphs, "int8": {
            "file": ex.GRAPH_FILES["int8"], "sha256": ex.sha256_file(int8_path),
            "weights_sha256": artifact.weights_sha256, "gate": f"refused (timing only): {exc}"}}
        from dataclasses import replace

        write_metadata(replace(artifact, graphs=graphs), folder)
        report = {"graphs": graphs, "refused": str(exc)}
    report["export_seconds"] = round(time.perf_counter() - start, 1)
    if bf16:  # gated on the calibration scans (no validation scans here): unverified
        start = time.perf_counter()
        try:
            bf16_report = ex.export_model(folder, bf16=True, calibration=calib).to_json()
            report["graphs"]["bf16"] = bf16_report["graphs"]["bf16"]
        except ModelError as exc:
            logger.warning("bf16 gate refused the untrained model: %s", exc)
            report["bf16_refused"] = str(exc)
        report["bf16_export_seconds"] = round(time.perf_counter() - start, 1)
    report_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return folder, calib, report


CONVS_ONLY = "int8 convolutions only"


def convolutions_only_graph(folder: Path, calib: Path, artifact: Any) -> Any:
    """An ONNX Runtime session of the model quantised by the convolutions-only recipe."""
    from ctcovid.model.runtimes import OnnxRuntime
    from ctcovid.training import export as ex

    recipe = next(r for r in ex.RECIPES if r.op_types)
    path = folder / "convolutions-only.int8.onnx"
    if not path.exists():
        scans, _ = ex.read_scans(calib, artifact.ingest_config)
        ex.quantize(folder / ex.GRAPH_FILES["onnx"], path,
                    ex.sample_slices(scans, ex.DEFAULT_CALIBRATION_SLICES), recipe)
    return OnnxRuntime(path, "int8", "")


def openvino_classifiers(folder: Path, artifact: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """The OpenVINO runtimes by name (openvino and bf16 on model.onnx, openvino-int8 on the int8
    QDQ graph), each opened as the runtime opens it, behind the same Classifier (whatever their
    gates said: timing only), and each one's compile seconds."""
    from ctcovid.inference import Classifier
    from ctcovid.model.runtimes import GRAPH_FILES, bf16_missing, current_cpu, open_graph

    names = ["openvino", "openvino-int8"]
    if not bf16_missing(current_cpu()):
        names.append("bf16")
    classifiers, compile_s = {}, {}
    for name in names:
        start = time.perf_counter()
        runtime = open_graph(name, folder / GRAPH_FILES[name], "")
        compile_s[name] = round(time.perf_counter() - start, 2)
        classifiers[name] = Classifier(None, artifact, runtime=runtime)
    return classifiers, compile_s


def bench_runtimes(repeats: int) -> list[dict[str, Any]]:
    from ctcovid.inference import Classifier
    from ctcovid.model.artifact import load_model
    from ctcovid.model.export import cpu_description, runtime_probabilities
    from ctcovid.model.runtimes import openvino_available
    from ctcovid.training.export import read_scans

    size = int_setting("BENCH_INPUT_SIZE")
    folder, calib, report = exported_model(size)
    cpu = cpu_description()
    model, artifact = load_model(folder)
    scans, _ = read_scans(calib, artifact.ingest_config)
    slices = np.concatenate([s.slices for s in scans])
    n = min(int_setting("BENCH_RUNTIME_SLICES"), len(slices))
    slices = slices[:n]
    classifiers = {
        name: Classifier.from_file(folder, runtime=name) for name in ("keras", "onnx", "int8")
    }
    compile_s: dict[str, float] = {}
    if openvino_available():
        more, compile_s = openvino_classifiers(folder, artifact)
        classifiers.update(more)

    def plain() -> np.ndarray:
        return model.predict(slices[..., None].astype(np.float32), batch_size=32, verbose=0)

    fns: dict[str, Callable[[], Any]] = {"model.predict": plain}
    for name, clf in classifiers.items():
        fns[name] = lambda clf=clf: clf.predict_slices(slices)
    # The int8 recipe that quantises only the convolutions (what a trained model may need to
    # pass the gate), timed beside the graph the gate kept.
    convs = convolutions_only_graph(folder, calib, artifact)
    fns[CONVS_ONLY] = lambda: runtime_probabilities(convs, slices)
    reference = plain().reshape(-1)
    outputs = {name: np.asarray(fn()).reshape(-1) for name, fn in fns.items()}  # warm-up
    times = round_robin(fns, repeats)
    base = statistics.median(times["model.predict"])
    int8_record = report.get("graphs", {}).get("int8", {})
    gate = ({**int8_record["selection"],
             "labels_agree": not int8_record["selection"]["label_flips"],
             "status": int8_record["verification"]["status"]}
            if "selection" in int8_record else {"refused": report.get("refused", "")})
    ov_int8 = report.get("graphs", {}).get("openvino-int8", {})
    ov_int8_gate = ({"status": ov_int8["verification"]["status"],
                     **{k: v for k, v in (ov_int8["verification"].get("gate") or {}).items()
                        if k.startswith("max_") or k == "label_flips"}}
                    if "verification" in ov_int8
                    else {"not_recorded": report.get("not_recorded", {}).get("openvino-int8",
                                                                               "no int8 export")})
    rows: list[dict[str, Any]] = []
    for name in [*classifiers, CONVS_ONLY]:
        med = statistics.median(times[name])
        rows.append({
            "figure": f"runtime {name} {n}x{size}px",
            "baseline": "keras model.predict batch 32",
            "candidate": f"Classifier.predict_slices, runtime {name}"
            if name != CONVS_ONLY else f"ONNX Runtime session, {name}",
            "unit": "slices/s",
            "baseline_rate": round(n / base, 2),
            "candidate_rate": round(n / med, 2),
            "ratio": round(base / med, 2),
            "baseline_runs_s": [round(t, 3) for t in times["model.predict"]],
            "candidate_runs_s": [round(t, 3) for t in times[name]],
            "max_probability_difference": float(np.abs(outputs[name] - reference).max()),
            **({"compile_seconds": compile_s[name]} if name in compile_s else {}),
            "cpu": cpu,
            **({"int8_gate": {k: gate.get(k) for k in ("max_probability_difference",
                                                      "labels_agree", "status", "refused")
                              if k in gate},
                "int8_recipe": report.get("graphs", {}).get("int8", {}).get("recipe", {})}
               if name == "int8" else {}),
            **({"openvino_int8_gate": ov_int8_gate} if name == "openvino-int8" else {}),
        })
    classifiers.clear()  # free the sessions before the end-to-end process runs
    rows += bench_start(folder, repeats)
    ct = fixture_series("e2e", int_setting("BENCH_E2E_SLICES"), pixels=int_setting("BENCH_PIXELS"),
                        margin=int(int_setting("BENCH_E2E_SLICES") * 0.15))
    keras_s = None
    for runtime in setting("BENCH_RUNTIME_E2E").split(","):
        try:
            seconds, out, peak_mib, log = run_classify_peak(ct, folder, "--runtime", runtime)
        except RuntimeError as exc:  # bf16 on a CPU without BF16, a graph the export refused
            rows.append({"figure": f"e2e classify --runtime {runtime}, {size}px",
                         "skipped": str(exc)[-300:], "cpu": cpu})
            continue
        keras_s = seconds if runtime == "keras" else keras_s
        rows.append({
            "figure": f"e2e classify --runtime {runtime} ({out.get('runtime')}), {size}px",
            "unit": "s",
            "seconds": round(seconds, 1),
            **({"vs_keras": round(keras_s / seconds, 2)} if keras_s else {}),
            "classify_seconds": out["seconds"],
            "n_slices_used": out["n_slices_used"],
            "slices_per_s": round(out["n_slices_used"] / out["seconds"], 2),
            "probability_covid": out["probability_covid"],
            "label": out["label"],
            "peak_rss_mib": peak_mib,
            "runtime": out.get("runtime"),
            **({"why": [line for line in log if "auto" in line][-3:]} if runtime == "auto" else {}),
            "export_seconds": report.get("export_seconds"),
            "cpu": cpu,
        })
    return rows


MODEL_LOAD = """
import json, sys, time
start = time.perf_counter()
from ctcovid.inference import Classifier
imported = time.perf_counter()
classifier = Classifier.from_file(sys.argv[1], runtime=sys.argv[2])
loaded = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                  "runtime": classifier.artifact.runtime,
                  "opened": getattr(classifier.runtime, "opened", None),
                  "tensorflow": "tensorflow" in sys.modules}))
"""


def bench_start(folder: Path, repeats: int) -> list[dict[str, Any]]:
    """Start-up and model load as their own rows, each in a fresh interpreter (median of
    ``repeats``): ``ctcovid classify --help`` against the bare interpreter, and per runtime the
    import of ``ctcovid.inference`` and ``Classifier.from_file`` (graph verified by sha256, read,
    compiled, and for a gated graph its load check), with Keras as the baseline. An OpenVINO
    runtime whose compiled model the export saved imports it instead of compiling: ``opened``
    says which."""
    cpu = machine_description()["cpu"]
    runs = max(3, repeats)

    def wall(cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=quiet_env())
        return time.perf_counter() - start

    bare = [wall([sys.executable, "-c", "pass"]) for _ in range(runs)]
    helps = [wall([sys.executable, "-m", "ctcovid.cli.main", "classify", "--help"])
             for _ in range(runs)]
    rows: list[dict[str, Any]] = [{
        "figure": "start-up: ctcovid classify --help",
        "baseline": "python -c pass",
        "unit": "s",
        "baseline_s": round(statistics.median(bare), 3),
        "seconds": round(statistics.median(helps), 3),
        "runs_s": [round(t, 3) for t in helps],
        "cpu": cpu,
    }]
    keras_load = None
    for runtime in ("keras", "onnx", "int8", "openvino", "openvino-int8", "bf16"):
        loads = []
        for _ in range(runs):
            done = subprocess.run([sys.executable, "-c", MODEL_LOAD, str(folder), runtime],
                                  capture_output=True, text=True, env=quiet_env())
            if done.returncode != 0:
                loads = []
                rows.append({"figure": f"model load --runtime {runtime}",
                             "skipped": done.stderr.strip()[-300:], "cpu": cpu})
                break
            loads.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if not loads:
            continue
        load_s = statistics.median(x["load_s"] for x in loads)
        keras_load = load_s if runtime == "keras" else keras_load
        rows.append({
            "figure": f"model load --runtime {runtime} ({loads[0]['runtime']})",
            "unit": "s",
            "import_s": round(statistics.median(x["import_s"] for x in loads), 3),
            "seconds": round(load_s, 3),
            **({"vs_keras": round(keras_load / load_s, 2)} if keras_load else {}),
            "tensorflow_imported": loads[0]["tensorflow"],
            **({"opened": loads[0]["opened"]} if loads[0].get("opened") else {}),
            "runs_s": [round(x["load_s"], 3) for x in loads],
            "cpu": cpu,
        })
    return rows


PEAK_CLASSIFY = """
import sys
from ctcovid.cli.main import app
try:
    app(sys.argv[1:], prog_name="ctcovid")
finally:
    # The peak resident set of this process since its exec (not the forked parent's pages).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("PEAK_KIB", line.split()[1], file=sys.stderr)
"""


def run_peak(script: str, *args: str, what: str, **env: str
             ) -> tuple[float, dict[str, Any], int | None, list[str]]:
    """Wall seconds of ``python -c script ARGS`` (a ctcovid command that prints JSON and, on
    stderr, its ``PEAK_KIB``), its JSON, its own peak RSS in MiB (VmHWM, Linux) and its log
    lines; ``what`` names it in the error."""
    import tempfile

    cmd = [sys.executable, "-c", script, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        code = subprocess.run(cmd, stdout=out, stderr=err, env=quiet_env(**env)).returncode
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        log = err.read().splitlines()
        if code != 0:
            raise RuntimeError(f"{what} failed ({code}): {log[-3:]}")
        peak = next((int(x.split()[1]) // 1024 for x in log if x.startswith("PEAK_KIB")), None)
        return seconds, json.loads(out.read()), peak, log


def run_classify_peak(
    ct: Path, model: Path, *extra: str
) -> tuple[float, dict[str, Any], int | None, list[str]]:
    """Wall seconds of ``ctcovid classify --json -v`` in a fresh interpreter, its JSON, its own
    peak RSS in MiB (VmHWM, Linux) and its log lines."""
    return run_peak(PEAK_CLASSIFY, "classify", str(ct), "--model", str(model), "--json", "-v",
                    *extra, what=f"classify {' '.join(extra)}")


# The baselines of the export rows, as before: ONNX Runtime's quantize_static calibrating on its
# own session (BENCH_BASELINE=quantize_static), tf2onnx converting alone (=tf2onnx); then the
# command, as PEAK_CLASSIFY runs it.
PEAK_EXPORT = """
import functools, os
import ctcovid.training.export as export
if os.environ.get("BENCH_BASELINE") == "quantize_static":
    export.quantize = functools.partial(export.quantize, bounded=False)
if os.environ.get("BENCH_BASELINE") == "tf2onnx":
    export.convert_to_onnx = functools.partial(export.convert_to_onnx, bounded=False)
""" + PEAK_CLASSIFY

EXPORT_BASELINES = {
    "": "",
    "quantize_static": ", baseline quantize_static calibration",
    "tf2onnx": ", baseline tf2onnx converting alone",
}


def run_export_peak(folder: Path, *args: str, baseline: str = ""
                    ) -> tuple[float, dict[str, Any], int | None]:
    """Wall seconds of ``ctcovid export FOLDER --json ARGS`` in a fresh interpreter, its JSON and
    its own peak RSS in MiB (VmHWM, Linux); ``baseline``: one of :data:`EXPORT_BASELINES`."""
    seconds, out, peak, _ = run_peak(PEAK_EXPORT, "export", str(folder), "--json", *args,
                                     what=f"export {' '.join(args)}", BENCH_BASELINE=baseline)
    return seconds, out, peak


def bench_export() -> list[dict[str, Any]]:
    """Peak RSS of ``ctcovid export`` (each in a fresh interpreter, its own VmHWM) of the untrained
    BENCH_INPUT_SIZE model: the fp32 graph alone (the tf2onnx conversion), beside tf2onnx
    converting alone; --int8 on a folder whose fp32 graph is already exported (the calibration
    and the gate alone) and from the Keras model (conversion included), each beside the baseline
    of quantize_static calibrating on its own session (the same int8 bytes: the row says whether
    they were), and --bf16."""
    import shutil

    from ctcovid.model.export import cpu_description

    size = int_setting("BENCH_INPUT_SIZE")
    calib = calibration_data(size)
    cpu = cpu_description()
    work = data_dir() / f"export-{size}"
    if work.exists():
        shutil.rmtree(work)
    fp32 = work / "fp32"
    shutil.copytree(fixture_model(size), fp32)
    int8 = ("--int8", "--calibration", str(calib))
    runs: list[tuple[str, str, str, tuple[str, ...], str]] = [
        # (figure, model folder copied from, how, arguments, baseline)
        ("fp32 (tf2onnx conversion)", "", "", (), ""),
        ("fp32 (tf2onnx conversion)", "", "fp32 baseline", (), "tf2onnx"),
        ("--int8, fp32 graph exported", "fp32", "int8", int8, ""),
        ("--int8, fp32 graph exported", "fp32", "int8 baseline", int8, "quantize_static"),
        ("--int8 from the Keras model", "", "int8 keras", int8, ""),
        ("--int8 from the Keras model", "", "int8 keras baseline", int8, "quantize_static"),
        ("--bf16, fp32 graph exported", "fp32", "bf16", ("--bf16", "--calibration", str(calib)),
         ""),
    ]
    rows: list[dict[str, Any]] = []
    graphs: dict[str, str] = {}
    for figure, source, name, args, baseline in runs:
        folder = fp32 if not name else work / name.replace(" ", "-")
        if name:
            shutil.copytree(fp32 if source else fixture_model(size), folder)
        try:
            seconds, out, peak = run_export_peak(folder, *args, baseline=baseline)
        except RuntimeError as exc:  # bf16 on a CPU without BF16; a gate that refused
            rows.append({"figure": f"export {figure}, {size}px", "skipped": str(exc)[-300:],
                         "cpu": cpu})
            continue
        sha = out["graphs"].get("int8", {}).get("sha256") if "--int8" in args else None
        if sha:
            graphs[name] = sha
        rows.append({
            "figure": f"export {figure}, {size}px" + EXPORT_BASELINES[baseline],
            "unit": "MiB",
            "peak_rss_mib": peak,
            "seconds": round(seconds, 1),
            "written": out["written"],
            # Only beside the same model.onnx: tf2onnx's conversions differ in their bytes.
            **({"int8_sha256": sha, "same_int8_graph_as_bounded":
                sha == graphs.get(name.removesuffix(" baseline"))}
               if sha and baseline and source else {}),
            "cpu": cpu,
        })
        if name:
            shutil.rmtree(folder)
    shutil.rmtree(work)
    return rows


# -- end to end and memory ----------------------------------------------------------------------


def run_classify(ct: Path, model: Path, *extra: str) -> tuple[float, dict[str, Any], int]:
    """Wall seconds of ``ctcovid classify --json``, its JSON, and its own peak RSS in MiB."""
    import tempfile

    cmd = [sys.executable, "-m", "ctcovid.cli.main", "classify", str(ct), "--model", str(model),
           "--json", *extra]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=quiet_env())
        # wait4 gives this child's own rusage (ru_maxrss in KiB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read()[-500:]}")
        return seconds, json.loads(out.read()), usage.ru_maxrss // 1024


def bench_e2e() -> list[dict[str, Any]]:
    n = int_setting("BENCH_E2E_SLICES")
    size = int_setting("BENCH_INPUT_SIZE")
    ct = fixture_series("e2e", n, pixels=int_setting("BENCH_PIXELS"), margin=int(n * 0.15))
    rows = []
    for policy in setting("BENCH_E2E_POLICIES").split(","):
        seconds, out, _ = run_classify(ct, fixture_model(size, policy))
        rows.append({
            "figure": f"e2e classify {n} slices, policy {policy}, {size}px",
            "unit": "s",
            "seconds": round(seconds, 1),
            "classify_seconds": out["seconds"],
            "n_slices_used": out["n_slices_used"],
            "slices_per_s": round(out["n_slices_used"] / out["seconds"], 2),
        })
    return rows


def bench_memory() -> list[dict[str, Any]]:
    size = int_setting("BENCH_MEMORY_INPUT_SIZE")
    n = int_setting("BENCH_MEMORY_SLICES")
    model = fixture_model(size)
    rows = []
    for count in (n // 7, n):  # how peak memory grows with the series length
        ct = fixture_series("memory", count, pixels=int_setting("BENCH_PIXELS"))
        seconds, out, peak = run_classify(ct, model)
        rows.append({
            "figure": f"memory classify {count} slices, {size}px input",
            "unit": "MiB",
            "peak_rss_mib": peak,
            "seconds": round(seconds, 1),
            "n_slices_used": out["n_slices_used"],
        })
    return rows


# -- hooks for the node and batch benchmarks ----------------------------------------------------


# (script, arguments, the setting that bounds it): the node's stream of series with the model
# loaded takes far longer than its receive rate, so it runs on its own, under its own limit.
HOOKS = (
    ("node_bench.py", ("--measure", "rate,latency"), "BENCH_HOOK_TIMEOUT_S"),
    ("node_bench.py", ("--measure", "stream"), "BENCH_NODE_STREAM_TIMEOUT_S"),
    ("batch_bench.py", (), "BENCH_HOOK_TIMEOUT_S"),
    ("pacs_bench.py", (), "BENCH_HOOK_TIMEOUT_S"),
)


def bench_hooks() -> list[dict[str, Any]]:
    rows = []
    for script, arguments, limit in HOOKS:
        path = BENCH_DIR / script
        if not path.exists():
            continue
        figure = " ".join((script, *arguments))
        try:
            # the stream's own limit bounds its wait for the SRs; this one adds room to set up
            timeout = int_setting(limit) + (600 if limit != "BENCH_HOOK_TIMEOUT_S" else 0)
            proc = subprocess.run([sys.executable, str(path), *arguments], capture_output=True,
                                  text=True, env=quiet_env(), timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"figure": figure, "skipped": f"timed out after {timeout} s"})
            continue
        if proc.returncode != 0:
            rows.append({"figure": figure, "skipped": proc.stderr.strip()[-300:]})
            continue
        try:
            rows.append({"figure": figure, "result": json.loads(proc.stdout)})
        except json.JSONDecodeError as exc:
            rows.append({"figure": figure, "skipped": f"output is not JSON: {exc}"})
    return rows


# -- GPU ----------------------------------------------------------------------------------------


def bench_gpu(repeats: int) -> list[dict[str, Any]]:
    """bf16 + jit + large fixed batches vs fp32 ``model.predict``; then DICOM folder to result.

    Meant for ``KERAS_BACKEND=jax`` on one NVIDIA GPU (bench/gpu.sh); runs on CPU too, slowly.
    """
    import keras

    from ctcovid.config import IngestConfig, ModelConfig
    from ctcovid.dicom import load_series
    from ctcovid.inference import Classifier
    from ctcovid.model.artifact import load_model

    size = int_setting("BENCH_INPUT_SIZE")
    batch = int_setting("BENCH_GPU_BATCH")
    n = int_setting("BENCH_GPU_SLICES")
    model_dir = fixture_model(size)
    slices = np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)

    fp32_model, _ = load_model(model_dir)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    bf16 = Classifier.from_file(model_dir, batch_size=batch)
    keras.mixed_precision.set_global_policy("float32")

    def plain() -> np.ndarray:
        return fp32_model.predict(slices[..., None].astype(np.float32), batch_size=32, verbose=0)

    def fast() -> np.ndarray:
        return bf16.predict_slices(slices)

    start = time.perf_counter()
    reference, candidate = plain().reshape(-1), fast()
    warmup = time.perf_counter() - start
    timing = side_by_side(plain, fast, repeats)
    rows: list[dict[str, Any]] = [{
        "figure": f"gpu inference {keras.backend.backend()} {n}x{size}px",
        "baseline": "fp32 model.predict batch 32",
        "candidate": f"bf16 Classifier.predict_slices batch {batch}",
        "unit": "slices/s",
        "baseline_rate": round(n / timing["baseline_s"], 1),
        "candidate_rate": round(n / timing["candidate_s"], 1),
        "max_probability_difference": float(np.abs(reference - candidate).max()),
        "warmup_s": round(warmup, 1),
        **timing,
    }]
    ct = fixture_series("e2e", int_setting("BENCH_E2E_SLICES"),
                        pixels=int_setting("BENCH_PIXELS"),
                        margin=int(int_setting("BENCH_E2E_SLICES") * 0.15))
    config: IngestConfig = bf16.ingest_config
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = bf16.classify(load_series(ct, config))
        times.append(time.perf_counter() - start)
    rows.append({
        "figure": f"gpu DICOM folder to result, {result.n_slices_total} slices",
        "unit": "s",
        "seconds": round(statistics.median(times), 3),
        "runs_s": [round(t, 3) for t in times],
        "model_config": ModelConfig(input_size=size).to_dict(),
    })
    return rows


# -- table and main -----------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'figure':58s} {'baseline':>10s} {'candidate':>10s} {'unit':>9s} {'ratio':>7s}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['figure']:58s} skipped: {r['skipped'][:60]}")
        elif "ratio" in r:
            lines.append(
                f"{r['figure']:58s} {r['baseline_rate']:>10} {r['candidate_rate']:>10} "
                f"{r['unit']:>9s} {r['ratio']:>6}x"
            )
        elif "peak_rss_mib" in r:
            lines.append(f"{r['figure']:58s} peak RSS {r['peak_rss_mib']} MiB ({r['seconds']} s)")
        elif "seconds" in r:
            extra = f", {r['n_slices_used']} slices used" if "n_slices_used" in r else ""
            lines.append(f"{r['figure']:58s} {r['seconds']} s{extra}")
        elif "stream" in r.get("result", {}):
            st = r["result"]["stream"]
            lines.append(
                f"{r['figure']:58s} {st['series_per_hour']} series/h, {st['seconds_per_series']} "
                f"s/series ({st['series']}x{st['slices_per_series']} slices, "
                f"{st['runtime_chosen']}, worker {st['peak_rss_mib'].get('worker')} MiB)"
            )
        else:
            lines.append(f"{r['figure']:58s} {json.dumps(r.get('result'))[:80]}")
    return "\n".join(lines)


SECTIONS = ("ingest", "inference", "e2e", "runtimes", "export", "memory", "hooks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from {', '.join((*SECTIONS, 'gpu'))}")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/<machine>)")
    parser.add_argument("--inference-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = int_setting("BENCH_REPEATS")
    if args.inference_worker:
        row = inference_worker(int_setting("BENCH_INPUT_SIZE"), int_setting("BENCH_INFER_SLICES"),
                               repeats)
        print(json.dumps(row))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    runners: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "ingest": lambda: bench_ingest(repeats),
        "inference": lambda: bench_inference(repeats),
        "e2e": bench_e2e,
        "runtimes": lambda: bench_runtimes(repeats),
        "export": bench_export,
        "memory": bench_memory,
        "hooks": bench_hooks,
        "gpu": lambda: bench_gpu(repeats),
    }
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name in args.sections.split(","):
        logger.info("section %s", name)
        section_start = time.perf_counter()
        rows.extend(runners[name]())
        logger.info("section %s took %.0f s", name, time.perf_counter() - section_start)
    out = args.out or BENCH_DIR / "results" / f"{machine_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "settings": {k: setting(k) for k in SETTINGS},
        "total_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
