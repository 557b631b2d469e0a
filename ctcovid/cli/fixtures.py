"""``ctcovid fixtures OUT``: synthetic chest CT studies for tests and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctcovid.cli.common import handle_errors, print_json, setup_logging, stdout


@handle_errors
def fixtures(
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    studies: Annotated[int, typer.Option(help="Number of DICOM studies.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    slices: Annotated[int, typer.Option(help="Lung slices per CT series.")] = 24,
    size: Annotated[int, typer.Option(help="Rows and columns of each slice.")] = 128,
    cov19_per_class: Annotated[
        int,
        typer.Option(
            help="Also write a COV19-CT-DB layout (OUT/cov19/train/...) with N scans a class."
        ),
    ] = 0,
    cov19_slices: Annotated[
        int | None,
        typer.Option(help="Slices per COV19-CT-DB scan. Default: --slices, at most 16."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
) -> None:
    """Write synthetic chest CT studies (positives with ground-glass opacities, negatives clean).

    These images are synthetic: a model trained on them has no clinical value.

    Examples:

      ctcovid fixtures fixtures/ --studies 6 --seed 1

      ctcovid fixtures data/ --studies 0 --cov19-per-class 10 --cov19-slices 6
    """
    import dicom_fixtures

    setup_logging()
    infos = (
        dicom_fixtures.generate_studies(out, studies, seed=seed, n_slices=slices, size=size)
        if studies
        else []
    )
    scans = []
    if cov19_per_class:
        for split in ("train", "val"):
            scans += dicom_fixtures.write_cov19_layout(
                out / "cov19",
                n_per_class=cov19_per_class,
                n_slices=cov19_slices if cov19_slices is not None else min(slices, 16),
                size=size,
                seed=seed + (0 if split == "train" else 1000),
                split=split,
            )
    summary = {
        "out": str(out),
        "studies": [i.manifest_entry(out) for i in infos],
        "cov19_scans": len(scans),
    }
    if json_out:
        print_json(summary)
        return
    for i in infos:
        stdout.print(
            f"{i.label:9s} {i.ct_dir}  series {i.ct_series_instance_uid}",
            highlight=False,
            soft_wrap=True,
        )
    if scans:
        stdout.print(f"{len(scans)} COV19-CT-DB scans under {out / 'cov19'}", highlight=False)
