"""Prometheus metrics of the node, served at ``/metrics`` by its HTTP server (``--http-port``;
needs ``prometheus-client``), or on a port of their own (``Metrics(port, ...)``).

Exposes ``ctcovid_instances_received_total``, ``ctcovid_instances_refused_total{status}``,
``ctcovid_associations_rejected_total{reason}`` (associations rejected and connections cut),
``ctcovid_jobs{state}`` (read from the job database at scrape time) and the histograms
``ctcovid_classify_seconds`` and ``ctcovid_send_seconds`` (observed by the worker process and
forwarded to the listener).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from ctcovid.errors import ConfigError
from ctcovid.node.scp import ReceiveStats
from ctcovid.node.store import Store

logger = logging.getLogger(__name__)

_BUCKETS_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _NodeCollector:
    """Values that live elsewhere (listener counters, job table), read when scraped."""

    def __init__(self, store: Store, stats: ReceiveStats) -> None:
        self.store = store
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily(
            "ctcovid_instances_received",
            "Instances stored by the listener since it started.",
            value=self.stats.stored,
        )
        refused = CounterMetricFamily(
            "ctcovid_instances_refused",
            "C-STORE requests answered with a failure status, by status.",
            labels=["status"],
        )
        with self.stats.lock:
            for status, count in sorted(self.stats.refused.items()):
                refused.add_metric([f"0x{status:04X}"], count)
        yield refused
        rejected = CounterMetricFamily(
            "ctcovid_associations_rejected",
            "Associations rejected or connections cut by the listener, by reason.",
            labels=["reason"],
        )
        with self.stats.lock:
            for reason, count in sorted(self.stats.rejected.items()):
                rejected.add_metric([reason], count)
        yield rejected
        jobs = GaugeMetricFamily("ctcovid_jobs", "Series (jobs) by state.", labels=["state"])
        try:
            for state, count in self.store.jobs.counts_by_state().items():
                jobs.add_metric([state], count)
        except Exception:  # a busy database must not break the scrape of the other values
            logger.debug("job counts unavailable", exc_info=True)
        yield jobs


class Metrics:
    """The HTTP endpoint and the histograms the worker's observations feed."""

    def __init__(self, port: int | None, host: str, store: Store, stats: ReceiveStats) -> None:
        """``port`` None: no endpoint of its own (the node's HTTP server calls :meth:`render`)."""
        try:
            from prometheus_client import CollectorRegistry, Histogram, start_http_server
        except ImportError:
            raise ConfigError(
                "metrics need prometheus-client: pip install 'ctcovid[web]'"
            ) from None
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(store, stats))
        self.histograms = {
            "classify_seconds": Histogram(
                "ctcovid_classify_seconds",
                "Seconds from taking a complete series to its SR stored.",
                buckets=_BUCKETS_SECONDS,
                registry=self.registry,
            ),
            "send_seconds": Histogram(
                "ctcovid_send_seconds",
                "Seconds to deliver one SR to the peer (successful sends).",
                buckets=_BUCKETS_SECONDS,
                registry=self.registry,
            ),
        }
        self._server: Any = None
        self.port = port
        if port is None:
            return
        result = start_http_server(port, addr=host, registry=self.registry)
        self._server = result[0] if isinstance(result, tuple) else None
        self.port = int(self._server.server_address[1]) if self._server is not None else port
        logger.info("event=metrics_listening host=%s port=%d", host, self.port)

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe(self, name: str, value: float) -> None:
        histogram = self.histograms.get(name)
        if histogram is not None:
            histogram.observe(value)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
