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
    stack_rule: Annotated[
        str,
        typer.Option(
            help="How one stack (reconstruction) of a series is chosen: criteria in order, "
            "from original, thinnest, thickest, most."
        ),
    ] = "original,thinnest,most",
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """List every series found under PATH: UIDs, modality, instances, usable or not and why.

    A series holding several reconstructions is split into stacks (kernel, slice thickness,
    ImageType, orientation, repeated acquisitions); each stack is listed, and the one that
    would be classified is marked.

    Examples:

      ctcovid series /data/incoming

      ctcovid series study/ --json | jq '.series[] | select(.usable)'
    """
    from ctcovid.config import IngestConfig
    from ctcovid.dicom import scan

    setup_logging(verbose)
    report = scan(path, IngestConfig(min_slices=min_slices, stack_rule=stack_rule))
    rows = [
        {
            "study_instance_uid": s.study_instance_uid,
            "series_instance_uid": s.series_instance_uid,
            "modality": s.modality,
            "series_description": s.series_description,
            "n_instances": s.n_instances,
            "n_slices": s.n_slices,
            "slice_thickness_mm": (s.stack or s.instances[0]).slice_thickness,
            "usable": s.usable,
            "reason": s.reason,
            "ordering": s.ordering,
            "stack": s.stack.to_dict() if s.stack is not None else None,
            "stacks": [
                st.to_dict() | {"chosen": st is s.stack, "usable": st.usable, "reason": st.reason}
                for st in s.stacks
            ],
            "n_slices_dropped": s.n_slices_dropped,
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
        thickness = r["slice_thickness_mm"]
        table.add_row(
            str(r["series_instance_uid"]),
            str(r["modality"]),
            str(r["n_instances"]),
            str(r["n_slices"]),
            "" if thickness is None else f"{thickness:g} mm",
            "yes" if r["usable"] else "no",
            str(r["reason"]),
        )
    stdout.print(table)
    for s in report.series:
        if len(s.stacks) > 1:  # several reconstructions: which one would be classified
            stdout.print(f"{s.series_instance_uid}: {len(s.stacks)} stacks", highlight=False)
            for st in s.stacks:
                mark = "*" if st is s.stack else " "
                state = "usable" if st.usable else st.reason
                stdout.print(f"  {mark} {st.describe()}: {state}", highlight=False, soft_wrap=True)
    for b in bad:
        stdout.print(f"skipped {b['path']}: {b['reason']}", highlight=False)
