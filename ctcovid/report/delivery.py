"""One current result per series at each destination: what to send, given what was delivered.

Every revision of the result for one (study, series, model name) sits in one SR series
(:func:`~ctcovid.report.uids.sr_series_uid`), numbered by its InstanceNumber, each naming the
one before. Before a sender that did not deliver the last revision itself sends (batch after
the node, a second batch run, another run folder), it learns the chain from two places: its own
delivery record (what it sent: SR UID, revision, label, stated probability) and, where the
destination answers, the destination itself (an image-level C-FIND or QIDO-RS of the SR series:
SOP Instance UIDs and InstanceNumbers). :func:`plan_delivery` then decides:

- nothing delivered yet: revision 1;
- the newest revision there is the very SR this result makes (same content over the same
  predecessor: same UID) or, by the record, states the same label and stated probability: nothing
  to send (a clinically unchanged result is not sent again);
- anything else: revision n + 1 naming revision n, in the same SR series.

So a node and a batch run over the same study, or two batch runs at other batch sizes, put one
SR per series into the PACS, and a changed result is a true revision of the one it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ctcovid.report.uids import sr_revision_uid
from ctcovid.scans import same_finding


@dataclass(frozen=True)
class Delivered:
    """A revision delivered to one destination, as its sender recorded it."""

    sop_instance_uid: str
    revision: int
    label: str
    probability: float | None  # the stated probability
    predecessor_sop_instance_uid: str = ""


class Numbered(Protocol):
    """An SR a destination holds in the SR series, by InstanceNumber (None if it has none)."""

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def instance_number(self) -> int | None: ...


@dataclass(frozen=True)
class Delivery:
    """What to send: ``revision`` 0 for nothing, else that revision naming ``predecessor``.

    With nothing to send, ``stands`` is the delivered revision that states the result.
    """

    revision: int
    predecessor_sop_instance_uid: str | None
    reason: str
    stands: Delivered | None = None

    @property
    def needed(self) -> bool:
        return self.revision > 0


def plan_delivery(
    first_sop_instance_uid: str,
    label: str,
    probability: float,
    *,
    recorded: Delivered | None,
    held: Sequence[Numbered] | None,
) -> Delivery:
    """The next delivery of a result whose revision 1 is ``first_sop_instance_uid``.

    Parameters
    ----------
    first_sop_instance_uid
        The SOP Instance UID of this result's SR as revision 1 (a digest of what it states).
    label, probability
        What the result states (the probability at its stated precision or raw: compared as
        stated).
    recorded
        The newest revision this sender delivered to the destination, or None.
    held
        What the destination holds in the SR series (any order), or None when it could not be
        asked; then ``recorded`` alone decides.
    """
    chain: dict[int, str] = {}
    for item in held or ():
        if item.instance_number is not None and item.instance_number >= 1:
            chain.setdefault(item.instance_number, item.sop_instance_uid)
    if chain:
        newest = max(chain)
        newest_uid, before = chain[newest], chain.get(newest - 1)
    elif recorded is not None:
        newest, newest_uid = recorded.revision, recorded.sop_instance_uid
        before = recorded.predecessor_sop_instance_uid or None
    else:
        return Delivery(1, None, "nothing delivered yet")
    # Revision n of this very report over the same predecessor has the same UID.
    candidate = (
        sr_revision_uid(first_sop_instance_uid, newest, before)
        if newest == 1 or before is not None
        else None
    )
    if newest_uid == candidate:
        return Delivery(
            0,
            None,
            f"revision {newest} ({newest_uid}) is this very report",
            Delivered(newest_uid, newest, label, probability, before or ""),
        )
    if (
        recorded is not None
        and recorded.sop_instance_uid == newest_uid
        and same_finding(recorded.label, recorded.probability, label, probability)
    ):
        return Delivery(
            0,
            None,
            f"revision {newest} ({newest_uid}) states the same label and probability",
            recorded,
        )
    return Delivery(
        newest + 1, newest_uid, f"revision {newest} ({newest_uid}) states another result"
    )
