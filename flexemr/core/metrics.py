"""Client-side counters and a log2 latency histogram.

Counters of one :class:`~flexemr.EmbeddingClient` (all cumulative)::

    lookups        lookup calls that reached the network stage (lookup, lookup_many, lookup_jagged)
    ids_requested  ids asked for, duplicates included
    unique_ids     distinct ids per table per call, summed over calls
    rows_read      rows actually fetched from servers (after every kind of dedup)
    rows_shared    rows a call got without reading them itself:
                   merged with a concurrent call in the same batch, or already in flight
    inflight_hits  the part of rows_shared served by batches already sent
    reads          coalesced (remote offset, length) reads, summed over sub-requests
    bytes_read     bytes moved from servers
    subrequests    read_batch requests sent (one per server per batch when shards share an arena)
    batches        coalesced batches sent (a batch covers every caller of one window)
    errors         lookup calls that failed after validation

Invariant: ``unique_ids == rows_read + rows_shared`` once every call has completed.

Latencies (seconds in, microseconds stored) go into 40 log2 buckets: bucket
``0`` counts latencies below 1 us, bucket ``i > 0`` those in ``[2**(i-1), 2**i)``
us.  :meth:`LatencyHistogram.observe` takes a scalar (one ``math.frexp``) or an
array and updates with one vectorised ``np.frexp`` + ``np.bincount``.

>>> h = LatencyHistogram()
>>> h.observe(np.array([0.5e-6, 3e-6, 3.5e-6, 1e-3]))
>>> h.count, h.counts[:3].tolist(), h.quantile(0.5)
(4, [1, 0, 2], 4.0)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

__all__ = ["ClientMetrics", "LatencyHistogram", "LocalityMetrics", "ReliabilityMetrics"]

NUM_BUCKETS = 40


class LatencyHistogram:
    """Counts of latencies in log2 microsecond buckets (see the module docstring)."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts: npt.NDArray[np.int64] = np.zeros(NUM_BUCKETS, dtype=np.int64)
        self.total_s = 0.0

    def observe(self, seconds: float | npt.NDArray[Any]) -> None:
        """Record one latency or an array of latencies (seconds)."""
        if isinstance(seconds, (float, int)):  # one: no numpy calls (a server observes every request)
            bucket = math.frexp(seconds * 1e6)[1]
            self.counts[min(max(bucket, 0), NUM_BUCKETS - 1)] += 1
            self.total_s += float(seconds)
            return
        us = np.asarray(seconds, dtype=np.float64).reshape(-1) * 1e6
        if us.size == 0:
            return
        _, exp = np.frexp(us)
        self.counts += np.bincount(np.clip(exp, 0, NUM_BUCKETS - 1), minlength=NUM_BUCKETS)
        self.total_s += float(us.sum()) / 1e6

    @property
    def count(self) -> int:
        """Latencies recorded."""
        return int(self.counts.sum())

    @staticmethod
    def upper_bounds_us() -> npt.NDArray[np.float64]:
        """Upper bound (us, exclusive) of every bucket."""
        return np.ldexp(1.0, np.arange(NUM_BUCKETS))

    def quantile(self, q: float) -> float:
        """Upper bound (us) of the bucket holding quantile ``q`` (0 when empty)."""
        n = self.count
        if n == 0:
            return 0.0
        idx = int(np.searchsorted(np.cumsum(self.counts), q * n, side="left"))
        return float(self.upper_bounds_us()[min(idx, NUM_BUCKETS - 1)])

    def cumulative_buckets(self, last: int = 27) -> list[tuple[float, int]]:
        """``[(upper bound in seconds, latencies below it)]`` for buckets ``0..last``, then
        ``(inf, count)``: the shape of a Prometheus histogram (bucket ``last`` = 2**last us;
        27: about 134 s).

        >>> h = LatencyHistogram()
        >>> h.observe(np.array([0.5e-6, 3e-6, 5.0]))
        >>> h.cumulative_buckets(3)
        [(1e-06, 1), (2e-06, 1), (4e-06, 2), (8e-06, 2), (inf, 3)]
        """
        cum = np.cumsum(self.counts[: last + 1]).tolist()
        bounds = (self.upper_bounds_us()[: last + 1] * 1e-6).tolist()
        return [*zip(bounds, (int(c) for c in cum)), (float("inf"), self.count)]

    def snapshot(self) -> dict[str, Any]:
        """Plain-dict view: non-empty buckets, count, mean and p50/p99 bounds (us)."""
        nz = np.flatnonzero(self.counts)
        n = self.count
        return {
            "count": n,
            "mean_us": (self.total_s / n * 1e6) if n else 0.0,
            "p50_us": self.quantile(0.5),
            "p99_us": self.quantile(0.99),
            "buckets_us": {f"<{int(b)}": int(c) for b, c in zip(self.upper_bounds_us()[nz], self.counts[nz])},
        }


