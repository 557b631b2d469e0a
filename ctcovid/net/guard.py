"""The listener's transport, bounded against hostile and broken peers.

pynetdicom's acceptor trusts its peer: it reads a PDU of whatever length the header declares,
waits on a socket without a timeout, holds a C-STORE data set in memory and shakes hands for
TLS in the one thread that accepts connections. Here every resource a peer can make the node
spend has a bound:

- time: every accepted socket has a timeout, and a whole PDU must arrive within
  ``network_timeout_seconds`` (a peer that sends one byte and stalls, or one byte a second,
  loses its connection); the TLS handshake runs in the connection's own thread, with the same
  deadline, so a silent client delays nobody else. A per-PDU deadline alone lets a peer that
  sends one small PDU just inside it hold its association slot forever, so there are two
  wall-clock caps as well: a whole association (from its acceptance, after any TLS handshake)
  lasts at most ``max_association_seconds``, and one DIMSE message (a C-STORE: command and
  data set, from its first fragment to its last) must arrive within ``max_store_seconds``.
  Past either the association is aborted (A-ABORT, then the connection is closed) and a line
  names the peer's address and calling AE title;
- memory: a PDU longer than the maximum PDU size we offered is refused before it is read
  (the connection is closed), a command set may not exceed :data:`MAX_COMMAND_BYTES`, a data
  set held in memory (any message but C-STORE) :data:`MAX_MEMORY_DATASET_BYTES`;
- disk: a C-STORE data set is written as it arrives to a spool file in the store's ``tmp``
  folder, at most ``max_instance_bytes`` of it (the rest is read and dropped and the C-STORE
  answered with a failure), never below the store's free-space floor;
- threads: connections beyond ``max_connections`` (associations and handshakes in progress)
  are closed at once; an association from an address that already holds
  ``max_associations_per_address`` is rejected at negotiation (A-ASSOCIATE-RJ, transient,
  local limit exceeded), so that one host cannot take every slot from the modalities.

Spool files of data sets that never reached the handler (an association cut in between) are
deleted when the connection closes, and any left by a killed process at the next start.

The hooks sit on pynetdicom 3's DUL (``_read_pdu_data``, ``_is_transport_event``: the
reactor's loop, where the caps are checked while the peer is idle), DIMSE provider
(``receive_primitive``) and ACSE (``_negotiate_as_acceptor``) of each acceptor association;
they are installed per association, so nothing global in the library changes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from ctcovid.dicom.uids import valid_uid

logger = logging.getLogger(__name__)

SPOOL_PREFIX = "recv-"
# A command set holds a few UIDs and numbers; 64 KiB is generous (PS3.7 E.1).
MAX_COMMAND_BYTES = 64 * 1024
# Only C-STORE data sets go to disk; any other message's data set stays in memory.
MAX_MEMORY_DATASET_BYTES = 1024 * 1024
# A-ASSOCIATE-RQ and friends: even 128 presentation contexts with many syntaxes fit.
MAX_CONTROL_PDU_BYTES = 1024 * 1024
_P_DATA_TF = 0x04
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
# A-ABORT from the service provider, no reason given (PS3.8 9.3.8).
_A_ABORT_PROVIDER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"
# A-ASSOCIATE-RJ (result, source, diagnostic): transient, service provider (presentation),
# local limit exceeded (PS3.8 9.3.4): the peer may try again later.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

# A CT study of a few thousand instances on one association takes minutes on a hospital
# network; an hour leaves a wide margin yet frees a slot held by a trickling peer.
DEFAULT_MAX_ASSOCIATION_SECONDS = 3600.0
# One instance of max_instance_mb (1 GiB) at a slow 2 MB/s takes about 9 minutes.
DEFAULT_MAX_STORE_SECONDS = 600.0
# Half of the default ten associations: a router may send in parallel, yet never fill the node.
DEFAULT_MAX_ASSOCIATIONS_PER_ADDRESS = 5

# Called with (reason, peer address, calling AE title) when a connection is refused or cut.
RefusalHook = Callable[[str, str, str], None]


@dataclass(frozen=True)
class Limits:
    """The bounds one listener enforces on every connection."""

    network_timeout_seconds: float
    max_pdu_bytes: int
    max_instance_bytes: int
    max_connections: int
    spool_dir: Path
    # Raises (any exception) when the store may not take ``n`` more bytes.
    check_space: Callable[[int], None] | None = None
    # Wall-clock caps: a whole association, and one DIMSE message from first to last fragment.
    max_association_seconds: float = DEFAULT_MAX_ASSOCIATION_SECONDS
    max_store_seconds: float = DEFAULT_MAX_STORE_SECONDS
    # Associations one peer address may hold at once; 0: no limit per address.
    max_associations_per_address: int = DEFAULT_MAX_ASSOCIATIONS_PER_ADDRESS


class Spool:
    """One C-STORE data set on its way in: a DICOM file in the store's ``tmp`` folder.

    pynetdicom writes every data set fragment through :meth:`write` (and ``file.flush()``)
    and closes and deletes ``name`` after the C-STORE handler answered. Past
    ``max_instance_bytes`` the file is closed and the rest dropped: :attr:`oversize` tells the
    handler to refuse the instance. :attr:`error` says why nothing usable was written (disk
    failure, free-space floor).
    """

    def __init__(self, limits: Limits, meta: Any | None) -> None:
        self.path = limits.spool_dir / f"{SPOOL_PREFIX}{uuid.uuid4().hex}.dcm"
        self.name = str(self.path)
        self.file = self  # pynetdicom calls ``_data_set_file.file.flush()``
        self.max_bytes = limits.max_instance_bytes
        self.dataset_bytes = 0
        self.oversize = False
        self.error = ""
        # The request's Affected SOP Class/Instance UIDs are not UIDs: nothing to store.
        self.invalid_request = meta is None
        self._fh: BinaryIO | None = None
        if meta is None:
            return
        try:
            if limits.check_space is not None:
                limits.check_space(0)
            self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by close()/discard()
            self._fh.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(self._fh, meta)  # type: ignore[arg-type]
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self._close()

    def write(self, data: bytes) -> int:
        if self._fh is None:
            return len(data)
        if self.dataset_bytes + len(data) > self.max_bytes:
            self.oversize = True
            self.discard()  # free the disk now; the rest of the data set is read and dropped
            return len(data)
        try:
            self._fh.write(data)
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self._close()
        self.dataset_bytes += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing: buffered writes, flushed once when the data set is complete."""

    def _close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as exc:
                self.error = self.error or f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        self._close()

    @property
    def usable(self) -> bool:
        """The whole data set is in the file."""
        return not (self.oversize or self.error or self.invalid_request)

    def discard(self) -> None:
        self._close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _peer(assoc: Any) -> tuple[str, str]:
    """(address, calling AE title) of an association, for logs; never raises."""
    try:
        address = f"{assoc.requestor.address}:{assoc.requestor.port}"
    except Exception:
        address = ""
    try:
        calling = str(assoc.requestor.ae_title or "").strip()
    except Exception:
        calling = ""
    return address, calling


