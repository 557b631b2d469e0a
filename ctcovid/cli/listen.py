"""``ctcovid listen``: run the DICOM node (receive CT, classify complete series, send SRs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

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
    handle_errors,
    setup_logging,
)


@handle_errors
def listen(
    config: Annotated[
        Path | None,
        typer.Option("--config", exists=True, dir_okay=False, help="TOML file with node settings."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port to listen on (0: any free port). Default 11112.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind. Default 0.0.0.0.")] = None,
    ae_title: Annotated[str | None, typer.Option(help="Our AE title. Default CTCOVID.")] = None,
    peer: Annotated[
        str | None, typer.Option(help="Where SRs go, HOST:PORT:AET (usually PACS).")
    ] = None,
    stow: Annotated[
        str | None,
        typer.Option(
            help="Send SRs by STOW-RS to this DICOMweb URL instead of C-STORE to --peer. "
            "Credentials: $CTCOVID_STOW_AUTH or --stow-auth-file ('Bearer TOKEN' or "
            "'Basic USER:PASSWORD'); TLS always verified."
        ),
    ] = None,
    stow_auth_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Credentials for --stow, from this file."),
    ] = None,
    stow_ca_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="CA (PEM) the --stow service's certificate must be signed by. Default: the "
            "system's.",
        ),
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="Folder for received instances, SRs and the job database.")
    ] = None,
    model: ModelOption = None,
    runtime: Annotated[
        Runtime | None,
        typer.Option(help=RUNTIME_HELP + " Default auto."),
    ] = None,
    allow_aet: Annotated[
        list[str] | None,
        typer.Option(
            help="Calling AE title allowed to associate (repeatable); others are rejected."
        ),
    ] = None,
    stable_seconds: Annotated[
        float | None,
        typer.Option(help="Quiet time after the last instance before a series is complete."),
    ] = None,
    retry_seconds: Annotated[
        float | None, typer.Option(help="First wait before re-sending an SR; doubles each try.")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option(help="Send attempts before a job is 'failed'.")
    ] = None,
    max_associations: Annotated[
        int | None, typer.Option(help="Associations served at once; more are rejected.")
    ] = None,
    min_free_mb: Annotated[
        float | None, typer.Option(help="Refuse instances (0xA700) below this much free disk.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Our TLS certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Its private key (PEM).")
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="CA (PEM) that callers' and the peer's certificates must be signed by.",
        ),
    ] = None,
    peer_tls: Annotated[
        bool | None,
        typer.Option(
            "--peer-tls/--no-peer-tls",
            help="TLS towards the peer. Default: when --tls-cert is given.",
            show_default=False,
        ),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            help="Serve the status page, JSON API, probes (/healthz, /readyz) and Prometheus "
            "metrics (/metrics) on this port (0: any free port). Needs ctcovid[web]."
        ),
    ] = None,
    http_host: Annotated[
        str | None,
        typer.Option(
            help="Address of the HTTP server. Default 127.0.0.1; any other address needs "
            "--http-tls-cert, --http-tls-key and --http-auth-file."
        ),
    ] = None,
    http_tls_cert: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="TLS certificate (PEM) of the HTTP server."),
    ] = None,
    http_tls_key: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Its private key (PEM).")
    ] = None,
    http_auth_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Users (scrypt hashes) and API tokens allowed on the HTTP server; make lines "
            "with 'ctcovid http-credentials'.",
        ),
    ] = None,
    http_show_phi: Annotated[
        bool,
        typer.Option(
            "--http-show-phi",
            help="Show patient name, ID and birth date on the page and in the API.",
            show_default=False,
        ),
    ] = False,
    metrics_port: Annotated[
        int | None, typer.Option(help="Deprecated alias of --http-port.")
    ] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="Deprecated alias of --http-host.")
    ] = None,
    network_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a peer may take to send one PDU or stay idle; then it is cut. Default 60."
        ),
    ] = None,
    max_instance_mb: Annotated[
        float | None,
        typer.Option(help="Larger C-STORE data sets are refused (0xA700). Default 1024."),
    ] = None,
    max_pdu_bytes: Annotated[
        int | None,
        typer.Option(help="Largest PDU we accept (offered at association). Default 262144."),
    ] = None,
    max_association_seconds: Annotated[
        float | None,
        typer.Option(
            help="Longest an association may last, whatever its peer sends; then it is "
            "aborted. Default 3600."
        ),
    ] = None,
    max_store_seconds: Annotated[
        float | None,
        typer.Option(
            help="Longest one C-STORE may take to arrive (command and data set); then the "
            "association is aborted. Default 600."
        ),
    ] = None,
    max_associations_per_address: Annotated[
        int | None,
        typer.Option(
            help="Associations one peer address may hold at once; more are rejected. Default 5."
        ),
    ] = None,
    audit_file: AuditFileOption = None,
    audit_syslog: AuditSyslogOption = None,
    audit_ca: AuditCaOption = None,
    alert_webhook: Annotated[
        str | None,
        typer.Option(
            help='Post alerts here as JSON {"text": ...} (Slack or Teams incoming webhook). '
            "The URL is a secret: prefer alert_webhook in the --config file."
        ),
    ] = None,
    alert_smtp: Annotated[
        str | None,
        typer.Option(help="Mail alerts through this SMTP server, HOST:PORT (STARTTLS if offered)."),
    ] = None,
    alert_to: Annotated[
        list[str] | None, typer.Option(help="Recipient of alert mails (repeatable).")
    ] = None,
    alert_from: Annotated[
        str | None, typer.Option(help="Sender of alert mails. Default ctcovid@HOSTNAME.")
    ] = None,
    alert_after: Annotated[
        float | None,
        typer.Option(help="Minutes sending may keep failing before an alert. Default 15."),
    ] = None,
    alert_positive: Annotated[
        bool | None,
        typer.Option(
            "--alert-positive/--no-alert-positive",
            help="Also alert on every positive result (UIDs only). Default off.",
            show_default=False,
        ),
    ] = None,
    hl7: Hl7Option = None,
    hl7_tls: Hl7TlsOption = None,
    hl7_sending_application: Hl7SendingApplicationOption = None,
    hl7_sending_facility: Hl7SendingFacilityOption = None,
    hl7_receiving_application: Hl7ReceivingApplicationOption = None,
    hl7_receiving_facility: Hl7ReceivingFacilityOption = None,
    hl7_priority: Hl7PriorityOption = None,
    hl7_priority_field: Hl7PriorityFieldOption = None,
    result_card: Annotated[
        bool | None,
        typer.Option(
            "--result-card/--no-result-card",
            help="Send a result card (a Secondary Capture stating the result, for viewers that "
            "show no SR) with each SR. Default off (TOML result_card).",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging (-vv: debug).")] = 0,
) -> None:
    """Run the DICOM node: C-STORE CT in, one SR per complete CT series out to --peer (C-STORE)
    or --stow (STOW-RS).

    Logs go to stderr as key=value lines with study and series UIDs (never patient names).
    The calling AE title is not authentication: use --tls-ca (client certificates) and a
    firewall to choose who may send (see the README, "Securing a node").
    Stop it with SIGTERM or Ctrl-C: it stops accepting, finishes the current job and exits 0;
    after a crash it resumes every unfinished job on start.

    Examples:

      ctcovid listen --store /var/lib/ctcovid --port 11112 --ae-title CTCOVID --peer pacs:104:PACS

      ctcovid listen --config node.toml --allow-aet PACS --allow-aet ROUTER --http-port 8080

      ctcovid listen --store /srv/ctcovid --tls-cert node.pem --tls-key node.key --tls-ca ca.pem

      ctcovid listen --store /srv/ctcovid --stow https://vna.example.org/dicom-web

      ctcovid listen --config node.toml --alert-smtp mail:587 --alert-to radiology-it@example.org

      ctcovid listen --config node.toml --hl7 ris:2575 --hl7-receiving-application RIS
    """
    # A service logs its activity by default; -v adds debug detail.
    setup_logging(verbose + 1)
    from ctcovid.node.config import load_config
    from ctcovid.node.service import Node

    node_config = load_config(
        config,
        {
            "port": port,
            "host": host,
            "ae_title": ae_title,
            "peer": peer,
            "stow": stow,
            "stow_auth_file": stow_auth_file,
            "stow_ca_file": stow_ca_file,
            "store": store,
            "model": model,
            "runtime": runtime.value if runtime is not None else None,
            "allow_aet": tuple(allow_aet) if allow_aet else None,
            "stable_seconds": stable_seconds,
            "retry_seconds": retry_seconds,
            "max_attempts": max_attempts,
            "max_associations": max_associations,
            "min_free_mb": min_free_mb,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_ca": tls_ca,
            "peer_tls": peer_tls,
            "http_port": http_port,
            "http_host": http_host,
            "http_tls_cert": http_tls_cert,
            "http_tls_key": http_tls_key,
            "http_auth_file": http_auth_file,
            "http_show_phi": True if http_show_phi else None,
            "metrics_port": metrics_port,
            "metrics_host": metrics_host,
            "network_timeout_seconds": network_timeout,
            "max_instance_mb": max_instance_mb,
            "max_pdu_bytes": max_pdu_bytes,
            "max_association_seconds": max_association_seconds,
            "max_store_seconds": max_store_seconds,
            "max_associations_per_address": max_associations_per_address,
            "audit_file": audit_file,
            "audit_syslog": audit_syslog,
            "audit_ca": audit_ca,
            "alert_webhook": alert_webhook,
            "alert_smtp": alert_smtp,
            "alert_to": tuple(alert_to) if alert_to else None,
            "alert_from": alert_from,
            "alert_after_minutes": alert_after,
            "alert_positive": alert_positive,
            "hl7": hl7,
            "hl7_tls": hl7_tls,
            "hl7_sending_application": hl7_sending_application,
            "hl7_sending_facility": hl7_sending_facility,
            "hl7_receiving_application": hl7_receiving_application,
            "hl7_receiving_facility": hl7_receiving_facility,
            "hl7_priority": tuple(hl7_priority) if hl7_priority else None,
            "hl7_priority_fields": tuple(hl7_priority_field) if hl7_priority_field else None,
            "result_card": result_card,
        },
    )
    level = logging.DEBUG if verbose >= 1 else logging.INFO
    raise typer.Exit(code=Node(node_config, log_level=level).run())
