"""HL7 v2 over MLLP (the Minimal Lower Layer Protocol, HL7 v2.5.1 Appendix C): one message out,
its acknowledgement back, on a connection of its own, under hard limits.

A message is framed as ``<VT> message <FS><CR>``; the receiver answers with an ACK framed the
same way. The ACK's MSA-1 decides (original and enhanced acknowledgement modes alike):

========  ===========================================================================
MSA-1     outcome
========  ===========================================================================
AA, CA    delivered
AE, AR,   refused: :class:`Hl7Refused` with MSA-3 and the ERR segments' text. Sending
CE, CR    the same message again cannot help; the caller records it as failed
========  ===========================================================================

Everything else is a :class:`~ctcovid.errors.PacsError` that may pass (the caller retries with
backoff): the connection refused or broken, no complete ACK within ``timeout_seconds`` of the
last byte or ``deadline_seconds`` of the start, an ACK larger than ``max_ack_bytes``, an ACK
that is not HL7 or acknowledges another message (MSA-2 is not our MSH-10). The send runs under
:func:`~ctcovid.net.sender.run_with_deadline`, like a C-STORE, so the deadline and a stopping
node end it at once whatever the peer does.

ACKs are read with a small tolerant reader, not validated against a version: a RIS answers in
the version it speaks (2.3, 2.5, ...), and only MSA and ERR matter here.

With ``tls`` the connection is TLS 1.2 or later (the same client context as a DICOM TLS
association, :func:`~ctcovid.net.tls.client_ssl_context`): the RIS's certificate is verified
against ``tls_ca`` (default: the system's CAs) and its host name, and ``tls_cert``/``tls_key``
are shown to a RIS that asks for a client certificate. A failed handshake may pass (a RIS whose
certificate is being renewed): it is retried like a refused connection, and its reason names the
TLS error.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctcovid.errors import ConfigError, PacsError
from ctcovid.net.query import HeldInstance
from ctcovid.net.sender import Cancel, run_with_deadline
from ctcovid.report.oru import OruSettings

logger = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
DELIVERED = frozenset({"AA", "CA"})
REFUSED = frozenset({"AE", "AR", "CE", "CR"})
DEFAULT_MAX_ACK_BYTES = 65_536


class Hl7Refused(PacsError):
    """The receiver answered AE/AR (or CE/CR): the message was refused; ``code`` and the
    ``text`` of MSA-3 and ERR say why. Sending it again cannot change that."""

    def __init__(self, message: str, *, code: str, text: str) -> None:
        super().__init__(message)
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Endpoint:
    """An MLLP receiver, ``HOST:PORT``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str = "hl7") -> Endpoint:
        host, sep, port = str(text).strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{what} must be HOST:PORT (an MLLP receiver). Received: {text!r}.")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Ack:
    """The receiver's acknowledgement: MSA-1 ``code``, MSA-2 ``control_id``, and the text of
    MSA-3 and the ERR segments."""

    code: str
    control_id: str
    text: str


@dataclass(frozen=True)
class MllpSettings:
    """Where ORUs go and the limits of one send: ``timeout_seconds`` bounds the connection and
    each wait for data, ``deadline_seconds`` (default: three times that) the whole send, and
    ``max_ack_bytes`` the acknowledgement read."""

    endpoint: Endpoint
    timeout_seconds: float = 30.0
    deadline_seconds: float | None = None
    max_ack_bytes: int = DEFAULT_MAX_ACK_BYTES
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of a send (None without ``tls``); :class:`ConfigError` when a file
        cannot be loaded, so a front can check it at start."""
        if not self.tls:
            return None
        from ctcovid.net.tls import client_ssl_context

        return client_ssl_context(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)

    @property
    def deadline(self) -> float:
        if self.deadline_seconds is not None:
            return self.deadline_seconds
        return 3 * self.timeout_seconds

    def __str__(self) -> str:
        return f"mllp{'+tls' if self.tls else ''} {self.endpoint}"

    @property
    def uri(self) -> str:
        """``mllp://HOST:PORT`` (``mllp+tls://`` with TLS), as audit messages name the RIS."""
        host = f"[{self.endpoint.host}]" if ":" in self.endpoint.host else self.endpoint.host
        return f"mllp{'+tls' if self.tls else ''}://{host}:{self.endpoint.port}"


