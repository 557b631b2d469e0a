"""``ctcovid series PATH``: every series under a folder, usable or not and why."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ctcovid.cli.common import handle_errors, print_json, setup_logging, stdout


@handle_errors
def series(
    path: Annotated[Path, typer.Argument(exists=True, help="A DICOM file or folder tree.")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    min_slices: Annotated[int, typer.Option(help="Slices a series needs to be classified.")] = 8,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """List every series found under PATH: UIDs, modality, instances, usable or not and why.

    Examples:

      ctcovid series /data/incoming

      ctcovid series study/ --json | jq '.series[] | select(.usable)'
    """
    from ctcovid.config import IngestConfig
    from ctcovid.dicom import scan

    setup_logging(verbose)
    report = scan(path, IngestConfig(min_slices=min_slices))
    rows = [
        {
            "study_instance_uid": s.study_instance_uid,
            "series_instance_uid": s.series_instance_uid,
            "modality": s.modality,
            "series_description": s.series_description,
            "n_instances": s.n_instances,
            "n_slices": s.n_slices,
            "slice_thickness_mm": s.instances[0].slice_thickness,
            "usable": s.usable,
            "reason": s.reason,
            "ordering": s.ordering,
            "warnings": s.warnings,
        }
        for s in report.series
    ]
    bad = [{"path": str(b.path), "reason": b.reason} for b in report.bad_files]
    if json_out:
        print_json({"series": rows, "skipped_files": bad, "n_files": report.n_files})
        return
    table = Table(title=f"{len(rows)} series in {report.n_files} files")
    table.add_column("series UID", no_wrap=True)
    for col in ("modality", "instances", "slices", "thickness", "usable", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["series_instance_uid"]),
            str(r["modality"]),
            str(r["n_instances"]),
            str(r["n_slices"]),
            "" if r["slice_thickness_mm"] is None else f"{r['slice_thickness_mm']:g} mm",
            "yes" if r["usable"] else "no",
            str(r["reason"]),
        )
    stdout.print(table)
    for b in bad:
        stdout.print(f"skipped {b['path']}: {b['reason']}", highlight=False)
