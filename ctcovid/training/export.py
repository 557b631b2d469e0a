"""``ctcovid export``: add ``model.onnx``, a gated ``model.int8.onnx`` (on ONNX Runtime and on
OpenVINO) and a gated bf16 run of ``model.onnx`` on OpenVINO to a model folder.

The graphs and their gate are :mod:`ctcovid.model.export`; this module reads the calibration and
validation scans through the model's own ingest and slice policy (the training data readers) and
writes the graphs and their record only once every check passed.

int8 recipes are selected on the calibration scans and the selected one is confirmed once on the
validation scans, which must be disjoint from the calibration scans (no shared input file, DICOM
SeriesInstanceUID or identical slices) and enough to state a bound (:class:`GateRequirements`).
Without validation scans the int8 graph is written but recorded ``unverified``: ``--runtime auto``
does not use it. A refusal writes nothing and reports the measured numbers.

bf16 needs no calibration: OpenVINO runs ``model.onnx`` with ``INFERENCE_PRECISION_HINT`` bf16,
and that run is gated against fp32 by the int8 gate's criteria, once, on the validation scans
(verified), or on the calibration scans when no validation scans are given (``unverified``). It
is refused on a CPU without BF16 instructions, where OpenVINO would compute in f32: the record
names the CPU its gate ran on, and each load checks it again.

Where OpenVINO is installed, ``--int8`` also gates the int8 graph it keeps on OpenVINO
(``openvino-int8``: OpenVINO's own int8 kernels, not ONNX Runtime's) on the same scans and by
the same criteria, with its own record and load check. A refusal there keeps ONNX Runtime's
int8 graph and says why (:attr:`ExportReport.not_recorded`). A re-export that replaces
``model.onnx`` or ``model.int8.onnx`` drops the records that gated the previous file (bf16,
openvino-int8) unless it gates them again.

Each OpenVINO run that passed its gate also leaves the model OpenVINO compiled for it
(``model.bf16.blob``, ``model.openvino-int8.blob``), recorded under ``compiled``, for a load on
the same OpenVINO and CPU to import; a dropped record's blob is removed.
"""

from __future__ import annotations

import gc
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
from ctcovid.model.artifact import (
    ModelArtifact,
    load_model,
    read_artifact,
    sha256_file,
    write_metadata,
)
from ctcovid.model.export import (
    CAM_OUTPUT,
    CHECK_SLICES,
    CONFIDENCE,
    DEFAULT_CALIBRATION_SLICES,
    FP32_CHECK_SLICES,
    FP32_LOGIT_TOLERANCE,
    FP32_TOLERANCE,
    INT8_LOGIT_TOLERANCE,
    INT8_SLICE_TOLERANCE,
    INT8_TOLERANCE,
    OPSET,
    RECIPES,
    GateRequirements,
    GateResult,
    Recipe,
    ScanSlices,
    Scored,
    add_cam_output,
    add_logit_output,
    check_slices,
    convert_to_onnx,
    cpu_description,
    flip_rate_upper_bound,
    fp32_difference,
    gate,
    keras_outputs,
    overlap,
    package_versions,
    quantize,
    runtime_outputs,
    sample_slices,
    score,
    utc_now,
    write_check,
)
from ctcovid.model.runtimes import (
    CHECK_FILE,
    CHECK_FILES,
    COMPILED_FILES,
    GRAPH_FILES,
    OPENVINO_INSTALL_HINT,
    UNVERIFIED,
    VERIFIED,
    OnnxRuntime,
    OpenVinoRuntime,
    bf16_missing,
    graph_path,
    import_openvino,
    openvino_available,
)
from ctcovid.training.data import discover, load_scan

