"""The DICOM node: receive CT by C-STORE, classify complete series, send the SR back.

``config`` (NodeConfig, TOML) -> ``scp`` (listener, durable receive) -> ``store`` (``files``:
instances and SRs on disk; ``jobs``: the SQLite job database and its state table) -> ``worker``
(classify, build the SR) -> ``sender`` (C-STORE to the peer, or STOW-RS); ``service`` runs the
listener and the worker process, ``metrics`` the optional Prometheus endpoint.
"""

from ctcovid.node.config import NodeConfig, Peer, load_config
from ctcovid.node.store import STATES, JobState, SeriesRecord, Store, valid_uid

__all__ = [
    "STATES",
    "JobState",
    "NodeConfig",
    "Peer",
    "SeriesRecord",
    "Store",
    "load_config",
    "valid_uid",
]