def _host(assoc: Any) -> str:
    """The peer's IP address (no port), which the per-address limit counts by; never raises."""
    try:
        return str(assoc.requestor.address)
    except Exception:
        return ""


class _Stalled(Exception):
    """The peer did not send what it announced within the deadline."""


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytearray | None:
    """``size`` bytes, or None if the peer closed or failed; :class:`_Stalled` at the deadline."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    try:
        while received < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Stalled
            sock.settimeout(remaining)
            n = sock.recv_into(view[received:], min(size - received, 65536))
            if n == 0:
                return None
            received += n
    except TimeoutError:
        raise _Stalled from None
    except (OSError, ValueError):  # reset, TLS error, closed under us
        return None
    finally:
        view.release()
    return buffer


# Orders associations by arrival, so that of two from one address the later one is refused.
_SERIALS = itertools.count()

# Lists the server's running acceptor associations (for the per-address limit).
AssociationsHook = Callable[[], list[Any]]


class _Guard:
    """The hooks installed on one acceptor association."""

    def __init__(
        self,
        assoc: Any,
        limits: Limits,
        on_refused: RefusalHook,
        associations: AssociationsHook | None = None,
    ) -> None:
        self.assoc = assoc
        self.limits = limits
        self.on_refused = on_refused
        self.associations = associations
        self.cut = False
        self.refused = False
        self.serial = next(_SERIALS)
        # The guard is installed when the connection is accepted: the association's clock starts.
        self.association_deadline = time.monotonic() + limits.max_association_seconds
        # Set while a DIMSE message is arriving (first fragment in, last one not yet).
        self.message_deadline: float | None = None
        assoc._ctcovid_guard = self
        dimse = assoc.dimse
        self._receive_primitive = dimse.receive_primitive
        self._is_transport_event = assoc.dul._is_transport_event
        self._negotiate = assoc.acse._negotiate_as_acceptor
        # Instance attributes shadow the methods the DUL reactor and the state machine call.
        assoc.dul._read_pdu_data = self.read_pdu
        assoc.dul._is_transport_event = self.is_transport_event
        assoc.acse._negotiate_as_acceptor = self.negotiate
        dimse.receive_primitive = self.receive_primitive

    def cut_connection(self, reason: str, *, abort: bool = False) -> None:
        """Close the transport: the state machine sees the connection closed (Evt17).

        With ``abort`` an A-ABORT goes first, so that a peer that is still reading learns
        why (best effort: a peer that reads nothing does not hold the reactor for long).
        """
        if self.cut:
            return
        self.cut = True
        address, calling = _peer(self.assoc)
        self.on_refused(reason, address, calling)
        discard_spool(self.assoc)
        if abort:
            raw = getattr(self.assoc.dul.socket, "socket", None)
            if raw is not None:
                with contextlib.suppress(OSError, ValueError):
                    raw.settimeout(1.0)
                    raw.sendall(_A_ABORT_PROVIDER)
        try:
            self.assoc.dul.socket.close()
        except Exception:
            logger.debug("closing the socket failed", exc_info=True)

    # -- wall-clock caps ----------------------------------------------------------------------

    def _cap(self) -> tuple[float, str, float]:
        """(deadline, reason, limit in seconds) of the wall-clock cap that ends first."""
        cap = (
            self.association_deadline,
            "association_time_exceeded",
            self.limits.max_association_seconds,
        )
        message = self.message_deadline
        if message is not None and message < cap[0]:
            cap = (message, "store_time_exceeded", self.limits.max_store_seconds)
        return cap

    def _abort_past_cap(self, reason: str, limit_seconds: float) -> None:
        address, calling = _peer(self.assoc)
        logger.warning(
            "event=association_aborted reason=%s limit_seconds=%g from=%s calling_aet=%s",
            reason,
            limit_seconds,
            address,
            calling,
        )
        self.cut_connection(reason, abort=True)

    def is_transport_event(self) -> bool:
        """Replaces ``DULServiceProvider._is_transport_event``: first, the wall-clock caps.

        The reactor calls this on every loop, also while the peer sends nothing, so a cap
        ends an idle association as well as a busy one.
        """
        if not self.cut:
            deadline, reason, limit_seconds = self._cap()
            if time.monotonic() >= deadline:
                self._abort_past_cap(reason, limit_seconds)
        return bool(self._is_transport_event())

    # -- ACSE: one address may not hold every slot ---------------------------------------------

    def _held_by_same_address(self) -> int:
        """Running associations from this peer's address that arrived before this one."""
        if self.associations is None:
            return 0
        host = _host(self.assoc)
        held = 0
        for other in self.associations():
            guard = getattr(other, "_ctcovid_guard", None)
            if (
                other is not self.assoc
                and isinstance(guard, _Guard)
                and guard.serial < self.serial
                and not (guard.cut or guard.refused)
                # Released or aborted: its thread is only winding down.
                and not (
                    getattr(other, "is_released", False) or getattr(other, "is_aborted", False)
                )
                and _host(other) == host
            ):
                held += 1
        return held

    def negotiate(self) -> None:
        """Replaces ``ACSE._negotiate_as_acceptor``: the per-address limit, then the library's."""
        limit = self.limits.max_associations_per_address
        if limit and self._held_by_same_address() >= limit:
            self.refused = True
            acse = self.assoc.acse
            with contextlib.suppress(Exception):  # only for the log line
                self.assoc.requestor.ae_title = acse.requestor.primitive.calling_ae_title
            address, calling = _peer(self.assoc)
            acse.send_reject(*REJECT_LOCAL_LIMIT)
            self.on_refused("too_many_associations_from_address", address, calling)
            self.assoc.kill()
            return
        self._negotiate()

    # -- DUL: one PDU from the socket ---------------------------------------------------------

    def read_pdu(self) -> None:
        """Replaces ``DULServiceProvider._read_pdu_data``: bounded in length and time."""
        dul = self.assoc.dul
        assoc_socket = dul.socket
        maybe_raw: socket.socket | None = getattr(assoc_socket, "socket", None)
        if maybe_raw is None or self.cut:
            dul.event_queue.put("Evt17")
            return
        raw: socket.socket = maybe_raw
        timeout = self.limits.network_timeout_seconds
        cap_deadline, cap_reason, cap_seconds = self._cap()
        deadline = min(time.monotonic() + timeout, cap_deadline)
        try:
            header = _recv_exact(raw, 6, deadline)
            if header is None:
                dul.event_queue.put("Evt17")  # closed by the peer
                return
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                dul.event_queue.put("Evt19")
                return
            limit = self.limits.max_pdu_bytes if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU_BYTES
            if pdu_length > limit:
                logger.warning(
                    "event=pdu_refused pdu_type=0x%02X declared_bytes=%d limit_bytes=%d",
                    pdu_type,
                    pdu_length,
                    limit,
                )
                self.cut_connection("pdu_too_large")
                return
            body = _recv_exact(raw, pdu_length, deadline) if pdu_length else bytearray()
            if body is None:
                dul.event_queue.put("Evt17")
                return
        except _Stalled:
            if deadline >= cap_deadline:
                self._abort_past_cap(cap_reason, cap_seconds)
                return
            logger.warning("event=peer_stalled timeout_seconds=%.0f", timeout)
            self.cut_connection("peer_stalled")
            return
        finally:
            # Sends (responses) keep the plain per-operation timeout.
            if getattr(assoc_socket, "socket", None) is raw:
                with contextlib.suppress(OSError):
                    raw.settimeout(timeout)
        try:
            pdu, event = dul._decode_pdu(header + body)
        except Exception as exc:
            logger.warning(
                "event=pdu_undecodable pdu_type=0x%02X error=%s", pdu_type, type(exc).__name__
            )
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    # -- DIMSE: P-DATA fragments into messages ------------------------------------------------

    def receive_primitive(self, primitive: Any) -> None:
        """Replaces ``DIMSEServiceProvider.receive_primitive``: one fragment at a time, bounded."""
        try:
            self._receive(primitive)
        except Exception as exc:
            # The state machine's thread must not die with the exception (the association
            # would hang until its timeout): drop the peer instead.
            logger.warning("event=dimse_undecodable error=%s", type(exc).__name__)
            self.cut_connection("invalid_message")

    def _receive(self, primitive: Any) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            if self.cut:
                return
            if not data:
                self.cut_connection("empty_pdv")
                return
            message = self.assoc.dimse.message
            if data[0] & 1:  # command fragment
                held = message.encoded_command_set.tell() if message is not None else 0
                if held + len(data) > MAX_COMMAND_BYTES:
                    self.cut_connection("command_too_large")
                    return
            elif not isinstance(getattr(message, "_data_set_file", None), Spool):
                held = message.data_set.tell() if message is not None else 0
                if held + len(data) > MAX_MEMORY_DATASET_BYTES:
                    self.cut_connection("dataset_too_large")
                    return
            if message is None:  # the first fragment of a message: its clock starts
                self.message_deadline = time.monotonic() + self.limits.max_store_seconds
            single = P_DATA()
            single.presentation_data_value_list = [[context_id, data]]  # type: ignore[list-item]
            self._receive_primitive(single)
            if self.assoc.dimse.message is None:  # complete and handed on
                self.message_deadline = None
            self._attach_spool()

    def _attach_spool(self) -> None:
        """A C-STORE-RQ whose command set just completed: its data set goes to a spool file."""
        message = self.assoc.dimse.message
        if (
            not isinstance(message, C_STORE_RQ)
            or message._data_set_file is not None
            or message.command_set.get("CommandDataSetType", 0x0101) == 0x0101
        ):
            return
        context = self.assoc._accepted_cx.get(message.context_id)
        if context is None:
            self.cut_connection("unknown_presentation_context")
            return
        command = message.command_set
        sop_class = str(command.get("AffectedSOPClassUID", ""))
        sop_instance = str(command.get("AffectedSOPInstanceUID", ""))
        meta = None
        if valid_uid(sop_class) and valid_uid(sop_instance):
            meta = create_file_meta(
                sop_class_uid=UID(sop_class),
                sop_instance_uid=UID(sop_instance),
                transfer_syntax=context.transfer_syntax[0],
            )
        spool = Spool(self.limits, meta)
        message._data_set_file = spool  # type: ignore[assignment]
        message._data_set_path = spool.path