logger = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """What ``export_model`` wrote, and the gate's runs: recipes tried on the calibration scans
    (``attempts``, in order), and the confirmation of the selected one on validation scans."""

    model: Path
    graphs: dict[str, dict[str, Any]]
    written: list[str]
    attempts: list[GateResult] = field(default_factory=list)
    confirmation: GateResult | None = None
    #: Gated runtimes this export did not record, and why (openvino-int8: its gate refused, or
    #: OpenVINO is not installed).
    not_recorded: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "written": self.written,
            "graphs": self.graphs,
            "attempts": [asdict(a) for a in self.attempts],
            "confirmation": asdict(self.confirmation) if self.confirmation else None,
            "not_recorded": self.not_recorded,
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
            scans.append(
                ScanSlices(
                    item.scan_id,
                    loaded.slices,
                    files=tuple(str(f.resolve()) for f in item.files),
                    series_instance_uid=item.series_instance_uid,
                )
            )
    if not scans:
        raise InvalidInputError(f"{data_dir}: no scan could be read for export")
    return scans, skipped


def _valid_graph(folder: Path, artifact: ModelArtifact, runtime: str) -> Path | None:
    if runtime not in artifact.graphs:
        return None
    if runtime == "onnx" and not dict(artifact.graphs["onnx"].get("outputs") or {}).get("logit"):
        logger.info("re-exporting: the recorded fp32 graph has no logit output (older ctcovid)")
        return None
    try:
        return graph_path(folder, artifact, runtime)
    except ModelError as exc:
        logger.info("re-exporting: %s", exc)
        return None


def _fp32_graph(
    folder: Path, artifact: ModelArtifact, out: Path, scans: list[ScanSlices], source: str
) -> dict[str, Any]:
    """Convert the Keras model to ``out`` and check it against Keras; returns its record."""
    model, artifact = load_model(folder)
    size = artifact.model_config.input_size
    logger.info("converting %s to ONNX", folder)
    convert_to_onnx(model, out, size)
    logit_name = add_logit_output(out)
    add_cam_output(out)
    if scans:
        check = sample_slices(scans, FP32_CHECK_SLICES)
    else:
        logger.warning(
            "no scans given: the ONNX graph is checked against Keras on random slices only; "
            "pass --validation DATA to check it on real scans"
        )
        source = "random uint8 slices"
        check = np.random.default_rng(0).integers(
            0, 256, (FP32_CHECK_SLICES, size, size), dtype=np.uint8
        )
    sha = sha256_file(out)
    measured = fp32_difference(
        keras_outputs(model, check), runtime_outputs(OnnxRuntime(out, "onnx", sha), check)
    )
    # Keras is done with. Its model is reference cycles (layers, their functions) that only a
    # full collection frees, else whenever Python next runs one, maybe in the int8 calibration
    # (0.9 GB resident at 256 px; TensorFlow keeps much of it for reuse, so the int8 export's
    # peak fell by 0.15 GB).
    del model
    gc.collect()
    dp = measured["max_slice_difference_vs_keras"]
    dz = measured["max_slice_logit_difference_vs_keras"]
    if dp > FP32_TOLERANCE or dz > FP32_LOGIT_TOLERANCE:
        raise ModelError(
            f"{folder}: the ONNX graph differs from Keras on {source}: by {dp:.2e} in a slice's "
            f"probability (limit {FP32_TOLERANCE:g}) and {dz:.2e} in its logit (limit "
            f"{FP32_LOGIT_TOLERANCE:g} times max(1, |logit|)); nothing written"
        )
    return {
        "file": GRAPH_FILES["onnx"],
        "sha256": sha,
        "weights_sha256": artifact.weights_sha256,
        "created": utc_now(),
        "exporter": package_versions("tf2onnx", "onnx"),
        "opset": OPSET,
        "outputs": {"probability": 0, "logit": logit_name, "cam": CAM_OUTPUT},
        "check": {
            "n_slices": len(check),
            "source": source,
            **measured,
            "tolerance": FP32_TOLERANCE,
            "logit_tolerance": FP32_LOGIT_TOLERANCE,
        },
    }


