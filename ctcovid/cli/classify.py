"""``ctcovid classify SERIES_DIR``: one CT series -> scan-level P(COVID), optionally an SR."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from ctcovid.cli.common import (
    RUNTIME_HELP,
    ModelOption,
    Runtime,
    handle_errors,
    print_json,
    quiet_keras,
    setup_logging,
    stdout,
)


@handle_errors
def classify(
    series_dir: Annotated[
        Path, typer.Argument(exists=True, help="Folder (or file) holding one CT series.")
    ],
    model: ModelOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    sr: Annotated[
        Path | None, typer.Option("--sr", help="Write the DICOM Structured Report here.")
    ] = None,
    card: Annotated[
        Path | None,
        typer.Option(
            "--card",
            help="Write the result card here: a DICOM Secondary Capture that states the result "
            "in large type, with the key slice and its heatmap, for viewers that show no SR.",
        ),
    ] = None,
    heatmaps: Annotated[
        Path | None,
        typer.Option(help="Write class-activation overlays (PNG) of the key slices here."),
    ] = None,
    heatmaps_dicom: Annotated[
        bool,
        typer.Option(help="With --heatmaps, also write them as a DICOM Secondary Capture series."),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(help="Slices decoded ahead of the model; results do not depend on it."),
    ] = 32,
    runtime: Annotated[
        Runtime,
        typer.Option(help=RUNTIME_HELP),
    ] = Runtime.auto,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Classify one CT series: mean of slice probabilities, thresholded into covid / non-covid.

    Examples:

      ctcovid classify study/ct --model models/demo

      ctcovid classify study/ct --json --sr result.dcm --heatmaps heatmaps/

      ctcovid classify study/ct --sr result.dcm --card card.dcm

      ctcovid classify study/ct --runtime int8
    """
    setup_logging(verbose)
    quiet_keras()
    from ctcovid.dicom import load_series
    from ctcovid.errors import ModelError
    from ctcovid.inference import Classifier
    from ctcovid.model.artifact import default_model_path, missing_model_message

    model_path = model or default_model_path()
    if not model_path.exists():
        raise ModelError(missing_model_message(model_path))
    # The model loads in the background while the series is read and decoded.
    classifier = Classifier.from_file(
        model_path, batch_size=batch_size, runtime=runtime.value, background=True
    )
    try:
        series = load_series(series_dir, classifier.ingest_config)
    except Exception:
        classifier.wait_loaded()  # a model that cannot load is said first: it fails every series
        raise
    prepared, result = classifier.run(series)
    out: dict[str, Any] = result.to_json_dict()
    if sr is not None or card is not None:
        from ctcovid.report import build_sr, write_sr

        report = build_sr(result, series)
        if sr is not None:
            write_sr(report, sr)
            out["sr_path"] = str(sr)
        if card is not None:
            write_result_card(classifier, prepared, result, report, card)
            out["card_path"] = str(card)
    if heatmaps is not None:
        out["heatmaps"] = write_heatmaps(classifier, prepared, result, heatmaps, heatmaps_dicom)
    if json_out:
        print_json(out)
        return
    verdict = {
        "covid": "COVID-19 findings",
        "indeterminate": f"{result.n_slices_lost} of {result.n_slices_total} slices lost",
    }.get(result.label, "no COVID-19 findings")
    stdout.print(
        Text.assemble(
            f"{result.series_instance_uid}: P(COVID) = {result.probability_covid:.3f} "
            f"(threshold {result.threshold:.2f}) -> ",
            (result.label, "bold"),
            f" ({verdict}); {result.n_slices_used} of {result.n_slices_total} slices, "
            f"{result.seconds:.1f} s, runtime {result.model.runtime}",
        ),
        highlight=False,
    )
    if sr is not None:
        stdout.print(f"SR written to {sr}", highlight=False)
    if card is not None:
        stdout.print(f"Result card written to {card}", highlight=False)
    for w in result.warnings:
        stdout.print(f"warning: {w}", highlight=False)


def write_heatmaps(
    classifier: Any, prepared: Any, result: Any, folder: Path, as_dicom: bool
) -> list[str]:
    """CAM overlays of the key slices as PNG (and optionally Secondary Capture) files."""
    from ctcovid.report import build_heatmap_secondary_captures, overlay_rgb, write_png

    folder.mkdir(parents=True, exist_ok=True)
    keys = result.key_slice_indices
    slices = prepared.used.slices[keys]
    cams = classifier.key_slice_maps(prepared, keys)
    overlays = [overlay_rgb(s, c) for s, c in zip(slices, cams, strict=True)]
    paths = []
    for rank, (idx, rgb) in enumerate(zip(keys, overlays, strict=True), start=1):
        # No score in the name: classifying again (say with a new model) overwrites the files.
        name = f"key{rank}_slice{idx:04d}.png"
        paths.append(str(write_png(rgb, folder / name)))
    if as_dicom:
        for i, ds in enumerate(
            build_heatmap_secondary_captures(overlays, prepared.series, result, slice_indices=keys)
        ):
            path = folder / f"heatmap_{i + 1:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(str(path))
    return paths


def write_result_card(classifier: Any, prepared: Any, result: Any, report: Any, path: Path) -> None:
    """The result card of ``report`` (the SR of ``result``), with the key slice's heatmap."""
    from ctcovid.report.card import build_result_card, card_key_slice, write_card

    index = card_key_slice(result)
    key_slice = prepared.used.slices[index]
    (cam,) = classifier.key_slice_maps(prepared, [index])
    write_card(
        build_result_card(result, prepared.series, report, key_slice=key_slice, cam=cam), path
    )