@dataclass
class ClientMetrics:
    """Counters and latency histograms of one client (see the module docstring).

    >>> m = ClientMetrics()
    >>> m.ids_requested += 5
    >>> m.snapshot()["ids_requested"]
    5
    >>> print(str(m).splitlines()[0])
    metric          value
    """

    lookups: int = 0
    ids_requested: int = 0
    unique_ids: int = 0
    rows_read: int = 0
    rows_shared: int = 0
    inflight_hits: int = 0
    reads: int = 0
    bytes_read: int = 0
    subrequests: int = 0
    batches: int = 0
    errors: int = 0
    lookup_latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False)
    batch_latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False)

    _COUNTERS: ClassVar[tuple[str, ...]] = (
        "lookups", "ids_requested", "unique_ids", "rows_read", "rows_shared", "inflight_hits", "reads",
        "bytes_read", "subrequests", "batches", "errors")

    def snapshot(self) -> dict[str, Any]:
        """Counters plus ``lookup_latency`` / ``batch_latency`` histogram dicts (a copy)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self._COUNTERS}
        out["lookup_latency"] = self.lookup_latency.snapshot()
        out["batch_latency"] = self.batch_latency.snapshot()
        return out

    def reset(self) -> None:
        """Zero every counter and histogram."""
        for f in fields(self):
            if f.name in self._COUNTERS:
                setattr(self, f.name, 0)
        self.lookup_latency = LatencyHistogram()
        self.batch_latency = LatencyHistogram()

    def __str__(self) -> str:
        rows = [(name, f"{getattr(self, name):,}") for name in self._COUNTERS]
        for label, h in (("lookup", self.lookup_latency), ("batch", self.batch_latency)):
            snap = h.snapshot()
            rows.append((f"{label} latency", f"n={snap['count']} mean={snap['mean_us']:.0f}us "
                                             f"p50<{snap['p50_us']:.0f}us p99<{snap['p99_us']:.0f}us"))
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"{'metric':<{width}}value"] + [f"{k:<{width}}{v}" for k, v in rows]
        return "\n".join(lines)


@dataclass
class LocalityMetrics(ClientMetrics):
    """:class:`~flexemr.ClientMetrics` plus the cache, pooling and prefetch counters.

    Extra counters (cumulative)::

        cache_hits           unique ids per call served from the ranker cache
        cache_misses         unique ids per call looked up in the cache and not found
        cache_inserts        rows inserted into the cache (fills after reads)
        cache_evictions      rows evicted (capacity pressure or adaptive shrink)
        cache_invalidations  cached rows dropped by invalidate(), update() or a shard's GEN change
        cache_stale_hits     cached rows of versioned shards found stale (the shard's GEN moved) and
                             read again; counted in cache_misses, not cache_hits
        cache_resizes        adaptive capacity changes applied
        cache_capacity       current capacity in rows (a gauge)
        pooled_lookups       lookup_pooled calls
        pooled_subrequests   (server, table) sub-requests sent as pooling RPCs
        pool_rpcs            pooling RPCs sent (one per lookup and server: all its tables in one request)
        raw_subrequests      (server, table) sub-requests served by one-sided reads
        pooled_bags          (server, bag) partials computed by servers
        pooled_rows          rows pooled on servers (occurrences)
        local_pooled_rows    rows pooled on the ranker (cached or read raw; occurrences)
        pool_bytes_sent      pooling request bytes (frames + channel headers)
        pool_bytes_received  pooling response bytes
        pool_fallbacks       pooling requests that failed (channel broken or refused, bad response) and
                             were served by raw reads pooled on the ranker instead
        prefetched_batches   batches fetched through client.prefetch()
        replica_moves        times the replicas serving a shard's reads changed from one batch to the next
                             (load-aware reads moving traffic; flexemr.client.load)
        off_primary_reads    shard reads of a batch that did not use the shard's primary
        split_reads          shard reads of a batch cut over several replicas
        worker_moves         endpoints the client moved to a queue pair of another engine worker because
                             its per-server load was skewed over the workers (flexemr.client.workers)
        priority_lookups     lookups sent in the priority lane (flexemr.client.lanes)
        priority_demoted     priority=True lookups larger than priority_max_rows, sent as bulk
        swapin_rows          rows read into the cache in the background after it grew (flexemr.client.swapin)
        swapin_rounds        background swap-in reads
        predicted_rows       rows read ahead into the cache because the predictor expects them

    ``network_bytes`` = ``bytes_read + pool_bytes_sent + pool_bytes_received``.

    With a cache, ``unique_ids`` counts the distinct ids per call served by the
    cache or the read path (rows pooled on servers are in ``pooled_rows``
    instead), and the invariant of :class:`~flexemr.ClientMetrics` becomes
    ``unique_ids == rows_read + rows_shared + cache_hits``.
    """

    cache_hits: int = 0
    cache_misses: int = 0
    cache_inserts: int = 0
    cache_evictions: int = 0
    cache_invalidations: int = 0
    cache_stale_hits: int = 0
    cache_resizes: int = 0
    cache_capacity: int = 0
    pooled_lookups: int = 0
    pooled_subrequests: int = 0
    pool_rpcs: int = 0
    raw_subrequests: int = 0
    pooled_bags: int = 0
    pooled_rows: int = 0
    local_pooled_rows: int = 0
    pool_bytes_sent: int = 0
    pool_bytes_received: int = 0
    pool_fallbacks: int = 0
    prefetched_batches: int = 0
    replica_moves: int = 0
    off_primary_reads: int = 0
    split_reads: int = 0
    worker_moves: int = 0
    priority_lookups: int = 0
    priority_demoted: int = 0
    swapin_rows: int = 0
    swapin_rounds: int = 0
    predicted_rows: int = 0

    _COUNTERS: ClassVar[tuple[str, ...]] = ClientMetrics._COUNTERS + (
        "cache_hits", "cache_misses", "cache_inserts", "cache_evictions", "cache_invalidations", "cache_stale_hits",
        "cache_resizes",
        "cache_capacity", "pooled_lookups", "pooled_subrequests", "pool_rpcs", "raw_subrequests", "pooled_bags", "pooled_rows",
        "local_pooled_rows", "pool_bytes_sent", "pool_bytes_received", "pool_fallbacks",
        "prefetched_batches", "replica_moves", "off_primary_reads", "split_reads", "worker_moves",
        "priority_lookups", "priority_demoted", "swapin_rows", "swapin_rounds", "predicted_rows")

    @property
    def network_bytes(self) -> int:
        """Bytes moved over the network: raw read payload plus pooling messages."""
        return self.bytes_read + self.pool_bytes_sent + self.pool_bytes_received

    def snapshot(self) -> dict[str, Any]:
        out = super().snapshot()
        out["network_bytes"] = self.network_bytes
        return out


@dataclass
class ReliabilityMetrics:
    """Counters of failures, failovers, reconnects and updates (``client.reliability``)."""

    peer_failures: int = 0        # servers marked down (a read/write/atomic on them failed)
    peer_timeouts: int = 0        # of those, noticed only when an operation ran out of op_timeout
    reconnects: int = 0           # successful reconnections
    restarts_seen: int = 0        # reconnections that found a new server incarnation
    failover_reads: int = 0       # read groups re-issued on another replica
    torn_rereads: int = 0         # rows read again because their version/checksum did not validate
    updates: int = 0              # acknowledged update() calls
    rows_updated: int = 0         # distinct rows written by acknowledged updates
    failed_updates: int = 0       # update() calls that raised
    resync_copies: int = 0        # shard copies made to bring a replica back in sync
    fenced: int = 0               # replicas dropped from service by this client's commits
    lock_steals: int = 0          # shard locks taken over from a silent holder
    stale_replica_reads: int = 0  # row groups read again: their replica was out of service (fenced)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        return asdict(self)
