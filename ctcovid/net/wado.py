"""WADO-RS retrieval of one series (PS3.18 10.4), held to the listener's limits.

What a server may do, and what happens:

- answer slowly, or trickle bytes: the whole retrieval, request to last part, runs under one
  deadline; at the deadline the connection is shut down and :class:`~ctcovid.errors.PacsError`
  says so (the series becomes a ``failed`` row; the batch goes on);
- send an instance larger than ``max_instance_bytes``: refused at that byte, not after;
- send a syntax the ingest does not decode: only the syntaxes of
  :data:`~ctcovid.dicom.syntaxes.DECODABLE_TRANSFER_SYNTAXES` are asked for (never Deflate,
  never ``transfer-syntax=*``), and a part that is deflated anyway is refused from its declared
  syntax, before any of its data set is parsed (inflating is unbounded work);
- compress the HTTP body: refused (``Accept-Encoding: identity`` is asked for), for the same
  reason.

The multipart body is read part by part; each part goes to a spool file as it arrives, and only
its PS3.10 file meta information (bounded by the part's size) is read to learn its SOP Instance
UID and transfer syntax, both checked before the instance reaches the cache.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ctcovid.dicom.syntaxes import DECODABLE_TRANSFER_SYNTAXES
from ctcovid.dicom.uids import InvalidUidError, check_uid
from ctcovid.errors import PacsError
from ctcovid.net.query import InstanceWriter, SeriesMatch

logger = logging.getLogger(__name__)

CHUNK_BYTES = 65_536
MAX_PART_HEADER_BYTES = 16_384  # the MIME headers of one part
MAX_PREAMBLE_BYTES = 65_536  # whatever precedes the first boundary
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"


def accept_header() -> str:
    """The ``Accept`` of a series retrieval: one media range per syntax the ingest decodes.

    Explicit VR Little Endian is preferred (``q`` 1, the others 0.9) and, for servers that
    ignore ``q``, the list starts and ends with an uncompressed syntax: Orthanc 1.10's DICOMweb
    plugin takes the last range and ignores ``q`` (asked last for RLE, it answered HTTP 500,
    "Cannot transcode image"), other servers take the first.
    """
    others = sorted(
        uid for uid in DECODABLE_TRANSFER_SYNTAXES if uid not in (_EXPLICIT_LE, _IMPLICIT_LE)
    )
    ranges = [f"{uid}; q=0.9" for uid in [_IMPLICIT_LE, *others]] + [_EXPLICIT_LE]
    return ", ".join(
        f'multipart/related; type="application/dicom"; transfer-syntax={item}' for item in ranges
    )


class _Deadline:
    """When the retrieval must end; shuts the connection down then, whatever blocks on it."""

    def __init__(self, seconds: float, what: str):
        self.seconds = seconds
        self.what = what
        self.ends = time.monotonic() + seconds
        self.passed = threading.Event()
        self._response: Any = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, response: Any) -> None:
        with self._lock:
            self._response = response
        if self.passed.is_set():
            self._shut(response)

    def _fire(self) -> None:
        self.passed.set()
        with self._lock:
            response = self._response
        if response is not None:
            self._shut(response)

    @staticmethod
    def _shut(response: Any) -> None:
        # shutdown() wakes a thread blocked in recv on this socket; close() alone does not.
        with contextlib.suppress(Exception):
            response.raw.connection.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            response.close()

    def expired(self) -> PacsError:
        self.passed.set()
        return PacsError(f"{self.what} did not finish within {self.seconds:g} s; abandoned")

    def check(self) -> None:
        if self.passed.is_set() or time.monotonic() >= self.ends:
            raise self.expired()

    def cancel(self) -> None:
        self._timer.cancel()


def _get(
    session: Any, url: str, headers: dict[str, str], timeout: float, deadline: _Deadline
) -> Any:
    """``session.get`` (streamed) whose headers must arrive before the deadline.

    Until the response exists there is no socket to shut down, so the request runs in a thread
    of its own; past the deadline it is abandoned (it ends within one network timeout).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["response"] = session.get(url, headers=headers, stream=True, timeout=timeout)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="wado-request", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline.ends - time.monotonic()))
    if thread.is_alive():
        raise deadline.expired()
    if "error" in outcome:
        raise outcome["error"]
    response = outcome["response"]
    deadline.watch(response)
    return response


