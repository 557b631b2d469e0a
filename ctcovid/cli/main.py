"""The ``ctcovid`` command: one thin module per command, heavy imports inside the commands."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from ctcovid import __version__
from ctcovid.cli import (
    batch,
    classify,
    conformance,
    evaluate,
    export,
    fixtures,
    http_credentials,
    listen,
    preprocess,
    pseudonymize,
    queue,
    rules,
    series,
    train,
)

USAGE_ERROR = 1
# Typer ships its own copy of Click; its usage error is the base class of typer.BadParameter.
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]


class _Commands(TyperGroup):
    """The command group, with Click's usage errors (bad flag, missing argument) exiting 1.

    Exit codes: 0 success, 1 bad usage or bad input (a one-line reason), 2 internal failure,
    130 interrupted. Click's own default for usage errors is 2, which a script could not tell
    from an internal failure.
    """

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _UsageError as exc:
            exc.exit_code = USAGE_ERROR  # type: ignore[attr-defined]
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            exc.exit_code = USAGE_ERROR  # type: ignore[attr-defined]
            raise


app = typer.Typer(
    cls=_Commands,
    name="ctcovid",
    help="COVID-19 detection in chest CT: DICOM in, Res-Dense Net, DICOM Structured Report out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help layout: rich's (boxes, markup) costs about 70 ms of imports per --help.
    rich_markup_mode=None,
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
app.command("http-credentials")(http_credentials.http_credentials)
app.command("batch")(batch.batch)
app.command("conformance")(conformance.conformance)
app.add_typer(rules.app)
app.command("pseudonymize")(pseudonymize.pseudonymize)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
