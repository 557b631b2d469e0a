"""``ctcovid batch ARCHIVE --out DIR``: reprocess an archive, one results row per series."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from ctcovid.cli.common import (
    Runtime,
    console,
    handle_errors,
    print_json,
    quiet_keras,
    setup_logging,
    stdout,
)


class Engine(StrEnum):
    local = "local"
    ray = "ray"


def _progress_bars(quiet: bool) -> tuple[Any, Any]:
    """A rich ``Progress`` (or None when quiet) and the ``BatchProgress`` that drives it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ctcovid.batch.pipeline import BatchProgress

    if quiet:
        return None, BatchProgress()

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )

    class Bars(BatchProgress):
        index_task: Any = None
        classify_task: Any = None
        counts: dict[str, int]

        def index_started(self, n_files: int) -> None:
            self.index_task = bars.add_task("indexing", total=n_files, unit="files", rate="")

        def index_advanced(self, n_done: int, n_total: int) -> None:
            task = bars.tasks[self.index_task]
            speed = task.finished_speed or task.speed
            bars.update(self.index_task, completed=n_done, rate=f"{speed:.0f}/s" if speed else "")

        def classify_started(self, n_series: int, n_slices: int) -> None:
            self.counts = {"classified": 0, "skipped": 0, "failed": 0}
            self.n_series = n_series
            self.classify_task = bars.add_task(
                f"classifying 0/{n_series} series", total=n_slices, unit="slices", rate=""
            )

        def series_finished(self, row: Any, n_slices: int) -> None:
            self.counts[row.status] += 1
            bars.advance(self.classify_task, n_slices)
            task = bars.tasks[self.classify_task]
            done = sum(self.counts.values())
            bars.update(
                self.classify_task,
                rate=f"{task.speed:.1f}/s" if task.speed else "",
                description=f"classifying {done}/{self.n_series} series "
                f"({self.counts['failed']} failed)",
            )

    return bars, Bars()


@handle_errors
def batch(
    archive: Annotated[
        Path, typer.Argument(exists=True, help="Folder tree of DICOM files (any layout).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (results, SRs, index).")],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Model folder. Default: $CTCOVID_MODEL, else ~/.local/share/ctcovid/model."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Finish an interrupted run in --out (same model and archive).")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0, help="Decode processes (0: decode in the inference process). Default: cores - 1."
        ),
    ] = None,
    engine: Annotated[Engine, typer.Option(help="local: this machine; ray: a Ray cluster.")] = (
        Engine.local
    ),
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join (e.g. ray://head:10001 or auto). "
            "Default: a local Ray instance."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per model batch.")] = 32,
    runtime: Annotated[
        Runtime,
        typer.Option(
            help="How the model runs: auto (fastest graph the model folder holds: int8, onnx, "
            "then keras), keras, onnx (fp32 graph) or int8; see 'ctcovid export'."
        ),
    ] = Runtime.auto,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """Classify every usable CT series of an archive; one row per series in DIR/results.csv.

    Writes DIR/index.sqlite (every file: instance, duplicate or bad, and why), DIR/results.csv
    (status classified | skipped | failed, appended as series finish), DIR/sr/ (one SR per
    classified series) and DIR/summary.json. After an interruption, --resume finishes the rest.
    A folder belongs to one model: another model needs a new --out.

    Examples:

      ctcovid batch /archive/ct --out runs/2024-06 --model models/v1

      ctcovid batch /archive/ct --out runs/2024-06 --model models/v1 --resume

      ctcovid batch /shared/archive --out /shared/runs/a --engine ray --ray-address auto
    """
    setup_logging(verbose, quiet=quiet)
    quiet_keras()
    from ctcovid.batch.pipeline import BatchOptions, default_workers, run_batch
    from ctcovid.errors import ModelError
    from ctcovid.model.artifact import default_model_path, missing_model_message

    model_path = model or default_model_path()
    if not model_path.exists():
        raise ModelError(missing_model_message(model_path))
    options = BatchOptions(
        archive=archive,
        out=out,
        model_path=model_path,
        resume=resume,
        workers=default_workers() if workers is None else workers,
        engine=engine.value,
        batch_size=batch_size,
        ray_address=ray_address,
        runtime=runtime.value,
    )
    bars, progress = _progress_bars(quiet or json_out)
    if bars is not None:
        with bars:
            summary = run_batch(options, progress)
    else:
        summary = run_batch(options, progress)
    if json_out:
        print_json(summary)
        return
    if quiet:
        return
    counts = summary["counts"]
    run = summary["this_run"]
    stdout.print(
        f"{summary['series']} series: {counts['classified']} classified "
        f"({summary['positives']} positive), {counts['skipped']} skipped, "
        f"{counts['failed']} failed; {summary['index']['bad_files']} file(s) not usable. "
        f"This run: {run['slices_classified']} slices, {run['slices_per_second'] or 0:.1f} "
        f"slices/s, {run['wall_seconds']:.1f} s. Results: {summary['results_csv']}",
        highlight=False,
    )
