"""The PACS options of ``ctcovid batch``: where series come from and where SRs go."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ctcovid.errors import ConfigError

if TYPE_CHECKING:  # imported when used: ``ctcovid --help`` stays instant
    from ctcovid.batch.sources import PacsSource
    from ctcovid.net.sender import SendSettings

_PACS = "PACS source"
_DEST = "SR destinations"

FromPacsOption = Annotated[
    str | None,
    typer.Option(
        "--from-pacs",
        metavar="HOST:PORT:AET",
        help="Read the studies from a PACS by C-FIND and C-GET (or C-MOVE, --move-dest).",
        rich_help_panel=_PACS,
    ),
]
FromDicomWebOption = Annotated[
    str | None,
    typer.Option(
        "--from-dicomweb",
        metavar="URL",
        help="Read the studies from a DICOMweb service (QIDO-RS, WADO-RS). Credentials: "
        "$CTCOVID_DICOMWEB_AUTH or --auth-file ('Bearer TOKEN' or 'Basic USER:PASSWORD').",
        rich_help_panel=_PACS,
    ),
]
QueryOption = Annotated[
    list[str] | None,
    typer.Option(
        "--query",
        metavar="KEY=VALUE",
        help="Study-level matching key, e.g. StudyDate=20200301-20210630 (repeatable).",
        rich_help_panel=_PACS,
    ),
]
ModalityOption = Annotated[
    list[str] | None,
    typer.Option(
        "--modality",
        help="Series modality to retrieve (repeatable). Default: CT.",
        rich_help_panel=_PACS,
    ),
]
AccessionsOption = Annotated[
    Path | None,
    typer.Option(
        "--accessions",
        exists=True,
        dir_okay=False,
        help="File of accession numbers, one per line: one study query each.",
        rich_help_panel=_PACS,
    ),
]
BodyPartOption = Annotated[
    list[str] | None,
    typer.Option(
        "--body-part",
        metavar="PATTERN",
        help="Retrieve only series whose BodyPartExamined matches (e.g. 'CHEST', repeatable).",
        rich_help_panel=_PACS,
    ),
]
DescriptionOption = Annotated[
    list[str] | None,
    typer.Option(
        "--series-description",
        metavar="PATTERN",
        help="Retrieve only series whose SeriesDescription matches (e.g. '*lung*', repeatable).",
        rich_help_panel=_PACS,
    ),
]
CacheGbOption = Annotated[
    float,
    typer.Option(
        "--cache-gb",
        min=0.001,
        help="Bound of the local cache of retrieved series (DIR/cache).",
        rich_help_panel=_PACS,
    ),
]
MaxRetrievalsOption = Annotated[
    int,
    typer.Option(
        "--max-retrievals",
        min=1,
        max=16,
        help="Series retrieved at the same time.",
        rich_help_panel=_PACS,
    ),
]
QueryPauseOption = Annotated[
    float,
    typer.Option(
        "--query-pause",
        min=0.0,
        help="Seconds between two requests to the PACS.",
        rich_help_panel=_PACS,
    ),
]
AeTitleOption = Annotated[
    str,
    typer.Option(
        "--ae-title", help="Our AE title (calling AE; C-MOVE destination).", rich_help_panel=_PACS
    ),
]
MoveDestOption = Annotated[
    int | None,
    typer.Option(
        "--move-port",
        metavar="PORT",
        help="Retrieve by C-MOVE to our own storage SCP on this port (the PACS must know "
        "--ae-title at this host and port) instead of C-GET.",
        rich_help_panel=_PACS,
    ),
]
MoveBindOption = Annotated[
    str | None,
    typer.Option(
        "--move-bind",
        metavar="ADDRESS",
        help="Address the C-MOVE receiver listens on (needed with --move-port): the one the "
        "PACS reaches us at, e.g. this host's IP. Only the PACS's AE title may store into it.",
        rich_help_panel=_PACS,
    ),
]
MaxInstanceMbOption = Annotated[
    float,
    typer.Option(
        "--max-instance-mb",
        min=0.001,
        help="Refuse (and stop the retrieval of) any instance larger than this, as the "
        "listener does; instances are received to disk, never held in memory.",
        rich_help_panel=_PACS,
    ),
]
RetrieveDeadlineOption = Annotated[
    float,
    typer.Option(
        "--retrieve-deadline",
        min=1.0,
        metavar="SECONDS",
        help="Give up on a query or a series retrieval that has not finished after this long "
        "(a stalled or trickling PACS): the series becomes a failed row and the run goes on.",
        rich_help_panel=_PACS,
    ),
]
TlsCertOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        exists=True,
        dir_okay=False,
        help="Our TLS certificate (PEM) for every DICOM association: C-FIND, C-GET, C-MOVE and "
        "the C-MOVE receiver of --from-pacs, and the C-STORE of --send-to.",
        rich_help_panel=_PACS,
    ),
]
TlsKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-key",
        exists=True,
        dir_okay=False,
        help="The private key (PEM) of --tls-cert.",
        rich_help_panel=_PACS,
    ),
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        exists=True,
        dir_okay=False,
        help="CA certificates (PEM) the PACS's certificate must be signed by; any TLS option "
        "turns TLS on for --from-pacs and --send-to (default CAs: the system's).",
        rich_help_panel=_PACS,
    ),
]
AuthFileOption = Annotated[
    Path | None,
    typer.Option(
        "--auth-file",
        exists=True,
        dir_okay=False,
        help="Credentials for --from-dicomweb, read from this file.",
        rich_help_panel=_PACS,
    ),
]
CaFileOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        exists=True,
        dir_okay=False,
        help="CA certificates to verify DICOMweb servers with (default: certifi's bundle; "
        "REQUESTS_CA_BUNDLE and ~/.netrc are not read).",
        rich_help_panel=_PACS,
    ),
]
SendToOption = Annotated[
    str | None,
    typer.Option(
        "--send-to",
        metavar="HOST:PORT:AET",
        help="Also C-STORE every SR to this peer (retried; outcome in DIR/sent.sqlite).",
        rich_help_panel=_DEST,
    ),
]
StowOption = Annotated[
    str | None,
    typer.Option(
        "--stow",
        metavar="URL",
        help="Also STOW-RS every SR to this DICOMweb service. Credentials: "
        "$CTCOVID_STOW_AUTH or --stow-auth-file.",
        rich_help_panel=_DEST,
    ),
]
StowAuthFileOption = Annotated[
    Path | None,
    typer.Option(
        "--stow-auth-file",
        exists=True,
        dir_okay=False,
        help="Credentials for --stow, read from this file.",
        rich_help_panel=_DEST,
    ),
]


def pacs_source(
    *,
    from_pacs: str | None,
    from_dicomweb: str | None,
    query: list[str] | None,
    modality: list[str] | None,
    accessions: Path | None,
    body_part: list[str] | None,
    series_description: list[str] | None,
    cache_gb: float,
    max_retrievals: int,
    query_pause: float,
    ae_title: str,
    move_port: int | None,
    auth_file: Path | None,
    ca_file: Path | None,
    move_bind: str | None = None,
    max_instance_mb: float = 1024.0,
    retrieve_deadline_seconds: float = 1800.0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
    spool_dir: Path | None = None,
) -> PacsSource | None:
    """The PACS to read from, or None for a folder archive.

    ``retrieve_deadline_seconds`` bounds each association or series retrieval, and
    ``max_instance_mb`` each retrieved instance, by DIMSE and by DICOMweb alike. TLS is on for
    ``--from-pacs`` when any of ``tls_cert``/``tls_key``/``tls_ca`` is given; ``spool_dir``
    (beside the cache) receives retrieved instances before they enter it.
    """
    from ctcovid.batch.sources import PacsSource
    from ctcovid.net.peers import Peer, check_ae_title
    from ctcovid.net.query import SeriesRules, StudyQuery

    if from_pacs and from_dicomweb:
        raise ConfigError("give --from-pacs or --from-dicomweb, not both")
    if not from_pacs and not from_dicomweb:
        used = [
            name
            for name, v in (
                ("--query", query),
                ("--accessions", accessions),
                ("--move-port", move_port),
                ("--move-bind", move_bind),
            )
            if v
        ]
        if used:
            raise ConfigError(f"{', '.join(used)} need --from-pacs or --from-dicomweb")
        return None
    modalities = tuple(modality or ("CT",))
    study_query = StudyQuery.parse(query or [], accessions_file=accessions, modalities=modalities)
    rules = SeriesRules(
        modalities=study_query.modalities,
        body_parts=tuple(body_part or ()),
        descriptions=tuple(series_description or ()),
    )
    archive: object
    if from_pacs:
        from ctcovid.net.dimse import DimseArchive, MoveReceiver
        from ctcovid.net.tls import client_ssl_context, server_ssl_context

        calling = check_ae_title(ae_title, "--ae-title")
        peer = Peer.parse(from_pacs)
        tls = any(p is not None for p in (tls_cert, tls_key, tls_ca))
        receiver = None
        if move_port is not None:
            if not move_bind:
                raise ConfigError(
                    "--move-port needs --move-bind ADDRESS: the address the PACS sends to "
                    "(this host's IP, or 0.0.0.0 for every interface)"
                )
            receiver = MoveReceiver(
                calling,
                move_port,
                host=move_bind,
                allow_ae_titles=(peer.ae_title,),
                max_instance_mb=max_instance_mb,
                spool_dir=spool_dir,
                ssl_context=(
                    server_ssl_context(cert=tls_cert, key=tls_key, ca=tls_ca) if tls else None
                ),
            )
        elif move_bind:
            raise ConfigError("--move-bind is for --move-port (C-MOVE)")
        archive = DimseArchive(
            peer,
            calling_ae_title=calling,
            move_receiver=receiver,
            max_instance_mb=max_instance_mb,
            deadline_seconds=retrieve_deadline_seconds,
            spool_dir=spool_dir,
            ssl_context=(
                client_ssl_context(cert=tls_cert, key=tls_key, ca=tls_ca) if tls else None
            ),
        )
    else:
        from ctcovid.net.dicomweb import AUTH_ENV, DicomWebArchive, HttpAuth

        assert from_dicomweb is not None
        if move_port is not None or move_bind:
            raise ConfigError("--move-port and --move-bind are for --from-pacs (DIMSE)")
        limits: dict[str, Any] = {
            "deadline_seconds": retrieve_deadline_seconds,
            "max_instance_bytes": int(max_instance_mb * 1024 * 1024),
        }
        archive = DicomWebArchive(
            from_dicomweb, HttpAuth.load(AUTH_ENV, auth_file), ca_file=ca_file, **limits
        )
    return PacsSource(
        archive,  # type: ignore[arg-type]
        study_query,
        rules,
        cache_bytes=int(cache_gb * 1e9),
        max_retrievals=max_retrievals,
        pause_seconds=query_pause,
    )


def destinations(
    *,
    send_to: str | None,
    stow: str | None,
    stow_auth_file: Path | None,
    ca_file: Path | None,
    ae_title: str,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> tuple[SendSettings, ...]:
    """Where the SRs go; the TLS files, when given, also secure ``--send-to``."""
    from ctcovid.net.dicomweb import STOW_AUTH_ENV, HttpAuth
    from ctcovid.net.sender import SendSettings

    out = []
    if send_to:
        out.append(
            SendSettings.c_store(
                send_to,
                calling_ae_title=ae_title,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_ca=tls_ca,
            )
        )
    if stow:
        out.append(
            SendSettings.stow_rs(
                stow, auth=HttpAuth.load(STOW_AUTH_ENV, stow_auth_file), ca_file=ca_file
            )
        )
    return tuple(out)
