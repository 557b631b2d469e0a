"""``ctcovid export MODEL``: add ONNX inference graphs (fp32, gated int8) to a model folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

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
    calibration: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="COV19-CT-DB or DICOM folder: calibration slices, and the gate scans "
            "unless --validation is given.",
        ),
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option(
            exists=True, file_okay=False, help="Separate scans for the int8 accuracy gate."
        ),
    ] = None,
    calibration_slices: Annotated[
        int, typer.Option(min=1, help="Calibration slices, spread evenly over the scans.")
    ] = 32,
    force: Annotated[
        bool, typer.Option(help="Convert again even if a valid model.onnx is recorded.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Export the model for ONNX Runtime: model.onnx (fp32) and, with --int8, model.int8.onnx.

    The fp32 graph must match Keras within 1e-4 per slice. The int8 graph is kept only if, on
    the gate scans, every scan's probability is within 0.02 of fp32 and no label changes at
    the model's threshold; otherwise nothing is written and the measured numbers are shown.
    ctcovid.json records each graph with its sha256, the calibration set and the agreement.

    Examples:

      ctcovid export models/site-v3

      ctcovid export models/site-v3 --int8 --calibration data/calib --validation data/val
    """
    setup_logging(verbose if verbose else 1)  # progress: conversion and calibration take minutes
    quiet_keras()
    if verbose < 2:  # tf2onnx reports every folded node at INFO
        logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    from ctcovid.training.export import export_model

    report = export_model(
        model,
        int8=int8,
        calibration=calibration,
        validation=validation,
        calibration_slices=calibration_slices,
        force=force,
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
    if "int8" in report.graphs and report.attempts:
        agreement = report.graphs["int8"]["agreement"]
        stdout.print(
            f"int8 gate passed with recipe {report.graphs['int8']['recipe']['name']!r}: "
            f"max |int8 - fp32| = {agreement['max_probability_difference']:.4f} on "
            f"{agreement['n_scans']} scan(s), labels agree",
            highlight=False,
        )
