"""A PACS over DICOMweb: QIDO-RS to list studies and series, WADO-RS to fetch, STOW-RS to store.

Built on ``dicomweb-client`` (optional extra ``dicomweb``). Credentials never come from the
command line (where ``ps`` and shell histories show them): :meth:`HttpAuth.load` reads them from
an environment variable or a file, as ``Bearer TOKEN`` or ``Basic USER:PASSWORD``. TLS
certificates are always verified (against the system store, or a CA file given).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ctcovid.errors import ConfigError, PacsError
from ctcovid.net.query import (
    SERIES_RETURN_KEYS,
    STUDY_RETURN_KEYS,
    HeldInstance,
    IncompleteRetrievalError,
    InstanceWriter,
    SeriesMatch,
    StudyMatch,
    accept_match,
    first_value,
    held_instances,
    series_match,
    study_match,
)
from ctcovid.net.stow import stow as stow  # STOW-RS lives there; batch imports it from here

logger = logging.getLogger(__name__)

AUTH_ENV = "CTCOVID_DICOMWEB_AUTH"
STOW_AUTH_ENV = "CTCOVID_STOW_AUTH"
# A whole series (hundreds of slices) on a slow link takes minutes; a stalled one, not hours.
DEFAULT_RETRIEVE_DEADLINE_SECONDS = 1800.0
DEFAULT_MAX_INSTANCE_BYTES = 1024 * 1024 * 1024  # as the listener's max_instance_mb
PAGE_SIZE = 500
MAX_MATCHES = 100_000


@dataclass(frozen=True)
class HttpAuth:
    """The Authorization header of every request (the secret is kept out of ``repr``)."""

    scheme: str  # "Bearer" | "Basic"
    credentials: str

    def __repr__(self) -> str:
        return f"HttpAuth(scheme={self.scheme!r}, credentials=<hidden>)"

    def header(self) -> str:
        if self.scheme == "Basic":
            import base64

            return "Basic " + base64.b64encode(self.credentials.encode()).decode("ascii")
        return f"Bearer {self.credentials}"

    @classmethod
    def parse(cls, text: str, where: str) -> HttpAuth:
        scheme, _, value = text.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return cls("Bearer", value)
        if scheme.lower() == "basic" and ":" in value:
            return cls("Basic", value)
        raise ConfigError(f"{where}: credentials must read 'Bearer TOKEN' or 'Basic USER:PASSWORD'")

    @classmethod
    def load(cls, env_var: str, file: Path | None = None) -> HttpAuth | None:
        """Credentials from ``file`` when given, else from the environment variable, else none."""
        if file is not None:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{file}: cannot read credentials ({exc})") from exc
            if os.name == "posix" and Path(file).stat().st_mode & 0o077:
                logger.warning("%s: credentials file is readable by others (chmod 600)", file)
            return cls.parse(text, str(file))
        text = os.environ.get(env_var, "")
        return cls.parse(text, f"environment variable {env_var}") if text.strip() else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact(url: str) -> str:
    """``url`` without its user-info part (``user:password@``), for messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def make_session(url: str, auth: HttpAuth | None, *, ca_file: Path | None = None) -> Any:
    """A ``requests`` session for ``url``: verified TLS, our credentials and nothing else.

    The environment is not consulted (``trust_env`` off): with it, requests would let
    ``REQUESTS_CA_BUNDLE`` replace ``ca_file``, ``~/.netrc`` replace ``auth``, and proxy
    variables route patient data elsewhere. Credentials travel only over ``https://`` (or to a
    loopback address), and never in the URL, where logs, ``ps`` and the run's files would keep
    them.

    Raises
    ------
    ConfigError
        For a URL that is not ``http(s)://HOST/...``, that carries credentials, or that would
        send credentials in clear to another host.
    """
    try:
        import requests
    except ImportError as exc:  # pragma: no cover - requests comes with dicomweb-client
        raise ConfigError(
            f"DICOMweb needs requests ({exc}); install it with: pip install 'ctcovid[dicomweb]'"
        ) from exc
    parts = urlsplit(url)
    shown = redact(url)
    if "@" in parts.netloc:
        raise ConfigError(
            f"DICOMweb URL {shown} carries credentials; remove them from the URL and give them "
            f"in ${AUTH_ENV} / ${STOW_AUTH_ENV} or a credentials file instead"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"DICOMweb URL must be http(s)://HOST[:PORT]/PATH. Received: {shown!r}.")
    loopback = _is_loopback(parts.hostname)
    if parts.scheme == "http" and not loopback:
        if auth is not None:
            raise ConfigError(
                f"{shown}: credentials would travel unencrypted over plain HTTP; use https://"
            )
        logger.warning("%s: plain HTTP; patient data travels unencrypted", shown)
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_file) if ca_file is not None else True
    if auth is not None:
        session.headers["Authorization"] = auth.header()
    return session


def make_client(
    url: str,
    auth: HttpAuth | None,
    *,
    ca_file: Path | None = None,
    timeout_seconds: float = 60.0,
) -> Any:
    """A ``DICOMwebClient`` for ``url`` on a :func:`make_session` session, without retries.

    The client's own retries (of 429/503/504, quietly, within one call) are turned off: the
    caller owns the one retry policy (the node's and batch's backoff, recorded per attempt).
    """
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:
        raise ConfigError(
            f"DICOMweb needs dicomweb-client ({exc}); install it with: "
            "pip install 'ctcovid[dicomweb]'"
        ) from exc
    session = make_session(url, auth, ca_file=ca_file)
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout_seconds)
    client.set_http_retry_params(retry=False)
    return client


def _http_error(url: str, what: str, exc: Exception) -> PacsError:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    detail = f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"
    return PacsError(f"{url}: {what} failed ({detail})")


