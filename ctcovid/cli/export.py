"""``ctcovid export MODEL``: add ONNX inference graphs (fp32, gated int8) to a model folder, and
gate runs of them on OpenVINO (bf16, openvino-int8)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from ctcovid.cli.common import handle_errors, print_json, quiet_keras, setup_logging, stdout


@handle_errors
def export(
    model: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="Model folder to add graphs to.")
    ],
    int8: Annotated[
        bool,
        typer.Option("--int8", help="Also write a calibrated int8 graph (needs --calibration)."),
    ] = False,
    bf16: Annotated[
        bool,
        typer.Option(
            "--bf16",
            help="Also gate model.onnx on OpenVINO at bf16 (CPUs with AMX-BF16 or AVX512-BF16; "
            "verified on --validation, else unverified on --calibration).",
        ),
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="COV19-CT-DB or DICOM folder: calibration slices; the int8 recipe is selected "
            "on these scans.",
        ),
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Scans disjoint from --calibration that confirm the int8 graph (without them "
            "it is recorded unverified and --runtime auto does not use it).",
        ),
    ] = None,
    calibration_slices: Annotated[
        int, typer.Option(min=1, help="Calibration slices, spread evenly over the scans.")
    ] = 32,
    min_scans: Annotated[
        int, typer.Option(min=1, help="Validation scans the int8 confirmation needs.")
    ] = 100,
    min_per_class: Annotated[
        int,
        typer.Option(min=0, help="Validation scans it needs on each side of the threshold (fp32)."),
    ] = 10,
    min_near_threshold: Annotated[
        int,
        typer.Option(min=0, help="Validation scans it needs within 0.1 of the threshold (fp32)."),
    ] = 10,
    force: Annotated[
        bool, typer.Option(help="Convert again even if a valid model.onnx is recorded.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Export the model for ONNX Runtime: model.onnx (fp32) and, with --int8, model.int8.onnx.

    The fp32 graph must match Keras within 1e-4 in probability and 1e-3 in logit per slice. The
    int8 recipe is selected on the calibration scans (every scan within 0.02 of fp32, every slice
    within 0.1 and its logit within 1.0, no label changed at the model's threshold) and then
    confirmed, once, on the --validation scans by the same criteria. Validation scans must be
    disjoint from the calibration scans and enough to bound the label flip rate (--min-scans,
    --min-per-class, --min-near-threshold); otherwise nothing is written. Without --validation
    the int8 graph is written but recorded unverified: --runtime auto keeps using fp32, and
    --runtime int8 runs it with a warning. ctcovid.json records each graph with its sha256, the
    scans that selected and confirmed it, the measured differences, the 95% upper bound on the
    flip rate, the CPU flags, and a few check slices that each load re-runs.

    With --bf16, OpenVINO's bf16 run of model.onnx (no calibration) is gated against fp32 by
    the same criteria on the --validation scans, and recorded with this CPU's BF16 flags; it is
    refused on a CPU without BF16 instructions.

    Where OpenVINO is installed, --int8 also gates the int8 graph on OpenVINO's own int8
    kernels (runtime openvino-int8) on the same scans by the same criteria, recorded with this
    CPU's AMX-INT8, VNNI and AVX-512 flags; if it refuses, the int8 graph is kept for ONNX
    Runtime and the reason is printed.

    Each OpenVINO run gated (bf16, openvino-int8) also saves OpenVINO's compiled model
    (model.bf16.blob, model.openvino-int8.blob, 100-200 MB at 256 px, sha256 recorded): a load
    on the same OpenVINO version, CPU and thread count imports it instead of compiling.

    Examples:

      ctcovid export models/site-v3

      ctcovid export models/site-v3 --int8 --calibration data/calib --validation data/val

      ctcovid export models/site-v3 --bf16 --validation data/val
    """
    setup_logging(verbose if verbose else 1)  # progress: conversion and calibration take minutes
    quiet_keras()
    if verbose < 2:  # tf2onnx reports every folded node at INFO
        logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    from ctcovid.model.export import GateRequirements
    from ctcovid.training.export import export_model

    report = export_model(
        model,
        int8=int8,
        bf16=bf16,
        calibration=calibration,
        validation=validation,
        calibration_slices=calibration_slices,
        force=force,
        requirements=GateRequirements(min_scans, min_per_class, min_near_threshold),
    )
    if json_out:
        print_json(report.to_json())
        return
    for name, record in report.graphs.items():
        state = "written" if record["file"] in report.written else "kept"
        stdout.print(
            f"{name}: {model / record['file']} ({state}, sha256 {record['sha256'][:12]})",
            highlight=False,
        )
        compiled = record.get("compiled")
        if isinstance(compiled, dict):  # OpenVINO's compiled model, imported at load
            blob = model / compiled["file"]
            size = f", {blob.stat().st_size / 2**20:.0f} MiB" if blob.is_file() else ""
            state = "written" if compiled["file"] in report.written else "kept"
            cpu = compiled["cpu"].get("model") or "this CPU"
            stdout.print(
                f"{name}: compiled model {blob} ({state}{size}, sha256 "
                f"{compiled['sha256'][:12]}; imported at load on OpenVINO "
                f"{compiled['openvino'].split('-')[0]}, {cpu}, {compiled['threads']} threads)",
                highlight=False,
                soft_wrap=True,
            )
    if "int8" in report.graphs and report.attempts:
        for line in int8_summary(report.graphs["int8"]):
            stdout.print(line, highlight=False, soft_wrap=True)
    if int8 and "openvino-int8" in report.graphs:
        stdout.print(
            openvino_summary(report.graphs["openvino-int8"], "openvino-int8"),
            highlight=False,
            soft_wrap=True,
        )
    for name, reason in report.not_recorded.items():
        stdout.print(f"{name} not recorded: {reason}", highlight=False, soft_wrap=True)
    if bf16:
        stdout.print(bf16_summary(report.graphs["bf16"]), highlight=False, soft_wrap=True)


