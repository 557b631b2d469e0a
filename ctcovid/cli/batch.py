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
    Hl7Option,
    Hl7PriorityFieldOption,
    Hl7PriorityOption,
    Hl7ReceivingApplicationOption,
    Hl7ReceivingFacilityOption,
    Hl7SendingApplicationOption,
    Hl7SendingFacilityOption,
    Hl7TlsOption,
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
    result_card: Annotated[
        bool,
        typer.Option(
            "--result-card",
            help="Also write a result card (a DICOM Secondary Capture stating the result, for "
            "viewers that show no SR) per SR in DIR/cards, sent with the SR (--engine local).",
        ),
    ] = False,
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
    hl7: Hl7Option = None,
    hl7_tls: Hl7TlsOption = None,
    hl7_sending_application: Hl7SendingApplicationOption = None,
    hl7_sending_facility: Hl7SendingFacilityOption = None,
    hl7_receiving_application: Hl7ReceivingApplicationOption = None,
    hl7_receiving_facility: Hl7ReceivingFacilityOption = None,
    hl7_priority: Hl7PriorityOption = None,
    hl7_priority_field: Hl7PriorityFieldOption = None,
    pseudonymize: Annotated[
        Path | None,
        typer.Option(
            "--pseudonymize",
            metavar="KEYFILE",
            help="Also write a pseudonymised research export to DIR/research with this secret "
            "key (see 'ctcovid pseudonymize').",
        ),
    ] = None,
) -> None:
    """Classify every usable CT series of an archive; one row per series in DIR/results.csv.

    Writes DIR/index.sqlite (every file: instance, duplicate or bad, and why), DIR/results.csv
    (status classified | skipped | failed | incomplete, appended as series finish), DIR/sr/ (one
    SR per classified series) and DIR/summary.json. After an interruption, --resume finishes the
    rest. A folder belongs to one model: another model needs a new --out.

    Examples:

      ctcovid batch /archive/ct --out runs/2024-06 --model models/v1

      ctcovid batch /archive/ct --out runs/2024-06 --model models/v1 --resume

      ctcovid batch /archive/ct --out runs/c --send-to pacs:104:PACS --result-card

      ctcovid batch /shared/archive --out /shared/runs/a --engine ray --ray-address auto

      ctcovid batch --from-pacs pacs:104:PACS --query StudyDate=20200301-20210630 --out runs/c

      ctcovid batch --from-dicomweb https://vna/dicom-web --accessions acc.txt --out runs/a

      ctcovid batch /archive/ct --out runs/b --hl7 ris:2575 --hl7-receiving-application RIS

    With --pseudonymize KEYFILE, DIR/research/ gets results.csv with keyed pseudonyms and
    remapped UIDs and the SRs de-identified (PS3.15 Annex E), for a research team; the rest of
    DIR stays the site's.

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
    if any(p is not None for p in (tls_cert, tls_key, tls_ca)) and not (
        from_pacs or send_to or hl7_tls
    ):
        raise ConfigError(
            "--tls-cert/--tls-key/--tls-ca secure DICOM associations (--from-pacs, --send-to) "
            "and MLLP to the RIS (--hl7-tls); DICOMweb uses --ca-file"
        )
    if hl7_tls and not hl7:
        raise ConfigError("--hl7-tls needs --hl7 HOST:PORT (the RIS's MLLP listener)")
    sends: tuple[Any, ...] = destinations(
        send_to=send_to,
        stow=stow,
        stow_auth_file=stow_auth_file,
        ca_file=ca_file,
        ae_title=ae_title,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    if hl7:
        from ctcovid.net.mllp import Endpoint, Hl7Settings, MllpSettings
        from ctcovid.report.oru import (
            DEFAULT_PRIORITY,
            DEFAULT_PRIORITY_FIELDS,
            OruSettings,
            parse_priority,
        )

        named = {
            "sending_application": hl7_sending_application,
            "sending_facility": hl7_sending_facility,
            "receiving_application": hl7_receiving_application,
            "receiving_facility": hl7_receiving_facility,
        }
        oru = OruSettings(
            **{k: v for k, v in named.items() if v is not None},
            priority=parse_priority(hl7_priority) if hl7_priority else DEFAULT_PRIORITY,
            priority_fields=tuple(hl7_priority_field or DEFAULT_PRIORITY_FIELDS),
        )
        mllp = MllpSettings(
            Endpoint.parse(hl7, "--hl7"),
            tls=bool(hl7_tls),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
        )
        mllp.ssl_context()  # an unreadable certificate or CA stops the batch now
        sends = (*sends, Hl7Settings(mllp, oru))
    if audit_syslog:
        from ctcovid.audit import parse_endpoint

        parse_endpoint(audit_syslog)
        if audit_ca is None:
            raise ConfigError("--audit-syslog needs --audit-ca (the repository's CA, PEM)")
    research_key = None
    if pseudonymize is not None:  # refused now, not after hours of classification
        from ctcovid.batch.research import RESEARCH_DIR, check_export_folder
        from ctcovid.report.deid import PseudonymKey

        research_key = PseudonymKey.from_file(pseudonymize)
        check_export_folder(out / RESEARCH_DIR, research_key)
    if result_card and engine == Engine.ray:
        raise ConfigError(
            "--result-card needs --engine local: the Ray engine keeps the slices on its workers, "
            "and the card shows the key slice"
        )
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
        research_key=research_key,
        result_card=result_card,
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
        f"slices/s, {run['wall_seconds']:.1f} s. Results: {summary['results_csv']}"
        + (f"; result cards: {summary['card_dir']}" if "card_dir" in summary else ""),
        highlight=False,
    )
    if "research" in summary:
        research = summary["research"]
        stdout.print(
            f"Research export: {research['rows']} rows, {research['srs']} SRs de-identified "
            f"(key id {research['key_id']}) in {research['out']}",
            highlight=False,
        )
