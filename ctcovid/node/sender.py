"""Send an SR to the peer (PACS) by C-STORE, optionally over TLS.

Success and the warning statuses 0xB000 (coercion of data elements), 0xB006 (elements
discarded) and 0xB007 (data set does not match SOP class) count as delivered: the peer has
stored the object (PS3.4 B.2.3). Anything else raises :class:`~ctcovid.errors.PacsError`
with the reason, which the worker records before backing off.

Every send has a hard deadline. pynetdicom's ACSE, DIMSE and network timeouts are set, but a
peer that accepts the association and then stalls can still hold a blocked socket past them, so
the association runs in its own thread: at the deadline (or when the caller is stopping) its
socket is shut down and its threads stopped, and the caller gets the reason at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE

from ctcovid.errors import PacsError
from ctcovid.node.config import NodeConfig, Peer

logger = logging.getLogger(__name__)

DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_SR_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


class Cancel(Protocol):
    def is_set(self) -> bool: ...


class SendCancelled(PacsError):
    """The send was abandoned because the node is stopping; it is not a failed attempt."""


def client_ssl_context(config: NodeConfig) -> ssl.SSLContext:
    """TLS for sending: verify the peer against ``tls_ca`` and show our certificate."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(config.tls_ca) if config.tls_ca else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_cert is not None and config.tls_key is not None:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return context


def send_file(
    path: Path,
    peer: Peer,
    *,
    calling_ae_title: str,
    ssl_context: ssl.SSLContext | None = None,
    timeout_seconds: float = 60.0,
    max_pdu_bytes: int = 262_144,
    deadline_seconds: float | None = None,
    cancel: Cancel | None = None,
) -> int:
    """C-STORE the DICOM file at ``path`` to ``peer``; returns the (delivered) status.

    ``timeout_seconds`` bounds each network wait; ``deadline_seconds`` (default: three times
    that) bounds the whole send, connection to release. ``cancel``, when set, aborts the send.

    Raises
    ------
    PacsError
        When the association is refused or lost, the peer answers with a failure status, or
        the deadline passes (the association is then aborted).
    SendCancelled
        When ``cancel`` was set before the send finished.
    """
    ds = pydicom.dcmread(path)
    deadline = deadline_seconds if deadline_seconds is not None else 3 * timeout_seconds
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_seconds
    ae.dimse_timeout = timeout_seconds
    ae.network_timeout = timeout_seconds
    ae.connection_timeout = timeout_seconds
    transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    syntaxes = [transfer_syntax, *[t for t in _SR_TRANSFER_SYNTAXES if t != transfer_syntax]]
    ae.add_requested_context(Comprehensive3DSRStorage, syntaxes)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["status"] = _associate_and_store(ae, ds, peer, ssl_context, max_pdu_bytes)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"send-{ds.SOPInstanceUID}", daemon=True)
    thread.start()
    ends = time.monotonic() + deadline
    while thread.is_alive():
        thread.join(min(0.1, max(0.0, ends - time.monotonic())))
        if not thread.is_alive():
            break
        if cancel is not None and cancel.is_set():
            _abort_all(ae)
            raise SendCancelled(f"{peer}: sending SR {ds.SOPInstanceUID} abandoned (stopping)")
        if time.monotonic() >= ends:
            _abort_all(ae)
            raise PacsError(
                f"{peer}: C-STORE of SR {ds.SOPInstanceUID} did not finish within "
                f"{deadline:.0f} s; association aborted"
            )
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome["status"])


def _abort_all(ae: AE) -> None:
    """End ``ae``'s associations at once, whatever the peer does.

    The socket is shut down (which unblocks any thread reading or writing it; the peer sees the
    connection close) and pynetdicom's DUL reactor is told to stop. An A-ABORT is not sent: the
    peer is the one not answering, and the DUL thread is not a daemon, so an abort that waits for
    the peer would keep the process from exiting.
    """
    for assoc in list(ae.active_associations):
        with contextlib.suppress(Exception):
            raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            if raw is not None:
                raw.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            assoc.is_aborted = True
            assoc.is_established = False
            assoc.dul.kill_dul()
            assoc._kill = True
            assoc._reactor_checkpoint.set()  # let its thread run to see the kill


def _associate_and_store(
    ae: AE,
    ds: pydicom.Dataset,
    peer: Peer,
    ssl_context: ssl.SSLContext | None,
    max_pdu_bytes: int,
) -> int:
    tls_args = (ssl_context, peer.host) if ssl_context is not None else None
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        max_pdu=max_pdu_bytes,
        tls_args=tls_args,
    )
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise PacsError(f"association with {peer} {why}")
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise PacsError(
            f"{peer}: no C-STORE response for SR {ds.SOPInstanceUID} (timeout or abort)"
        )
    code = int(status.Status)
    if code not in DELIVERED_STATUSES:
        comment = str(status.get("ErrorComment", "")).strip()
        raise PacsError(
            f"{peer} answered C-STORE of SR {ds.SOPInstanceUID} with status 0x{code:04X}"
            + (f" ({comment})" if comment else "")
        )
    if code != 0:
        logger.warning(
            "event=sr_stored_with_warning peer=%s sop=%s status=0x%04X",
            peer,
            ds.SOPInstanceUID,
            code,
        )
    return code
