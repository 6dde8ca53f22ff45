"""The client's use of its row cache: probe before reading, fill after, adaptive capacity, metrics.

The data structure is :class:`~flexemr.core.cache.RowCache` (keyed by
physical ids); this module is what the client does with it
(``docs/locality.md``):

* **probe** -- a lookup's sorted unique ids are looked up first
  (:meth:`ClientCache.probe`); only the misses go to the batcher;
* **fill** -- the rows a batch read are inserted when it lands, unless an
  invalidation happened meanwhile (the batcher compares epochs,
  :mod:`flexemr.client.coherence`);
* **adaptive capacity** -- with ``adaptive=True``,
  :class:`~flexemr.core.cache.AdaptiveCapacity` turns the rows of recent
  batches into a capacity (:meth:`ClientCache.batch_done`,
  :meth:`ClientCache.idle_check`);
* **metrics** -- the cache's own counters are mirrored into the client's
  :class:`~flexemr.LocalityMetrics` (:meth:`ClientCache.sync_metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.cache import AdaptiveCapacity, RowCache, Split
from ..core.capacity import ActivationCapacity
from ..core.metrics import LocalityMetrics
from ..core.plan import Shard, ShardingPlan
from .options import ClientOptions

__all__ = ["ClientCache"]

IntArray = npt.NDArray[np.int64]


class ClientCache:
    """A client's :class:`~flexemr.core.cache.RowCache` and the policy around it (module docstring)."""

    def __init__(self, plan: ShardingPlan, options: ClientOptions, metrics: LocalityMetrics) -> None:
        row_bytes = max(s.dim * s.np_dtype.itemsize for s in plan.tables.values())
        self.rows = RowCache(memory_budget_bytes=options.cache_bytes, row_bytes=row_bytes,
                             policy=options.cache_policy)
        for spec in plan.tables.values():
            self.rows.register(spec.name, spec.dim, spec.np_dtype)
        self.adaptive: AdaptiveCapacity | ActivationCapacity | None = None
        #: [swapin] the capacity follows the NN's activations (batch samples), not the rows read
        self.by_samples = bool(options.adaptive and options.nn_sample_bytes)
        if self.by_samples:
            self.adaptive = ActivationCapacity(options.cache_bytes, row_bytes, options.nn_sample_bytes,
                                               options.cache_window)
        elif options.adaptive:
            self.adaptive = AdaptiveCapacity(options.cache_bytes, row_bytes, options.cache_window, inflight=2)
        #: [swapin] called with (old, new) capacity after every resize (flexemr.client.swapin)
        self.on_resize: Callable[[int, int], None] | None = None
        self.admit = options.cache_admit
        self.idle_s = float(options.cache_idle_s)
        self.metrics = metrics
        metrics.cache_capacity = self.rows.capacity
        self._seen = (0, 0, 0)
        self.last_batch_end = time.monotonic()

    def probe(self, table: str, uniq: IntArray) -> tuple[npt.NDArray[np.bool_], npt.NDArray[Any], int]:
        """``(hit mask, rows of the hits, number of hits)`` for sorted unique ids (counted in the metrics)."""
        hit, hit_rows = self.rows.lookup(table, uniq)
        nh = int(np.count_nonzero(hit))
        m = self.metrics
        m.cache_hits += nh
        m.cache_misses += int(uniq.size) - nh
        return hit, hit_rows, nh

    def probe_slots(self, table: str, uniq: IntArray) -> tuple[npt.NDArray[np.bool_], IntArray, int]:
        """``(hit mask, slots of the hits, number of hits)``: :meth:`probe` without copying the rows, which
        the caller reads in place from ``self.rows.rows_view(table)[slots]`` before anything is inserted."""
        hit, slots = self.rows.lookup_slots(table, uniq)
        nh = int(slots.size)
        m = self.metrics
        m.cache_hits += nh
        m.cache_misses += int(uniq.size) - nh
        return hit, slots, nh

    def probe_split(self, table: str, ids: IntArray, offsets: IntArray,
                    weights: npt.NDArray[np.float32] | None) -> Split:
        """A pooled lookup's occurrences probed and split (:meth:`~flexemr.core.cache.RowCache.probe_split`,
        admitting misses that occur ``cache_admit`` times), counted in the metrics per distinct id."""
        r = self.rows.probe_split(table, ids, offsets, weights, self.admit)
        m = self.metrics
        m.cache_hits += r.distinct_hits
        m.cache_misses += r.distinct - r.distinct_hits
        return r

    def fill(self, table: str, ids: IntArray, rows: npt.NDArray[Any]) -> None:
        """Cache rows just read."""
        self.rows.insert(table, ids, rows)

    def invalidate(self, table: str, ids: IntArray) -> int:
        """Drop cached copies of physical ``ids``; returns how many were cached."""
        n = self.rows.invalidate(table, ids)
        self.sync_metrics()
        return n

    def drop_shards(self, shards: Sequence[Shard]) -> None:
        """Drop every cached row of ``shards`` (their ``GEN`` moved)."""
        by_table: dict[str, list[Shard]] = {}
        for sh in shards:
            by_table.setdefault(sh.table, []).append(sh)
        for table, lst in by_table.items():
            ids = self.rows.entries(table)[0]
            drop = np.zeros(ids.size, dtype=bool)
            for sh in lst:
                drop |= (ids >= sh.row_start) & (ids < sh.row_end)
            if drop.any():
                self.rows.invalidate(table, ids[drop])
        self.sync_metrics()

    def sync_metrics(self) -> None:
        """Mirror the cache's counters into the client's metrics."""
        st = self.rows.stats
        ins, ev, inv = self._seen
        m = self.metrics
        m.cache_inserts += st.inserts - ins
        m.cache_evictions += st.evictions - ev
        m.cache_invalidations += st.invalidations - inv
        m.cache_capacity = self.rows.capacity
        self._seen = (st.inserts, st.evictions, st.invalidations)

    # ------------------------------------------------------------ adaptive

    def batch_done(self, rows: Mapping[str, IntArray]) -> None:
        """A batch landed; ``rows``: the rows it read per table."""
        self.last_batch_end = time.monotonic()
        if rows and self.adaptive is not None and not self.by_samples:  # GEN reads only say nothing
            self._resize(self.adaptive.observe(sum(int(r.size) for r in rows.values())))

    def observe_samples(self, samples: int) -> None:
        """[swapin] A batch of ``samples`` samples is looked up (``nn_sample_bytes``: the NN's memory need)."""
        if self.by_samples and self.adaptive is not None:
            if time.monotonic() - self.last_batch_end > self.idle_s:  # idle meanwhile: the window is stale
                self.adaptive.reset()
            self.last_batch_end = time.monotonic()
            self._resize(self.adaptive.observe(samples))

    def idle_check(self) -> None:
        """Before a batch: after ``cache_idle_s`` without one, the adaptive window is forgotten."""
        if self.adaptive is not None and time.monotonic() - self.last_batch_end > self.idle_s:
            self.adaptive.reset()
            self._resize(self.adaptive.capacity)

    def _resize(self, target: int) -> None:
        ac, cache = self.adaptive, self.rows
        assert ac is not None
        step = max(1, ac.max_capacity // 16)
        if target != cache.capacity and (abs(target - cache.capacity) >= step or target == ac.max_capacity):
            old = cache.capacity
            cache.resize(target)
            self.metrics.cache_resizes += 1
            self.sync_metrics()
            if self.on_resize is not None:
                self.on_resize(old, target)
