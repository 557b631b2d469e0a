"""``ctcovid queue``: the DICOM node's series and jobs, and re-queueing failed ones."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer

from ctcovid.cli.common import handle_errors, print_json, setup_logging, stdout


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return dt.datetime.fromtimestamp(timestamp).isoformat(timespec="seconds")


@handle_errors
def queue(
    store: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="The node's store folder.")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    retry: Annotated[
        str | None, typer.Option(help="Re-queue this failed series (SeriesInstanceUID).")
    ] = None,
    retry_all_failed: Annotated[
        bool, typer.Option("--retry-all-failed", help="Re-queue every failed series.")
    ] = False,
    verbose: Annotated[int, typer.Option("-v", count=True, help="More logging.")] = 0,
) -> None:
    """List the node's series with their job state, rule, revision, attempts and reasons, and
    the state of each result's delivery to every other destination (the RIS, named ones).

    A failed send is re-queued for sending (attempts reset); a failed classification is
    classified again; a failed or refused delivery (ORU or SR) is sent again, the same message.
    A running node picks re-queued jobs up by itself.

    Examples:

      ctcovid queue --store /var/lib/ctcovid

      ctcovid queue --store /var/lib/ctcovid --retry-all-failed --json
    """
    setup_logging(verbose)
    from ctcovid.errors import InvalidInputError
    from ctcovid.node.store import NotRetryable, Store

    if not (store / "node.sqlite").is_file():
        raise InvalidInputError(f"{store}: not a node store (no node.sqlite)")
    if retry is not None and retry_all_failed:
        raise InvalidInputError("give either --retry SERIES_UID or --retry-all-failed, not both")
    node_store = Store(store)
    requeued: list[str] | None = None
    try:
        if retry is not None:
            try:
                requeued = node_store.retry_series(retry)
            except NotRetryable as exc:
                raise InvalidInputError(str(exc)) from None
        elif retry_all_failed:
            requeued = node_store.retry(None)
        records = node_store.jobs.list_series()
        deliveries: dict[tuple[str, str], list[Any]] = {}
        for delivery in node_store.jobs.deliveries():
            key = (delivery.study_instance_uid, delivery.series_instance_uid)
            deliveries.setdefault(key, []).append(delivery)
        counts = node_store.jobs.counts_by_state()
        n_instances = node_store.jobs.count_instances()
    finally:
        node_store.close()

    if json_out:
        out: dict[str, Any] = {
            "store": str(store),
            "instances": n_instances,
            "counts": counts,
            "series": [
                r.to_dict()
                | {
                    "deliveries": [
                        d.to_dict()
                        for d in deliveries.get((r.study_instance_uid, r.series_instance_uid), [])
                    ]
                }
                for r in records
            ],
        }
        if requeued is not None:
            out["requeued"] = requeued
        print_json(out)
        return
    if requeued is not None:
        stdout.print(f"re-queued {len(requeued)} series", highlight=False)
    from rich.table import Table

    table = Table(title=f"{store}: {n_instances} instances, {len(records)} series")
    columns = (
        "series",
        "state",
        "rule",
        "inst.",
        "rev.",
        "sent",
        "tries",
        "P(COVID)",
        "reason",
        "other destinations",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in records:
        reason = r.reason
        if r.state == "classified" and r.next_try:
            reason = (reason + "; " if reason else "") + f"next try {_when(r.next_try)}"
        others = []
        for d in deliveries.get((r.study_instance_uid, r.series_instance_uid), []):
            text = f"{d.destination}: {d.state}"
            if d.state == "pending" and d.attempts:
                text += f" (try {d.attempts + 1} at {_when(d.next_try)})"
            if d.reason:
                text += f"; {d.reason}"
            others.append(text)
        table.add_row(
            r.series_instance_uid,
            r.state,
            r.rule,
            str(r.n_instances),
            str(r.revision or ""),
            str(r.sent_revision or ""),
            str(r.attempts or ""),
            f"{r.probability_covid:.3f}" if r.probability_covid is not None else "",
            reason,
            "\n".join(others),
        )
    stdout.print(table)
    stdout.print(" ".join(f"{state}={count}" for state, count in counts.items()), highlight=False)
