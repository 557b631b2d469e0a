"""Settings of the DICOM node: one frozen dataclass, read from TOML and overridden by flags.

A TOML file holds the same keys as :class:`NodeConfig` (``port``, ``ae_title``, ``peer``,
``store``, ``allow_aet``, ``stable_seconds`` ...), at top level or under a ``[node]`` table;
``peer`` is ``"HOST:PORT:AET"``; ``stow`` (a DICOMweb base URL) sends the SRs by STOW-RS
instead, with credentials from ``$CTCOVID_STOW_AUTH`` or ``stow_auth_file``, never from the
URL or the command line. Command-line flags win over the file.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ctcovid.dicom.rules import Rule, parse_rules
from ctcovid.errors import ConfigError
from ctcovid.net.guard import (
    DEFAULT_MAX_ASSOCIATION_SECONDS,
    DEFAULT_MAX_ASSOCIATIONS_PER_ADDRESS,
    DEFAULT_MAX_STORE_SECONDS,
)
from ctcovid.net.peers import Peer, check_ae_title
from ctcovid.net.sender import SendSettings

if TYPE_CHECKING:
    from ctcovid.net.mllp import MllpSettings
    from ctcovid.node.alerts import AlertSettings
    from ctcovid.report.oru import OruSettings


# The names rules give destinations: the SR's (peer or stow), and the RIS (hl7).
SR_DESTINATION = "default"
RIS_DESTINATION = "ris"

# Settings that name files or folders (besides the store): Path in a NodeConfig, and relative to
# the TOML file when given in one.
PATH_SETTINGS = (
    "model",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "stow_auth_file",
    "stow_ca_file",
    "audit_file",
    "audit_ca",
    "http_tls_cert",
    "http_tls_key",
    "http_auth_file",
)


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``ctcovid listen`` needs; see DESIGN.md, "The DICOM node"."""

    store: Path
    port: int = 11112
    host: str = "0.0.0.0"
    ae_title: str = "CTCOVID"
    peer: Peer | None = None
    # SRs by STOW-RS to this DICOMweb service instead of C-STORE to the peer.
    stow: str | None = None
    # 'Bearer TOKEN' or 'Basic USER:PASSWORD' for stow; default: $CTCOVID_STOW_AUTH.
    stow_auth_file: Path | None = None
    # CA (PEM) the STOW-RS service's certificate must be signed by; default: the system's.
    stow_ca_file: Path | None = None
    model: Path | None = None
    allow_aet: tuple[str, ...] = ()
    stable_seconds: float = 30.0
    retry_seconds: float = 30.0
    max_retry_seconds: float = 3600.0
    max_attempts: int = 8
    max_associations: int = 10
    max_pdu_bytes: int = 262_144
    min_free_mb: float = 1024.0
    # Each PDU must arrive whole within this time; idle associations end after it too.
    network_timeout_seconds: float = 60.0
    # Wall-clock caps, so that a peer sending one small PDU just inside the network timeout
    # cannot hold a slot forever: a whole association, and one C-STORE (first fragment of its
    # command to last of its data set). Past either the association is aborted.
    max_association_seconds: float = DEFAULT_MAX_ASSOCIATION_SECONDS
    max_store_seconds: float = DEFAULT_MAX_STORE_SECONDS
    # Associations one peer address may hold at once; more are rejected (transient), so that
    # one host cannot take every slot from the modalities.
    max_associations_per_address: int = DEFAULT_MAX_ASSOCIATIONS_PER_ADDRESS
    # A C-STORE data set larger than this is refused (0xA700); it never sits in memory.
    max_instance_mb: float = 1024.0
    # The whole send of one SR, connection to release; None: three network timeouts.
    send_deadline_seconds: float | None = None
    # A worker that reports no progress for this long is killed and restarted.
    worker_stall_seconds: float = 1800.0
    # Address-space limit of the decoder process (RLIMIT_AS); 0: no limit.
    decoder_memory_mb: int = 4096
    # With a decoder process: decode the next waiting series while the model scores this one.
    prefetch: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # None: use TLS towards the peer exactly when TLS is configured for receiving.
    peer_tls: bool | None = None
    # The node's HTTP server (status page, JSON API, probes, /metrics); None: no server.
    http_port: int | None = None
    # Loopback unless told otherwise; another address needs http_tls_* and http_auth_file.
    http_host: str = "127.0.0.1"
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    # Users (scrypt hashes) and API tokens allowed on the HTTP server (see ctcovid.node.webauth).
    http_auth_file: Path | None = None
    # Show patient name, ID and birth date on the page and in the API (off: accession only).
    http_show_phi: bool = False
    # Deprecated aliases of http_port and http_host (Prometheus metrics are at /metrics there).
    metrics_port: int | None = None
    metrics_host: str | None = None
    poll_seconds: float = 0.5
    batch_size: int = 32
    runtime: str = "auto"  # auto | keras | onnx | int8 (ctcovid.model.runtimes)
    # The audit trail (ctcovid.audit): a file of messages, and/or a syslog repository over TLS.
    audit_file: Path | None = None
    audit_syslog: str | None = None  # HOST:PORT
    audit_ca: Path | None = None
    # Alerts (ctcovid.node.alerts): a webhook URL (JSON {"text": ...}) and/or e-mail by SMTP.
    alert_webhook: str | None = None
    alert_smtp: str | None = None  # HOST:PORT
    alert_to: tuple[str, ...] = ()
    alert_from: str | None = None
    alert_after_minutes: float = 15.0
    alert_positive: bool = False
    # Routing rules ([[rule]] tables, see ctcovid.dicom.rules): which series are classified,
    # classified in shadow (kept, not sent) or ignored. None: classify every series.
    rule: tuple[dict[str, Any], ...] = ()
    # How long the files of an ignored series are kept (0: removed at once).
    ignore_keep_hours: float = 0.0
    # Named destinations ([destination.NAME] tables: kind "dicom" or "stow"), each with its own
    # delivery job per series; rules choose among them.
    destination: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Results to the RIS as HL7 v2.5.1 ORU^R01 over MLLP (ctcovid.report.oru), HOST:PORT.
    hl7: str | None = None
    # MLLP over TLS to the RIS: verified against tls_ca (else the system's CAs), tls_cert/tls_key
    # shown as the client certificate when set.
    hl7_tls: bool = False
    hl7_sending_application: str = "CTCOVID"
    hl7_sending_facility: str = ""
    hl7_receiving_application: str = ""
    hl7_receiving_facility: str = ""
    # Result label -> HL7 table 0027 priority ("covid=S"), written to hl7_priority_fields.
    hl7_priority: tuple[str, ...] = ("covid=S",)
    hl7_priority_fields: tuple[str, ...] = ("ORC-7", "OBR-27")
    # A result card (ctcovid.report.card, a Secondary Capture any viewer shows) with each SR,
    # built with it and sent with it to the same destination.
    result_card: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        if isinstance(self.rule, dict) or not isinstance(self.rule, list | tuple):
            raise ConfigError("rule: expected [[rule]] tables (a list of rules)")
        object.__setattr__(self, "rule", tuple(self.rule))
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "ae_title"))
        object.__setattr__(
            self, "allow_aet", tuple(check_ae_title(a, "allow_aet") for a in self.allow_aet)
        )
        if isinstance(self.peer, str):
            object.__setattr__(self, "peer", Peer.parse(self.peer))
        for name in PATH_SETTINGS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        self._check_stow()
        if self.audit_syslog:
            from ctcovid.audit import parse_endpoint

            parse_endpoint(self.audit_syslog)
            if self.audit_ca is None:
                raise ConfigError("audit_syslog needs audit_ca (the repository's CA, PEM).")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0-65535. Received: port={self.port}.")
        self._check_http()
        for name in (
            "stable_seconds",
            "retry_seconds",
            "min_free_mb",
            "poll_seconds",
            "decoder_memory_mb",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0. Received: {getattr(self, name)}.")
        if self.network_timeout_seconds <= 0:
            raise ConfigError(
                "network_timeout_seconds must be positive. "
                f"Received: {self.network_timeout_seconds}."
            )
        if self.max_instance_mb <= 0:
            raise ConfigError(
                f"max_instance_mb must be positive. Received: {self.max_instance_mb}."
            )
        for name in (
            "send_deadline_seconds",
            "worker_stall_seconds",
            "max_association_seconds",
            "max_store_seconds",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive. Received: {value}.")
        if self.max_retry_seconds < self.retry_seconds:
            raise ConfigError(
                f"max_retry_seconds ({self.max_retry_seconds}) must be >= retry_seconds "
                f"({self.retry_seconds})."
            )
        # as ctcovid.model.runtimes.RUNTIMES
        runtimes = ("auto", "keras", "onnx", "int8", "openvino", "bf16", "openvino-int8")
        if self.runtime not in runtimes:
            raise ConfigError(
                f"runtime must be one of {', '.join(runtimes)}. Received: {self.runtime!r}."
            )
        for name in (
            "max_attempts",
            "max_associations",
            "max_associations_per_address",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1. Received: {getattr(self, name)}.")
        # PS3.8 D.3.3.2.1: 0 means unlimited, which a node facing the network must not offer.
        if not 4096 <= self.max_pdu_bytes <= 16 * 1024 * 1024:
            raise ConfigError(
                f"max_pdu_bytes must be 4096 to 16 MiB. Received: {self.max_pdu_bytes}."
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither.")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_ca needs tls_cert and tls_key (the node's own certificate).")
        if isinstance(self.alert_to, str):
            object.__setattr__(self, "alert_to", (self.alert_to,))
        object.__setattr__(self, "alert_to", tuple(self.alert_to))
        self.alert_settings()
        self._check_hl7()
        if self.ignore_keep_hours < 0:
            raise ConfigError(
                f"ignore_keep_hours must be >= 0. Received: {self.ignore_keep_hours}."
            )
        if not isinstance(self.destination, dict):
            raise ConfigError("destination: expected [destination.NAME] tables")
        _ = self.destinations  # a bad destination stops the node at start, naming its key
        _ = self.rules  # a bad rule stops the node at start, naming its key

    def _check_hl7(self) -> None:
        """``hl7`` as HOST:PORT (or unset), the priority mapping and fields as lists."""
        if self.hl7 in (None, ""):
            object.__setattr__(self, "hl7", None)
        for name in ("hl7_priority", "hl7_priority_fields"):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = [f"{k}={v}" for k, v in value.items()]
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        self.oru_settings()
        if not isinstance(self.hl7_tls, bool):
            raise ConfigError(f"hl7_tls: expected true or false. Received: {self.hl7_tls!r}.")
        if self.hl7_tls and self.hl7 is None:
            raise ConfigError("hl7_tls needs hl7 (HOST:PORT of the RIS's MLLP listener)")
        if self.hl7 is not None:
            self.hl7_settings()

    def _check_http(self) -> None:
        """The HTTP server's settings; ``metrics_port``/``metrics_host`` (deprecated) alias
        ``http_port``/``http_host``."""
        if self.metrics_port is not None:
            if self.http_port is not None and self.http_port != self.metrics_port:
                raise ConfigError(
                    "metrics_port is a deprecated alias of http_port (metrics are served at "
                    f"/metrics there): give http_port only. Received: http_port={self.http_port}"
                    f", metrics_port={self.metrics_port}."
                )
            object.__setattr__(self, "http_port", self.metrics_port)
        if self.metrics_host is not None and self.http_host == "127.0.0.1":
            object.__setattr__(self, "http_host", self.metrics_host)
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ConfigError(f"http_port must be 0-65535. Received: {self.http_port}.")
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ConfigError("http_tls_cert and http_tls_key go together: give both or neither.")
        if self.http_port is None or is_loopback(self.http_host):
            return
        missing = [
            flag
            for flag, value in (
                ("--http-tls-cert and --http-tls-key", self.http_tls_cert),
                ("--http-auth-file", self.http_auth_file),
            )
            if value is None
        ]
        if missing:
            raise ConfigError(
                f"--http-host {self.http_host} is not loopback: the page and API need "
                f"{' and '.join(missing)} there (TLS and credentials), or use 127.0.0.1."
            )

    def _check_stow(self) -> None:
        if self.stow in (None, ""):
            object.__setattr__(self, "stow", None)
            for name in ("stow_auth_file", "stow_ca_file"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} needs stow (the STOW-RS URL).")
            return
        if self.peer is not None:
            raise ConfigError(
                "give peer (C-STORE) or stow (STOW-RS), not both: each SR goes one way. "
                f"Received: peer={self.peer}, stow={self.stow!r}."
            )
        object.__setattr__(
            self, "stow", check_stow_url(self.stow, "stow", "$CTCOVID_STOW_AUTH or stow_auth_file")
        )

    @property
    def sends(self) -> bool:
        """Whether SRs leave the node (by C-STORE to ``peer`` or STOW-RS to ``stow``)."""
        return self.peer is not None or self.stow is not None

    @functools.cached_property
    def destinations(self) -> tuple[NamedDestination, ...]:
        """The ``[destination.NAME]`` tables, checked, with their send settings (credentials
        files are read now, so an unreadable one shows at start)."""
        return tuple(
            _named_destination(self, str(name), table) for name, table in self.destination.items()
        )

    @property
    def destination_names(self) -> tuple[str, ...]:
        """The names rules may send to: ``default``, the SR's destination (``peer`` or
        ``stow``; none when the SRs stay in the store), ``ris`` when ``hl7`` is set, and the
        named destinations."""
        return (
            (SR_DESTINATION,) * self.sends
            + (RIS_DESTINATION,) * (self.hl7 is not None)
            + tuple(d.name for d in self.destinations)
        )

    @functools.cached_property
    def rules(self) -> tuple[Rule, ...]:
        """The routing rules, checked (:func:`ctcovid.dicom.rules.parse_rules`)."""
        rules = parse_rules(self.rule, self.destination_names)
        for i, rule in enumerate(rules):
            if rule.action != "classify" or rule.destinations is None:
                continue
            if not rule.destinations:
                raise ConfigError(
                    f"rule[{i}].destinations: rule {rule.name!r} classifies and sends nowhere; "
                    'use action = "shadow" to keep results without sending them'
                )
            if self.sends and SR_DESTINATION not in rule.destinations:
                raise ConfigError(
                    f"rule[{i}].destinations: rule {rule.name!r} leaves out {SR_DESTINATION!r}, "
                    "the SR's destination; a classified series' SR always goes there (sending "
                    "only to other destinations is not supported)"
                )
        return rules

    @property
    def sr_destination(self) -> str:
        """Where the SRs go, for log lines: ``HOST:PORT:AET``, ``stow-rs URL`` or ``none``."""
        if self.stow is not None:
            return f"stow-rs {self.stow}"
        return str(self.peer) if self.peer is not None else "none"

    @property
    def tls(self) -> bool:
        """Whether the listener requires TLS."""
        return self.tls_cert is not None

    @property
    def send_deadline(self) -> float:
        """Seconds one send of an SR may take in all."""
        if self.send_deadline_seconds is not None:
            return self.send_deadline_seconds
        return 3 * self.network_timeout_seconds

    @property
    def send_tls(self) -> bool:
        """Whether the SR goes to the peer over TLS."""
        return self.tls if self.peer_tls is None else self.peer_tls

    def send_settings(self) -> SendSettings | None:
        """Where and how the worker sends SRs; None when they stay in the store.

        Reads the STOW-RS credentials (``$CTCOVID_STOW_AUTH`` or ``stow_auth_file``) now, so an
        unreadable file shows at start.
        """
        if self.stow is None and self.peer is None:
            return None
        auth = None
        if self.stow is not None:
            from ctcovid.net.dicomweb import STOW_AUTH_ENV, HttpAuth

            auth = HttpAuth.load(STOW_AUTH_ENV, self.stow_auth_file)
        return SendSettings(
            calling_ae_title=self.ae_title,
            peer=self.peer if self.stow is None else None,
            stow_url=self.stow,
            tls=self.send_tls,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_ca=self.tls_ca,
            stow_auth=auth,
            stow_ca_file=self.stow_ca_file,
            timeout_seconds=self.network_timeout_seconds,
            deadline_seconds=self.send_deadline,
            max_pdu_bytes=self.max_pdu_bytes,
        )

    def oru_settings(self) -> OruSettings:
        """How the ORU^R01 is addressed and how a result maps to the worklist priority."""
        from ctcovid.report.oru import OruSettings, parse_priority

        return OruSettings(
            sending_application=self.hl7_sending_application,
            sending_facility=self.hl7_sending_facility,
            receiving_application=self.hl7_receiving_application,
            receiving_facility=self.hl7_receiving_facility,
            priority=parse_priority(self.hl7_priority),
            priority_fields=self.hl7_priority_fields,
        )

    def hl7_settings(self) -> MllpSettings | None:
        """Where ORUs go by MLLP and the limits of one send; None without ``hl7``."""
        if self.hl7 is None:
            return None
        from ctcovid.net.mllp import Endpoint, MllpSettings

        return MllpSettings(
            Endpoint.parse(self.hl7),
            timeout_seconds=self.network_timeout_seconds,
            deadline_seconds=self.send_deadline,
            **_mllp_tls(self.hl7_tls, self.tls_cert, self.tls_key, self.tls_ca),
        )

    def alert_settings(self) -> AlertSettings | None:
        """Where alerts go and what raises them; None without a webhook or mail server."""
        from ctcovid.node.alerts import AlertSettings

        return AlertSettings.build(
            webhook=self.alert_webhook,
            smtp=self.alert_smtp,
            to=self.alert_to,
            sender=self.alert_from,
            after_minutes=self.alert_after_minutes,
            positive=self.alert_positive,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths and the peer as strings), e.g. to hand to the worker process."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path | Peer):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeConfig:
        """Build from plain values; unknown keys are an error naming them (a typo is not silent)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown node setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}."
            )
        kw = dict(data)
        if "store" not in kw or kw["store"] in (None, ""):
            raise ConfigError("store is required: the folder for received instances and jobs.")
        if "allow_aet" in kw:
            value = kw["allow_aet"]
            kw["allow_aet"] = (value,) if isinstance(value, str) else tuple(value)
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ConfigError(f"invalid node settings: {exc}") from None


def check_stow_url(value: object, key: str, credentials: str) -> str:
    """A STOW-RS base URL (http(s), a host, no credentials), without its trailing slash;
    ``credentials`` says where credentials go instead."""
    parts = urlsplit(str(value))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{key} must be a DICOMweb URL, http(s)://HOST[:PORT]/PATH. Received: {value!r}."
        )
    if parts.username is not None or parts.password is not None:
        # A URL is logged and shown by ps; credentials go in the environment or a file.
        raise ConfigError(
            f"{key} must not carry credentials; put them in {credentials} "
            "('Bearer TOKEN' or 'Basic USER:PASSWORD')."
        )
    return str(value).rstrip("/")


@dataclass(frozen=True)
class NamedDestination:
    """A ``[destination.NAME]`` of the node: where its SRs go besides (or instead of) ``peer``
    or ``stow``, each with a delivery job of its own per series (:mod:`ctcovid.node.courier`).
    """

    name: str
    kind: str  # "dicom" (C-STORE) | "stow" (STOW-RS) | "hl7" (ORU^R01 over MLLP)
    settings: SendSettings | MllpSettings

    @property
    def address(self) -> str:
        """Where it is, for logs and ``ctcovid queue`` (never credentials)."""
        if not isinstance(self.settings, SendSettings):
            return str(self.settings.endpoint)
        if self.settings.stow_url is not None:
            from ctcovid.net.dicomweb import redact

            return redact(self.settings.stow_url)
        return str(self.settings.peer)


#: The keys of a ``[destination.NAME]`` table, by kind.
DESTINATION_KEYS = {
    "dicom": frozenset({"kind", "peer", "tls", "tls_cert", "tls_key", "tls_ca"}),
    "stow": frozenset({"kind", "url", "auth_file", "ca_file"}),
    "hl7": frozenset({"kind", "address", "tls", "tls_cert", "tls_key", "tls_ca"}),
}
#: Keys of a destination table that name files (relative to the TOML file when given in one).
DESTINATION_PATH_KEYS = ("tls_cert", "tls_key", "tls_ca", "auth_file", "ca_file")
_DESTINATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def _mllp_tls(tls: bool, cert: Path | None, key: Path | None, ca: Path | None) -> dict[str, Any]:
    """The TLS part of an MLLP destination's settings (nothing without ``tls``)."""
    return {"tls": True, "tls_cert": cert, "tls_key": key, "tls_ca": ca} if tls else {}


def _named_destination(config: NodeConfig, name: str, table: object) -> NamedDestination:
    key = f"destination.{name}"
    if not _DESTINATION_NAME.match(name):
        raise ConfigError(f"{key}: a destination name is 1-32 letters, digits, '.', '_' or '-'")
    if name in (SR_DESTINATION, RIS_DESTINATION):
        raise ConfigError(
            f"{key}: {name!r} is the name of the destination set by "
            + ("peer or stow" if name == SR_DESTINATION else "hl7")
            + "; choose another name"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table ([destination.{name}])")
    kind = table.get("kind")
    if kind not in DESTINATION_KEYS:
        raise ConfigError(
            f"{key}.kind: expected one of {', '.join(DESTINATION_KEYS)}; got {kind!r}"
        )
    unknown = sorted(set(table) - DESTINATION_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"{key}: unknown key(s) {', '.join(unknown)} for kind {kind!r}; "
            f"known: {', '.join(sorted(DESTINATION_KEYS[kind]))}"
        )

    def path(option: str) -> Path | None:
        value = table.get(option)
        return Path(value) if value else None

    common: dict[str, Any] = {
        "calling_ae_title": config.ae_title,
        "timeout_seconds": config.network_timeout_seconds,
        "deadline_seconds": config.send_deadline,
        "max_pdu_bytes": config.max_pdu_bytes,
    }
    tls = table.get("tls", False)
    if not isinstance(tls, bool):
        raise ConfigError(f"{key}.tls: expected true or false, got {tls!r}")
    cert, tls_key = path("tls_cert") or config.tls_cert, path("tls_key") or config.tls_key
    if (cert is None) != (tls_key is None):
        raise ConfigError(f"{key}: tls_cert and tls_key go together: give both or neither")
    if kind == "dicom":
        if not isinstance(table.get("peer"), str):
            raise ConfigError(f"{key}.peer: required, HOST:PORT:AET")
        try:
            peer = Peer.parse(table["peer"])
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{key}.peer: {exc}") from None
        settings = SendSettings(
            peer=peer, tls=tls, tls_cert=cert, tls_key=tls_key, tls_ca=path("tls_ca"), **common
        )
    elif kind == "hl7":
        from ctcovid.net.mllp import Endpoint, MllpSettings

        if not isinstance(table.get("address"), str):
            raise ConfigError(f"{key}.address: required, HOST:PORT of the RIS's MLLP listener")
        return NamedDestination(
            name=name,
            kind=kind,
            settings=MllpSettings(
                Endpoint.parse(table["address"], f"{key}.address"),
                timeout_seconds=config.network_timeout_seconds,
                deadline_seconds=config.send_deadline,
                **_mllp_tls(tls, cert, tls_key, path("tls_ca")),
            ),
        )
    else:
        from ctcovid.net.dicomweb import HttpAuth

        if not isinstance(table.get("url"), str):
            raise ConfigError(f"{key}.url: required, the DICOMweb base URL")
        url = check_stow_url(table["url"], f"{key}.url", f"{key}.auth_file")
        auth_file = path("auth_file")
        auth = HttpAuth.load("", auth_file) if auth_file is not None else None
        settings = SendSettings(
            stow_url=url, stow_auth=auth, stow_ca_file=path("ca_file"), **common
        )
    return NamedDestination(name=name, kind=kind, settings=settings)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_toml(path: Path) -> dict[str, Any]:
    """The node settings in a TOML file (top level, or the ``[node]`` table when present)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "node" in data and isinstance(data["node"], dict):
        top = data
        data = dict(data["node"])
        for key in ("rule", "destination"):  # tables beside a [node] table
            if key in top and key not in data:
                data[key] = top[key]
    # Relative paths in a file mean relative to that file, as a reader of the file expects.
    base = Path(path).resolve().parent
    for key in ("store", *PATH_SETTINGS):
        if isinstance(data.get(key), str) and data[key]:
            value = Path(data[key]).expanduser()
            data[key] = str(value if value.is_absolute() else base / value)
    for table in (data.get("destination") or {}).values():
        for key in DESTINATION_PATH_KEYS if isinstance(table, dict) else ():
            if isinstance(table.get(key), str) and table[key]:
                value = Path(table[key]).expanduser()
                table[key] = str(value if value.is_absolute() else base / value)
    return data


def load_config(path: Path | None, overrides: dict[str, Any]) -> NodeConfig:
    """The TOML file's settings (if any) with ``overrides`` applied; ``None`` values are unset."""
    data = read_toml(path) if path is not None else {}
    for key, value in overrides.items():
        if value is None or (key == "allow_aet" and not value):
            continue
        data[key] = value
    return NodeConfig.from_dict(data)


#: The store of settings read to describe or test them (no node runs on them).
UNCONFIGURED_STORE = "(not configured)"


def load_settings(path: Path | None) -> NodeConfig:
    """The node settings of ``path`` (defaults when None), for describing or testing them.

    A file without ``store`` is fine here: a store is needed to run a node, not to describe its
    settings or test its rules.
    """
    overrides: dict[str, Any] = {}
    if path is None or not read_toml(path).get("store"):
        overrides["store"] = UNCONFIGURED_STORE
    return load_config(path, overrides)
