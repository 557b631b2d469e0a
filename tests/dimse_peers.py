"""Peers for the PACS client's tests, all on 127.0.0.1: a small archive (pynetdicom SCP) and a
proxy that passes an association's first PDUs, then stalls or trickles (plain sockets)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

PACS_AET = "PACS"
# Every wait in these peers ends: a stalled peer gives up after this.
STALL_LIMIT_SECONDS = 60.0


def ct_instance(study: str, series: str, *, pixel_bytes: int = 64, sop: str = "") -> Dataset:
    """A CT Image Storage data set: the UIDs and ``pixel_bytes`` of pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.Columns = min(4096, pixel_bytes // 2)
    ds.Rows = pixel_bytes // (2 * ds.Columns)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(pixel_bytes)
    return ds


@dataclass
class FakePacs:
    """A Study Root archive: C-FIND at every level, C-GET and C-MOVE of a series.

    ``announced`` (default: ``instances``) is what the image-level C-FIND answers;
    ``delivered`` (default: ``instances``) what a C-GET or C-MOVE sends; ``final_status``,
    when set, ends a retrieval instead of pynetdicom's own count. ``pending_every_seconds``
    makes a study C-FIND answer one match per interval, without end (bounded).
    """

    instances: list[Dataset]
    announced: list[Dataset] | None = None
    delivered: list[Dataset] | None = None
    final_status: int | None = None
    move_destination: tuple[str, int] | None = None
    pending_every_seconds: float | None = None
    ssl_context: ssl.SSLContext | None = None
    queries: list[Dataset] = field(default_factory=list)
    # (abstract syntax, transfer syntaxes) of each context the last C-GET's requestor proposed
    get_contexts: list[tuple[str, list[str]]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        ae = AE(ae_title=PACS_AET)
        ae.maximum_pdu_size = 16384
        for model in (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        ):
            ae.add_supported_context(model)
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scu_role=True,
                                 scp_role=True)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        self._ae = ae
        self._server = ae.start_server(
            ("127.0.0.1", 0), block=False, ssl_context=self.ssl_context, evt_handlers=[
                (evt.EVT_C_FIND, self._find), (evt.EVT_C_GET, self._get),
                (evt.EVT_C_MOVE, self._move)],
        )
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()

    def _find(self, event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        self.queries.append(query)
        level = query.QueryRetrieveLevel
        if level == "STUDY" and self.pending_every_seconds is not None:
            end = time.monotonic() + STALL_LIMIT_SECONDS
            while time.monotonic() < end:
                match = Dataset()
                match.QueryRetrieveLevel = "STUDY"
                match.StudyInstanceUID = generate_uid()
                yield 0xFF00, match
                time.sleep(self.pending_every_seconds)
            return
        seen = set()
        for ds in (self.announced if self.announced is not None else self.instances):
            match = Dataset()
            match.QueryRetrieveLevel = level
            match.StudyInstanceUID = ds.StudyInstanceUID
            if level == "STUDY":
                match.PatientID = ds.PatientID  # returned, as a PACS does with a matching key
            if level in ("SERIES", "IMAGE"):
                match.SeriesInstanceUID = ds.SeriesInstanceUID
            if level == "SERIES":
                match.Modality = "CT"
                match.NumberOfSeriesRelatedInstances = len(self.instances)
            if level == "IMAGE":
                match.SOPInstanceUID = ds.SOPInstanceUID
                match.SOPClassUID = ds.SOPClassUID
            key = tuple(str(elem.value) for elem in match)
            if key not in seen:
                seen.add(key)
                yield 0xFF00, match
        yield 0x0000, None

    def _sent(self) -> list[Dataset]:
        return self.delivered if self.delivered is not None else self.instances

    def _get(self, event) -> Iterator:
        self.get_contexts = [
            (str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
            for cx in event.assoc.requestor.requested_contexts
        ]
        sent = self._sent()
        # A final status of our own counts as one more (failed) sub-operation.
        yield len(sent) + (self.final_status is not None)
        for ds in sent:
            yield 0xFF00, ds
        if self.final_status is not None:
            yield self.final_status, None

    def _move(self, event) -> Iterator:
        assert self.move_destination is not None
        yield self.move_destination
        yield from self._get(event)


class StallingProxy:
    """Forwards connections to ``upstream``; on connection number ``stall_connection`` it
    passes the first ``pass_pdus`` PDUs the upstream sends, then either sends 2 bytes of the
    next one and stalls (``mode="partial"``) or sends it one byte a second (``"trickle"``)."""

    def __init__(self, upstream: int, *, stall_connection: int = 0, pass_pdus: int = 0,
                 mode: str = "partial") -> None:
        assert mode in ("partial", "trickle")
        self.upstream = upstream
        self.stall_connection = stall_connection
        self.pass_pdus = pass_pdus
        self.mode = mode
        self.stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            stall = n == self.stall_connection
            n += 1
            threading.Thread(target=_pipe, args=(client, server, self.stop), daemon=True).start()
            down: Callable[..., None] = self._down_stalling if stall else _pipe
            threading.Thread(target=down, args=(server, client, self.stop), daemon=True).start()

    def _down_stalling(self, server: socket.socket, client: socket.socket,
                       stop: threading.Event) -> None:
        try:
            for _ in range(self.pass_pdus):
                client.sendall(_read_pdu(server))
            pdu = _read_pdu(server)
            if self.mode == "partial":
                client.sendall(pdu[:2])
                stop.wait(STALL_LIMIT_SECONDS)
            else:
                for byte in pdu:
                    if stop.wait(1.0):
                        break
                    client.sendall(bytes([byte]))
        except OSError:
            pass
        finally:
            _close(client, server)


def _read_pdu(sock: socket.socket) -> bytes:
    sock.settimeout(STALL_LIMIT_SECONDS)
    header = _read_exact(sock, 6)
    (length,) = struct.unpack(">L", header[2:])
    return header + _read_exact(sock, length)


def _read_exact(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise OSError("closed")
        out += chunk
    return bytes(out)


def _pipe(src: socket.socket, dst: socket.socket, stop: threading.Event) -> None:
    src.settimeout(0.5)
    try:
        while not stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src, dst)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def stalling_server(mode: str) -> tuple[int, threading.Event]:
    """A plain server that reads the A-ASSOCIATE-RQ, then sends 2 bytes of a 100-byte PDU and
    stalls (``"partial"``), or sends that PDU one byte a second (``"trickle"``)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(STALL_LIMIT_SECONDS)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            _read_pdu(conn)
            pdu = struct.pack(">BBL", 0x02, 0, 94) + bytes(94)
            if mode == "partial":
                conn.sendall(pdu[:2])
                stop.wait(STALL_LIMIT_SECONDS)
            else:
                for byte in pdu:
                    if stop.wait(1.0):
                        break
                    conn.sendall(bytes([byte]))
        except OSError:
            pass
        finally:
            _close(conn, listener)

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1]), stop
