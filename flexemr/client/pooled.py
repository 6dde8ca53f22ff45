"""Pooled lookups (EmbeddingBag) on the ranker: :class:`Pooler` and the pooling RPC's :class:`PoolChannel`.

A pooled lookup (:meth:`~flexemr.EmbeddingClient.lookup_pooled`) splits the
occurrences of every table of a batch, natively and in one pass
(:func:`flexemr.core.kernel.partition_many`), by the shard (row band) that
holds their rows:

* with a cache (:mod:`flexemr.client.cache`), the hits are pooled at once,
  by the kernel, from the cache's arena where they lie; rows frequent in the
  batch (``cache_admit``) are read raw and cached.  Whether a lookup probes
  the cache at all is chosen by measured time (``Pooler.cache_cost``, a
  :class:`~flexemr.core.cachechoice.CacheChoice`, after the first
  :data:`CACHE_WARMUP` lookups, which fill it; in a prefetch stream by the
  stream's cycle): on a ranker short of CPU the probe can cost more than the
  reads it saves, and the lookups then bypass the cache (re-measured now and
  then);
* every shard's occurrences go either to its server, in **one pooling
  request per server** covering every table (``"flexemr/pool"`` channel,
  :mod:`flexemr.core.poolwire`), or to raw reads (the batcher,
  :mod:`flexemr.client.batcher`) pooled on the ranker by the kernel straight
  from the staging buffer, by the cost model of :class:`~flexemr.core.pooling.PoolingCost`
  (measured time per row; the byte model of :func:`~flexemr.core.pooling.choose_pooling`
  until there are measurements);

then the parts are added into the ``[B, dim]`` result in place (``max``: the
element-wise maximum; ``mean``: divided by the bag lengths at the end).

Wire format and framing: :mod:`flexemr.core.poolwire`; the server side:
:mod:`flexemr.server.pooling`.  A ranker opens one channel per server
(lazily, on its first pooled lookup) and keeps it for the life of the
client.  A pooling request that fails is served by raw reads pooled on the
ranker instead, and that server is paused (raw reads only) for a jittered,
doubling delay (``docs/locality.md``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core import dedup, kernel
from ..core.cachechoice import CacheChoice
from ..core.errors import ClosedError, InputError, TransportError, UnknownTableError
from ..core.hitpool import HitJob, pool_hits
from ..core.jagged import JaggedBatch
from ..core.metrics import LocalityMetrics
from ..core.plan import ShardingPlan
from ..core.pooling import PoolingCost, PoolMode, accumulation_dtype
from ..core.poolwire import POOL_CHANNEL, Buffer, FrameAssembler, RequestJob, decode_response, encode_request, frames
from ..core.spec import TableSpec
from .batcher import Batcher, Request
from .cache import ClientCache
from .coherence import Coherence
from .options import ClientOptions
from .peers import Peers
from .prefetch import current_stream
from .replica import Backoff

__all__ = ["PoolChannel", "Pooler", "send_message", "split_weights"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

#: Pooled lookups that always probe the cache before its cost is weighed against bypassing it.
CACHE_WARMUP = 32

#: Prefetch streams whose last completion the cache choice keeps (:meth:`Pooler._observe_cache`).
_STREAMS_KEPT = 8

#: rdmaio's per-message header (length, sequence), counted in the pooling byte metrics.
_CHANNEL_HEADER = 8


async def send_message(ch: rdmaio.Channel, req_id: int, parts: Sequence[Buffer]) -> int:
    """Send one logical message as frames; returns the bytes handed to the channel (headers included)."""
    cut = list(frames(req_id, parts, ch.max_message))
    await ch.send_many([head, *frame] for head, frame in cut)  # back to back: each posted once a credit allows
    return sum(len(head) + _CHANNEL_HEADER + sum(f.nbytes for f in frame) for head, frame in cut)


class PoolChannel:
    """Client side of one server's pooling channel: pipelined calls, one reader task.

    ``await call(parts)`` sends a request and waits for its response; any number
    of calls may be outstanding (the channel's credits bound what is on the
    wire).  Bytes sent/received are added to ``metrics``.
    """

    def __init__(self, ch: rdmaio.Channel, metrics: LocalityMetrics) -> None:
        self.channel = ch
        self._metrics = metrics
        self._ids = itertools.count(1)
        self._futs: dict[int, asyncio.Future[Buffer]] = {}
        self._error: BaseException | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        asm = FrameAssembler()
        try:
            async for frame in self.channel:
                self._metrics.pool_bytes_received += len(frame) + _CHANNEL_HEADER
                msg = asm.add(frame)
                if msg is not None:
                    fut = self._futs.pop(msg[0], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg[1])
            self._error = ClosedError("the server closed its pooling channel")
        except asyncio.CancelledError:
            self._error = ClosedError("pooling channel closed")
            raise
        except BaseException as exc:
            self._error = TransportError(f"pooling channel failed: {exc}")
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        futs, self._futs = self._futs, {}
        for f in futs.values():
            if not f.done():
                f.set_exception(self._error or ClosedError("pooling channel closed"))

    @property
    def broken(self) -> bool:
        return self._error is not None

    async def call(self, parts: Sequence[Buffer]) -> Buffer:
        """Send one request and return its response message."""
        if self._error is not None:
            raise self._error
        rid = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[Buffer] = asyncio.get_running_loop().create_future()
        self._futs[rid] = fut
        try:
            self._metrics.pool_bytes_sent += await send_message(self.channel, rid, parts)
            self._metrics.pool_rpcs += 1
        except BaseException as exc:
            # the reader may have failed this future meanwhile (the channel closed while we
            # waited for credits): retrieve that, so it is not reported as never retrieved
            self._futs.pop(rid, None)
            if fut.done():
                if not fut.cancelled():
                    fut.exception()
            else:
                fut.cancel()
            if isinstance(exc, rdmaio.RdmaioError):
                raise TransportError(f"sending a pooling request failed: {exc}") from exc
            raise
        return await fut

    async def aclose(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        try:
            await self.channel.aclose()
        except rdmaio.RdmaioError:
            pass


# ------------------------------------------------------------ pooled lookups


def split_weights(batch: JaggedBatch, w: object | None, mode: str) -> dict[str, npt.NDArray[Any]]:
    """``per_sample_weights`` (one per id of the batch, or ``{table: weights}``) per table, checked."""
    if w is None:
        return {}
    if mode == "max":
        raise InputError("per_sample_weights are only supported with mode 'sum' or 'mean'")
    if isinstance(w, Mapping):
        extra = set(w) - set(batch.keys)
        if extra:
            raise UnknownTableError(f"weights for tables not in the batch: {sorted(extra)}")
        per = {t: np.asarray(v) for t, v in w.items()}
    else:
        arr = np.asarray(w)
        if arr.ndim != 1 or arr.size != len(batch):
            raise InputError(f"per_sample_weights must be 1-D with one weight per id ({len(batch)}), "
                             f"got shape {arr.shape}")
        per = {}
        pos = 0
        for t in batch.keys:
            n = int(batch.ids(t).size)
            per[t] = arr[pos : pos + n]
            pos += n
    for t, v in per.items():
        if v.ndim != 1 or v.size != batch.ids(t).size or (v.size and v.dtype.kind not in "fiu"):
            raise InputError(f"table {t!r}: per_sample_weights must be {batch.ids(t).size} numbers, "
                             f"got shape {v.shape} dtype {v.dtype}")
    return per


def _sub_offsets(offsets: IntArray, mask: npt.NDArray[np.bool_]) -> IntArray:
    """Bag offsets of the occurrences ``mask`` selects (bags of ``offsets``, order kept)."""
    c = np.empty(mask.size + 1, dtype=np.int64)
    c[0] = 0
    np.cumsum(mask, out=c[1:])
    out: IntArray = c[offsets]
    return out


@dataclass(eq=False)
class _Table:
    """One table of a pooled lookup: its occurrences and the ``[B, dim]`` result the parts are added into."""

    table: str
    spec: TableSpec
    ids: IntArray
    offsets: IntArray
    weights: F32 | None
    kmode: str                      # what the parts compute: "sum" (sum, mean) or "max"
    out: npt.NDArray[Any]
    filled: bool = False
    #: whether servers may pool it: not when the cache left mostly bags of one row (as many bytes either way)
    poolable: bool = True
    #: the cache's probe: the admitted misses (read raw, then cached) and every miss, admitted or not (read raw
    #: in one part when servers do not pool the table), as positions and bag offsets
    admitted: tuple[IntArray, IntArray] | None = None
    misses: tuple[IntArray, IntArray] | None = None

    @property
    def fill(self) -> float:
        return float("-inf") if self.kmode == "max" else 0.0

    def target(self) -> npt.NDArray[Any] | None:
        """Where the next part may be pooled directly (the result itself while it holds nothing yet)."""
        if self.filled:
            return None
        self.filled = True
        return self.out

    def merge(self, part: npt.NDArray[Any]) -> None:
        """Add a ``[B, dim]`` part (a partial sum, or partial maxima with ``-inf`` for empty bags)."""
        if part is self.out:
            return
        if not self.filled:
            np.copyto(self.out, part)
            self.filled = True
        elif self.kmode == "max":
            np.maximum(self.out, part, out=self.out)
        else:
            np.add(self.out, part, out=self.out)

    def pool(self, rows: npt.NDArray[Any], ids: IntArray, offsets: IntArray, weights: F32 | None) -> None:
        """Pool rows ``rows[ids]`` by ``offsets`` and add them in."""
        dst = self.target()
        part = kernel.pool(rows, ids, offsets, self.kmode, weights, out=dst, fill=self.fill)  # type: ignore[arg-type]
        self.merge(part)


@dataclass(eq=False)
class _Local:
    """Occurrences of a table to pool on the ranker from raw reads: physical ids, their bags, weights."""

    tab: _Table
    ids: IntArray
    offsets: IntArray
    weights: F32 | None
    uniq: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    inverse: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))


def _add_local(tab: _Table, part: tuple[IntArray, IntArray] | None, local: list[_Local]) -> None:
    """The occurrences of ``tab`` at positions ``part[0]`` (bags by ``part[1]``), if any, to raw reads pooled here."""
    if part is not None and part[0].size:
        pos, offs = part
        local.append(_Local(tab, tab.ids[pos], offs, None if tab.weights is None else tab.weights[pos]))


@dataclass(eq=False)
class _Remote:
    """One server's pooling request: its jobs and, per job, the table it belongs to and the band start."""

    server: str
    jobs: list[RequestJob] = field(default_factory=list)
    tabs: list[_Table] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(int(j.ids.size) for j in self.jobs)


