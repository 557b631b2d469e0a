"""The node's SR sender, built from its settings: C-STORE to ``config.peer`` (TLS when
``config.send_tls``) or STOW-RS to ``config.stow``, through :mod:`ctcovid.net.sender`."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Protocol

from ctcovid.net.sender import Cancel, send_file, stow_file
from ctcovid.node.config import NodeConfig


def client_ssl_context(config: NodeConfig) -> ssl.SSLContext:
    """TLS for sending: verify the peer against ``tls_ca`` and show our certificate."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(config.tls_ca) if config.tls_ca else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_cert is not None and config.tls_key is not None:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return context


class SrSender(Protocol):
    """Delivers one SR file; returns a ``key=value`` note on the outcome for the log line."""

    def send(self, path: Path, cancel: Cancel | None = None) -> str: ...


class CStoreSender:
    """C-STORE to ``config.peer``, over TLS when ``config.send_tls``."""

    def __init__(self, config: NodeConfig) -> None:
        assert config.peer is not None
        self.config = config
        self.peer = config.peer
        self.ssl_context = client_ssl_context(config) if config.send_tls else None

    def send(self, path: Path, cancel: Cancel | None = None) -> str:
        status = send_file(
            path,
            self.peer,
            calling_ae_title=self.config.ae_title,
            ssl_context=self.ssl_context,
            timeout_seconds=self.config.network_timeout_seconds,
            max_pdu_bytes=self.config.max_pdu_bytes,
            deadline_seconds=self.config.send_deadline,
            cancel=cancel,
        )
        return f"status=0x{status:04X}"


class StowSender:
    """STOW-RS to ``config.stow``; credentials from ``$CTCOVID_STOW_AUTH`` or the file."""

    def __init__(self, config: NodeConfig) -> None:
        from ctcovid.net.dicomweb import STOW_AUTH_ENV, HttpAuth, make_client

        assert config.stow is not None
        self.config = config
        self.url = config.stow
        self.auth = HttpAuth.load(STOW_AUTH_ENV, config.stow_auth_file)

        def new_client() -> Any:
            client = make_client(
                self.url,
                self.auth,
                ca_file=config.stow_ca_file,
                timeout_seconds=config.network_timeout_seconds,
            )
            # One retry policy: the node's backoff (retry_seconds, max_attempts, recorded in
            # the job), not the client's own quiet retries of 429/503 within one send.
            client.set_http_retry_params(retry=False)
            return client

        self._make_client = new_client
        # Made now: a bad URL or a missing DICOMweb extra shows at start, not at the first send.
        self._client: Any = self._make_client()

    def send(self, path: Path, cancel: Cancel | None = None) -> str:
        if self._client is None:
            self._client = self._make_client()
        try:
            stow_file(
                path,
                self.url,
                client=self._client,
                timeout_seconds=self.config.network_timeout_seconds,
                deadline_seconds=self.config.send_deadline,
                cancel=cancel,
            )
        except BaseException:
            # After a failure, abandoned or cancelled request the next send opens new
            # connections rather than share a session with a request that may still run.
            self._client = None
            raise
        return "stored=stow-rs"


def sr_sender(config: NodeConfig) -> SrSender | None:
    """The sender for ``config``'s destination; None when SRs stay in the store.

    Raises :class:`~ctcovid.errors.ConfigError` for unreadable credentials or a bad URL, and
    ``OSError``/``ssl.SSLError`` for unreadable TLS files.
    """
    if config.stow is not None:
        return StowSender(config)
    if config.peer is not None:
        return CStoreSender(config)
    return None
