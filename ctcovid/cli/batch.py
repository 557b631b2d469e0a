"""``ctcovid batch ARCHIVE --out DIR``: reprocess an archive, one results row per series."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from ctcovid.cli.batch_pacs import (
    AccessionsOption,
    AeTitleOption,
    AuthFileOption,
    BodyPartOption,
    CacheGbOption,
    CaFileOption,
    DescriptionOption,
    FromDicomWebOption,
    FromPacsOption,
    MaxInstanceMbOption,
    MaxRetrievalsOption,
    ModalityOption,
    MoveBindOption,
    MoveDestOption,
    QueryOption,
    QueryPauseOption,
    RetrieveDeadlineOption,
    SendToOption,
    StowAuthFileOption,
    StowOption,
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    destinations,
    pacs_source,
)
from ctcovid.cli.common import (
    RUNTIME_HELP,
    AuditCaOption,
    AuditFileOption,
    AuditSyslogOption,
    ModelOption,
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

    from ctcovid.batch.results import STATUSES, BatchProgress

    if quiet:
        return None, BatchProgress()

    bars = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}", markup=False),
        TextColumn("{task.fields[rate]}", style="cyan", markup=False),
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
            self.counts = dict.fromkeys(STATUSES, 0)
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
                f"({self.counts['failed'] + self.counts['incomplete']} failed)",
            )

    return bars, Bars()


@handle_errors
def batch(
    out: Annotated[Path, typer.Option("--out", help="Output folder (results, SRs, index).")],
    archive: Annotated[
        Path | None,
        typer.Argument(
            exists=True, help="Folder tree of DICOM files (any layout); not with --from-pacs."
        ),
    ] = None,
    model: ModelOption = None,
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
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Kept for compatibility: series are scored in fixed batches of their own.",
        ),
    ] = 32,
    decoder_memory_mb: Annotated[
        int,
        typer.Option(
            min=0,
            help="Address-space limit of each decode process in MiB (0: none); a series whose "
            "files need more fails alone, with the reason.",
        ),
    ] = 4096,
    runtime: Annotated[
        Runtime,
        typer.Option(help=RUNTIME_HELP),
    ] = Runtime.auto,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
    from_pacs: FromPacsOption = None,
    from_dicomweb: FromDicomWebOption = None,
    query: QueryOption = None,
    modality: ModalityOption = None,
    accessions: AccessionsOption = None,
    body_part: BodyPartOption = None,
    series_description: DescriptionOption = None,
    cache_gb: CacheGbOption = 10.0,
    max_retrievals: MaxRetrievalsOption = 1,
    query_pause: QueryPauseOption = 0.5,
    ae_title: AeTitleOption = "CTCOVID",
    move_port: MoveDestOption = None,
    move_bind: MoveBindOption = None,
    max_instance_mb: MaxInstanceMbOption = 1024.0,
    retrieve_deadline: RetrieveDeadlineOption = 1800.0,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_ca: TlsCaOption = None,
    auth_file: AuthFileOption = None,
    ca_file: CaFileOption = None,
    send_to: SendToOption = None,
    stow: StowOption = None,
    stow_auth_file: StowAuthFileOption = None,
    audit_file: AuditFileOption = None,
    audit_syslog: AuditSyslogOption = None,
    audit_ca: AuditCaOption = None,
) -> None:
    """Classify every usable CT series of an archive; one row per series in DIR/results.csv.

    Writes DIR/index.sqlite (every file: instance, duplicate or bad, and why), DIR/results.csv
    (status classified | skipped | failed | incomplete, appended as series finish), DIR/sr/ (one
    SR per classified series) and DIR/summary.json. After an interruption, --resume finishes the
    rest. A folder belongs to one model: another model needs a new --out.

    Examples:

      ctcovid batch /archive/ct --out runs/2024-06 --model models/v1

      ctcovid batch /archive/ct --out runs/2024-06 --model models/v1 --resume

      ctcovid batch /shared/archive --out /shared/runs/a --engine ray --ray-address auto

      ctcovid batch --from-pacs pacs:104:PACS --query StudyDate=20200301-20210630 --out runs/c

      ctcovid batch --from-dicomweb https://vna/dicom-web --accessions acc.txt --out runs/a

    From a PACS, DIR/pacs.sqlite lists the series found, DIR/cache/ holds retrieved series
    until they are classified (at most --cache-gb), and nothing on the PACS is changed.
    """
    setup_logging(verbose, quiet=quiet)
    quiet_keras()
    from ctcovid.batch.job import run_batch
    from ctcovid.batch.options import BatchOptions, default_workers
    from ctcovid.errors import ConfigError, ModelError
    from ctcovid.model.artifact import default_model_path, missing_model_message

    source = pacs_source(
        from_pacs=from_pacs,
        from_dicomweb=from_dicomweb,
        query=query,
        modality=modality,
        accessions=accessions,
        body_part=body_part,
        series_description=series_description,
        cache_gb=cache_gb,
        max_retrievals=max_retrievals,
        query_pause=query_pause,
        ae_title=ae_title,
        move_port=move_port,
        auth_file=auth_file,
        ca_file=ca_file,
        move_bind=move_bind,
        max_instance_mb=max_instance_mb,
        retrieve_deadline_seconds=retrieve_deadline,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        spool_dir=out / "spool",
    )
    if (archive is None) == (source is None):
        raise ConfigError("give an ARCHIVE folder, or --from-pacs / --from-dicomweb (one of them)")
    if any(p is not None for p in (tls_cert, tls_key, tls_ca)) and not (from_pacs or send_to):
        raise ConfigError(
            "--tls-cert/--tls-key/--tls-ca secure DICOM associations (--from-pacs, --send-to); "
            "DICOMweb uses --ca-file"
        )
    sends = destinations(
        send_to=send_to,
        stow=stow,
        stow_auth_file=stow_auth_file,
        ca_file=ca_file,
        ae_title=ae_title,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    if audit_syslog:
        from ctcovid.audit import parse_endpoint

        parse_endpoint(audit_syslog)
        if audit_ca is None:
            raise ConfigError("--audit-syslog needs --audit-ca (the repository's CA, PEM)")
    model_path = model or default_model_path()
    if not model_path.exists():
        raise ModelError(missing_model_message(model_path))
    options = BatchOptions(
        # A PACS run's archive is its cache: the folder the series are read from.
        archive=archive if archive is not None else out / "cache",
        out=out,
        model_path=model_path,
        resume=resume,
        workers=default_workers() if workers is None else workers,
        engine=engine.value,
        batch_size=batch_size,
        ray_address=ray_address,
        source=source,
        destinations=sends,
        decoder_memory_mb=decoder_memory_mb,
        runtime=runtime.value,
        audit_file=audit_file,
        audit_syslog=audit_syslog,
        audit_ca=audit_ca,
    )
    # Redrawn bars come out as broken lines in a log or a pipe: bars only on a terminal.
    bars, progress = _progress_bars(quiet or json_out or not console.is_terminal)
    try:
        if bars is not None:
            with bars:
                summary = run_batch(options, progress)
        else:
            summary = run_batch(options, progress)
    finally:
        if source is not None:
            source.close()
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
        f"{counts['failed']} failed"
        + (f", {counts['incomplete']} incomplete" if counts.get("incomplete") else "")
        + f"; {summary['index']['bad_files']} file(s) not usable. "
        f"This run: {run['slices_classified']} slices, {run['slices_per_second'] or 0:.1f} "
        f"slices/s, {run['wall_seconds']:.1f} s. Results: {summary['results_csv']}",
        highlight=False,
    )
