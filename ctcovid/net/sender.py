"""The one SR sender of the node and of batch: C-STORE to a peer (optionally over TLS), or
STOW-RS to a DICOMweb service, built from plain :class:`SendSettings`.

An SR may travel with companions of the same revision (its result card, a Secondary Capture):
they go in the same association or STOW-RS request, after the SR, and the send is delivered
only when every one of them is (a C-STORE peer that does not accept one's SOP class gets none
of them); a resend sends them all again (their UIDs are derived, so a PACS keeps one copy of
each).

Success and the warning statuses 0xB000 (coercion of data elements), 0xB006 (elements
discarded) and 0xB007 (data set does not match SOP class) count as delivered by C-STORE: the
peer has stored the object (PS3.4 B.2.3). Anything else raises :class:`~ctcovid.errors.PacsError`
with the reason, which the worker records before backing off. STOW-RS goes through
:mod:`ctcovid.net.stow`; a refusal that sending again cannot change (an HTTP 4xx such as 409)
raises :class:`~ctcovid.net.stow.StowRefused`, which the worker records as ``failed`` at once.

Every send has a hard deadline. pynetdicom's ACSE, DIMSE and network timeouts are set, but a
peer that accepts the association and then stalls can still hold a blocked socket past them, so
the association runs in its own thread: at the deadline (or when the caller is stopping) its
socket is shut down and its threads stopped, and the caller gets the reason at once. A STOW-RS
request runs in its own thread too; at the deadline it is abandoned (the thread ends by itself
within one network timeout, which bounds every wait of the HTTP client).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pydicom
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE

from ctcovid.errors import PacsError
from ctcovid.net.peers import Peer
from ctcovid.net.query import HeldInstance
from ctcovid.net.tls import client_ssl_context

logger = logging.getLogger(__name__)

T = TypeVar("T")
DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
# Proposed for the SR, after the SR file's own syntax: Explicit, then Implicit VR Little Endian.
SR_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


class Cancel(Protocol):
    def is_set(self) -> bool: ...


class SendCancelled(PacsError):
    """The send was abandoned because the node is stopping; it is not a failed attempt."""


@dataclass(frozen=True)
class SendSettings:
    """Where and how SRs are sent; plain values, so the node (from its TOML) and batch (from
    its flags) build the same sender.

    Exactly one of ``peer`` (C-STORE) and ``stow_url`` (STOW-RS) is set. ``tls`` turns TLS on
    for C-STORE, verified against ``tls_ca`` (else the system's CAs), showing ``tls_cert`` and
    ``tls_key`` when given. ``stow_auth`` and ``stow_ca_file`` are for STOW-RS.
    ``timeout_seconds`` bounds each network wait, ``deadline_seconds`` (default: three times
    that) a whole send.
    """

    calling_ae_title: str = "CTCOVID"
    peer: Peer | None = None
    stow_url: str | None = None
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    stow_auth: Any = field(default=None, repr=False)  # an HttpAuth; never printed
    stow_ca_file: Path | None = None
    timeout_seconds: float = 60.0
    deadline_seconds: float | None = None
    max_pdu_bytes: int = 262_144

    def __post_init__(self) -> None:
        if (self.peer is None) == (self.stow_url is None):
            raise ValueError("SendSettings needs exactly one of peer and stow_url")

    @classmethod
    def c_store(
        cls,
        peer: str,
        *,
        calling_ae_title: str = "CTCOVID",
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_ca: Path | None = None,
        timeout_seconds: float = 60.0,
    ) -> SendSettings:
        """C-STORE to ``HOST:PORT:AET``; TLS when any of the TLS files is given."""
        return cls(
            calling_ae_title=calling_ae_title,
            peer=Peer.parse(peer),
            tls=any(p is not None for p in (tls_cert, tls_key, tls_ca)),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            timeout_seconds=timeout_seconds,
        )

    @classmethod
    def stow_rs(
        cls,
        url: str,
        *,
        auth: Any = None,
        ca_file: Path | None = None,
        timeout_seconds: float = 60.0,
    ) -> SendSettings:
        """STOW-RS to the DICOMweb base ``url`` (checked now: scheme, credentials, the extra)."""
        from ctcovid.net.dicomweb import make_client

        make_client(url, auth, ca_file=ca_file)
        return cls(
            stow_url=url.rstrip("/"),
            stow_auth=auth,
            stow_ca_file=ca_file,
            timeout_seconds=timeout_seconds,
        )

    @property
    def deadline(self) -> float:
        """Seconds one send may take in all."""
        if self.deadline_seconds is not None:
            return self.deadline_seconds
        return 3 * self.timeout_seconds

    def __str__(self) -> str:
        return f"c-store {self.peer}" if self.peer is not None else f"stow-rs {self.stow_url}"


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
    also: Sequence[Path] = (),
) -> int:
    """C-STORE the DICOM file at ``path`` to ``peer``, then the files ``also`` in the same
    association; returns the SR's (delivered) status.

    Each file's SOP class is proposed with its own transfer syntax first, then Explicit and
    Implicit VR Little Endian.

    ``timeout_seconds`` bounds each network wait; ``deadline_seconds`` (default: three times
    that) bounds the whole send, connection to release. ``cancel``, when set, aborts the send.

    Raises
    ------
    PacsError
        When the association is refused or lost, the peer does not accept a file's SOP class
        or answers any file with a failure status, or the deadline passes (the association is
        then aborted).
    SendCancelled
        When ``cancel`` was set before the send finished.
    """
    datasets = [pydicom.dcmread(p) for p in (path, *also)]
    ds = datasets[0]
    deadline = deadline_seconds if deadline_seconds is not None else 3 * timeout_seconds
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_seconds
    ae.dimse_timeout = timeout_seconds
    ae.network_timeout = timeout_seconds
    ae.connection_timeout = timeout_seconds
    proposed: set[tuple[str, str]] = set()
    for each in datasets:
        sop_class = str(each.get("SOPClassUID", Comprehensive3DSRStorage))
        transfer_syntax = str(each.file_meta.TransferSyntaxUID)
        key = (sop_class, transfer_syntax)
        if key not in proposed:
            proposed.add(key)
            syntaxes = [transfer_syntax, *[t for t in SR_TRANSFER_SYNTAXES if t != transfer_syntax]]
            ae.add_requested_context(sop_class, syntaxes)
    return run_with_deadline(
        lambda: _associate_and_store(ae, datasets, peer, ssl_context, max_pdu_bytes),
        deadline_seconds=deadline,
        cancel=cancel,
        abort=lambda: _abort_all(ae),
        name=f"send-{ds.SOPInstanceUID}",
        cancelled=f"{peer}: sending SR {ds.SOPInstanceUID} abandoned (stopping)",
        late=f"{peer}: C-STORE of SR {ds.SOPInstanceUID} did not finish within {deadline:.0f} s; "
        "association aborted",
    )


def run_with_deadline(
    work: Callable[[], T],
    *,
    deadline_seconds: float,
    cancel: Cancel | None,
    abort: Callable[[], None],
    name: str,
    cancelled: str,
    late: str,
) -> T:
    """``work()`` in a thread of its own; its result, or its exception raised here.

    At ``deadline_seconds``, or as soon as ``cancel`` is set, ``abort`` is called and
    :class:`~ctcovid.errors.PacsError` (``late``) or :class:`SendCancelled` (``cancelled``) is
    raised at once, whatever the thread is doing.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ends = time.monotonic() + deadline_seconds
    while thread.is_alive():
        thread.join(min(0.1, max(0.0, ends - time.monotonic())))
        if not thread.is_alive():
            break
        if cancel is not None and cancel.is_set():
            abort()
            raise SendCancelled(cancelled)
        if time.monotonic() >= ends:
            abort()
            raise PacsError(late)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


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
    datasets: Sequence[pydicom.Dataset],
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
        # Every file's SOP class first: a peer that takes the SR but not its card gets neither.
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                raise PacsError(
                    f"{peer} did not accept SOP class {ds.SOPClassUID} ({_what(ds)} "
                    f"{ds.SOPInstanceUID}) in the association; nothing was sent"
                )
        codes = [_store_one(assoc, ds, peer) for ds in datasets]
    finally:
        if assoc.is_established:
            assoc.release()
    return codes[0]


def _what(ds: pydicom.Dataset) -> str:
    """'SR', or 'result card' for a companion Secondary Capture, in messages."""
    return "SR" if str(ds.get("Modality", "")) == "SR" else "result card"


def _store_one(assoc: Any, ds: pydicom.Dataset, peer: Peer) -> int:
    """C-STORE ``ds`` over ``assoc``: its delivered status, or PacsError."""
    status = assoc.send_c_store(ds)
    if not status or "Status" not in status:
        raise PacsError(
            f"{peer}: no C-STORE response for {_what(ds)} {ds.SOPInstanceUID} (timeout or abort)"
        )
    code = int(status.Status)
    if code not in DELIVERED_STATUSES:
        comment = str(status.get("ErrorComment", "")).strip()
        raise PacsError(
            f"{peer} answered C-STORE of {_what(ds)} {ds.SOPInstanceUID} with status "
            f"0x{code:04X}" + (f" ({comment})" if comment else "")
        )
    if code != 0:
        logger.warning(
            "event=sr_stored_with_warning peer=%s sop=%s status=0x%04X",
            peer,
            ds.SOPInstanceUID,
            code,
        )
    return code


def stow_file(
    path: Path,
    url: str,
    *,
    client: Any = None,
    auth: Any = None,
    ca_file: Path | None = None,
    timeout_seconds: float = 60.0,
    deadline_seconds: float | None = None,
    cancel: Cancel | None = None,
    also: Sequence[Path] = (),
) -> None:
    """STOW-RS the DICOM file at ``path`` (and the files ``also``, in the same request) to the
    DICOMweb service at ``url``.

    ``client`` is a ``DICOMwebClient`` from :func:`ctcovid.net.dicomweb.make_client`; without
    one, a client is made with ``auth`` (a :class:`~ctcovid.net.dicomweb.HttpAuth` or None),
    TLS verified against ``ca_file`` when given. Timeouts and the deadline as for
    :func:`send_file`.

    Raises
    ------
    StowRefused
        When the service refused the SR for good (HTTP 4xx such as 409, 401, 404).
    PacsError
        When the request failed in a way that may pass (5xx, connection refused or lost,
        timeout), or the deadline passed.
    SendCancelled
        When ``cancel`` was set before the send finished.
    """
    from ctcovid.net.dicomweb import make_client
    from ctcovid.net.stow import stow

    deadline = deadline_seconds if deadline_seconds is not None else 3 * timeout_seconds
    if client is None:
        client = make_client(url, auth, ca_file=ca_file, timeout_seconds=timeout_seconds)
    sop = path.stem  # SR files are named by their SOPInstanceUID
    run_with_deadline(
        lambda: stow(client, url, [path, *also]),
        deadline_seconds=deadline,
        cancel=cancel,
        abort=lambda: None,  # the thread ends within one network timeout; nothing waits for it
        name=f"stow-{sop}",
        cancelled=f"{url}: sending SR {sop} abandoned (stopping)",
        late=f"{url}: STOW-RS of SR {sop} did not finish within {deadline:.0f} s; abandoned",
    )


class SrSender(Protocol):
    """Delivers one SR file; returns a ``key=value`` note on the outcome for the log line.

    ``held`` lists what the destination holds in one series (C-FIND at the C-STORE peer, QIDO-RS
    at the DICOMweb service), so that a sender that did not deliver an SR itself (batch after
    the node, a second run) learns its revisions; :class:`~ctcovid.errors.PacsError` when the
    destination cannot answer.
    """

    def send(self, path: Path, cancel: Cancel | None = None, also: Sequence[Path] = ()) -> str:
        """Deliver the SR at ``path`` and the files ``also`` (its result card) with it."""
        ...

    def held(self, study_instance_uid: str, series_instance_uid: str) -> list[HeldInstance]: ...


class CStoreSender:
    """C-STORE to ``settings.peer``, over TLS when ``settings.tls``."""

    def __init__(self, settings: SendSettings) -> None:
        assert settings.peer is not None
        self.settings = settings
        self.peer = settings.peer
        self.ssl_context = (
            client_ssl_context(cert=settings.tls_cert, key=settings.tls_key, ca=settings.tls_ca)
            if settings.tls
            else None
        )

    def send(self, path: Path, cancel: Cancel | None = None, also: Sequence[Path] = ()) -> str:
        status = send_file(
            path,
            self.peer,
            also=also,
            calling_ae_title=self.settings.calling_ae_title,
            ssl_context=self.ssl_context,
            timeout_seconds=self.settings.timeout_seconds,
            max_pdu_bytes=self.settings.max_pdu_bytes,
            deadline_seconds=self.settings.deadline,
            cancel=cancel,
        )
        return f"status=0x{status:04X}"

    def held(self, study_instance_uid: str, series_instance_uid: str) -> list[HeldInstance]:
        from ctcovid.net.dimse import DimseArchive

        archive = DimseArchive(
            self.peer,
            calling_ae_title=self.settings.calling_ae_title,
            timeout_seconds=self.settings.timeout_seconds,
            deadline_seconds=self.settings.deadline,
            max_pdu_bytes=self.settings.max_pdu_bytes,
            ssl_context=self.ssl_context,
        )
        try:
            return archive.find_held(study_instance_uid, series_instance_uid)
        finally:
            archive.close()


class StowSender:
    """STOW-RS to ``settings.stow_url`` with ``settings.stow_auth``."""

    def __init__(self, settings: SendSettings) -> None:
        from ctcovid.net.dicomweb import make_client

        assert settings.stow_url is not None
        self.settings = settings
        self.url = settings.stow_url

        def new_client() -> Any:
            # make_client turns the client's own retries off: one retry policy, the caller's
            # backoff (the node's job, the batch forwarder), not quiet retries within a send.
            return make_client(
                self.url,
                settings.stow_auth,
                ca_file=settings.stow_ca_file,
                timeout_seconds=settings.timeout_seconds,
            )

        self._make_client = new_client
        # Made now: a bad URL or a missing DICOMweb extra shows at start, not at the first send.
        self._client: Any = self._make_client()

    def send(self, path: Path, cancel: Cancel | None = None, also: Sequence[Path] = ()) -> str:
        if self._client is None:
            self._client = self._make_client()
        try:
            stow_file(
                path,
                self.url,
                also=also,
                client=self._client,
                timeout_seconds=self.settings.timeout_seconds,
                deadline_seconds=self.settings.deadline,
                cancel=cancel,
            )
        except BaseException:
            # After a failure, abandoned or cancelled request the next send opens new
            # connections rather than share a session with a request that may still run.
            self._client = None
            raise
        return "stored=stow-rs"

    def held(self, study_instance_uid: str, series_instance_uid: str) -> list[HeldInstance]:
        from ctcovid.net.dicomweb import DicomWebArchive

        archive = DicomWebArchive(
            self.url,
            self.settings.stow_auth,
            ca_file=self.settings.stow_ca_file,
            timeout_seconds=self.settings.timeout_seconds,
        )
        return archive.find_held(study_instance_uid, series_instance_uid)


def sr_sender(settings: SendSettings) -> SrSender:
    """The sender for ``settings``.

    Raises :class:`~ctcovid.errors.ConfigError` for a bad URL, a missing DICOMweb extra or
    unreadable TLS files.
    """
    if settings.stow_url is not None:
        return StowSender(settings)
    return CStoreSender(settings)
