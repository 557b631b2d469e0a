"""A PACS over DICOMweb: QIDO-RS to list studies and series, WADO-RS to fetch, STOW-RS to store.

Built on ``dicomweb-client`` (optional extra ``dicomweb``). Credentials never come from the
command line (where ``ps`` and shell histories show them): :meth:`HttpAuth.load` reads them from
an environment variable or a file, as ``Bearer TOKEN`` or ``Basic USER:PASSWORD``. TLS
certificates are always verified (against the system store, or a CA file given).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydicom.datadict import tag_for_keyword

from ctcovid.errors import ConfigError, PacsError
from ctcovid.net.query import (
    SERIES_RETURN_KEYS,
    STUDY_RETURN_KEYS,
    InstanceWriter,
    SeriesMatch,
    StudyMatch,
)
from ctcovid.net.stow import stow as stow  # STOW-RS lives there; batch imports it from here

logger = logging.getLogger(__name__)

AUTH_ENV = "CTCOVID_DICOMWEB_AUTH"
STOW_AUTH_ENV = "CTCOVID_STOW_AUTH"
# Ask for the stored transfer syntax: the archive sends its files as they are, no transcoding.
ORIGINAL_SYNTAX = (("application/dicom", "*"),)
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


def make_client(
    url: str,
    auth: HttpAuth | None,
    *,
    ca_file: Path | None = None,
    timeout_seconds: float = 60.0,
) -> Any:
    """A ``DICOMwebClient`` for ``url`` with verified TLS and the Authorization header."""
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:
        raise ConfigError(
            f"DICOMweb needs dicomweb-client ({exc}); install it with: "
            "pip install 'ctcovid[dicomweb]'"
        ) from exc
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"DICOMweb URL must be http(s)://HOST[:PORT]/PATH. Received: {url!r}.")
    loopback = _is_loopback(parts.hostname)
    if parts.scheme == "http" and not loopback:
        logger.warning("%s: plain HTTP; patient data and credentials travel unencrypted", url)
    session = requests.Session()
    session.verify = str(ca_file) if ca_file is not None else True
    if loopback:
        session.trust_env = False  # never send loopback traffic through a proxy
    headers = {"Authorization": auth.header()} if auth is not None else None
    return DICOMwebClient(
        url.rstrip("/"), session=session, headers=headers, timeout=timeout_seconds
    )


def _first(item: dict[str, Any], keyword: str) -> str:
    element = item.get(f"{tag_for_keyword(keyword):08X}", {})
    values = element.get("Value") or []
    if not values:
        return ""
    value = values[0]
    if isinstance(value, dict):  # a person name: {"Alphabetic": ...}
        return str(value.get("Alphabetic", ""))
    return str(value).strip()


def _http_error(url: str, what: str, exc: Exception) -> PacsError:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    detail = f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"
    return PacsError(f"{url}: {what} failed ({detail})")


def search_all(search: Any, uid_keyword: str, what: str, url: str, **kwargs: Any) -> list[dict]:
    """Every match of a QIDO-RS search, page by page (``limit``/``offset``).

    Paging stops at a short page, and also at a page without a new UID: some servers ignore
    ``offset``, and following them would ask for the same page forever.
    """
    seen: set[str] = set()
    out: list[dict] = []
    offset = 0
    while True:
        try:
            page = search(limit=PAGE_SIZE, offset=offset, **kwargs) or []
        except Exception as exc:  # requests' errors: refused, TLS, HTTP status
            raise _http_error(url, what, exc) from exc
        new = [item for item in page if _first(item, uid_keyword) not in seen]
        for item in new:
            seen.add(_first(item, uid_keyword))
        out.extend(new)
        if len(out) > MAX_MATCHES:
            raise PacsError(
                f"{url}: {what} returned more than {MAX_MATCHES} matches; narrow the query "
                "(e.g. a shorter StudyDate range)"
            )
        if len(page) < PAGE_SIZE or not new:
            return out
        offset += len(page)


class DicomWebArchive:
    """Query (QIDO-RS) and retrieve (WADO-RS, multipart) from a DICOMweb service."""

    def __init__(
        self,
        url: str,
        auth: HttpAuth | None = None,
        *,
        ca_file: Path | None = None,
        timeout_seconds: float = 60.0,
    ):
        self.url = url.rstrip("/")
        self.client = make_client(url, auth, ca_file=ca_file, timeout_seconds=timeout_seconds)

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
            fields=list(STUDY_RETURN_KEYS),
            search_filters=filters,
        )
        out = []
        for item in found:
            uid = _first(item, "StudyInstanceUID")
            if uid:
                out.append(
                    StudyMatch(
                        study_instance_uid=uid,
                        patient_id=_first(item, "PatientID"),
                        accession_number=_first(item, "AccessionNumber"),
                        study_date=_first(item, "StudyDate"),
                    )
                )
        return out

    def find_series(self, study: StudyMatch) -> list[SeriesMatch]:
        found = search_all(
            self.client.search_for_series,
            "SeriesInstanceUID",
            f"QIDO-RS series of study {study.study_instance_uid}",
            self.url,
            study_instance_uid=study.study_instance_uid,
            fields=list(SERIES_RETURN_KEYS),
        )
        out = []
        for item in found:
            uid = _first(item, "SeriesInstanceUID")
            if not uid:
                continue
            n = _first(item, "NumberOfSeriesRelatedInstances")
            out.append(
                SeriesMatch(
                    study_instance_uid=study.study_instance_uid,
                    series_instance_uid=uid,
                    patient_id=study.patient_id,
                    modality=_first(item, "Modality"),
                    series_description=_first(item, "SeriesDescription"),
                    body_part=_first(item, "BodyPartExamined"),
                    n_instances=int(n) if n.isdigit() else None,
                )
            )
        return out

    def retrieve_series(self, series: SeriesMatch, write: InstanceWriter) -> int:
        """WADO-RS of the whole series (multipart, streamed) into ``write``."""
        from ctcovid.net.cache import CacheFullError

        stored = 0
        try:
            for ds in self.client.iter_series(
                series.study_instance_uid,
                series.series_instance_uid,
                media_types=ORIGINAL_SYNTAX,
            ):
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                write(str(ds.SOPInstanceUID), buf.getvalue())
                stored += 1
        except CacheFullError:
            raise
        except Exception as exc:
            if type(exc).__module__.split(".")[0] in ("requests", "urllib3"):
                what = f"WADO-RS series {series.series_instance_uid}"
                raise _http_error(self.url, what, exc) from exc
            raise PacsError(
                f"{self.url}: series {series.series_instance_uid}: instance {stored + 1} "
                f"could not be stored ({type(exc).__name__}: {exc})"
            ) from exc
        if stored == 0:
            raise PacsError(
                f"{self.url} delivered no instance of series {series.series_instance_uid}"
            )
        return stored
