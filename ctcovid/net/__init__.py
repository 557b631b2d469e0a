"""Archives in a PACS: find studies and series, retrieve series, without ever changing the PACS.

``query.py`` says what to look for (study-level keys, accession numbers, series rules);
``dimse.py`` asks a PACS by C-FIND and retrieves by C-GET or C-MOVE; ``dicomweb.py`` does the same
by QIDO-RS and WADO-RS; ``cache.py`` is the bounded local folder the retrieved series wait in
until they are classified. Both archives only read: no C-STORE, no DELETE, no update.
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
