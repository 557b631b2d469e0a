"""The ``ctcovid`` command: one thin module per command, heavy imports inside the commands."""

from __future__ import annotations

import typer

from ctcovid import __version__
from ctcovid.cli import (
    batch,
    classify,
    evaluate,
    export,
    fixtures,
    listen,
    preprocess,
    queue,
    series,
    train,
)

app = typer.Typer(
    name="ctcovid",
    help="COVID-19 detection in chest CT: DICOM in, Res-Dense Net, DICOM Structured Report out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctcovid {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """COVID-19 detection in chest CT."""


app.command("series")(series.series)
app.command("preprocess")(preprocess.preprocess)
app.command("classify")(classify.classify)
app.command("fixtures")(fixtures.fixtures)
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("export")(export.export)
app.command("listen")(listen.listen)
app.command("queue")(queue.queue)
app.command("batch")(batch.batch)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
