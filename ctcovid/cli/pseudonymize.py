"""``ctcovid pseudonymize RUN_DIR --key KEYFILE --out DIR``: the research export of a batch run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctcovid.cli.common import handle_errors, print_json, setup_logging, stdout

KeyOption = Annotated[
    Path,
    typer.Option(
        "--key",
        metavar="KEYFILE",
        help="The secret key (at least 32 bytes; e.g. 'openssl rand -hex 32 > research.key'). "
        "The same key gives the same pseudonyms.",
    ),
]


@handle_errors
def pseudonymize(
    run_dir: Annotated[
        Path,
        typer.Argument(exists=True, file_okay=False, help="The --out folder of 'ctcovid batch'."),
    ],
    key: KeyOption,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="The export folder (new, or an earlier export made with the same key)."
        ),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Write a pseudonymised copy of a batch run's results.csv and SRs for research.

    Patient ID and accession number become keyed pseudonyms (HMAC-SHA256), UIDs become 2.25
    UIDs derived from the key, dates move back by a per-patient number of days, and the SRs are
    de-identified following PS3.15 Annex E (README: "A pseudonymised research export"). The
    key is never written anywhere; export.json names it by a key id only.

    Examples:

      ctcovid pseudonymize runs/2024-06 --key ~/secret/research.key --out export/2024-06

      ctcovid pseudonymize runs/2024-06 --key research.key --out runs/2024-06/research --json
    """
    setup_logging(verbose)
    from ctcovid.batch.research import check_export_folder, export_run
    from ctcovid.report.deid import PseudonymKey

    secret = PseudonymKey.from_file(key)
    check_export_folder(out, secret)
    summary = export_run(run_dir, out, secret)
    if json_out:
        print_json(summary)
        return
    stdout.print(
        f"{summary['rows']} rows, {summary['srs']} SRs de-identified (key id "
        f"{summary['key_id']}). Results: {summary['results_csv']}",
        highlight=False,
    )