class Pooler:
    """Pooled lookups of one client (module docstring)."""

    def __init__(self, plan: ShardingPlan, options: ClientOptions, metrics: LocalityMetrics, peers: Peers,
                 batcher: Batcher, coherence: Coherence, cache: ClientCache | None) -> None:
        kernel.tune_allocator()
        self.plan = plan
        self.metrics = metrics
        self.peers = peers
        self.batcher = batcher
        self.coherence = coherence
        self.cache = cache
        self._slots = options.pool_slots
        self._slot_size = options.pool_slot_size
        self.channels: dict[str, PoolChannel] = {}
        self.refused: set[str] = set()
        self.pause: dict[str, tuple[float, Backoff]] = {}  # server -> (no pooling before, backoff)
        #: the clock pauses are measured on (time.monotonic; a test may drive its own)
        self.clock: Callable[[], float] = time.monotonic
        self.opening: asyncio.Task[None] | None = None
        self.server_index = {name: i for i, name in enumerate(plan.servers)}
        #: by the fastest sample of each way, the two ways interleaved after the first two lookups: load from other
        #: work must not pin the choice on the slower way (PoolingCost, judge="least")
        self.cost = PoolingCost(first_explore=2, judge="least")
        #: whether a lookup probes the cache or bypasses it, by measured time in runs (CacheChoice); on a
        #: ranker short of CPU the probe and the pooling of hits can cost more than the reads they save.  The
        #: first CACHE_WARMUP lookups always probe (they fill the cache)
        self.cache_cost = CacheChoice(warmup=CACHE_WARMUP)
        #: whether servers pool what the cache left (misses in bags of 2+ rows), by measured time as ``cost``,
        #: among the lookups that probed the cache (``cost`` measures those without it); no forced first turns
        self.miss_cost = PoolingCost(first_explore=0)
        #: prefetch stream -> when its last lookup completed: a stream's lookups are timed by its cycle (a few
        #: streams at once; the oldest forgotten first)
        self._stream_end: dict[object, float] = {}
        #: tables servers may pool: (band start rows, band server index, band shard index); not
        #: replicated/updatable ones (raw reads only: failover, torn-row checks) nor column-split ones
        self.routes: dict[str, tuple[IntArray, npt.NDArray[np.int32], list[int]]] = {}
        for table, shards in plan.shards.items():
            spec = plan.spec(table)
            if plan.versioned or any(sh.backups for sh in shards):
                continue
            if all(sh.col_start == 0 and sh.col_end == spec.dim for sh in shards) and \
                    all(sh.num_rows < (1 << 31) for sh in shards):
                self.routes[table] = (np.array([sh.row_start for sh in shards], dtype=np.int64),
                                      np.array([self.server_index[sh.server] for sh in shards], dtype=np.int32),
                                      [sh.index for sh in shards])
        peers.on_failure.append(self._drop_channel)

    def _drop_channel(self, server: str) -> None:
        self.channels.pop(server, None)

    # ------------------------------------------------------------ lookups

    async def lookup(self, batch: JaggedBatch, mode: PoolMode, weights: Mapping[str, npt.NDArray[Any]],
                     reqs: list[Request], use_pool: bool, t0: float) -> dict[str, npt.NDArray[Any]]:
        """``{table: [batch_size, dim]}`` for validated physical ids ``reqs`` (one per key of ``batch``)."""
        if use_pool:
            await self.open_channels()
        m = self.metrics
        m.lookups += 1
        m.pooled_lookups += 1
        kmode = "max" if mode == "max" else "sum"
        tabs: list[_Table] = []
        for t, spec, ids in reqs:
            w = weights.get(t)
            acc = accumulation_dtype(spec.np_dtype)
            offs = batch.bag_offsets(t)
            tabs.append(_Table(t, spec, ids, offs, None if w is None else np.ascontiguousarray(w, dtype=np.float32),
                               kmode, np.empty((offs.size - 1, spec.dim), dtype=acc)))
            m.ids_requested += int(ids.size)
        cached = self.cache is not None and not self.plan.versioned and self.cache_cost.choose()
        try:
            local: list[_Local] = []
            hits: list[HitJob] = []
            skips = [self._probe(tab, local, hits) if cached else None for tab in tabs]
            pool_hits(hits)  # every table's hits in one kernel call
            remote: dict[str, _Remote] = {}
            parted: set[str] = set()
            # a lookup whose every table the cache left with bags of one row is served raw, not
            # counted as a choice of the cost model (neither way would pool).  Whether servers pool what the
            # cache left is measured among the lookups that probed it (miss_cost); a trial's bypassing lookups
            # do not explore (they measure the cache), they pool only if pooling was measured faster
            chose = use_pool and any(t.poolable and t.table in self.routes for t in tabs)
            trial = self.cache is not None and not cached and self.cache_cost.exploring
            pooled = chose and (self._pooling_measured_faster() if trial else
                                (self.miss_cost if cached else self.cost).choose())
            if pooled:
                remote, parted = self._partition(tabs, skips, local)
            for tab, skip in zip(tabs, skips):
                if tab.table in parted:
                    _add_local(tab, tab.admitted, local)
                else:
                    self._keep_local(tab, skip, local)
            # a lookup that bypasses the cache does not fill it either (inserting every row read would
            # cost what bypassing saves); the cache keeps its rows for the next lookups that probe it
            coros: list[Any] = [self._raw(local, fill=cached or self.cache is None or self.plan.versioned)] if local else []
            coros += [self._rpc(r) for r in remote.values()]
            results = await asyncio.gather(*coros, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        except BaseException:
            m.errors += 1
            raise
        out = {tab.table: self._finish(tab, mode) for tab in tabs}
        dt = time.perf_counter() - t0
        n_ids = sum(int(tab.ids.size) for tab in tabs)
        if use_pool and not cached and not trial:
            self.cost.observe(pooled, n_ids, dt)
        elif cached and chose:
            self.miss_cost.observe(pooled, n_ids, dt)
        if self.cache is not None and not self.plan.versioned:
            self._observe_cache(cached, n_ids, t0, t0 + dt)
        m.lookup_latency.observe(dt)
        return out

    def _pooling_measured_faster(self) -> bool:
        """Whether servers pooling was measured faster than raw reads: on lookups without the cache (``cost``),
        or, while those have no measurements of both ways (the cache in use), on what the cache left
        (``miss_cost``); each judged as its model judges."""
        for cost in (self.cost, self.miss_cost):
            p, r = cost.pooled, cost.raw
            pv, rv = (p.least, r.least) if cost.judge == "least" else (p.value, r.value)
            if pv is not None and rv is not None:
                return pv < rv
        return False

    def _observe_cache(self, cached: bool, n_ids: int, t0: float, end: float) -> None:
        """File the time of a lookup with the cache choice: its own, or in a prefetch stream (lookups overlapping
        each other and the consumer, whose CPU they share) the stream's cycle, from that stream's last
        completion to this one (other streams and direct lookups in between do not break a stream's cycle)."""
        stream = current_stream()
        if stream is None:
            self.cache_cost.observe(cached, n_ids, end - t0)
            return
        last = self._stream_end.pop(stream, None)
        self._stream_end[stream] = end
        if len(self._stream_end) > _STREAMS_KEPT:
            del self._stream_end[next(iter(self._stream_end))]
        if last is not None:
            self.cache_cost.observe(cached, n_ids, end - last)

    def _probe(self, tab: _Table, local: list[_Local], hits: list[HitJob]) -> npt.NDArray[np.bool_] | None:
        """With a cache: the hits to pool now, from the cache's arena (a job added to ``hits``, pooled before
        anything is inserted), rows frequent in the batch sent to raw reads (and so to the cache); returns the
        occurrences served here (``None``: none)."""
        cache = self.cache
        if cache is None or self.plan.versioned or tab.ids.size == 0:  # versioned: hits checked by the batcher
            return None
        r = cache.probe_split(tab.table, tab.ids, tab.offsets, tab.weights)
        self.metrics.unique_ids += r.distinct_hits  # the misses are counted when (and if) they are read
        if r.hit_slots.size:
            out = tab.target()
            if out is None:  # not expected: the hits are a table's first part
                tab.pool(cache.rows.rows_view(tab.table), r.hit_slots, r.hit_offsets, r.hit_weights)
            else:
                hits.append(HitJob(cache.rows.rows_view(tab.table), r.hit_slots, r.hit_offsets, r.hit_weights,
                                   tab.kmode, out, tab.fill))
            self.metrics.local_pooled_rows += int(r.hit_slots.size)
        if r.admitted.size:  # read raw: alone if servers pool the table, else with the rest (_keep_local)
            tab.admitted = (r.admitted, r.admitted_offsets)
        # PoolingCost.prior's rule for the whole table: servers pool bags of 2+ rows; a rest mostly in bags of
        # one row moves as many bytes pooled as raw, and would cost a partition and the servers' CPU
        tab.poolable = 2 * r.rest_in_multi >= r.rest
        tab.misses = (r.miss_positions, r.miss_offsets)
        return r.served

    def _keep_local(self, tab: _Table, skip: npt.NDArray[np.bool_] | None, local: list[_Local]) -> None:
        """Every occurrence not pooled yet to raw reads pooled here: those not served (``skip``) and the admitted
        misses, in one part (one read and one fill per table; the probe's split gave them by bag)."""
        if skip is None:
            if tab.ids.size:
                local.append(_Local(tab, tab.ids, tab.offsets, tab.weights))
            return
        assert tab.misses is not None  # a probed table (skip: its served occurrences): the probe gave its misses
        _add_local(tab, tab.misses, local)

    def _partition(self, tabs: list[_Table], skips: list[npt.NDArray[np.bool_] | None],
                   local: list[_Local]) -> tuple[dict[str, _Remote], set[str]]:
        """Split the routable tables by shard in one native call; each shard's part goes to its server's request
        or, where the cost model says so, to raw reads.  Returns the requests by server and the tables split."""
        m = self.metrics
        down = self.refused | (set(self.plan.servers) - set(self.channels)) | self.paused()
        open_srv = np.array([s not in down for s in self.plan.servers])
        if not open_srv.any():
            return {}, set()
        jobs, parted = [], []
        for tab, skip in zip(tabs, skips):
            route = self.routes.get(tab.table)
            if route is None or tab.ids.size == 0 or not tab.poolable:
                continue
            starts, band_server, _ = route
            slot = np.where(open_srv[band_server], np.arange(band_server.size), -1).astype(np.int32)
            if (slot < 0).all():
                continue
            jobs.append(kernel.PartitionJob(tab.ids, tab.offsets, tab.spec.num_rows, starts, slot, band_server.size,
                                            tab.weights, skip))
            parted.append((tab, skip))
        remote: dict[str, _Remote] = {}
        for (tab, skip), p in zip(parted, kernel.partition_many(jobs) if jobs else []):
            starts, band_server, shard_index = self.routes[tab.table]
            assert p.rest_pos is not None
            # the rest: occurrences served here already (skip) and those of servers not pooling now
            rest = p.rest_pos if skip is None else p.rest_pos[~skip[p.rest_pos]]
            if rest.size:
                mask = np.zeros(tab.ids.size, dtype=bool)
                mask[rest] = True
                local.append(_Local(tab, tab.ids[rest], _sub_offsets(tab.offsets, mask),
                                    None if tab.weights is None else tab.weights[rest]))
            for b, (offs, ids) in enumerate(zip(p.offsets, p.ids)):
                if ids.size == 0:
                    continue
                server = self.plan.servers[int(band_server[b])]
                w = None if p.weights is None else p.weights[b]
                if not self.cost.prior(tab.spec.dim, tab.spec.np_dtype.itemsize, offs, int(ids.size)):
                    local.append(_Local(tab, ids.astype(np.int64) + starts[b], offs, w))
                    continue
                r = remote.get(server)
                if r is None:
                    r = remote[server] = _Remote(server)
                r.jobs.append(RequestJob(tab.table, shard_index[b], offs, ids, w))
                r.tabs.append(tab)
                r.starts.append(int(starts[b]))
                m.pooled_rows += int(ids.size)
                m.pooled_bags += int(np.count_nonzero(np.diff(offs)))
        m.pooled_subrequests += sum(len(r.jobs) for r in remote.values())
        return remote, {tab.table for tab, _ in parted}

    async def _raw(self, parts: list[_Local], *, fill: bool = True) -> None:
        """Read the rows of ``parts`` (one coalesced batch) and pool them here, straight from the staging buffer
        (``fill``: insert them into the cache)."""
        m = self.metrics
        reqs: list[Request] = []
        live = [lp for lp in parts if lp.ids.size]
        found = dedup.unique_inverse_many([(lp.ids, lp.tab.spec.num_rows) for lp in live])  # tables in parallel
        for lp, (uniq, inverse) in zip(live, found):
            lp.uniq, lp.inverse = uniq, inverse
            reqs.append((lp.tab.table, lp.tab.spec, uniq))
            m.local_pooled_rows += int(lp.ids.size)
            m.raw_subrequests += len(self._servers_of(lp.tab.table, lp.uniq))
        if not reqs:
            return

        def use(i: int, rows: npt.NDArray[Any], idx: IntArray | None) -> None:
            lp = live[i]
            lp.tab.pool(rows, lp.inverse if idx is None else idx[lp.inverse], lp.offsets, lp.weights)

        await self.batcher.fetch_rows(reqs, probe=self.plan.versioned, use=use, fill=fill)

    def _servers_of(self, table: str, uniq: IntArray) -> set[str]:
        """Servers holding rows of ``uniq`` (sorted unique ids: O(bands log n), no per-id routing)."""
        rt = self.plan.range_table(table)
        starts = rt.starts
        first = np.searchsorted(uniq, starts)                     # first id at or after each band start
        end = np.append(first[1:], uniq.size)
        shards = self.plan.shards[table]
        return {shards[int(rt.first_shard[b])].server for b in np.flatnonzero(end > first).tolist()}

    async def _rpc(self, r: _Remote) -> None:
        """One server's pooling request; its partials are added into the results (raw reads if it fails)."""
        server = r.server
        ch = self.channels.get(server)
        try:
            if ch is None or ch.broken:
                raise TransportError(f"no pooling channel to server {server!r}")
            mode = r.tabs[0].kmode
            data = await ch.call(encode_request(r.jobs, mode))
            parts = decode_response(data, [(j.offsets.size - 1, tab.spec.dim) for j, tab in zip(r.jobs, r.tabs)])
            for tab, part in zip(r.tabs, parts):
                tab.merge(part)
            pause = self.pause.get(server)
            if pause is not None and self.clock() >= pause[0]:  # not a request sent before the pause
                del self.pause[server]
        except (TransportError, ClosedError) as exc:
            if self.peers.closed:
                raise
            # The pooling channel failed, which need not mean the rows are unreadable:
            # read them raw (failover applies) and pool them here, as the server would have.
            now = self.clock()
            until, backoff = self.pause.get(server) or (0.0, Backoff(0.5, 30.0))
            if until <= now:  # one warning per pause, not one per lookup
                delay = backoff.next()
                self.pause[server] = (now + delay, backoff)
                log.warning("server %s: pooling request failed (%s); its rows are pooled on the ranker "
                            "for the next %.1f s", server, exc, delay)
            self.metrics.pool_fallbacks += 1
            await self._raw([_Local(tab, j.ids.astype(np.int64) + start, j.offsets, j.weights)
                             for j, tab, start in zip(r.jobs, r.tabs, r.starts)])

    @staticmethod
    def _finish(tab: _Table, mode: PoolMode) -> npt.NDArray[Any]:
        """The result: empty bags 0, ``mean`` divided by the bag lengths."""
        out = tab.out
        if not tab.filled:
            out.fill(0)
            return out
        lengths = np.diff(tab.offsets)
        if mode == "max":
            out[lengths == 0] = 0
        elif mode == "mean":
            nz = lengths > 0
            out[nz] /= lengths[nz, None].astype(out.dtype)
        return out

    # ------------------------------------------------------------ channels

    def paused(self) -> set[str]:
        """Servers whose pooling requests failed recently: raw reads only until their pause ends."""
        if not self.pause:
            return set()
        now = self.clock()
        return {s for s, (until, _) in self.pause.items() if until > now}

    async def open_channels(self) -> None:
        """Open the pooling channel to every server not tried yet (once; concurrent callers share the attempt)."""
        paused = self.paused()
        todo = [s for s in self.plan.servers
                if s not in self.refused and s not in paused and self.peers.peers[s].ep is not None
                and (s not in self.channels or self.channels[s].broken)]
        if not todo:
            return
        if self.opening is None or self.opening.done():
            assert self.peers.loop is not None
            self.opening = self.peers.loop.create_task(self._open(todo))
        opening = self.opening
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if opening.cancelled() and self.peers.closed and (task is None or not task.cancelling()):
                raise ClosedError("client closed while the lookup was in flight") from None  # aclose(), not us
            raise

    async def _open(self, servers: list[str]) -> None:
        async def one(server: str) -> None:
            old = self.channels.pop(server, None)
            if old is not None:
                await old.aclose()
            ep = self.peers.peers[server].ep
            if ep is None:
                return
            try:
                ch = await ep.channel(POOL_CHANNEL, slots=self._slots, slot_size=self._slot_size)
            except (rdmaio.EndpointBrokenError, rdmaio.ClosedError, rdmaio.TimeoutError) as exc:
                self.peers.peer_failed(server, exc, ep)
                return
            except rdmaio.RdmaioError as exc:  # e.g. transport without channels, or an old server
                log.warning("server %s: no pooling channel (%s); raw reads only", server, exc)
                self.refused.add(server)
                return
            self.channels[server] = PoolChannel(ch, self.metrics)

        await asyncio.gather(*(one(s) for s in servers))

    async def aclose(self) -> None:
        """Stop opening channels, close the open ones."""
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
            await asyncio.gather(self.opening, return_exceptions=True)
        for ch in self.channels.values():
            await ch.aclose()
        self.channels.clear()
