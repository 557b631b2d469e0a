"""UIDs that may become part of a path or a URL: digits and dots only, nothing after them."""

from __future__ import annotations

import pytest

from ctcovid.dicom.uids import InvalidUidError, check_uid, valid_uid


def test_a_uid_with_a_trailing_newline_is_not_valid():
    # A pattern ending in "$" matches before a final newline and would let this through.
    assert valid_uid("1.2.3") is True
    assert valid_uid("1.2.3\n") is False


def test_check_uid_refuses_a_trailing_newline_naming_the_attribute():
    with pytest.raises(InvalidUidError, match=r"SeriesInstanceUID '1\.2\.3\\n' is not a valid UID"):
        check_uid("1.2.3\n", "SeriesInstanceUID")
