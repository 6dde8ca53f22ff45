"""Swap-in and predictive prefetch: hot rows read into the ranker cache in the background.

Both rank rows with one :class:`~flexemr.core.sketch.HotRows` (a count-min
frequency sketch with aging plus a bounded set of candidate rows per table)
fed with the ids of every lookup (:meth:`SwapIn.observe`).

Swap-in (``ClientOptions(adaptive=True, swapin=True)``)
    When the cache's capacity grows (the NN needs less memory:
    :class:`~flexemr.core.capacity.ActivationCapacity`, or the ranker went
    idle), the new free slots are filled with the most frequent rows that
    are not cached, read in chunks of ``swapin_chunk_rows`` rows.  When it
    shrinks, a swap-in still running stops after its current chunk, and
    eviction is LRU as before.
Predictive prefetch (``ClientOptions(predict_rows=N)``)
    After every lookup, up to ``N`` uncached rows ranked by frequency x
    recency (:meth:`~flexemr.core.sketch.HotRows.predict`) are read into the
    cache while the caller runs its NN on the rows it got: the next batches
    find them cached.  Lookahead prefetch (``client.prefetch``) fetches the
    batches it is handed; this predicts rows of batches not seen yet.

Neither ever delays a lookup: their reads go through a
:class:`~flexemr.client.batcher.Batcher` of their own (lookups never join
its batches nor wait for them), one chunk at a time, and the rows land in
the cache only when their batch was not overtaken by an invalidation
(:mod:`flexemr.client.coherence`, as every cache fill).  A lookup that
misses a row a swap-in is reading reads it itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.errors import FlexEMRError
from ..core.metrics import LocalityMetrics
from ..core.plan import ShardingPlan
from ..core.sketch import HotRows
from ..core.spec import TableSpec
from .batcher import Batcher
from .cache import ClientCache
from .options import ClientOptions

__all__ = ["SwapIn"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]


class SwapIn:
    """A client's swap-in and predictive prefetch (module docstring).

    ``batcher``: a batcher of its own (started by the client), reading into ``cache``.
    """

    def __init__(self, plan: ShardingPlan, options: ClientOptions, metrics: LocalityMetrics, cache: ClientCache,
                 batcher: Batcher, lookups: Batcher) -> None:
        self.plan = plan
        self.lookups = lookups  # the lookups' batcher: a prediction waits until the lookup it follows landed
        self.metrics = metrics
        self.cache = cache
        self.batcher = batcher
        batcher.background = True  # its reads are not the ranker's load (adaptive capacity)
        self.chunk = options.swapin_chunk_rows
        self.predict_rows = options.predict_rows
        self.enabled = options.swapin and cache.adaptive is not None
        limit = max(4096, min(1 << 18, 2 * cache.adaptive.max_capacity if cache.adaptive else cache.rows.capacity))
        self.hot = HotRows(limit=limit)
        self.task: asyncio.Task[None] | None = None
        self.predicting: asyncio.Task[None] | None = None
        self._budget = 0  # rows a running swap-in still may read
        self.closed = False
        if self.enabled:
            cache.on_resize = self.resized

    # --------------------------------------------------------------- inputs

    def observe(self, reqs: Sequence[tuple[str, TableSpec, IntArray]]) -> None:
        """The physical ids of one lookup (called before it is sent); may start a predictive read."""
        hot = self.hot
        hot.advance()
        for table, _, ids in reqs:
            if ids.size:
                hot.observe(table, ids)
        if self.predict_rows and not self.closed and (self.predicting is None or self.predicting.done()):
            self.predicting = self._start(self._predict())

    def resized(self, old: int, new: int) -> None:
        """The cache's capacity changed: grow -> swap in (more); shrink -> stop after the current chunk."""
        if self.closed:
            return
        if new <= old:
            self._budget = 0
            return
        self._budget += new - old
        if self.task is None or self.task.done():
            self.task = self._start(self._swap_in())

    def _start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.batcher.tasks.add(task)  # cancelled and awaited with the batcher's tasks at close
        task.add_done_callback(self.batcher.tasks.discard)
        return task

    # ------------------------------------------------------------- reading

    def _cached(self, table: str) -> npt.NDArray[np.bool_]:
        return self.cache.rows.contains(table, self.hot.candidates(table))

    async def _read(self, wanted: dict[str, IntArray]) -> int:
        """Read ``{table: sorted unique rows}`` into the cache through the swap-in batcher; rows read."""
        reqs = [(t, self.plan.spec(t), ids) for t, ids in wanted.items() if ids.size]
        if not reqs:
            return 0
        await self.batcher.fetch_unique(reqs, probe=False)
        self.metrics.swapin_rounds += 1
        return sum(int(ids.size) for _, _, ids in reqs)

    def _pick(self, n: int, predict: bool, reading: dict[str, IntArray] | None = None) -> dict[str, IntArray]:
        """Up to ``n`` uncached rows over all tables, hottest (or most likely next) first; ``reading``:
        rows the lookups read right now (they are about to be cached: not read twice)."""
        hot = self.hot
        scored: list[tuple[float, str, int]] = []
        per_table: dict[str, IntArray] = {}
        for table in hot.tables():
            cached = self._cached(table)
            if reading and table in reading:
                cached |= np.isin(hot.candidates(table), reading[table])
            ids = (hot.predict(table, n, exclude=cached) if predict else hot.hottest(table, n, exclude=cached))
            if ids.size == 0:
                continue
            per_table[table] = ids
            est = hot.estimate(table, ids)
            scored.extend((float(e), table, i) for i, e in enumerate(est.tolist()))
        if not scored:
            return {}
        if len(per_table) == 1 or sum(v.size for v in per_table.values()) <= n:
            take = {t: v[:n] for t, v in per_table.items()}
        else:  # share n rows between tables by estimate
            scored.sort(key=lambda x: -x[0])
            counts: dict[str, int] = {}
            for _, t, _ in scored[:n]:
                counts[t] = counts.get(t, 0) + 1
            take = {t: per_table[t][:k] for t, k in counts.items()}
        return {t: np.unique(v) for t, v in take.items()}

    def _admit(self, wanted: dict[str, IntArray]) -> dict[str, IntArray]:
        """Predicted rows worth their slots: all while the cache has free slots, then only those seen
        more often (sketch) than the cached rows they would evict (TinyLFU-style admission), so a
        prediction never pushes out rows more likely to be used than itself."""
        rows = self.cache.rows
        pred = [(t, ids, self.hot.estimate(t, ids)) for t, ids in wanted.items() if ids.size]
        n = sum(int(ids.size) for _, ids, _ in pred)
        free = rows.capacity - len(rows)
        if n <= free or not pred:
            return wanted
        est = np.concatenate([e for _, _, e in pred]).astype(np.float64)
        order = np.argsort(-est, kind="stable")
        victims = rows.coldest(n - free)
        vest = np.sort(np.concatenate([self.hot.estimate(t, v) for t, v in victims.items()] or
                                      [np.zeros(0, dtype=np.int64)]).astype(np.float64))
        better = est[order][free:free + vest.size] > vest[: n - free]
        k = free + (int(better.size) if better.all() else int(np.argmin(better)))
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
        out: dict[str, IntArray] = {}
        pos = 0
        for t, ids, _ in pred:
            sel = ids[keep[pos:pos + ids.size]]
            pos += ids.size
            if sel.size:
                out[t] = sel
        return out

    async def _swap_in(self) -> None:
        try:
            while self._budget > 0 and not self.closed:
                n = min(self.chunk, self._budget)
                wanted = self._pick(n, predict=False)
                if not wanted:
                    break
                got = await self._read(wanted)
                self._budget -= max(got, 1)
                self.metrics.swapin_rows += got
        except (FlexEMRError, OSError) as exc:  # a background read failed: lookups go on, misses fill it
            log.info("swap-in stopped: %s", exc)
        finally:
            self._budget = 0

    async def _predict(self) -> None:
        try:
            # after the lookup that started it has been read (while the caller runs its NN)
            batches = [b for b in (self.lookups.pending, *self.lookups.inflight) if b is not None]
            reading: dict[str, list[IntArray]] = {}
            if batches:
                await asyncio.wait([b.future for b in batches])
                for b in batches:
                    for t in set(b.rows) | set(b.needs):
                        reading.setdefault(t, []).extend([*b.needs.get(t, []), b.rows.get(t, np.zeros(0, np.int64))])
            wanted = self._admit(self._pick(self.predict_rows, predict=True,
                                            reading={t: np.concatenate(v) for t, v in reading.items() if v}))
            got = await self._read(wanted)
            self.metrics.predicted_rows += got
        except (FlexEMRError, OSError) as exc:
            log.info("predictive prefetch failed: %s", exc)

    def close(self) -> None:
        """Stop (the tasks are cancelled with the batcher's)."""
        self.closed = True
        self._budget = 0
