"""``ctcovid export``: add ``model.onnx`` and a gated ``model.int8.onnx`` to a model folder.

The graphs and their gate are :mod:`ctcovid.model.export`; this module reads the calibration and
validation scans through the model's own ingest and slice policy (the training data readers) and
writes the graphs and their record only once every check passed. When every recipe fails nothing
is written and the measured numbers are reported.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ctcovid.config import IngestConfig
from ctcovid.errors import InvalidInputError, ModelError
from ctcovid.model.artifact import ModelArtifact, load_model, sha256_file, write_metadata
from ctcovid.model.export import (
    DEFAULT_CALIBRATION_SLICES,
    FP32_CHECK_SLICES,
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    OPSET,
    RECIPES,
    GateResult,
    Recipe,
    ScanSlices,
    convert_to_onnx,
    cpu_description,
    gate,
    keras_probabilities,
    package_versions,
    quantize,
    runtime_probabilities,
    sample_slices,
    utc_now,
)
from ctcovid.model.runtimes import GRAPH_FILES, OnnxRuntime, graph_path
from ctcovid.training.data import discover, load_scan

logger = logging.getLogger(__name__)


@dataclass
class ExportReport:
    model: Path
    graphs: dict[str, dict[str, Any]]
    written: list[str]
    attempts: list[GateResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "written": self.written,
            "graphs": self.graphs,
            "attempts": [asdict(a) for a in self.attempts],
        }


def read_scans(data_dir: Path, ingest: IngestConfig) -> tuple[list[ScanSlices], list[str]]:
    """Every scan under ``data_dir`` (COV19-CT-DB or DICOM) through the model's ingest and policy.

    Returns the scans and one reason per scan that could not be read.
    """
    data = discover(data_dir, "auto", ingest=ingest, labelled=False)
    scans: list[ScanSlices] = []
    skipped = [f"{s}" for s in data.skipped]
    for item in data.items:
        try:
            loaded = load_scan(item, ingest)
        except InvalidInputError as exc:
            skipped.append(f"{item.scan_id}: {exc}")
            continue
        if len(loaded.slices):
            scans.append(ScanSlices(item.scan_id, loaded.slices))
    if not scans:
        raise InvalidInputError(f"{data_dir}: no scan could be read for export")
    return scans, skipped


def _valid_graph(folder: Path, artifact: ModelArtifact, runtime: str) -> Path | None:
    if runtime not in artifact.graphs:
        return None
    try:
        return graph_path(folder, artifact, runtime)
    except ModelError as exc:
        logger.info("re-exporting: %s", exc)
        return None


def export_model(
    folder: Path,
    *,
    int8: bool = False,
    calibration: Path | None = None,
    validation: Path | None = None,
    calibration_slices: int = DEFAULT_CALIBRATION_SLICES,
    force: bool = False,
    recipes: Sequence[Recipe] = RECIPES,
) -> ExportReport:
    """Add ``model.onnx`` (and with ``int8`` a gated ``model.int8.onnx``) to a model folder.

    A valid fp32 graph already recorded for these weights is reused unless ``force``. Files are
    written under temporary names and only renamed, and ``ctcovid.json`` updated, once every
    check passed: a refusal leaves the folder as it was.
    """
    folder = Path(folder)
    if int8 and calibration is None:
        raise InvalidInputError("--int8 needs --calibration DATA (COV19-CT-DB or DICOM folder)")
    model, artifact = load_model(folder)
    size = artifact.model_config.input_size
    ingest = artifact.ingest_config
    calib_scans: list[ScanSlices] = []
    skipped: list[str] = []
    if calibration is not None:
        calib_scans, skipped = read_scans(calibration, ingest)
    gate_scans, gate_skipped = (
        read_scans(validation, ingest) if validation is not None else (calib_scans, skipped)
    )
    graphs = dict(artifact.graphs)
    staged: dict[str, Path] = {}
    attempts: list[GateResult] = []
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp_dir:
        tmp = Path(tmp_dir)
        fp32_path = None if force else _valid_graph(folder, artifact, "onnx")
        if fp32_path is None:
            fp32_path = tmp / GRAPH_FILES["onnx"]
            logger.info("converting %s to ONNX", folder)
            convert_to_onnx(model, fp32_path, size)
            check = (
                sample_slices(calib_scans, FP32_CHECK_SLICES)
                if calib_scans
                else np.random.default_rng(0).integers(
                    0, 256, (FP32_CHECK_SLICES, size, size), dtype=np.uint8
                )
            )
            sha = sha256_file(fp32_path)
            runtime = OnnxRuntime(fp32_path, "onnx", sha)
            diff = float(
                np.abs(
                    keras_probabilities(model, check) - runtime_probabilities(runtime, check)
                ).max()
            )
            if diff > FP32_TOLERANCE:
                raise ModelError(
                    f"{folder}: the ONNX graph differs from Keras by {diff:.2e} on a slice "
                    f"(limit {FP32_TOLERANCE:g}); nothing written"
                )
            staged["onnx"] = fp32_path
            graphs["onnx"] = {
                "file": GRAPH_FILES["onnx"],
                "sha256": sha,
                "weights_sha256": artifact.weights_sha256,
                "created": utc_now(),
                "exporter": package_versions("tf2onnx", "onnx"),
                "opset": OPSET,
                "check": {
                    "n_slices": len(check),
                    "source": "calibration data" if calib_scans else "random uint8 slices",
                    "max_slice_difference_vs_keras": diff,
                },
            }
        if int8:
            fp32_runtime = OnnxRuntime(fp32_path, "onnx", graphs["onnx"]["sha256"])
            calib = sample_slices(calib_scans, calibration_slices)
            fp32_scan = {
                s.scan_id: float(np.mean(runtime_probabilities(fp32_runtime, s.slices)))
                for s in gate_scans
            }
            int8_path = tmp / GRAPH_FILES["int8"]
            chosen: GateResult | None = None
            for recipe in recipes:
                logger.info("quantising with recipe %r on %d slices", recipe.name, len(calib))
                quantize(fp32_path, int8_path, calib, recipe)
                int8_runtime = OnnxRuntime(int8_path, "int8", "")
                result = gate(recipe, gate_scans, fp32_scan, int8_runtime, artifact.threshold)
                attempts.append(result)
                logger.info("gate: %s -> %s", result.summary(), "pass" if result.passed else "fail")
                if result.passed:
                    chosen = result
                    break
            if chosen is None:
                raise ModelError(
                    f"{folder}: int8 refused, no recipe kept every scan within {INT8_TOLERANCE} "
                    f"of fp32 with the same label at threshold {artifact.threshold:g} on "
                    f"{len(gate_scans)} scan(s); nothing written. Measured: "
                    + "; ".join(a.summary() for a in attempts)
                )
            staged["int8"] = int8_path
            graphs["int8"] = {
                "file": GRAPH_FILES["int8"],
                "sha256": sha256_file(int8_path),
                "weights_sha256": artifact.weights_sha256,
                "created": utc_now(),
                "quantizer": package_versions("onnxruntime", "onnx"),
                "recipe": {
                    "name": chosen.recipe,
                    "format": "QDQ",
                    "weights": "int8 per channel",
                    "activations": "uint8",
                    "tried": [a.recipe for a in attempts],
                },
                "calibration": {
                    "source": str(calibration),
                    "n_scans": len(calib_scans),
                    "n_slices": len(calib),
                    "skipped": skipped,
                },
                "agreement": {
                    "on": "validation" if validation is not None else "calibration",
                    "source": str(validation if validation is not None else calibration),
                    "n_scans": len(gate_scans),
                    "skipped": gate_skipped,
                    "max_probability_difference": chosen.max_probability_difference,
                    "labels_agree": not chosen.label_flips,
                    "threshold": artifact.threshold,
                    "tolerance": INT8_TOLERANCE,
                    "cpu": cpu_description(),
                    "scans": chosen.scans,
                },
            }
        for name, path in staged.items():
            os.replace(path, folder / GRAPH_FILES[name])
    write_metadata(replace(artifact, graphs=graphs), folder)
    return ExportReport(folder, graphs, sorted(GRAPH_FILES[n] for n in staged), attempts)
