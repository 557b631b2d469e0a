"""Who may use the node's HTTP server: users with scrypt-hashed passwords and API tokens.

The credentials file (``--http-auth-file``) holds one entry a line; ``#`` starts a comment::

    user alice scrypt$16384$8$1$<salt, base64>$<hash, base64>
    token backup-script sha256$<sha256 of the token, hex>

``ctcovid http-credentials NAME`` prints a ``user`` line (it asks for the password) and,
with ``--token``, a ``token`` line and the new token. A browser logs in with HTTP Basic
(over TLS); a script sends ``Authorization: Bearer TOKEN``. Failed logins are counted, logged
(the name tried and the client address, never the password) and answered more slowly the more
an address fails: 0.5 s doubling per failure in a row, at most 8 s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ctcovid.errors import ConfigError

logger = logging.getLogger(__name__)

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
# Verified credentials are remembered this long, so that a page refreshing itself does not
# cost an scrypt each time (only a hash of the header is kept).
VERIFIED_SECONDS = 300.0
MAX_DELAY_SECONDS = 8.0


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` for ``password`` (a fresh random salt unless given)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_SCRYPT_MAXMEM
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, expected)


def token_line(name: str) -> tuple[str, str]:
    """A new API token and the credentials-file line that admits it."""
    token = secrets.token_urlsafe(32)
    return token, f"token {name} sha256${hashlib.sha256(token.encode()).hexdigest()}"


@dataclass(frozen=True)
class Credentials:
    users: dict[str, str] = field(default_factory=dict)  # name -> scrypt$...
    tokens: dict[str, str] = field(default_factory=dict)  # sha256 hex -> name

    @classmethod
    def load(cls, path: Path) -> Credentials:
        users: dict[str, str] = {}
        tokens: dict[str, str] = {}
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the HTTP credentials file ({exc})") from None
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) == 3 and parts[0] == "user" and parts[2].startswith("scrypt$"):
                users[parts[1]] = parts[2]
            elif len(parts) == 3 and parts[0] == "token" and parts[2].startswith("sha256$"):
                tokens[parts[2].removeprefix("sha256$").lower()] = parts[1]
            else:  # the line is not quoted: it may hold a secret
                raise ConfigError(
                    f"{path}:{number}: not 'user NAME scrypt$...' nor 'token NAME sha256$...'"
                )
        if not users and not tokens:
            raise ConfigError(f"{path}: no users or tokens in the HTTP credentials file")
        return cls(users, tokens)

    def token_name(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, name in self.tokens.items():
            if hmac.compare_digest(known, digest):
                return name
        return None


@dataclass
class Identity:
    name: str
    by_token: bool


class LoginGuard:
    """Checks ``Authorization`` headers against :class:`Credentials`; counts and slows
    failures per client address."""

    def __init__(
        self,
        credentials: Credentials,
        on_failure: Callable[[str, str], None] | None = None,
    ) -> None:
        self.credentials = credentials
        self.on_failure = on_failure  # (the user tried, the address): the audit trail's
        self.failures_total = 0
        self._failures: dict[str, int] = {}
        self._verified: dict[str, tuple[float, Identity]] = {}
        self._lock = threading.Lock()

    def delay_for(self, address: str) -> float:
        """Seconds to wait before answering ``address`` (grows with its failures in a row)."""
        with self._lock:
            failures = self._failures.get(address, 0)
        return 0.0 if failures == 0 else min(MAX_DELAY_SECONDS, 0.5 * 2 ** (failures - 1))

    def authenticate(self, header: str, address: str) -> Identity | None:
        """The identity ``header`` proves, or None (a failure, counted and logged)."""
        if not header:
            return None  # no credentials offered: asked for, not a failed login
        key = hashlib.sha256(header.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(key)
        if hit is not None and hit[0] > now:
            self._succeeded(address)
            return hit[1]
        identity, tried = self._check(header)
        if identity is None:
            with self._lock:
                self.failures_total += 1
                count = self._failures.get(address, 0) + 1
                self._failures[address] = count
                if len(self._failures) > 10_000:
                    self._failures.clear()
            logger.warning(
                "event=http_login_failed user=%s from=%s failures_in_a_row=%d",
                tried,
                address,
                count,
            )
            if self.on_failure is not None:
                self.on_failure(tried, address)
            return None
        with self._lock:
            if len(self._verified) > 1000:
                self._verified.clear()
            self._verified[key] = (now + VERIFIED_SECONDS, identity)
        self._succeeded(address)
        return identity

    def _succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)

    def _check(self, header: str) -> tuple[Identity | None, str]:
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            name = self.credentials.token_name(value)
            return (Identity(name, True) if name else None), f"token:{name or 'unknown'}"
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except (ValueError, binascii.Error):
                return None, "unreadable"
            encoded = self.credentials.users.get(user)
            if encoded is None:
                # As slow as a known user, so that names cannot be told apart by timing.
                verify_password(password, hash_password("x", salt=b"0" * 16))
                return None, "unknown"
            if verify_password(password, encoded):
                return Identity(user, False), user
            return None, user
        return None, "unreadable"
