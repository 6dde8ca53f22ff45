"""The batcher: coalescing window, in-flight dedup, staging buffers and the reads of a batch.

Life of a lookup (``Batcher.lookup``, ids validated by the client)::

    uniq, inverse = unique(ids)                   duplicates fetched once
    cache probe (flexemr.client.cache)            hits need no read
    in-flight check: rows of uniq already being fetched by a sent batch are
        borrowed from it (searchsorted against its sorted row array)
    the rest joins the *pending batch*            concurrent callers share it
    ... the coalescing window closes ...
    launch: per table np.unique over all callers' rows (when more than one),
        split_lookup(sorted_unique=True: no second validation or unique; runs of
        consecutive rows -> one read), one read_batch per server (shards of a
        server share its arena region), all into one registered staging buffer
    each caller: the kernel gathers (or pools) its occurrences straight from
        staging_view[searchsorted(batch_rows, uniq)[inverse]] (one copy)

Coalescing window
    The first caller that adds rows to an empty pending batch schedules its
    launch: with ``coalesce_window_us=0`` (default) via ``loop.call_soon``, so
    every lookup started in the same event-loop iteration (e.g. tasks of one
    ``asyncio.gather``) joins the batch; with ``coalesce_window_us=W`` via
    ``loop.call_later(W / 1e6)`` (``W`` at most
    :data:`~flexemr.client.options.MAX_WINDOW_US`).  A batch reaching
    ``max_batch_rows`` rows launches at once.  Nothing waits longer than the
    window.

In-flight dedup
    A launched batch keeps, per table, the sorted array of rows it fetches.  A
    new caller looks its unique rows up in every batch still in flight (one
    ``searchsorted`` per batch and table; not on versioned plans, where a sent
    read may predate an acknowledged update, nor across an invalidation:
    :mod:`flexemr.client.coherence`) and only adds the misses to the pending
    batch; it then waits for every batch it depends on and copies its rows
    out.  A batch's staging buffer is reference counted by its callers and
    returns to the pool when the last one has copied its rows.

Reads and failover
    The reads of a batch are grouped per route (:meth:`Batcher.read_items`);
    a group whose server fails marks it down (:meth:`Peers.peer_failed`) and is
    re-issued on another replica.  Versioned tables are read as header+row
    slots and validated per batch (:mod:`flexemr.core.versioned`), torn rows
    read again; their control words ride in the same batch
    (:meth:`~flexemr.client.coherence.Coherence.check_members`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core import dedup, kernel
from ..core.errors import ClosedError, FlexEMRError, TransportError
from ..core.metrics import LocalityMetrics, ReliabilityMetrics
from ..core.plan import ShardingPlan
from ..core.spec import TableSpec
from ..core.split import SplitLookup, split_lookup
from ..core.versioned import Ctl, ctl_offset, row_data, slot_bytes, validate_slots
from .cache import ClientCache
from .coherence import Coherence, GenCheck, GenToken
from .lanes import ReadLane
from .load import LoadTracker
from .options import ClientOptions
from .peers import Peers, Route

__all__ = ["Batch", "Batcher", "Item", "RowUser", "StagingPool", "caller_error"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
Request = tuple[str, TableSpec, IntArray]  #: (table, spec, sorted unique or raw physical ids)
#: ``use(i, rows, idx)`` of :meth:`Batcher.fetch_rows`: request ``i``'s row ``j`` is ``rows[idx[j]]`` (``idx`` None: ``rows[j]``)
RowUser = Callable[[int, npt.NDArray[Any], "IntArray | None"], None]

_ALIGN = 64
_MIN_STAGING = 1 << 16
#: Longest single read, and most bytes per read_batch request (rdmaio caps a request at 1 GiB).
_MAX_READ_BYTES = 64 << 20
_MAX_REQUEST_BYTES = 256 << 20


# ------------------------------------------------------------------- helpers


def _unique_rows(split: SplitLookup, buf: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
    """The ``[num_unique, dim]`` sorted unique rows of a filled staging slice (a view when possible)."""
    spec = split.spec
    dtype = spec.np_dtype
    n = split.num_unique
    if split.full_width:
        return buf[: split.staging_bytes].view(dtype).reshape(n, spec.dim)
    rows = np.empty((n, spec.dim), dtype=dtype)
    for blk in split.blocks:
        cols = blk.col_end - blk.col_start
        end = blk.local_base + blk.count * cols * dtype.itemsize
        rows[blk.first : blk.first + blk.count, blk.col_start : blk.col_end] = (
            buf[blk.local_base : end].view(dtype).reshape(blk.count, cols))
    return rows


def _chunks(lengths: IntArray, max_reads: int, max_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` slices of at most ``max_reads`` reads and (unless one read is larger) ``max_bytes`` bytes.

    >>> _chunks(np.array([4, 4, 4, 4, 4]), 2, 100), _chunks(np.array([4, 4, 4, 4, 4]), 10, 8)
    ([(0, 2), (2, 4), (4, 5)], [(0, 2), (2, 4), (4, 5)])
    """
    n = int(lengths.size)
    if n <= max_reads and int(lengths.sum()) <= max_bytes:
        return [(0, n)] if n else []
    csum = np.cumsum(lengths)
    out: list[tuple[int, int]] = []
    start = 0
    while start < n:
        base = int(csum[start - 1]) if start else 0
        end = min(start + max_reads, n, int(np.searchsorted(csum, base + max_bytes, side="right")))
        end = max(end, start + 1)
        out.append((start, end))
        start = end
    return out


