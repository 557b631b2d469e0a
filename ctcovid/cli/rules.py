"""``ctcovid rules test``: which routing rule each series under a folder matches, and why."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ctcovid.cli.common import handle_errors, print_json, setup_logging, stdout

app = typer.Typer(
    name="rules",
    help="The node's routing rules ([[rule]] in its TOML).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@app.command("test")
@handle_errors
def test(
    path: Annotated[Path, typer.Argument(exists=True, help="A DICOM file or folder tree.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            help="The node's TOML file (as for ctcovid listen). Default: no rules (classify all).",
        ),
    ] = None,
    calling_aet: Annotated[
        str, typer.Option(help="The calling AE title to test CallingAETitle conditions with.")
    ] = "",
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """For each series under PATH, the rule the node would apply, and every condition it
    checked with the series' value. Nothing is classified and the model is not loaded.

    Examples:

      ctcovid rules test /data/incoming --config node.toml

      ctcovid rules test study/ --config node.toml --calling-aet CT_SCANNER_2 --json
    """
    import pydicom

    from ctcovid.config import IngestConfig
    from ctcovid.dicom import scan
    from ctcovid.dicom.rules import decide
    from ctcovid.node.config import load_settings

    setup_logging(verbose)
    rules = load_settings(config).rules
    report = scan(path, IngestConfig())
    rows: list[dict[str, Any]] = []
    for series in report.series:
        header = pydicom.Dataset()
        for instance in sorted(series.instances, key=lambda i: str(i.path)):
            try:
                header = pydicom.dcmread(instance.path, stop_before_pixels=True)
                break
            except Exception:
                continue
        decision = decide(rules, header, calling_aet)
        rows.append(
            {
                "study_instance_uid": series.study_instance_uid,
                "series_instance_uid": series.series_instance_uid,
                "series_description": series.series_description,
                "n_instances": series.n_instances,
            }
            | decision.to_dict()
        )
    if json_out:
        print_json({"series": rows, "n_files": report.n_files})
        return
    for row in rows:
        stdout.print(
            f"{row['series_instance_uid']} ({row['series_description'] or 'no description'}, "
            f"{row['n_instances']} instances): rule {row['rule']!r} -> {row['action']}",
            highlight=False,
        )
        for tried in row["tried"]:
            verdict = "matches" if tried["matched"] else "does not match"
            stdout.print(f"  rule {tried['rule']!r} {verdict}", highlight=False)
            for c in tried["conditions"]:
                mark = "yes" if c["matched"] else "no "
                value = "absent" if c["value"] is None else repr(c["value"])
                stdout.print(
                    f"    [{mark}] {c['keyword']} {c['condition']}: {value}", highlight=False
                )
    if not rows:
        stdout.print(f"no DICOM series under {path}", highlight=False)
