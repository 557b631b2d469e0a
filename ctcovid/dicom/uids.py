"""DICOM UIDs as values that may become part of a path or a URL (PS3.5 9.1).

Every UID that arrives from outside (a C-STORE, a C-FIND or QIDO-RS match, a file header) is
checked here before it names a file, a folder or a URL path segment.
"""

from __future__ import annotations

import re

# \Z, not $: "$" also matches before a trailing newline, which would let "1.2\n" through.
UID_PATTERN = re.compile(r"\A[0-9]+(\.[0-9]+)*\Z")
UID_MAX_CHARS = 64


class InvalidUidError(ValueError):
    """A UID that may not become part of a path (wrong characters or too long)."""


def valid_uid(uid: object) -> bool:
    """True when ``uid`` is a DICOM UID safe to use as a file name (PS3.5 9.1)."""
    return isinstance(uid, str) and len(uid) <= UID_MAX_CHARS and bool(UID_PATTERN.match(uid))


def check_uid(uid: object, attribute: str) -> str:
    """Return ``uid`` or raise :class:`InvalidUidError` naming the attribute."""
    if not valid_uid(uid):
        shown = repr(uid)[:80]
        raise InvalidUidError(
            f"{attribute} {shown} is not a valid UID (digits and dots, at most "
            f"{UID_MAX_CHARS} characters)"
        )
    return str(uid)
