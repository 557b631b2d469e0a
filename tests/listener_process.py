"""The node's listener alone, as a process: what ``ctcovid listen`` runs, without the worker.

Tests that measure the listener's memory or attack it run it this way, so that nothing else
shares its process (no model, no TensorFlow). Settings are ``NodeConfig`` keys as JSON::

    python tests/listener_process.py '{"store": "/tmp/s", "port": 0, "host": "127.0.0.1"}'

Logging is set up as ``ctcovid listen`` sets it up; SIGTERM stops it as it stops the node.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time


def main(argv: list[str]) -> int:
    from ctcovid.cli.common import setup_logging
    from ctcovid.logs import quiet_libraries
    from ctcovid.node.config import NodeConfig
    from ctcovid.node.scp import Listener
    from ctcovid.node.service import LISTENER_DRAIN_SECONDS
    from ctcovid.node.store import Store

    setup_logging(1)
    quiet_libraries(logging.INFO)
    config = NodeConfig.from_dict(json.loads(argv[0]))
    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.append(True))
    store = Store(config.store, min_free_mb=config.min_free_mb)
    listener = Listener(config, store)
    listener.start()
    try:
        while not stop:
            time.sleep(0.1)
    finally:
        listener.stop(LISTENER_DRAIN_SECONDS)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