def send_message(
    message: bytes,
    control_id: str,
    settings: MllpSettings,
    *,
    cancel: Cancel | None = None,
) -> Ack:
    """Send one HL7 message (ER7 bytes, segments ended by CR) and return its positive ACK.

    Raises
    ------
    Hl7Refused
        The receiver answered AE, AR, CE or CR.
    PacsError
        Anything that may pass: connection refused or lost, timeout, deadline, an ACK too large
        or unreadable, or one for another message.
    SendCancelled
        ``cancel`` was set before the ACK came.
    """
    endpoint = settings.endpoint
    context = settings.ssl_context()
    holder: dict[str, socket.socket] = {}

    def abort() -> None:
        sock = holder.get("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def work() -> bytes:
        try:
            sock = socket.create_connection(
                (endpoint.host, endpoint.port), timeout=settings.timeout_seconds
            )
        except OSError as exc:
            raise PacsError(
                f"{endpoint}: cannot connect for HL7 message {control_id}: {exc}"
            ) from None
        holder["socket"] = sock
        try:
            sock.settimeout(settings.timeout_seconds)
            if context is not None:
                try:
                    sock = context.wrap_socket(sock, server_hostname=endpoint.host)
                except ssl.SSLError as exc:
                    detail = getattr(exc, "verify_message", "") or ""
                    raise PacsError(
                        f"{endpoint}: TLS handshake failed for HL7 message {control_id}: "
                        f"{exc.reason or exc}{': ' + detail if detail else ''}"
                    ) from None
                holder["socket"] = sock
            sock.sendall(START_BLOCK + message + END_BLOCK)
            return _read_frame(sock, settings.max_ack_bytes, endpoint, control_id)
        except TimeoutError:
            raise PacsError(
                f"{endpoint}: no acknowledgement of HL7 message {control_id} within "
                f"{settings.timeout_seconds:g} s"
            ) from None
        except OSError as exc:
            raise PacsError(
                f"{endpoint}: connection lost sending HL7 message {control_id}: {exc}"
            ) from None
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    start = time.monotonic()
    frame = run_with_deadline(
        work,
        deadline_seconds=settings.deadline,
        cancel=cancel,
        abort=abort,
        name=f"mllp-{control_id}",
        cancelled=f"{endpoint}: sending HL7 message {control_id} abandoned (stopping)",
        late=f"{endpoint}: HL7 message {control_id} not acknowledged within "
        f"{settings.deadline:g} s; connection closed",
    )
    ack = parse_ack(frame, endpoint, control_id)
    logger.debug(
        "event=hl7_acknowledged peer=%s control_id=%s code=%s seconds=%.2f",
        endpoint,
        control_id,
        ack.code,
        time.monotonic() - start,
    )
    if ack.code in DELIVERED:
        return ack
    if ack.code in REFUSED:
        raise Hl7Refused(
            f"{endpoint} answered HL7 message {control_id} with {ack.code}"
            + (f": {ack.text}" if ack.text else ""),
            code=ack.code,
            text=ack.text,
        )
    raise PacsError(f"{endpoint}: acknowledgement of {control_id} has MSA-1 {ack.code!r}")


def _read_frame(sock: socket.socket, limit: int, endpoint: Endpoint, control_id: str) -> bytes:
    """One MLLP frame's content, at most ``limit`` bytes; bytes before the start are ignored."""
    data = b""
    while True:
        end = data.find(END_BLOCK)
        if end >= 0:
            start = data.find(START_BLOCK)
            if 0 <= start < end:
                return data[start + 1 : end]
        if len(data) > limit + 3:
            raise PacsError(
                f"{endpoint}: acknowledgement of HL7 message {control_id} exceeds {limit} bytes"
            )
        chunk = sock.recv(min(65_536, limit + 4 - len(data)))
        if not chunk:
            raise PacsError(
                f"{endpoint}: connection closed before the acknowledgement of HL7 message "
                f"{control_id}"
            )
        data += chunk


def parse_ack(frame: bytes, endpoint: Endpoint | str, control_id: str) -> Ack:
    """MSA and ERR of an acknowledgement; :class:`PacsError` when it has no MSA or
    acknowledges another message."""
    text = frame.decode("utf-8", errors="replace")
    segments = [s for s in text.replace("\n", "\r").split("\r") if s.strip()]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise PacsError(f"{endpoint}: the answer to HL7 message {control_id} is not HL7")
    field_sep = segments[0][3]
    component_sep = segments[0][4]
    msa = next((s.split(field_sep) for s in segments if s.startswith("MSA" + field_sep)), None)
    if msa is None or len(msa) < 2:
        raise PacsError(f"{endpoint}: the answer to HL7 message {control_id} has no MSA")
    code = msa[1].strip().upper()
    acked = msa[2].strip() if len(msa) > 2 else ""
    if acked and acked != control_id:
        raise PacsError(
            f"{endpoint}: an acknowledgement of {acked!r} came back for HL7 message {control_id}"
        )
    notes = [msa[3].strip()] if len(msa) > 3 and msa[3].strip() else []
    for segment in segments:
        if segment.startswith("ERR" + field_sep):
            notes.extend(_err_text(segment.split(field_sep), component_sep))
    return Ack(code, acked, "; ".join(dict.fromkeys(n for n in notes if n)))


def _err_text(err: list[str], component_sep: str) -> list[str]:
    """The human text of an ERR segment: ERR-8 user message, ERR-7 diagnostics, ERR-3 error
    code text (2.5), or ERR-1 (2.3: location and code)."""
    found = []
    for index in (8, 7):
        if len(err) > index and err[index].strip():
            found.append(err[index].strip())
    if len(err) > 3 and err[3].strip():
        parts = err[3].split(component_sep)
        found.append(parts[1] if len(parts) > 1 and parts[1] else parts[0])
    if not found and len(err) > 1 and err[1].strip():
        found.append(err[1].replace(component_sep, " ").strip())
    return found


@dataclass(frozen=True)
class Hl7Settings:
    """A RIS as a destination of SRs (batch): each SR sent becomes its ORU^R01 (``oru``, see
    :mod:`ctcovid.report.oru`) sent by MLLP (``mllp``)."""

    mllp: MllpSettings
    oru: OruSettings

    def __str__(self) -> str:
        return f"hl7 {self.mllp.endpoint}"


class Hl7Sender:
    """An :class:`~ctcovid.net.sender.SrSender` whose destination is a RIS: ``send`` builds the
    ORU of the SR file (``C`` when the SR is a revision, which a sender plans only over a result
    it delivered there before) and sends it. The message derives from the file alone, so a
    resend is the very same message, MSH-10 included.

    A RIS cannot be asked which SRs it holds: :meth:`held` answers nothing, and the sender's
    own delivery record decides revisions.
    """

    def __init__(self, settings: Hl7Settings) -> None:
        self.settings = settings

    def send(self, path: Path, cancel: Cancel | None = None, also: Sequence[Path] = ()) -> str:
        """The ORU of the SR at ``path``; ``also`` (its result card, a DICOM image for the PACS)
        has no place in an ORU and is not sent."""
        import pydicom

        from ctcovid.report.oru import build_oru

        sr = pydicom.dcmread(path)
        revision = int(sr.get("InstanceNumber") or 1)
        oru = build_oru(sr, self.settings.oru, corrected=revision > 1)
        ack = send_message(oru.to_bytes(), oru.control_id, self.settings.mllp, cancel=cancel)
        return f"ack={ack.code} control_id={oru.control_id} status={oru.result_status}"

    def held(self, study_instance_uid: str, series_instance_uid: str) -> list[HeldInstance]:
        return []