def check_library() -> None:
    """Fail at start, not under attack, if pynetdicom no longer has the hooks used here."""
    from pynetdicom.acse import ACSE
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.dul import DULServiceProvider

    missing = [
        name
        for owner, name in (
            (DULServiceProvider, "_read_pdu_data"),
            (DULServiceProvider, "_is_transport_event"),
            (DULServiceProvider, "_decode_pdu"),
            (ACSE, "_negotiate_as_acceptor"),
            (ACSE, "send_reject"),
            (DIMSEServiceProvider, "receive_primitive"),
            (DIMSEMessage(), "_data_set_file"),
        )
        if not hasattr(owner, name)
    ]
    if missing:
        import pynetdicom

        raise RuntimeError(
            f"pynetdicom {pynetdicom.__version__} lacks {', '.join(missing)}: the listener's "
            "bounds cannot be installed; use pynetdicom 3.0"
        )


def guard_association(
    assoc: Any,
    limits: Limits,
    on_refused: RefusalHook,
    associations: AssociationsHook | None = None,
) -> None:
    """Install the bounds on one acceptor association before it starts.

    ``associations`` lists the server's running associations; without it there is no limit
    per address.
    """
    _Guard(assoc, limits, on_refused, associations)


def discard_spool(assoc: Any) -> None:
    """Delete the spool file of a C-STORE the association ended in the middle of."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    spool = getattr(message, "_data_set_file", None)
    if isinstance(spool, Spool):
        spool.discard()


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with the bounds installed on each new association."""

    server: GuardedServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        server = self.server
        guard_association(
            assoc, server.limits, server.on_refused, lambda: server.active_associations
        )
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """The association server: TLS per connection, timeouts on every socket, bounded threads."""

    # Connection threads only shake hands and start the association: never wait for them.
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        ae: Any,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: Limits,
        on_refused: RefusalHook,
    ) -> None:
        self.limits = limits
        self.on_refused = on_refused
        self._handshakes = 0
        self._handshakes_lock = threading.Lock()
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=GuardedRequestHandler,
        )

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only; the TLS handshake happens in the connection's thread."""
        assert self.socket is not None
        client, address = self.socket.accept()
        # Accepted sockets do not inherit the listening socket's timeout.
        client.settimeout(self.limits.network_timeout_seconds)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        busy = len(self.active_associations) + self._handshakes
        if busy >= self.limits.max_connections:
            self.on_refused("too_many_connections", _address(client_address), "")
            return False
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.ssl_context is not None:
                request = self._tls_handshake(request, client_address)
                if request is None:
                    return
            self.finish_request(request, client_address)
        except Exception as exc:
            logger.warning(
                "event=connection_error from=%s error=%s",
                _address(client_address),
                type(exc).__name__,
            )
            self.shutdown_request(request)

    def _tls_handshake(self, request: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        with self._handshakes_lock:
            self._handshakes += 1
        try:
            tls = self.ssl_context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
            tls.settimeout(self.limits.network_timeout_seconds)
            tls.do_handshake()
            return tls
        except (OSError, ValueError) as exc:
            reason = "tls_timeout" if isinstance(exc, TimeoutError) else "tls_handshake_failed"
            self.on_refused(reason, _address(client_address), "")
            logger.debug("TLS handshake failed", exc_info=True)
            self.shutdown_request(request)
            return None
        finally:
            with self._handshakes_lock:
                self._handshakes -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr; one log line is enough.
        logger.warning("event=connection_error from=%s", _address(client_address))

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (open associations are not waited for)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        with contextlib.suppress(ValueError):
            self.ae._servers.remove(self)


def _address(client_address: Any) -> str:
    try:
        return f"{client_address[0]}:{client_address[1]}"
    except Exception:
        return str(client_address)


def force_close(associations: list[Any], wait_seconds: float = 2.0) -> None:
    """End associations whatever their peers do: cut each socket, then abort (bounded).

    Shutting the socket down first wakes a reader blocked in ``recv``; ``abort`` then runs in
    a daemon thread, so a library thread that does not stop cannot hold the caller.
    """
    aborters = []
    for assoc in associations:
        try:
            raw = assoc.dul.socket.socket
            if raw is not None:
                raw.shutdown(socket.SHUT_RDWR)
        except Exception:  # already closed by the peer or the reactor: nothing left to cut
            pass
        aborter = threading.Thread(target=assoc.abort, name="ctcovid-abort", daemon=True)
        aborter.start()
        aborters.append(aborter)
    deadline = time.monotonic() + wait_seconds
    for aborter in aborters:
        aborter.join(max(0.0, deadline - time.monotonic()))
    for assoc in associations:
        discard_spool(assoc)
