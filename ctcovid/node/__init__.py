"""The DICOM node, a front: receive CT by C-STORE, classify complete series, send the SR back.

``config`` (NodeConfig, TOML) -> ``scp`` (listener, durable receive) -> ``store`` (``files``:
instances and SRs on disk; ``jobs``: the SQLite job database and its state table) -> ``worker``
(decode in a capped process, classify, build the SR) -> ``sender`` (the node's settings made
into an SR sender); ``service`` runs the listener and the worker process, ``metrics`` the
optional Prometheus endpoint. The machinery it composes lives below it: the wire in
:mod:`ctcovid.net` (guard, peers, services, sender), decoding in :mod:`ctcovid.decoder`.
"""