def caller_error(exc: BaseException) -> FlexEMRError:
    """A fresh exception for one caller of a failed batch (the batch's error is shared)."""
    if isinstance(exc, FlexEMRError):
        err: FlexEMRError = type(exc)(*exc.args)
    else:
        err = TransportError(f"embedding read failed: {exc}")
    err.__cause__ = exc
    return err


# ------------------------------------------------------------------- staging


class Staging:
    __slots__ = ("array", "mr", "size")

    def __init__(self, array: npt.NDArray[np.uint8], mr: rdmaio.MemoryRegion) -> None:
        self.array = array
        self.mr = mr
        self.size = int(array.size)


class StagingPool:
    """Registered staging buffers in power-of-two size classes, reused between batches."""

    def __init__(self, engine: rdmaio.Engine, max_cached_bytes: int) -> None:
        self._engine = engine
        self._max = max_cached_bytes
        self._free: dict[int, list[Staging]] = {}
        self._cached = 0
        self._closed = False

    def acquire(self, nbytes: int) -> Staging:
        size = max(_MIN_STAGING, 1 << max(0, nbytes - 1).bit_length())
        free = self._free.get(size)
        if free:
            self._cached -= size
            return free.pop()
        arr = np.empty(size, dtype=np.uint8)
        return Staging(arr, self._engine.register(arr, access=rdmaio.Access.NONE))

    def release(self, st: Staging) -> None:
        if self._closed or self._cached + st.size > self._max:
            st.mr.close()
            return
        self._free.setdefault(st.size, []).append(st)
        self._cached += st.size

    def close(self) -> None:
        self._closed = True
        for lst in self._free.values():
            for st in lst:
                st.mr.close()
        self._free.clear()
        self._cached = 0


# ------------------------------------------------------------------- batches


class Batch:
    """One coalesced round of reads (see the module docstring)."""

    __slots__ = ("needs", "pending_rows", "rows", "views", "future", "refs", "staging", "finished", "error", "epoch",
                 "tainted", "gen_regions", "gens", "allowed")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.tainted = False  # a read failed (maybe still landing): do not reuse the staging buffer
        self.epoch = -1  # the client's invalidation epoch when the reads were issued
        self.needs: dict[str, list[IntArray]] = {}
        self.pending_rows = 0
        self.rows: dict[str, IntArray] = {}
        self.views: dict[str, npt.NDArray[Any]] = {}
        self.future = future
        self.refs = 0
        self.staging: Staging | None = None
        self.finished = False
        self.error: BaseException | None = None
        self.gen_regions: set[str] = set()  # versioned shards whose GEN word this batch also reads
        self.gens: dict[str, GenToken] = {}  # ... and what it read
        #: versioned, replicated shards: the replicas this batch may take rows from (in service
        #: according to the control words it read; see Coherence.check_members)
        self.allowed: dict[str, frozenset[str]] = {}


