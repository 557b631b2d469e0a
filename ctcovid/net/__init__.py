"""Everything on a wire: the DICOM vocabulary, the listener's guard, the SR sender, query and
retrieve.

``peers.py`` (Peer, AE titles) and ``services.py`` (statuses, storage classes, transfer syntaxes
in preferred order) are the vocabulary; ``guard.py`` holds a hostile peer to the listener's
limits; ``sender.py`` sends an SR by C-STORE or STOW-RS (``stow.py``) under a deadline.
``query.py`` says what to look for in a PACS (study-level keys, accession numbers, series
rules); ``dimse.py`` asks by C-FIND and retrieves by C-GET or C-MOVE, ``dicomweb.py`` does the
same by QIDO-RS and WADO-RS; ``cache.py`` is the bounded local folder the retrieved series wait
in. Queries and retrievals only read: no DELETE, no update.
"""

from ctcovid.net.cache import CacheFullError, SeriesCache
from ctcovid.net.query import Archive, SeriesMatch, SeriesRules, StudyMatch, StudyQuery

__all__ = [
    "Archive",
    "CacheFullError",
    "SeriesCache",
    "SeriesMatch",
    "SeriesRules",
    "StudyMatch",
    "StudyQuery",
]
