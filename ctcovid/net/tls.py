"""TLS contexts for DICOM associations (PS3.15 B.1, the TLS secure transport profile).

Built from three plain paths (certificate, key, CA), as the command line gives them, so every
association a batch opens or accepts towards a PACS takes the same options. TLS 1.2 at least;
the peer is always verified (against ``ca`` or the system's store when opening, against ``ca``
when accepting, if given).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ctcovid.errors import ConfigError

# The oldest TLS version accepted, opening or accepting an association.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def _load_chain(context: ssl.SSLContext, cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{cert} / {key}: cannot load the TLS certificate ({exc})") from exc


def client_ssl_context(
    *, cert: Path | None = None, key: Path | None = None, ca: Path | None = None
) -> ssl.SSLContext:
    """TLS for opening associations: verify the peer against ``ca`` (default: the system's
    CAs) and, with ``cert`` and ``key``, show our certificate to peers that ask for one."""
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{ca}: cannot load the TLS CA certificates ({exc})") from exc
    context.minimum_version = MINIMUM_TLS_VERSION
    _load_chain(context, cert, key)
    return context


def server_ssl_context(
    *, cert: Path | None, key: Path | None, ca: Path | None = None
) -> ssl.SSLContext:
    """TLS for accepting associations (the C-MOVE receiver): our certificate; with ``ca``,
    callers must show a certificate it signed."""
    if cert is None or key is None:
        raise ConfigError("accepting TLS associations needs --tls-cert and --tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_TLS_VERSION
    _load_chain(context, cert, key)
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{ca}: cannot load the TLS CA certificates ({exc})") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context