def bf16_summary(record: dict[str, Any]) -> str:
    """What gated the bf16 run and what was measured, as printed by ``ctcovid export``."""
    return openvino_summary(record, "bf16")


def openvino_summary(record: dict[str, Any], name: str) -> str:
    """What gated an OpenVINO run (``bf16``, ``openvino-int8``) and what was measured, as
    printed by ``ctcovid export``."""
    verification = record["verification"]
    cpu = record["cpu"]
    on = f"{cpu.get('model') or 'an unknown CPU'} ({' '.join(cpu.get('flags', []))})"
    if verification["status"] != "verified":
        gate = verification["gate"]
        return (
            f"{name} UNVERIFIED (no --validation), gated on {gate['n_scans']} scan(s) of "
            f"{gate['source']} on {on}: {_measured(gate, name)}; --runtime auto does not use it"
        )
    c = verification["confirmation"]
    return (
        f"{name} VERIFIED on {c['n_scans']} validation scan(s) of {c['source']} on {on}: "
        f"{_measured(c, name)}; 0 labels flipped; each load re-checks "
        f"{record['load_check']['n_slices']} slices ({record['load_check']['file']})"
    )


def int8_summary(record: dict[str, Any]) -> list[str]:
    """What gated the int8 graph and what was measured, as printed by ``ctcovid export``."""
    recipe, selection = record["recipe"], record["selection"]
    verification = record["verification"]
    lines = [
        f"int8 recipe {recipe['name']!r} ({recipe['activations']} activations, "
        f"{recipe['weights']} weights) selected on {selection['n_scans']} calibration scan(s) of "
        f"{selection['source']}: {_measured(selection)}"
    ]
    if verification["status"] != "verified":
        lines.append(
            "int8 UNVERIFIED (no --validation): --runtime auto uses the fp32 graph; "
            "--runtime int8 runs it with a warning"
        )
        return lines
    c = verification["confirmation"]
    bound = c["flip_rate_upper_bound"]
    lines.append(
        f"int8 VERIFIED on {c['n_scans']} validation scan(s) of {c['source']}, disjoint from the "
        f"calibration scans ({c['n_positive']} at or above the threshold {record['threshold']:g}, "
        f"{c['n_negative']} below, {c['n_near_threshold']} within "
        f"{c['requirements']['near']:g} of it): {_measured(c)}; 0 labels flipped, "
        f"{bound['confidence']:.0%} upper bound on the flip rate {bound['all_scans']:.2%} "
        f"(all scans), {bound['near_threshold']:.2%} (near the threshold)"
    )
    lines.append(
        f"int8 gated on {record['cpu'].get('model') or 'an unknown CPU'} "
        f"({' '.join(record['cpu'].get('flags', [])) or 'no flags read'}); each load re-checks "
        f"{record['load_check']['n_slices']} slices ({record['load_check']['file']})"
    )
    return lines


def _measured(gate: dict[str, Any], name: str = "int8") -> str:
    return (
        f"max |{name} - fp32| {gate['max_probability_difference']:.4f} per scan, "
        f"{gate['max_slice_probability_difference']:.4f} per slice, logit "
        f"{gate['max_slice_logit_difference']:.3f} per slice"
    )
