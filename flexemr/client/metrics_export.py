"""Prometheus metrics of a ranker: a ``prometheus_client`` collector over an :class:`~flexemr.EmbeddingClient`.

:class:`ClientCollector` reads the client's own counters when scraped --
``client.metrics`` (:class:`~flexemr.LocalityMetrics`), ``client.reliability``
(:class:`~flexemr.core.metrics.ReliabilityMetrics`), the routes and the
rdmaio endpoints -- so lookups never touch a Prometheus object::

    registry = prometheus_client.CollectorRegistry()
    registry.register(ClientCollector(client, labels={"ranker": "r0"}))
    prometheus_client.start_http_server(9500, registry=registry)   # or start_client_metrics(...)

Names (prefix ``flexemr_client_``; counters end in ``_total``, base units)
come from :data:`COUNTERS`, :data:`RELIABILITY` and::

    flexemr_client_lookup_latency_seconds     histogram: lookup call to its rows
    flexemr_client_batch_latency_seconds      histogram: one coalesced batch's reads
    flexemr_client_cache_capacity_rows        gauge: row-cache capacity
    flexemr_client_healthy                    gauge: 1 when every replica of every shard serves
    flexemr_client_server_up{server}          gauge: 1 while connected to that server
    flexemr_client_shards_degraded            gauge: shards served by fewer replicas than planned
    flexemr_client_qp_slot_waits_total        operations that waited for a free queue-pair slot

``labels`` are added to every sample (e.g. which ranker this is).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.errors import ConfigError, TransportError
from ..core.metrics import LatencyHistogram
from .client import EmbeddingClient

__all__ = ["COUNTERS", "GAUGES", "RELIABILITY", "ClientCollector", "ClientMetricsEndpoint", "start_client_metrics"]

#: ``client.metrics`` counter -> (metric name without the prefix and ``_total``, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "lookups": ("lookups", "Lookup calls that reached the network stage"),
    "ids_requested": ("ids_requested", "Ids asked for, duplicates included"),
    "unique_ids": ("unique_ids", "Distinct ids per table per call, summed over calls"),
    "rows_read": ("rows_read", "Rows fetched from servers"),
    "rows_shared": ("rows_shared", "Rows a call got from a concurrent call's reads"),
    "inflight_hits": ("inflight_hits", "Rows served by batches already in flight"),
    "reads": ("reads", "Coalesced remote reads"),
    "bytes_read": ("read_bytes", "Bytes read from servers"),
    "subrequests": ("read_requests", "read_batch requests sent"),
    "batches": ("batches", "Coalesced batches sent"),
    "errors": ("lookup_errors", "Lookup calls that failed after validation"),
    "cache_hits": ("cache_hits", "Ids served by the ranker's row cache"),
    "cache_misses": ("cache_misses", "Ids looked up in the row cache and not found"),
    "cache_inserts": ("cache_inserts", "Rows inserted into the row cache"),
    "cache_evictions": ("cache_evictions", "Rows evicted from the row cache"),
    "cache_invalidations": ("cache_invalidations", "Cached rows dropped by invalidation"),
    "cache_stale_hits": ("cache_stale_hits", "Cached rows of versioned shards found stale and read again"),
    "cache_resizes": ("cache_resizes", "Adaptive cache capacity changes"),
    "pooled_lookups": ("pooled_lookups", "lookup_pooled calls"),
    "pooled_subrequests": ("pool_subrequests", "(server, table) sub-requests sent as pooling RPCs"),
    "pool_rpcs": ("pool_requests", "Pooling RPCs sent (one per lookup and server, all its tables)"),
    "raw_subrequests": ("raw_requests", "Sub-requests served by one-sided reads"),
    "pooled_bags": ("pooled_bags", "Bag partials computed by servers"),
    "pooled_rows": ("server_pooled_rows", "Rows pooled on servers"),
    "local_pooled_rows": ("local_pooled_rows", "Rows pooled on the ranker"),
    "pool_bytes_sent": ("pool_sent_bytes", "Bytes of pooling requests"),
    "pool_bytes_received": ("pool_received_bytes", "Bytes of pooling responses"),
    "pool_fallbacks": ("pool_fallbacks", "Pooling requests that failed and were served by reads instead"),
    "prefetched_batches": ("prefetched_batches", "Batches fetched through client.prefetch()"),
    "replica_moves": ("replica_moves", "Changes of the replicas serving a shard's reads between batches"),
    "off_primary_reads": ("off_primary_reads", "Shard reads of a batch that did not use the shard's primary"),
    "split_reads": ("split_reads", "Shard reads of a batch cut over several replicas"),
    "worker_moves": ("worker_moves", "Endpoints moved to a queue pair of another engine worker under skew"),
    "priority_lookups": ("priority_lookups", "Lookups sent on the priority lane"),
    "priority_demoted": ("priority_demoted", "priority=True lookups larger than priority_max_rows, sent as bulk"),
    "swapin_rows": ("swapin_rows", "Rows read into the cache in the background after it grew"),
    "swapin_rounds": ("swapin_rounds", "Background swap-in reads"),
    "predicted_rows": ("predicted_rows", "Rows read ahead into the cache because the predictor expects them"),
}
#: ``client.metrics`` fields that are gauges, not counters
GAUGES: dict[str, tuple[str, str]] = {
    "cache_capacity": ("cache_capacity_rows", "Row-cache capacity in rows"),
}
#: ``client.reliability`` counter -> (metric name without the prefix and ``_total``, help)
RELIABILITY: dict[str, tuple[str, str]] = {
    "peer_failures": ("server_failures", "Servers marked down after an operation on them failed"),
    "peer_timeouts": ("server_timeouts", "Servers marked down only when an operation on them timed out"),
    "reconnects": ("reconnects", "Successful reconnections to servers"),
    "restarts_seen": ("server_restarts_seen", "Reconnections that found a restarted server"),
    "failover_reads": ("failovers", "Read groups re-issued on another replica"),
    "torn_rereads": ("torn_rereads", "Rows read again because their version did not validate"),
    "updates": ("updates", "Acknowledged update() calls"),
    "rows_updated": ("rows_updated", "Distinct rows written by acknowledged updates"),
    "failed_updates": ("failed_updates", "update() calls that raised"),
    "resync_copies": ("resyncs", "Shard copies made to bring a replica back in sync"),
    "fenced": ("fenced_replicas", "Replicas dropped from service by this client's commits"),
    "lock_steals": ("lock_steals", "Shard locks taken over from a silent holder"),
    "stale_replica_reads": ("stale_replica_reads", "Row groups read again: their replica was out of service"),
}
PREFIX = "flexemr_client_"


class ClientCollector(Collector):
    """Collects one :class:`~flexemr.EmbeddingClient`'s metrics at scrape time (module docstring).

    Holds the client weakly: a collected client exposes nothing.  Queue-pair
    slot waits are summed over the client's endpoints and kept monotonic
    across reconnections (an endpoint's count since the previous scrape is
    lost if it breaks in between).
    """

    def __init__(self, client: EmbeddingClient, labels: Mapping[str, str] | None = None) -> None:
        if not isinstance(client, EmbeddingClient):
            raise ConfigError(f"ClientCollector takes an EmbeddingClient, got {type(client).__name__}")
        self._client = weakref.ref(client)
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self._waits_total = 0
        self._waits_seen: dict[int, tuple[weakref.ref[object], int]] = {}

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: registering never calls collect() early

    def _slot_waits(self, client: EmbeddingClient) -> int:
        seen: dict[int, tuple[weakref.ref[object], int]] = {}
        for server in client.plan.servers:
            try:
                ep = client.endpoint(server)
            except (TransportError, ConfigError):
                continue
            now = ep.slot_waits
            prev = self._waits_seen.get(id(ep))
            before = prev[1] if prev is not None and prev[0]() is ep else 0
            self._waits_total += max(0, now - before)
            seen[id(ep)] = (weakref.ref(ep), now)
        self._waits_seen = seen
        return self._waits_total

    def collect(self) -> Iterator[Metric]:
        client = self._client()
        if client is None:
            return
        names, values = list(self.labels), list(self.labels.values())
        m, r = client.metrics, client.reliability
        for table, fields, kind in ((COUNTERS, m, "c"), (GAUGES, m, "g"), (RELIABILITY, r, "c")):
            for attr, (name, doc) in table.items():
                value = getattr(fields, attr, None)
                if not isinstance(value, int):
                    continue
                fam: Metric = (CounterMetricFamily(PREFIX + name, doc, labels=names) if kind == "c"
                               else GaugeMetricFamily(PREFIX + name, doc, labels=names))
                fam.add_metric(values, value)  # type: ignore[attr-defined]
                yield fam
        for attr, name, doc in (("lookup_latency", "lookup_latency_seconds", "Lookup call to its rows"),
                                ("batch_latency", "batch_latency_seconds", "One coalesced batch's reads")):
            hist = getattr(m, attr, None)
            if isinstance(hist, LatencyHistogram):
                h = HistogramMetricFamily(PREFIX + name, doc, labels=names)
                h.add_metric(values, [("+Inf" if le == float("inf") else repr(le), float(n))
                                      for le, n in hist.cumulative_buckets()], sum_value=hist.total_s)
                yield h
        if not client.connected:
            return
        up = GaugeMetricFamily(PREFIX + "server_up", "1 while this client is connected to the server",
                               labels=[*names, "server"])
        for server in client.plan.servers:
            try:
                ep = client.endpoint(server)
                ok = ep.broken is None and not ep.closed
            except (TransportError, ConfigError):
                ok = False
            up.add_metric([*values, server], float(ok))
        yield up
        healthy = GaugeMetricFamily(PREFIX + "healthy", "1 when every replica of every shard serves reads",
                                    labels=names)
        healthy.add_metric(values, float(client.healthy()))
        yield healthy
        status = client.replica_status()
        planned = {sh.region_name: len(sh.replicas) for shards in client.plan.shards.values() for sh in shards}
        degraded = GaugeMetricFamily(PREFIX + "shards_degraded",
                                     "Shards served by fewer replicas than the plan has", labels=names)
        degraded.add_metric(values, float(sum(len(status.get(reg, [])) < n for reg, n in planned.items())))
        yield degraded
        waits = CounterMetricFamily(PREFIX + "qp_slot_waits",
                                    "Operations that waited for a free queue-pair slot (send credits)",
                                    labels=names)
        waits.add_metric(values, self._slot_waits(client))
        yield waits


@dataclass
class ClientMetricsEndpoint:
    """What :func:`start_client_metrics` started: the registry and the HTTP server (close it when done)."""

    registry: CollectorRegistry
    port: int
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        """Stop serving. Idempotent."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_client_metrics(client: EmbeddingClient, port: int = 0, host: str = "127.0.0.1", *,
                         labels: Mapping[str, str] | None = None,
                         registry: CollectorRegistry | None = None) -> ClientMetricsEndpoint:
    """Serve ``client``'s metrics at ``http://host:port/metrics`` (``prometheus_client``'s daemon thread).

    ``port=0`` picks a free port (:attr:`ClientMetricsEndpoint.port`).  The
    registry is a new one unless given; a :class:`ClientCollector` is
    registered in it.
    """
    reg = registry if registry is not None else CollectorRegistry()
    reg.register(ClientCollector(client, labels))
    server, thread = start_http_server(port, host, registry=reg)
    return ClientMetricsEndpoint(reg, int(server.server_address[1]), server, thread)