def _gate_record(result: GateResult) -> dict[str, Any]:
    return {
        "n_scans": len(result.scans),
        "n_slices": result.n_slices,
        "max_probability_difference": result.max_probability_difference,
        "max_slice_probability_difference": result.max_slice_probability_difference,
        "max_slice_logit_difference": result.max_slice_logit_difference,
        "label_flips": result.label_flips,
        "scans": result.scans,
    }


@dataclass(frozen=True)
class ValidationScans:
    """The scans that confirm a gate (``--validation``), their fp32 outputs and what they hold."""

    source: Path
    scans: list[ScanSlices]
    skipped: list[str]
    fp32: dict[str, Scored]
    counts: dict[str, int]


def _verification(
    result: GateResult,
    validation: ValidationScans | None,
    requirements: GateRequirements,
    threshold: float,
    *,
    unverified: str,
    selected: bool = False,
    gate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``verification`` record of a gated graph (int8, bf16).

    ``result`` is its gate on the validation scans when there are some: verified, with the bound
    on the label flip rate. Without them the record is unverified, says why (``unverified``) and
    holds ``gate``, the gate it passed instead, if any. ``selected``: a recipe was selected on
    the calibration scans (int8).
    """
    selection = {"selected_on": "calibration scans"} if selected else {}
    if validation is None:
        return {
            "status": UNVERIFIED,
            "reason": unverified,
            **selection,
            "confirmed_on": None,
            **({"gate": gate} if gate is not None else {}),
        }
    n_near = sum(
        abs(validation.fp32[s.scan_id].scan_probability - threshold) <= requirements.near
        for s in validation.scans
    )
    return {
        "status": VERIFIED,
        **selection,
        "confirmed_on": "validation scans",
        "confirmation": {
            "source": str(validation.source),
            "skipped": validation.skipped,
            **validation.counts,
            "requirements": asdict(requirements),
            **_gate_record(result),
            "flip_rate_upper_bound": {
                "confidence": CONFIDENCE,
                "method": "Clopper-Pearson, one-sided",
                "all_scans": flip_rate_upper_bound(0, len(result.scans)),
                "near_threshold": flip_rate_upper_bound(0, n_near),
            },
        },
    }


def _gate_terms(
    threshold: float,
    cpu: dict[str, Any],
    runtime: str,
    check_path: Path,
    validated: bool,
    origins: Any,
    check: dict[str, Any],
) -> dict[str, Any]:
    """The end of a gated graph's record (int8, bf16): the threshold and tolerances its gate
    used, the CPU it ran on, and its load check (the check slices' file, where they came from)."""
    return {
        "threshold": threshold,
        "tolerances": {
            "scan_probability": INT8_TOLERANCE,
            "slice_probability": INT8_SLICE_TOLERANCE,
            "slice_logit": INT8_LOGIT_TOLERANCE,
        },
        "cpu": cpu,
        "load_check": {
            "file": CHECK_FILES[runtime],
            "sha256": sha256_file(check_path),
            "from": "validation scans" if validated else "calibration scans",
            "slices": origins,
            **check,
        },
    }


@dataclass(frozen=True)
class OpenVinoGate:
    """An OpenVINO run of a recorded graph file to gate against fp32 (bf16, openvino-int8)."""

    name: str  # the runtime, and the key of its record
    path: Path  # the graph file as staged (or kept)
    sha256: str  # of that file
    precision: str  # OpenVINO's INFERENCE_PRECISION_HINT
    precision_words: str  # the record's "precision"
    unverified: str  # the record's reason when there are no validation scans


def _openvino_graph(
    folder: Path,
    artifact: ModelArtifact,
    tmp: Path,
    run: OpenVinoGate,
    fp32_runtime: OnnxRuntime,
    validation: ValidationScans | None,
    calibration: tuple[Path | None, list[ScanSlices], dict[str, Scored] | None],
    requirements: GateRequirements,
    cpu: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Gate ``run`` (a graph on OpenVINO at a precision hint) against fp32; its record and
    staged files (final name -> staged file): its check slices and OpenVINO's compiled model.

    On the validation scans when there are some (verified), else on the calibration scans
    (unverified; their fp32 outputs are scored here unless given). Raises :class:`ModelError`
    when the gate refuses, or OpenVINO cannot load the graph.

    The model the gate ran is the one a load compiles (same settings, static batch, threads),
    so it is saved (:data:`COMPILED_FILES`) for a load on this OpenVINO and CPU to import.
    """
    cal_source, cal_scans, cal_fp32 = calibration
    threshold = artifact.threshold
    runtime = OpenVinoRuntime(run.path, run.name, run.sha256, precision=run.precision)
    source: Path | None
    if validation is not None:
        scans, fp32, source = validation.scans, validation.fp32, validation.source
    else:
        scans, source = cal_scans, cal_source
        fp32 = cal_fp32 if cal_fp32 is not None else score(fp32_runtime, cal_scans)
    measured = score(runtime, scans)
    result = gate(run.name, scans, fp32, measured, threshold, candidate=run.name)
    logger.info("%s against fp32 on %s: %s", run.name, source, result.summary())
    if not result.passed:
        raise ModelError(
            f"{folder}: {run.name} refused on the scans of {source}: {result.summary()}"
        )
    verification = _verification(
        result,
        validation,
        requirements,
        threshold,
        unverified=run.unverified,
        gate={"source": str(cal_source), **_gate_record(result)},
    )
    check_path = tmp / CHECK_FILES[run.name]
    slices, origins = check_slices(scans, fp32, measured, CHECK_SLICES)
    check = write_check(check_path, slices, fp32_runtime, runtime, run.name)
    blob_path = tmp / COMPILED_FILES[run.name]
    compiled = runtime.export_compiled(blob_path)
    record = {
        "file": GRAPH_FILES[run.name],
        "sha256": run.sha256,
        "weights_sha256": artifact.weights_sha256,
        "created": utc_now(),
        "engine": package_versions("openvino"),
        "precision": run.precision_words,
        "verification": verification,
        **_gate_terms(threshold, cpu, run.name, check_path, validation is not None, origins, check),
        "compiled": compiled,
    }
    return record, {CHECK_FILES[run.name]: check_path, COMPILED_FILES[run.name]: blob_path}


def _compiled_files(graphs: dict[str, dict[str, Any]]) -> set[str]:
    return {
        str(r["compiled"]["file"]) for r in graphs.values() if isinstance(r.get("compiled"), dict)
    }


def _drop_stale_blobs(
    folder: Path, before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> None:
    """Remove the compiled models (100-200 MB each) of records this export dropped or replaced
    with one that has none; a replaced one with a blob was overwritten by its rename."""
    for name in sorted(_compiled_files(before) - _compiled_files(after)):
        path = folder / name
        if path.is_file():
            logger.info("removing %s: the record that named it is gone", path)
            path.unlink()


def _bf16_run(fp32_path: Path, fp32_sha256: str) -> OpenVinoGate:
    """``model.onnx`` on OpenVINO at bf16 (no calibration)."""
    return OpenVinoGate(
        "bf16",
        fp32_path,
        fp32_sha256,
        "bf16",
        "bf16 (OpenVINO INFERENCE_PRECISION_HINT)",
        "no validation scans at export (--validation); gated on the calibration scans only",
    )


def _openvino_int8_run(int8_path: Path, int8_sha256: str) -> OpenVinoGate:
    """The int8 graph ONNX Runtime's gate kept, on OpenVINO's own int8 kernels (its other
    operators in f32: no BF16 needed)."""
    return OpenVinoGate(
        "openvino-int8",
        int8_path,
        int8_sha256,
        "f32",
        "int8 QDQ graph on OpenVINO's int8 kernels, other operators f32 (OpenVINO "
        "INFERENCE_PRECISION_HINT f32)",
        "no validation scans at export (--validation); gated on the calibration scans that "
        "selected its recipe only",
    )


def export_model(
    folder: Path,
    *,
    int8: bool = False,
    calibration: Path | None = None,
    validation: Path | None = None,
    calibration_slices: int = DEFAULT_CALIBRATION_SLICES,
    force: bool = False,
    recipes: Sequence[Recipe] = RECIPES,
    requirements: GateRequirements | None = None,
    bf16: bool = False,
) -> ExportReport:
    """Add ``model.onnx`` (and with ``int8`` a gated ``model.int8.onnx``) to a model folder.

    Files are written under temporary names and only renamed, and ``ctcovid.json`` updated, once
    every check passed: a refusal leaves the folder as it was. A valid fp32 graph already
    recorded for these weights (with its logit output) is reused unless ``force``.

    Parameters
    ----------
    folder
        The model folder.
    int8
        Also quantise; needs ``calibration``. Where OpenVINO is installed the int8 graph kept is
        gated on OpenVINO too (``openvino-int8``; a refusal there keeps the int8 graph and is
        reported in :attr:`ExportReport.not_recorded`).
    calibration
        Scans (COV19-CT-DB or DICOM folder) whose slices calibrate int8 and select the recipe.
    validation
        Scans disjoint from ``calibration`` that confirm the selected recipe; without them the
        int8 graph is recorded ``unverified``. They also check the fp32 graph against Keras.
    calibration_slices
        Calibration slices, spread evenly over the calibration scans.
    force
        Convert again even if a valid fp32 graph is recorded for these weights.
    recipes
        The quantisation recipes to try, in order.
    requirements
        What the validation scans must hold (default :class:`GateRequirements`).
    bf16
        Also gate ``model.onnx`` on OpenVINO at bf16 (needs a CPU with BF16, and scans:
        ``validation`` to verify it, else ``calibration``, recorded unverified).

    Returns
    -------
    ExportReport

    Raises
    ------
    InvalidInputError
        ``int8`` without ``calibration``, unreadable data, or validation scans that are also
        calibration scans.
    ModelError
        A check or gate refused; nothing was written.
    """
    folder = Path(folder)
    requirements = requirements or GateRequirements()
    if int8 and calibration is None:
        raise InvalidInputError("--int8 needs --calibration DATA (COV19-CT-DB or DICOM folder)")
    if bf16 and calibration is None and validation is None:
        raise InvalidInputError(
            "--bf16 needs scans to gate it: --validation DATA (COV19-CT-DB or DICOM folder)"
        )
    cpu = cpu_description()
    if bf16:
        no_bf16 = bf16_missing(cpu)
        if no_bf16:
            raise ModelError(f"{folder}: bf16 refused: {no_bf16}; nothing written")
        import_openvino("bf16")
    gated = " and ".join(name for name, on in (("int8", int8), ("bf16", bf16)) if on)
    artifact = read_artifact(folder)
    ingest = artifact.ingest_config
    threshold = artifact.threshold
    calib_scans: list[ScanSlices] = []
    val_scans: list[ScanSlices] = []
    skipped: list[str] = []
    val_skipped: list[str] = []
    if calibration is not None:
        calib_scans, skipped = read_scans(calibration, ingest)
    if validation is not None:
        val_scans, val_skipped = read_scans(validation, ingest)
    if int8 and val_scans:
        shared = overlap(calib_scans, val_scans)
        if shared:
            raise InvalidInputError(
                f"{validation}: {len(shared)} of its {len(val_scans)} scan(s) are also "
                f"calibration scans of {calibration}: {'; '.join(shared[:5])}"
                + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
                + ". The int8 gate needs validation scans disjoint from the calibration scans "
                "(compared by input file path, DICOM SeriesInstanceUID and pixels)"
            )
    graphs = dict(artifact.graphs)
    staged: dict[str, Path] = {}  # final file name -> staged file
    attempts: list[GateResult] = []
    confirmation: GateResult | None = None
    not_recorded: dict[str, str] = {}  # gated runtime -> why it was not recorded
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp_dir:
        tmp = Path(tmp_dir)
        fp32_path = None if force else _valid_graph(folder, artifact, "onnx")
        if fp32_path is None:
            fp32_path = tmp / GRAPH_FILES["onnx"]
            sources = [str(p) for p in (validation, calibration) if p is not None]
            graphs["onnx"] = _fp32_graph(
                folder, artifact, fp32_path, val_scans + calib_scans, " and ".join(sources)
            )
            staged[GRAPH_FILES["onnx"]] = fp32_path
            if "bf16" in graphs and not bf16:  # it ran the previous model.onnx
                logger.info("dropping the bf16 record: it gated the previous model.onnx")
                del graphs["bf16"]
            if "openvino-int8" in graphs and not int8:  # gated against the previous model.onnx
                logger.info(
                    "dropping the openvino-int8 record: its gate's fp32 reference was "
                    "the previous model.onnx"
                )
                del graphs["openvino-int8"]
        if int8 or bf16:  # the reference of both gates
            fp32_runtime = OnnxRuntime(fp32_path, "onnx", graphs["onnx"]["sha256"])
        confirming: ValidationScans | None = None
        if (int8 or bf16) and validation is not None:
            # Before any quantising: can these scans state a bound at all?
            fp32_val = score(fp32_runtime, val_scans)
            counts = requirements.counts(
                [fp32_val[s.scan_id].scan_probability for s in val_scans], threshold
            )
            confirming = ValidationScans(validation, val_scans, val_skipped, fp32_val, counts)
            missing = requirements.shortfall(counts, threshold)
            if missing:
                raise ModelError(
                    f"{folder}: {gated} refused: the validation scans of {validation} cannot "
                    f"state a bound on the label flip rate: {'; '.join(missing)} (set by "
                    "--min-scans, --min-per-class, --min-near-threshold); nothing written"
                )
        if bf16:
            try:
                graphs["bf16"], bf16_files = _openvino_graph(
                    folder,
                    artifact,
                    tmp,
                    _bf16_run(fp32_path, graphs["onnx"]["sha256"]),
                    fp32_runtime,
                    confirming,
                    (calibration, calib_scans, None),
                    requirements,
                    cpu,
                )
            except ModelError as exc:
                raise ModelError(f"{exc}; nothing written") from exc
            staged.update(bf16_files)
        if int8:
            if graphs.pop("openvino-int8", None) is not None:  # gated the previous int8 graph
                logger.info(
                    "dropping the openvino-int8 record: it gated the previous "
                    "model.int8.onnx (gated again below where OpenVINO is installed)"
                )
            fp32_cal = score(fp32_runtime, calib_scans)
            calib = sample_slices(calib_scans, calibration_slices)
            int8_path = tmp / GRAPH_FILES["int8"]
            chosen: tuple[Recipe, OnnxRuntime, dict[str, Scored]] | None = None
            for recipe in recipes:
                recipe = recipe.resolved(cpu)
                logger.info("quantising with recipe %r on %d slices", recipe.name, len(calib))
                quantize(fp32_path, int8_path, calib, recipe)
                int8_runtime = OnnxRuntime(int8_path, "int8", "")
                int8_cal = score(int8_runtime, calib_scans)
                result = gate(recipe, calib_scans, fp32_cal, int8_cal, threshold)
                attempts.append(result)
                logger.info(
                    "selection on the calibration scans: %s -> %s",
                    result.summary(),
                    "pass" if result.passed else "fail",
                )
                if result.passed:
                    chosen = (recipe, int8_runtime, int8_cal)
                    break
                # A refused recipe's session (its memory arena holds a scoring batch's
                # activations) goes before the next recipe calibrates.
                del int8_runtime
            if chosen is None:
                raise ModelError(
                    f"{folder}: int8 refused, no recipe kept the {len(calib_scans)} calibration "
                    f"scan(s) within the tolerances with the same labels at threshold "
                    f"{threshold:g}; nothing written. Measured: "
                    + "; ".join(a.summary() for a in attempts)
                )
            recipe, int8_runtime, int8_cal = chosen
            check_from, check_fp32, check_int8 = calib_scans, fp32_cal, int8_cal
            if confirming is not None:
                int8_val = score(int8_runtime, val_scans)
                confirmation = gate(recipe, val_scans, confirming.fp32, int8_val, threshold)
                logger.info("confirmation on the validation scans: %s", confirmation.summary())
                if not confirmation.passed:
                    raise ModelError(
                        f"{folder}: int8 refused: recipe {recipe.name!r}, selected on the "
                        f"calibration scans, failed its confirmation on the validation scans of "
                        f"{validation} ({confirmation.summary()}); nothing written. Other "
                        "recipes are not tried on these scans: that would make them selection "
                        "scans"
                    )
                check_from, check_fp32, check_int8 = val_scans, confirming.fp32, int8_val
            verification = _verification(
                confirmation or attempts[-1],
                confirming,
                requirements,
                threshold,
                unverified="no validation scans at export (--validation); its recipe was "
                "selected on the calibration scans and never confirmed on other scans",
                selected=True,
            )
            staged[GRAPH_FILES["int8"]] = int8_path
            check_path = tmp / CHECK_FILE
            slices, origins = check_slices(check_from, check_fp32, check_int8, CHECK_SLICES)
            check = write_check(check_path, slices, fp32_runtime, int8_runtime)
            staged[CHECK_FILE] = check_path
            selection = attempts[-1]
            graphs["int8"] = {
                "file": GRAPH_FILES["int8"],
                "sha256": sha256_file(int8_path),
                "weights_sha256": artifact.weights_sha256,
                "created": utc_now(),
                "quantizer": package_versions("onnxruntime", "onnx"),
                "recipe": {**recipe.describe(), "tried": [a.recipe for a in attempts]},
                "verification": verification,
                "calibration": {
                    "source": str(calibration),
                    "n_scans": len(calib_scans),
                    "n_slices": len(calib),
                    "skipped": skipped,
                },
                "selection": {"source": str(calibration), **_gate_record(selection)},
                **_gate_terms(
                    threshold, cpu, "int8", check_path, validation is not None, origins, check
                ),
            }
            # The same graph on OpenVINO's own int8 kernels: its own gate, on the same scans
            # (validation, else calibration). A refusal keeps ONNX Runtime's int8 graph. ONNX
            # Runtime's session goes first (its arena holds a scoring batch's activations).
            del chosen, int8_runtime
            if openvino_available():
                try:
                    graphs["openvino-int8"], ov_files = _openvino_graph(
                        folder,
                        artifact,
                        tmp,
                        _openvino_int8_run(int8_path, graphs["int8"]["sha256"]),
                        fp32_runtime,
                        confirming,
                        (calibration, calib_scans, fp32_cal),
                        requirements,
                        cpu,
                    )
                    staged.update(ov_files)
                except ModelError as exc:
                    not_recorded["openvino-int8"] = (
                        f"{exc}; the int8 graph is kept for ONNX Runtime"
                    )
                    logger.warning("openvino-int8 not recorded: %s", not_recorded["openvino-int8"])
            else:
                not_recorded["openvino-int8"] = (
                    f"OpenVINO is not installed ({OPENVINO_INSTALL_HINT})"
                )
                logger.info("openvino-int8 not gated: %s", not_recorded["openvino-int8"])
        for name, path in staged.items():
            os.replace(path, folder / name)
    write_metadata(replace(artifact, graphs=graphs), folder)
    _drop_stale_blobs(folder, artifact.graphs, graphs)
    return ExportReport(folder, graphs, sorted(staged), attempts, confirmation, not_recorded)
