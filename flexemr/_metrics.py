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
us.  :meth:`LatencyHistogram.observe` takes a scalar or an array and updates
with one vectorised ``np.frexp`` + ``np.bincount``.

>>> h = LatencyHistogram()
>>> h.observe(np.array([0.5e-6, 3e-6, 3.5e-6, 1e-3]))
>>> h.count, h.counts[:3].tolist(), h.quantile(0.5)
(4, [1, 0, 2], 4.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

__all__ = ["ClientMetrics", "LatencyHistogram"]

NUM_BUCKETS = 40


class LatencyHistogram:
    """Counts of latencies in log2 microsecond buckets (see the module docstring)."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts: npt.NDArray[np.int64] = np.zeros(NUM_BUCKETS, dtype=np.int64)
        self.total_s = 0.0

    def observe(self, seconds: float | npt.NDArray[Any]) -> None:
        """Record one latency or an array of latencies (seconds)."""
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