class _Job:
    __slots__ = ("table", "spec", "uniq", "sources", "hit", "hit_rows", "gen", "gen_batch")

    def __init__(self, table: str, spec: TableSpec, uniq: IntArray) -> None:
        self.table = table
        self.spec = spec
        self.uniq: IntArray = uniq
        self.sources: list[Batch] = []
        self.hit: npt.NDArray[np.bool_] | None = None
        self.hit_rows: npt.NDArray[Any] | None = None
        self.gen: GenCheck | None = None
        self.gen_batch: Batch | None = None


class Item(NamedTuple):
    """One group of reads of a batch: ``length[i]`` bytes at ``remote[i]`` (offset in the shard region)
    of ``region`` into the staging buffer at ``local[i]``; ``pin``: read from this replica only (never
    re-issued elsewhere: the control words of one replica), else from whichever replica serves."""

    region: str
    local: IntArray
    remote: IntArray
    length: IntArray
    pin: str | None = None


class Batcher:
    """Batches of one client: lookups in, coalesced reads out (module docstring)."""

    def __init__(self, plan: ShardingPlan, options: ClientOptions, metrics: LocalityMetrics,
                 reliability: ReliabilityMetrics, peers: Peers, coherence: Coherence,
                 cache: ClientCache | None, lane: ReadLane | None = None) -> None:
        self.plan = plan
        #: [lanes] which replica and endpoint each read takes, and its credits (flexemr.client.lanes)
        self.lane = lane if lane is not None else ReadLane("bulk", peers, LoadTracker(), metrics, balanced=False,
                                                           split_bytes=1 << 62)
        self.metrics = metrics
        self.reliability = reliability
        self.peers = peers
        self.coherence = coherence
        self.cache = cache
        #: [swapin] background reads (swap-in, predictions): not the ranker's load, so they neither feed
        #: nor reset the adaptive cache capacity (else a swap-in after a grow would shrink the cache again)
        self.background = False
        self.window_us = options.coalesce_window_us
        self.max_batch_rows = options.max_batch_rows
        self.max_reads = options.max_reads_per_request
        self.torn_timeout = float(options.torn_timeout)
        self._staging_bytes = options.staging_cache_bytes
        #: versioned table -> (row bytes, slot bytes)
        self.vslot: dict[str, tuple[int, int]] = {}
        if plan.versioned:
            for t, spec in plan.tables.items():
                self.vslot[t] = (spec.row_bytes, slot_bytes(spec))
        self.staging: StagingPool | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: Batch | None = None
        self.timer: asyncio.Handle | None = None
        self.inflight: list[Batch] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, loop: asyncio.AbstractEventLoop, engine: rdmaio.Engine) -> None:
        """Bind to the client's loop and engine (at connect)."""
        self.loop = loop
        self.staging = StagingPool(engine, self._staging_bytes)

    # ------------------------------------------------------------- lookups

    async def lookup(self, reqs: list[Request], t0: float) -> list[npt.NDArray[Any]]:
        """Rows ``[len(ids), dim]`` per ``(table, spec, physical ids)`` (validated); ``t0``: when the call began.

        One copy per row: the kernel gathers every occurrence straight from
        the staging buffer its row landed in (or the cache's copy) into the
        output.
        """
        m = self.metrics
        m.lookups += 1
        outs: list[npt.NDArray[Any]] = [np.empty((ids.size, spec.dim), dtype=spec.np_dtype) for _, spec, ids in reqs]
        wanted = [i for i, (_, _, ids) in enumerate(reqs) if ids.size]
        found = dedup.unique_inverse_many([(reqs[i][2], reqs[i][1].num_rows) for i in wanted])  # tables in parallel
        live: list[tuple[int, IntArray, IntArray]] = [(i, u, inv) for i, (u, inv) in zip(wanted, found)]
        m.ids_requested += sum(int(reqs[i][2].size) for i in wanted)

        def put(k: int, rows: npt.NDArray[Any], idx: IntArray | None) -> None:
            i, _, inverse = live[k]
            kernel.gather(rows, inverse if idx is None else idx[inverse], out=outs[i])

        try:
            await self.fetch_rows([(reqs[i][0], reqs[i][1], u) for i, u, _ in live], probe=True, use=put)
        except BaseException:
            m.errors += 1
            raise
        m.lookup_latency.observe(time.perf_counter() - t0)
        return outs

    async def fetch_unique(self, reqs: list[Request], *, probe: bool) -> list[npt.NDArray[Any]]:
        """Rows ``[len(uniq), dim]`` for sorted unique physical ids, per request (see :meth:`fetch_rows`)."""
        outs: list[npt.NDArray[Any]] = [np.empty((0, spec.dim), dtype=spec.np_dtype) for _, spec, _ in reqs]

        def keep(i: int, rows: npt.NDArray[Any], idx: IntArray | None) -> None:
            outs[i] = kernel.gather(rows, np.arange(rows.shape[0]) if idx is None else idx)

        await self.fetch_rows(reqs, probe=probe, use=keep)
        return outs

    async def fetch_rows(self, reqs: list[Request], *, probe: bool, use: RowUser, fill: bool = True) -> None:
        """Read the rows of sorted unique physical ids, per request, and hand them to ``use``.

        ``use(i, rows, idx)`` is called once per request ``i`` with a non-empty
        id array, while the rows are valid: the row of ``uniq[j]`` is
        ``rows[idx[j]]`` (``rows[j]`` when ``idx`` is ``None``); ``rows`` is
        usually a view of a staging buffer, reused once ``use`` returns.
        ``probe``: look the ids up in the cache first (else the caller did).
        Misses go through in-flight dedup and the pending (coalescing) batch;
        the rows read are inserted into the cache unless an invalidation
        happened since their batch was sent, or ``fill`` is false (a lookup
        that bypasses the cache leaves it as it is).
        """
        m = self.metrics
        cache = self.cache
        jobs: list[_Job] = []
        batches: dict[int, Batch] = {}
        for table, spec, uniq in reqs:
            job = _Job(table, spec, uniq)
            miss = uniq
            if probe and cache is not None and uniq.size:
                hit, hit_rows, nh = cache.probe(table, uniq)
                if nh:
                    job.hit, job.hit_rows = hit, hit_rows
                    miss = uniq[~hit]
                    job.gen = self.coherence.snapshot(table, uniq[hit])
                    if job.gen is not None:
                        b = job.gen_batch = self.place_gen_check(job.gen)
                        batches[id(b)] = b
            m.unique_ids += int(uniq.size)
            job.uniq = miss
            if miss.size:
                job.sources = self._place(table, miss)
                for b in job.sources:
                    batches[id(b)] = b
            jobs.append(job)
        for b in batches.values():
            b.refs += 1
        try:
            if self.pending is not None and self.pending.pending_rows >= self.max_batch_rows:
                self.launch()
            for b in batches.values():
                if not b.future.done():
                    await asyncio.shield(b.future)
                if b.error is not None:
                    raise caller_error(b.error)
            for job in jobs:
                if job.gen is not None:
                    assert job.hit_rows is not None
                    await self.refresh_stale(job.table, job.spec, job.gen, job.hit_rows, job.gen_batch)
            epoch = self.coherence.epoch
            for i, job in enumerate(jobs):
                if job.uniq.size == 0 and job.hit is None:
                    continue
                fill_job = fill and cache is not None and job.uniq.size > 0 and \
                    all(b.epoch == epoch for b in job.sources)
                if job.hit is None and not fill_job:
                    use(i, *self._source(job))
                    continue
                # one batch that read exactly these rows: its staging view, no copy (valid until we return)
                one = job.sources[0] if len(job.sources) == 1 else None
                miss_rows = one.views[job.table] if one is not None and one.rows[job.table].size == job.uniq.size \
                    else self._gather(job)
                if fill_job:
                    assert cache is not None
                    cache.fill(job.table, job.uniq, miss_rows)
                if job.hit is None:
                    use(i, miss_rows, None)
                    continue
                rows = np.empty((job.hit.size, job.spec.dim), dtype=job.spec.np_dtype)
                rows[job.hit] = job.hit_rows
                rows[~job.hit] = miss_rows
                use(i, rows, None)
            if cache is not None:
                cache.sync_metrics()
        finally:
            for b in batches.values():
                b.refs -= 1
                if b.finished and b.refs == 0:
                    self.release(b)

    def place_gen_check(self, check: GenCheck) -> Batch:
        """Have the pending batch read the GEN words of the shards of ``check``."""
        b = self.pending_batch()
        b.gen_regions.update(check.regions.values())
        return b

    async def refresh_stale(self, table: str, spec: TableSpec, check: GenCheck, hit_rows: npt.NDArray[Any],
                            batch: Batch | None = None) -> None:
        """Replace, in ``hit_rows``, the hits whose shard's GEN moved since they were cached by fresh reads.

        ``batch``: the batch reading the GEN words (:meth:`place_gen_check`), else the pending one now.
        """
        b = batch if batch is not None else self.place_gen_check(check)
        if not b.future.done():
            await asyncio.shield(b.future)
        if b.error is not None:
            raise caller_error(b.error)
        moved = self.coherence.moved(check, b.gens)
        if not moved:
            return
        stale = np.isin(check.shard_of, moved)
        n = int(np.count_nonzero(stale))
        m = self.metrics
        m.cache_stale_hits += n
        m.cache_hits -= n
        m.cache_misses += n
        m.unique_ids -= n  # the re-read below counts them again
        (rows,) = await self.fetch_unique([(table, spec, check.ids[stale])], probe=False)
        hit_rows[stale] = rows

    async def read_gens(self, regions: list[str]) -> None:
        """Read the GEN words of ``regions`` in a batch of their own (at connect: what the cache starts from)."""
        b = self.pending_batch()
        b.gen_regions.update(regions)
        self.launch()
        await b.future
        if b.error is not None:
            raise b.error

    def _place(self, table: str, uniq: IntArray) -> list[Batch]:
        """Borrow rows already in flight; add the rest to the pending batch."""
        sources: list[Batch] = []
        remaining = uniq
        epoch = self.coherence.epoch
        # A sent batch may have read a row before an update that was acknowledged
        # before this lookup began: versioned plans never borrow from one.
        for b in () if self.plan.versioned else self.inflight:
            rows = b.rows.get(table)
            if rows is None or b.epoch != epoch:  # sent before an invalidate(): maybe stale
                continue
            pos = np.searchsorted(rows, remaining)
            np.minimum(pos, rows.size - 1, out=pos)
            hit = rows[pos] == remaining
            n = int(np.count_nonzero(hit))
            if n:
                sources.append(b)
                self.metrics.inflight_hits += n
                self.metrics.rows_shared += n
                if n == remaining.size:
                    return sources
                remaining = remaining[~hit]
        b = self.pending_batch()
        b.needs.setdefault(table, []).append(remaining)
        b.pending_rows += int(remaining.size)
        sources.append(b)
        return sources

    def pending_batch(self) -> Batch:
        """The batch that the current coalescing window fills (opened, and its launch scheduled, on demand)."""
        b = self.pending
        if b is None:
            loop = self.loop
            assert loop is not None
            b = self.pending = Batch(loop.create_future())
            if self.window_us == 0:
                self.timer = loop.call_soon(self.launch)
            else:
                self.timer = loop.call_later(self.window_us / 1e6, self.launch)
        return b

    def _source(self, job: _Job) -> tuple[npt.NDArray[Any], IntArray | None]:
        """``(rows, idx)``: where a caller's rows are (``rows[idx[j]]`` is the row of ``job.uniq[j]``).

        One batch holds them all (the usual case): its staging view, no copy;
        else they are copied out of every batch (:meth:`_gather`).
        """
        if len(job.sources) == 1:
            b = job.sources[0]
            rows = b.rows[job.table]
            return b.views[job.table], None if rows.size == job.uniq.size else np.searchsorted(rows, job.uniq)
        return self._gather(job), None

    def _gather(self, job: _Job) -> npt.NDArray[Any]:
        """Copy a caller's rows out of the staging views of the batches it depends on."""
        spec = job.spec
        if job.uniq.size == 0:
            return np.empty((0, spec.dim), dtype=spec.np_dtype)
        if len(job.sources) == 1:
            rows, idx = self._source(job)
            return kernel.gather(rows, np.arange(rows.shape[0]) if idx is None else idx)
        out = np.empty((job.uniq.size, spec.dim), dtype=spec.np_dtype)
        for b in job.sources:
            rows = b.rows[job.table]
            pos = np.searchsorted(rows, job.uniq)
            np.minimum(pos, rows.size - 1, out=pos)
            hit = rows[pos] == job.uniq
            out[hit] = b.views[job.table][pos[hit]]
        return out

    # ------------------------------------------------------------- batches

    def launch(self) -> None:
        """Close the pending batch: fix its row sets (in-flight table) and start its reads."""
        b = self.pending
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if b is None:
            return
        self.pending = None
        if self.cache is not None and not self.background:
            self.cache.idle_check()
        b.epoch = self.coherence.epoch
        shared = 0
        for table, needs in b.needs.items():
            rows = needs[0] if len(needs) == 1 else np.unique(np.concatenate(needs))
            shared += sum(int(n.size) for n in needs) - int(rows.size)
            b.rows[table] = rows
        b.needs = {}
        self.metrics.rows_shared += shared
        self.inflight.append(b)
        assert self.loop is not None
        task = self.loop.create_task(self._run(b))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, b: Batch) -> None:
        t0 = time.perf_counter()
        m = self.metrics
        peers = self.peers
        try:
            assert self.staging is not None
            splits: list[tuple[SplitLookup, int, int]] = []
            pos = 0
            for table, rows in b.rows.items():
                split = split_lookup(self.plan, table, rows, max_read_bytes=_MAX_READ_BYTES, sorted_unique=True)
                vs = self.vslot.get(table)
                nbytes = split.staging_bytes if vs is None else int(rows.size) * vs[1]
                pos = -(-pos // _ALIGN) * _ALIGN
                splits.append((split, pos, nbytes))
                pos += nbytes
                m.rows_read += split.num_unique
            # versioned plans: the control words (LOCK, GEN, MEMBERS) of every connected replica of the
            # replicated shards read here, and of the shards whose GEN the cache needs, ride in this batch
            row_regions = {sub.region_name for split, _, _ in splits for sub in split.subrequests}
            ctl_regions = sorted(b.gen_regions | {r for r in row_regions if len(peers.region_shard[r].replicas) > 1}
                                 ) if self.vslot else []
            ctl_pins = [(r, s) for r in ctl_regions for s in peers.region_shard[r].replicas
                        if peers.live(s) and (s, r) in peers.routes]
            ctl_base = pos = -(-pos // 8) * 8
            pos += 24 * len(ctl_pins)
            st = b.staging = self.staging.acquire(pos)
            items: list[Item] = []
            for split, base, _ in splits:
                vs = self.vslot.get(split.table)
                for sub in split.subrequests:
                    lo, ro, ln = sub.local_offsets, sub.remote_offsets, sub.lengths
                    if vs is not None:  # versioned: the same runs of rows, strided by the slot size
                        rb, slot = vs
                        lo, ro, ln = lo // rb * slot, ro // rb * slot, ln // rb * slot
                    items.append(Item(sub.region_name, lo + base if base else lo, ro, ln))
            for i, (region, server) in enumerate(ctl_pins):
                sh = peers.region_shard[region]
                items.append(Item(region, np.array([ctl_base + 24 * i], dtype=np.int64),
                                  np.array([ctl_offset(self.plan.spec(sh.table), sh.num_rows)], dtype=np.int64),
                                  np.array([24], dtype=np.int64), server))
            m.batches += 1
            served, unread = await self.read_items(b, st, items)
            if ctl_regions:
                words = st.array[ctl_base : ctl_base + 24 * len(ctl_pins)].view("<u8").reshape(-1, 3)
                ctls: dict[str, dict[str, Ctl]] = {r: {} for r in ctl_regions}
                for (region, server), w in zip(ctl_pins, words.tolist()):
                    if (region, server) not in unread:
                        ctls[region][server] = Ctl(*w)
                tokens = await self.coherence.check_members(
                    b.allowed, served, ctls, row_regions, lambda stale: self._reread(b, st, items, stale))
                b.gens = {r: (tokens[r].server, tokens[r].incarnation, ctls[r][tokens[r].server].gen)
                          for r in b.gen_regions}
            for (split, base, nbytes), table in zip(splits, b.rows):
                if table in self.vslot:
                    b.views[table] = await self._validated_rows(b, st, split.spec, b.rows[table], base)
                else:
                    b.views[table] = _unique_rows(split, st.array[base : base + split.staging_bytes])
            if b.gens:
                self.coherence.observe(b.gens)
            m.batch_latency.observe(time.perf_counter() - t0)
            if self.cache is not None and not self.background:
                self.cache.batch_done(b.rows)
        except asyncio.CancelledError:
            b.error = ClosedError("client closed while the lookup was in flight")
            raise
        except rdmaio.RdmaioError as exc:
            b.error = TransportError(f"embedding read failed: {exc}")
            b.error.__cause__ = exc
            log.warning("batch failed: %s", exc)
        except FlexEMRError as exc:
            b.error = exc
            log.warning("batch failed: %s", exc)
        except BaseException as exc:
            b.error = exc
            log.exception("batch failed")
        finally:
            if b in self.inflight:
                self.inflight.remove(b)
            b.finished = True
            if not b.future.done():
                b.future.set_result(None)
            if b.refs == 0:
                self.release(b)

    async def _reread(self, b: Batch, st: Staging, items: list[Item],
                      regions: list[str]) -> dict[str, list[Route]]:
        """Read the row groups of ``regions`` again (their replica was out of service)."""
        more, _ = await self.read_items(b, st, [it for it in items if it.pin is None and it.region in regions])
        return more

    async def read_items(self, b: Batch, st: Staging,
                         items: list[Item]) -> tuple[dict[str, list[Route]], set[tuple[str, str]]]:
        """Issue the reads of ``items``; a failed server's share is re-read elsewhere.

        Each round groups the reads by the server (and key) now serving their
        region; a group that fails marks its server down (:meth:`Peers.peer_failed`,
        which drops it from every route) and is re-issued in the next round.
        Rounds end when everything landed or a region has no replica left
        (:class:`TransportError`).  Items pinned to a replica are never re-issued
        elsewhere.  Returns the routes that served each region (unpinned items; several when the
        lane cut a region's reads over its replicas)
        and the ``(region, server)`` of every pinned item that could not be read.
        """
        m = self.metrics
        peers = self.peers
        step = self.max_reads
        served: dict[str, list[Route]] = {}
        unread: set[tuple[str, str]] = set()
        pending = items
        while pending:
            groups: dict[tuple[str, str], tuple[Route, list[Item], list[IntArray]]] = {}
            # [lanes] the lane picks the replica(s) of every region (by load: it may cut a region's reads)
            routed = self.lane.routes([it for it in pending if it.pin is None], b.allowed)
            for item in pending:
                if item.pin is not None:
                    if not peers.live(item.pin) or (item.pin, item.region) not in peers.routes:
                        unread.add((item.region, item.pin))
                        continue
                    routed.append((item, self.lane.route(item.pin, item.region)))
            for item, route in routed:
                g = groups.get(route.group)
                if g is None:
                    g = groups[route.group] = (route, [], [])
                g[1].append(item)
                g[2].append(item.remote + peers.routes[(route.server, item.region)].base)  # offsets in route.key

            async def run_group(route: Route, its: list[Item], ro_parts: list[IntArray]) -> None:
                lo = np.concatenate([i.local for i in its]) if len(its) > 1 else its[0].local
                ro = np.concatenate(ro_parts) if len(ro_parts) > 1 else ro_parts[0]
                ln = np.concatenate([i.length for i in its]) if len(its) > 1 else its[0].length
                m.reads += int(ln.size)
                m.bytes_read += int(ln.sum())
                chunks = _chunks(ln, step, _MAX_REQUEST_BYTES)
                m.subrequests += len(chunks)
                coros = [self.lane.issue(route.server, int(ln[s:e].sum()), e - s, functools.partial(  # [lanes] credits, load
                    route.endpoint.read_batch, st.mr, lo[s:e], route.key, ro[s:e], ln[s:e])) for s, e in chunks]
                if len(coros) == 1:
                    await coros[0]
                    return
                results = await asyncio.gather(*coros, return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException):
                        raise r

            glist = list(groups.values())
            if len(glist) == 1:
                results: list[BaseException | None] = []
                try:
                    await run_group(*glist[0])
                    results.append(None)
                except rdmaio.RdmaioError as exc:
                    results.append(exc)
            else:
                results = await asyncio.gather(*(run_group(*g) for g in glist), return_exceptions=True)
            pending = []
            for (route, its, _), r in zip(glist, results):
                if r is None:
                    for item in its:
                        if item.pin is None and route not in served.setdefault(item.region, []):
                            served[item.region].append(route)
                    continue
                if not isinstance(r, rdmaio.RdmaioError) or isinstance(r, rdmaio.UsageError):
                    raise r
                b.tainted = True
                peers.peer_failed(route.server, r, route.endpoint)
                self.reliability.failover_reads += 1
                pending.extend(it for it in its if it.pin is None)
                unread.update((it.region, it.pin) for it in its if it.pin is not None)
        return served, unread

    async def _validated_rows(self, b: Batch, st: Staging, spec: TableSpec, rows: IntArray,
                              base: int) -> npt.NDArray[Any]:
        """Versioned table: check every slot read (vectorised), re-read the torn ones; the ``[n, dim]`` view."""
        slot = self.vslot[spec.name][1]
        n = int(rows.size)
        slots = st.array[base : base + n * slot].reshape(n, slot)
        ok = validate_slots(spec, slots, rows)
        deadline = time.monotonic() + self.torn_timeout
        delay = 0.0
        while not ok.all():
            bad = np.flatnonzero(~ok)
            self.reliability.torn_rereads += int(bad.size)
            if time.monotonic() > deadline:
                raise TransportError(f"table {spec.name!r}: {bad.size} row(s) failed validation for "
                                     f"{self.torn_timeout} s (e.g. row {int(rows[bad[0]])}): a writer died "
                                     f"mid-update or the data is corrupt")
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, 1e-4), 0.01)
            bad_rows = rows[bad]
            shard_of = self.plan.route(spec.name, bad_rows)
            cuts = np.flatnonzero(np.diff(shard_of)) + 1
            items: list[Item] = []
            for lo_i, hi_i in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [bad.size])).tolist()):
                shard = self.plan.shards[spec.name][int(shard_of[lo_i])]
                sel = slice(lo_i, hi_i)
                items.append(Item(shard.region_name, base + bad[sel] * slot,
                                  (bad_rows[sel] - shard.row_start) * slot,
                                  np.full(hi_i - lo_i, slot, dtype=np.int64)))
            await self.read_items(b, st, items)
            ok[bad] = validate_slots(spec, slots[bad], bad_rows)
        return row_data(spec, slots)

    def release(self, b: Batch) -> None:
        st, b.staging = b.staging, None
        b.views = {}
        if st is None:
            return
        if self.staging is not None and b.error is None and not b.tainted:
            self.staging.release(st)
        else:  # reads may still be in flight: rdmaio frees the memory once they end
            st.mr.close()

    # ------------------------------------------------------------- closing

    def fail_pending(self) -> None:
        """Closing: the batch still collecting callers fails them with :class:`ClosedError`."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.error = ClosedError("client closed before the lookup was sent")
            pending.finished = True
            if not pending.future.done():
                pending.future.set_result(None)

    def close(self) -> None:
        """Free the cached staging buffers (the batch tasks have ended)."""
        if self.staging is not None:
            self.staging.close()