def search_all(search: Any, uid_keyword: str, what: str, url: str, **kwargs: Any) -> list[dict]:
    """Every match of a QIDO-RS search, page by page (``limit``/``offset``), until an empty page.

    A short page does not mean the last one: servers cap pages below the ``limit`` asked for
    (PS3.18 8.3.4.4 lets them), and stopping there would truncate the list without a word.
    Paging also stops at a page without a new UID: some servers ignore ``offset``, and following
    them would ask for the same page forever. ``MAX_MATCHES`` bounds the rest.
    """
    seen: set[str] = set()
    out: list[dict] = []
    offset = 0
    while True:
        try:
            page = search(limit=PAGE_SIZE, offset=offset, **kwargs) or []
        except Exception as exc:  # requests' errors: refused, TLS, HTTP status
            raise _http_error(url, what, exc) from exc
        new = [item for item in page if first_value(item, uid_keyword) not in seen]
        for item in new:
            seen.add(first_value(item, uid_keyword))
        out.extend(new)
        if len(out) > MAX_MATCHES:
            raise PacsError(
                f"{url}: {what} returned more than {MAX_MATCHES} matches; narrow the query "
                "(e.g. a shorter StudyDate range)"
            )
        if not page or not new:
            return out
        offset += len(page)


class DicomWebArchive:
    """Query (QIDO-RS) and retrieve (WADO-RS, multipart) from a DICOMweb service.

    Every match is checked (:func:`~ctcovid.net.query.accept_match`) before it is used, and a
    series retrieval runs under an overall deadline with a cap on each instance (see
    :func:`ctcovid.net.wado.retrieve_series`).
    """

    def __init__(
        self,
        url: str,
        auth: HttpAuth | None = None,
        *,
        ca_file: Path | None = None,
        timeout_seconds: float = 60.0,
        deadline_seconds: float = DEFAULT_RETRIEVE_DEADLINE_SECONDS,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
    ):
        if deadline_seconds <= 0 or max_instance_bytes <= 0:
            raise ConfigError(
                "the retrieval deadline and the instance cap must be positive. Received: "
                f"deadline_seconds={deadline_seconds}, max_instance_bytes={max_instance_bytes}."
            )
        self.url = url.rstrip("/")
        self.client = make_client(url, auth, ca_file=ca_file, timeout_seconds=timeout_seconds)
        self.timeout_seconds = timeout_seconds
        self.deadline_seconds = deadline_seconds
        self.max_instance_bytes = max_instance_bytes

    def describe(self) -> str:
        return self.url

    def identity(self) -> str:
        return self.url

    def find_studies(self, keys: dict[str, str]) -> list[StudyMatch]:
        # QIDO-RS lists several values with commas where C-FIND uses backslashes.
        filters = {k: v.replace("\\", ",") for k, v in keys.items()}
        found = search_all(
            self.client.search_for_studies,
            "StudyInstanceUID",
            f"QIDO-RS studies {filters}",
            self.url,
            # The keys come back too, so that each match can be checked against them.
            fields=list(dict.fromkeys([*STUDY_RETURN_KEYS, *keys])),
            search_filters=filters,
        )
        out = []
        for item in found:
            uid = accept_match(keys, item, uid_keyword="StudyInstanceUID", source=self.url)
            if uid:
                out.append(study_match(uid, item))
        return out

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]:
        found = search_all(
            self.client.search_for_series,
            "SeriesInstanceUID",
            f"QIDO-RS series of study {study.study_instance_uid}",
            self.url,
            study_instance_uid=study.study_instance_uid,
            fields=[*SERIES_RETURN_KEYS, "StudyInstanceUID"],
        )
        out = []
        for item in found:
            # The study is in the URL path; a series that names another study is not ours.
            keys = (
                {"StudyInstanceUID": study.study_instance_uid}
                if first_value(item, "StudyInstanceUID")
                else {}
            )
            uid = accept_match(keys, item, uid_keyword="SeriesInstanceUID", source=self.url)
            if not uid:
                continue
            out.append(series_match(study, uid, item))
        return out

    def find_held(self, study_instance_uid: str, series_instance_uid: str) -> list[HeldInstance]:
        """The instances the service holds in one series, with their InstanceNumber (QIDO-RS)."""
        found = search_all(
            self.client.search_for_instances,
            "SOPInstanceUID",
            f"QIDO-RS instances of series {series_instance_uid}",
            self.url,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            fields=["SOPInstanceUID", "InstanceNumber", "SeriesInstanceUID"],
        )
        return held_instances(study_instance_uid, series_instance_uid, found, self.url)

    def retrieve_series(self, series: SeriesMatch, write: InstanceWriter) -> int:
        """WADO-RS of the whole series into ``write``, under the deadline and the instance cap.

        Raises :class:`~ctcovid.net.query.IncompleteRetrievalError` when fewer instances came
        than QIDO-RS announced (NumberOfSeriesRelatedInstances; WADO-RS returns every instance
        of the series, whatever its SOP class, so the two counts are comparable).
        """
        from ctcovid.net.wado import retrieve_series

        n = retrieve_series(
            self.client._session,
            self.url,
            series,
            write,
            timeout_seconds=self.timeout_seconds,
            deadline_seconds=self.deadline_seconds,
            max_instance_bytes=self.max_instance_bytes,
        )
        if series.n_instances is not None and n < series.n_instances:
            raise IncompleteRetrievalError(
                f"{self.url}: WADO-RS of series {series.series_instance_uid} delivered {n} of the "
                f"{series.n_instances} instance(s) QIDO-RS announced; not classified as if whole",
                delivered=n,
                announced=series.n_instances,
            )
        return n