def _boundary(content_type: str, where: str) -> bytes:
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        raise PacsError(f"{where}: answered {content_type!r}, not multipart/related")
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    raise PacsError(f"{where}: multipart answer without a boundary")


def _part_syntax(headers: dict[str, str]) -> str:
    for param in headers.get("content-type", "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "transfer-syntax":
            return value.strip().strip('"')
    return ""


class _Parts:
    """A ``multipart/related`` body read chunk by chunk, each part into a sink, within caps."""

    def __init__(self, read: Callable[[], bytes], boundary: bytes, where: str):
        self._read = read
        self._buf = b""
        self._eof = False
        self.delimiter = b"--" + boundary
        self.where = where

    def _more(self) -> bool:
        if self._eof:
            return False
        chunk = self._read()
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    def _until(self, marker: bytes, limit: int, what: str) -> bytes:
        """The bytes before ``marker`` (consumed with it), at most ``limit`` of them."""
        while True:
            found = self._buf.find(marker)
            if 0 <= found <= limit:
                head, self._buf = self._buf[:found], self._buf[found + len(marker) :]
                return head
            if len(self._buf) > limit + len(marker):
                raise PacsError(f"{self.where}: {what} longer than {limit} bytes")
            if not self._more():
                raise PacsError(f"{self.where}: answer ended inside {what}")

    def headers(self) -> dict[str, str] | None:
        """The headers of the next part, or None after the closing delimiter."""
        if self._starts_closing():
            return None
        if not self._buf:
            raise PacsError(f"{self.where}: answer ended without its closing delimiter")
        block = self._until(b"\r\n\r\n", MAX_PART_HEADER_BYTES, "part headers")
        out = {}
        for line in block.decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                out[name.strip().lower()] = value.strip()
        return out

    def start(self) -> None:
        """Skip what precedes the first boundary."""
        self._until(self.delimiter, MAX_PREAMBLE_BYTES, "the preamble")
        self._end_delimiter_line()

    def _end_delimiter_line(self) -> None:
        if not self._starts_closing():
            self._until(b"\r\n", 1024, "a delimiter line")

    def _starts_closing(self) -> bool:
        while len(self._buf) < 2 and self._more():
            pass
        return self._buf.startswith(b"--")

    def body(self, sink: BinaryIO, limit: int, what: str) -> int:
        """Copy the next part's body into ``sink`` as it arrives; its size."""
        marker = b"\r\n" + self.delimiter
        size = 0
        while True:
            found = self._buf.find(marker)
            if found >= 0:
                data, self._buf = self._buf[:found], self._buf[found + len(marker) :]
            else:
                cut = max(0, len(self._buf) - len(marker) + 1)  # a marker may straddle chunks
                data, self._buf = self._buf[:cut], self._buf[cut:]
            size += len(data)
            if size > limit:
                raise PacsError(f"{self.where}: {what} is larger than {limit} bytes; refused")
            sink.write(data)
            if found >= 0:
                self._end_delimiter_line()
                return size
            if not self._more():
                raise PacsError(f"{self.where}: answer ended inside {what}")


def _chunks(response: Any, deadline: _Deadline) -> Callable[[], bytes]:
    def read() -> bytes:
        deadline.check()
        try:
            # read1: what has arrived (up to CHUNK_BYTES), so the deadline is seen between reads
            # of a trickle; a stall is ended by the deadline shutting the socket down.
            data: bytes = response.raw.read1(CHUNK_BYTES, decode_content=False)
        except Exception:
            deadline.check()
            raise
        if not data:
            deadline.check()
        return data

    return read


def _meta(spool: BinaryIO, where: str) -> tuple[str, str]:
    """``(SOPInstanceUID, TransferSyntaxUID)`` from a part's PS3.10 file meta information."""
    spool.seek(0)
    try:
        read_preamble(spool, force=False)
        meta = _read_file_meta_info(spool)
    except Exception as exc:  # pydicom raises many types on bad input
        raise PacsError(
            f"{where}: not a DICOM file with file meta information ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        sop = check_uid(meta.get("MediaStorageSOPInstanceUID"), "MediaStorageSOPInstanceUID")
        syntax = check_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID")
    except InvalidUidError as exc:
        raise PacsError(f"{where}: {exc}") from exc
    return sop, syntax


def syntax_refusal(path: Path) -> str:
    """Why the retrieved file at ``path`` must not be parsed further, or ``""``.

    Only its file meta information is read: a deflated data set (from any retrieval) would be
    inflated whole by the header reader, without a bound, in the process that calls it.
    """
    try:
        with open(path, "rb") as fh:
            _, syntax = _meta(fh, str(path))
            _refuse_syntax(syntax, f"instance {path.stem}")
    except (OSError, PacsError) as exc:
        return str(exc)
    return ""


def _refuse_syntax(syntax: str, where: str) -> None:
    if syntax not in DECODABLE_TRANSFER_SYNTAXES:
        name = "Deflate" if syntax == DeflatedExplicitVRLittleEndian else "a syntax"
        raise PacsError(
            f"{where}: transfer syntax {syntax} ({name} the ingest does not decode) was not "
            "asked for; refused unparsed"
        )


def iter_instances(
    parts: _Parts, *, max_instance_bytes: int, where: str
) -> Iterator[tuple[str, bytes]]:
    """``(SOPInstanceUID, file bytes)`` of each part, each checked before it is yielded."""
    parts.start()
    for n in range(1, 1_000_000):  # a series of a million instances is not a series
        headers = parts.headers()
        if headers is None:
            return
        what = f"instance {n}"
        declared = _part_syntax(headers)
        if declared:
            _refuse_syntax(declared, f"{where}: {what}")
        with tempfile.TemporaryFile(prefix="ctcovid-wado-") as spool:
            parts.body(spool, max_instance_bytes, what)
            sop, syntax = _meta(spool, f"{where}: {what}")
            _refuse_syntax(syntax, f"{where}: instance {sop}")
            spool.seek(0)
            yield sop, spool.read()
    raise PacsError(f"{where}: more than a million parts")


def retrieve_series(
    session: Any,
    base_url: str,
    series: SeriesMatch,
    write: InstanceWriter,
    *,
    timeout_seconds: float,
    deadline_seconds: float,
    max_instance_bytes: int,
) -> int:
    """WADO-RS every instance of ``series`` into ``write``; the number written.

    Raises
    ------
    PacsError
        When the server refuses, the deadline passes, an instance is over the cap, not DICOM,
        or in a syntax not asked for, or the series comes back empty. Nothing of a refused part
        is written.
    """
    from ctcovid.net.cache import CacheFullError

    study = check_uid(series.study_instance_uid, "StudyInstanceUID")
    uid = check_uid(series.series_instance_uid, "SeriesInstanceUID")
    url = f"{base_url}/studies/{quote(study)}/series/{quote(uid)}"
    where = f"{base_url}: WADO-RS series {uid}"
    deadline = _Deadline(deadline_seconds, where)
    headers = {"Accept": accept_header(), "Accept-Encoding": "identity"}
    stored = 0
    try:
        response = _get(session, url, headers, timeout_seconds, deadline)
        with response:
            if response.status_code >= 400:
                reason = str(getattr(response, "reason", "") or "").strip()
                raise PacsError(f"{where} failed (HTTP {response.status_code} {reason})".strip())
            encoding = response.headers.get("Content-Encoding", "identity").lower()
            if encoding not in ("", "identity"):
                raise PacsError(f"{where}: answer compressed with {encoding!r}; refused")
            boundary = _boundary(response.headers.get("Content-Type", ""), where)
            parts = _Parts(_chunks(response, deadline), boundary, where)
            for sop, data in iter_instances(
                parts, max_instance_bytes=max_instance_bytes, where=where
            ):
                write(sop, data)
                stored += 1
    except (PacsError, CacheFullError):
        raise
    except Exception as exc:  # requests' and urllib3's errors: refused, TLS, reset
        if deadline.passed.is_set():
            raise deadline.expired() from exc
        raise PacsError(
            f"{where} failed after {stored} instance(s) ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        deadline.cancel()
    if stored == 0:
        raise PacsError(f"{base_url} delivered no instance of series {uid}")
    return stored
