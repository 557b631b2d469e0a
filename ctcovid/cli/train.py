"""``ctcovid train DATA_DIR --out MODEL``: train a Res-Dense Net, keep its best epoch."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ctcovid.cli.common import (
    console,
    handle_errors,
    parse_settings,
    print_json,
    quiet_keras,
    setup_logging,
    stdout,
)


class Layout(StrEnum):
    auto = "auto"
    cov19 = "cov19-ct-db"
    dicom = "dicom"


class Optimizer(StrEnum):
    adam = "adam"
    rmsprop = "rmsprop"


class SlicePolicy(StrEnum):
    all = "all"
    lung = "lung"


@handle_errors
def train(
    data_dir: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="Labelled training data.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write.")],
    layout: Annotated[
        Layout, typer.Option(help="Data layout (auto: JPG slices -> cov19-ct-db, else dicom).")
    ] = Layout.auto,
    epochs: Annotated[int, typer.Option(help="Epochs in all (both stages).")] = 20,
    head_epochs: Annotated[
        int | None,
        typer.Option(
            help="Stage-1 epochs, backbones frozen. Default: 5 pretrained, 0 from scratch."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Slices per training step.")] = 32,
    input_size: Annotated[int, typer.Option(help="Slice size in pixels (model input).")] = 256,
    weights: Annotated[
        str, typer.Option(help="imagenet, none (from scratch) or a folder of Keras no-top weights.")
    ] = "imagenet",
    backbones: Annotated[
        str, typer.Option(help="Two keras.applications backbones, comma-separated.")
    ] = "resnet101,densenet121",
    slice_policy: Annotated[
        SlicePolicy, typer.Option(help="all slices, or lung: slices with enough lung area.")
    ] = SlicePolicy.all,
    max_slices: Annotated[
        int | None, typer.Option(help="At most N slices per scan, evenly spaced along z.")
    ] = None,
    min_slices: Annotated[
        int, typer.Option(help="Slices a DICOM series needs (stored in the model for inference).")
    ] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the split, shuffling and augmentation.")] = 0,
    lr: Annotated[float, typer.Option(help="Learning rate of both stages.")] = 1e-4,
    optimizer: Annotated[
        Optimizer | None,
        typer.Option(
            help="Stage-2 optimizer. Default: rmsprop (the paper's) pretrained, adam from scratch."
        ),
    ] = None,
    class_weights: Annotated[
        bool, typer.Option(help="Weight the loss by inverse class frequency.")
    ] = False,
    frozen_layers: Annotated[
        int | None,
        typer.Option(
            help="Stage 2 keeps each backbone's first N layers frozen. "
            "Default: 100 pretrained, 0 from scratch."
        ),
    ] = None,
    augment: Annotated[
        bool,
        typer.Option("--augment/--no-augment", help="Random flip and rotation while training."),
    ] = True,
    ingest_setting: Annotated[
        list[str] | None,
        typer.Option(
            "--ingest",
            help="Any other ingest setting the model will carry, as KEY=VALUE (repeatable), "
            "e.g. --ingest window_center_hu=-500 --ingest lung_min_fraction=0.05.",
        ),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Validation share when the data has no val folder.")
    ] = 0.25,
    cache: Annotated[
        Path | None,
        typer.Option(help="Slice cache folder. Default: $XDG_CACHE_HOME/ctcovid/slices."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (settings, metrics.csv). Default: OUT/run.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary only.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Train the Res-Dense Net on COV19-CT-DB JPG scans or labelled DICOM; keep the best epoch.

    Scans are split by scan (by patient when DICOM names one), never by slice; validation macro F1
    at scan level picks the epoch, and the decision threshold is tuned on validation. Slices are
    cached (uint8, memory-mapped) so a second run on the same data starts at once.

    Examples:

      ctcovid train COV19-CT-DB/ --out models/resdense --weights imagenet

      ctcovid train labelled_dicom/ --out models/site --weights /opt/keras-weights --max-slices 64

      ctcovid train demo/data/cov19 --out demo/model --input-size 64 --weights none --lr 1e-3
    """
    setup_logging(verbose)
    quiet_keras()
    from ctcovid.training.config import TrainConfig
    from ctcovid.training.progress import NullProgress, console_progress
    from ctcovid.training.train import train as run_training

    config = TrainConfig.create(
        input_size=input_size,
        weights=weights,
        backbones=[b.strip() for b in backbones.split(",")],
        ingest={
            "slice_policy": slice_policy.value,
            "max_slices": max_slices,
            "min_slices": min_slices,
            **parse_settings(ingest_setting, "--ingest"),
        },
        epochs=epochs,
        head_epochs=head_epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer.value if optimizer is not None else None,
        class_weights=class_weights,
        augment=augment,
        frozen_layers=frozen_layers,
        val_fraction=val_fraction,
        seed=seed,
        layout=layout.value,
    )
    if json_out:
        result = run_training(
            data_dir, out, config, run_dir=run_dir, cache_dir=cache, progress=NullProgress()
        )
        print_json(result.summary())
        return
    with console_progress(console) as progress:
        result = run_training(
            data_dir, out, config, run_dir=run_dir, cache_dir=cache, progress=progress
        )
    m = result.val_metrics
    auc = f"{m['roc_auc']:.3f}" if m["roc_auc"] is not None else "n/a"
    stdout.print(
        f"model written to {result.model_dir} (best epoch {result.best_epoch}, "
        f"threshold {result.artifact.threshold:.3f})\n"
        f"validation ({m['n_scans']} scans): F1 covid {m['f1_covid']:.4f}, "
        f"F1 non-covid {m['f1_non_covid']:.4f}, macro F1 {m['macro_f1']:.4f}, ROC AUC {auc}\n"
        f"run folder {result.run_dir}; training {result.train_slices_per_second:.1f} slices/s, "
        f"input feed {result.input_slices_per_second:.0f} slices/s; {result.seconds:.0f} s",
        highlight=False,
    )
    if result.skipped:
        stdout.print(f"{len(result.skipped)} scan(s) skipped:", highlight=False)
        for s in result.skipped:
            stdout.print(f"  {s['scan']}: {s['reason']}", highlight=False)
    if result.scan_warnings:
        stdout.print(f"{len(result.scan_warnings)} scan(s) with warnings:", highlight=False)
        for scan, warnings in result.scan_warnings.items():
            stdout.print(f"  {scan}: {'; '.join(warnings)}", highlight=False)
    for note in result.notes:
        stdout.print(f"note: {note}", highlight=False)
