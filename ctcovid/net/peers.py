"""The other end of an association: AE titles and ``HOST:PORT:AET`` peers (PS3.5 6.2, PS3.8).

Shared by everything that opens or accepts an association: the node's SR sender, the batch's
PACS client and its C-MOVE receiver, the listener's allow-list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ctcovid.errors import ConfigError

# PS3.5 6.2: an AE title is at most 16 characters, no backslash and no control characters.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(value: str, what: str) -> str:
    """Return ``value`` stripped; a :class:`ConfigError` if it is not a valid AE title."""
    title = value.strip()
    if not _AE_TITLE.match(title):
        raise ConfigError(
            f"{what} must be 1 to 16 printable characters without backslash. Received: {value!r}."
        )
    return title


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network: where SRs go, or the PACS a batch queries."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``HOST:PORT:AET`` (an IPv6 host goes in brackets: ``[::1]:104:PACS``)."""
        match = re.match(r"^(\[[^\]]+\]|[^:]+):(\d+):(.+)$", text.strip())
        if not match:
            raise ConfigError(f"peer must look like HOST:PORT:AET. Received: {text!r}.")
        host, port, aet = match.groups()
        port_number = int(port)
        if not 0 < port_number < 65536:
            raise ConfigError(f"peer port must be 1-65535. Received: {text!r}.")
        return cls(host.strip("[]"), port_number, check_ae_title(aet, "peer AE title"))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.ae_title}"
