"""``ctcovid conformance``: the DICOM Conformance Statement of this installation."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ctcovid.cli.common import handle_errors, setup_logging


class Format(StrEnum):
    markdown = "markdown"
    html = "html"
    json = "json"


@handle_errors
def conformance(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            help="TOML file with node settings (as for ctcovid listen). Default: the defaults.",
        ),
    ] = None,
    fmt: Annotated[
        Format, typer.Option("--format", help="markdown, html (self-contained) or json.")
    ] = Format.markdown,
    out: Annotated[
        Path | None, typer.Option("--out", dir_okay=False, help="Write here instead of stdout.")
    ] = None,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Write the DICOM Conformance Statement (PS3.2) of this installation.

    Generated from the constants the node and batch use (SOP classes, transfer syntaxes, AE
    policies, statuses, the SR's content), with --config applied, so it cannot drift from the
    code.

    Examples:

      ctcovid conformance --config node.toml --out conformance.md

      ctcovid conformance --config node.toml --format html --out conformance.html

      ctcovid conformance --format json
    """
    setup_logging(verbose)
    from ctcovid.fsio import write_atomic
    from ctcovid.node.conformance import conformance_statement, render, statement_config

    node_config = statement_config(config)
    text = render(conformance_statement(node_config, config), fmt.value)
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(out, text)
