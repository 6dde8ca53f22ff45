"""The ranker side: :class:`EmbeddingClient`.

Life of a lookup (``await client.lookup(table, ids)``)::

    validate ids (numpy, before any I/O)          InputError / LookupIdError / UnknownTableError
    uniq, inverse = unique(ids)                   duplicates fetched once
    in-flight check: rows of uniq already being fetched by a sent batch are
        borrowed from it (searchsorted against its sorted row array)
    the rest joins the *pending batch*            concurrent callers share it
    ... the coalescing window closes ...
    launch: per table np.unique over all callers' rows, split_lookup (runs of
        consecutive rows -> one read), one read_batch per server (shards of a
        server share its arena region), all into one registered staging buffer
    each caller: rows = staging_view[searchsorted(batch_rows, uniq)[inverse]]

Coalescing window
    The first caller that adds rows to an empty pending batch schedules its
    launch: with ``coalesce_window_us=0`` (default) via ``loop.call_soon``, so
    every lookup started in the same event-loop iteration (e.g. tasks of one
    ``asyncio.gather``) joins the batch; with ``coalesce_window_us=W`` via
    ``loop.call_later(W / 1e6)`` (``W`` at most :data:`MAX_WINDOW_US`).  A batch
    reaching ``max_batch_rows`` rows launches at once.  Nothing waits longer
    than the window.

In-flight dedup
    A launched batch keeps, per table, the sorted array of rows it fetches.  A
    new caller looks its unique rows up in every batch still in flight (one
    ``searchsorted`` per batch and table) and only adds the misses to the
    pending batch; it then waits for every batch it depends on and copies its
    rows out.  A batch's staging buffer is reference counted by its callers and
    returns to the client's pool when the last one has copied its rows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import rdmaio

from ._errors import ClosedError, ConfigError, FlexEMRError, InputError, MetadataError, TransportError
from ._jagged import JaggedBatch, pool_bags
from ._meta import HEADER, MAX_META_BYTES, META_REGION, ServerMeta, decode_meta
from ._metrics import ClientMetrics
from ._plan import ClusterConfig, ShardingPlan, validate_ids
from ._spec import TableSpec
from ._split import SplitLookup, split_lookup

__all__ = ["MAX_WINDOW_US", "EmbeddingClient"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]

#: Upper bound of ``coalesce_window_us``.
MAX_WINDOW_US = 10_000
_ALIGN = 64
_MIN_STAGING = 1 << 16
_EMPTY = np.zeros(0, dtype=np.int64)
#: Longest single read, and most bytes per read_batch request (rdmaio caps a request at 1 GiB).
_MAX_READ_BYTES = 64 << 20
_MAX_REQUEST_BYTES = 256 << 20


# ------------------------------------------------------------------- helpers


def _unique_inverse(arr: IntArray, num_rows: int) -> tuple[IntArray, IntArray]:
    """``np.unique(arr, return_inverse=True)``; a bitmap instead of a sort when ids are dense."""
    if arr.size * 16 >= num_rows:
        seen = np.zeros(num_rows, dtype=np.bool_)
        seen[arr] = True
        uniq = np.flatnonzero(seen)
        rank = np.empty(num_rows, dtype=np.int64)
        rank[uniq] = np.arange(uniq.size, dtype=np.int64)
        return uniq.astype(np.int64, copy=False), rank[arr]
    uniq, inv = np.unique(arr, return_inverse=True)
    return uniq.astype(np.int64, copy=False), inv.reshape(-1).astype(np.int64, copy=False)


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


def _caller_error(exc: BaseException) -> FlexEMRError:
    """A fresh exception for one caller of a failed batch (the batch's error is shared)."""
    if isinstance(exc, FlexEMRError):
        err: FlexEMRError = type(exc)(*exc.args)
    else:
        err = TransportError(f"embedding read failed: {exc}")
    err.__cause__ = exc
    return err


class _Staging:
    __slots__ = ("array", "mr", "size")

    def __init__(self, array: npt.NDArray[np.uint8], mr: rdmaio.MemoryRegion) -> None:
        self.array = array
        self.mr = mr
        self.size = int(array.size)


class _StagingPool:
    """Registered staging buffers in power-of-two size classes, reused between batches."""

    def __init__(self, engine: rdmaio.Engine, max_cached_bytes: int) -> None:
        self._engine = engine
        self._max = max_cached_bytes
        self._free: dict[int, list[_Staging]] = {}
        self._cached = 0
        self._closed = False

    def acquire(self, nbytes: int) -> _Staging:
        size = max(_MIN_STAGING, 1 << max(0, nbytes - 1).bit_length())
        free = self._free.get(size)
        if free:
            self._cached -= size
            return free.pop()
        arr = np.empty(size, dtype=np.uint8)
        return _Staging(arr, self._engine.register(arr, access=rdmaio.Access.NONE))

    def release(self, st: _Staging) -> None:
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


@dataclass(frozen=True)
class _Route:
    """How to read one shard region: endpoint, key used for merged reads and the shard's base in it."""

    server: str
    endpoint: rdmaio.Endpoint
    group: tuple[str, str]
    key: rdmaio.RemoteKey
    base: int
    own_key: rdmaio.RemoteKey


class _Batch:
    """One coalesced round of reads (see the module docstring)."""

    __slots__ = ("needs", "pending_rows", "rows", "views", "future", "refs", "staging", "finished", "error")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.needs: dict[str, list[IntArray]] = {}
        self.pending_rows = 0
        self.rows: dict[str, IntArray] = {}
        self.views: dict[str, npt.NDArray[Any]] = {}
        self.future = future
        self.refs = 0
        self.staging: _Staging | None = None
        self.finished = False
        self.error: BaseException | None = None


class _Job:
    __slots__ = ("table", "spec", "ids", "uniq", "inverse", "sources")

    def __init__(self, table: str, spec: TableSpec, ids: IntArray) -> None:
        self.table = table
        self.spec = spec
        self.ids = ids
        self.uniq: IntArray = _EMPTY
        self.inverse: IntArray = _EMPTY
        self.sources: list[_Batch] = []


# -------------------------------------------------------------------- client


class EmbeddingClient:
    """Connects to every server of a cluster and looks embedding rows up.

    >>> # async with EmbeddingClient(ClusterConfig.from_toml("cluster.toml")) as client:
    >>> #     rows = await client.lookup("user", np.array([3, 1, 3]))        # [3, dim]
    >>> #     many = await client.lookup_many({"user": [1, 2], "item": [9]})
    >>> #     per_table = await client.lookup_jagged(jagged_batch)

    Parameters
    ----------
    config:
        The cluster (plan + server addresses); see :class:`ClusterConfig`.
    transport:
        rdmaio transport for a new engine: ``"auto"`` (verbs when an RDMA
        device is up, else tcp), ``"tcp"`` or ``"verbs"``.
    engine:
        An existing :class:`rdmaio.Engine` to use instead (not closed by the client).
    engine_options:
        Extra :class:`rdmaio.Engine` keyword arguments (default ``workers=2``).
    coalesce_window_us:
        How long a batch collects callers: ``0`` = the current event-loop
        iteration, else microseconds (at most :data:`MAX_WINDOW_US`).
    max_batch_rows:
        A pending batch with this many rows is launched at once.
    max_reads_per_request:
        Reads per ``read_batch`` request; larger groups are split into
        concurrent requests (spread over the endpoint's queue pairs).
    staging_cache_bytes:
        Registered staging memory kept for reuse between batches.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        transport: str = "auto",
        engine: rdmaio.Engine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        coalesce_window_us: int = 0,
        max_batch_rows: int = 1 << 22,
        max_reads_per_request: int = 16384,
        staging_cache_bytes: int = 256 << 20,
        connect_timeout: float = 10.0,
    ) -> None:
        if not isinstance(config, ClusterConfig):
            raise ConfigError(f"expected a ClusterConfig, got {type(config).__name__}")
        if isinstance(coalesce_window_us, bool) or not isinstance(coalesce_window_us, int) or not (
                0 <= coalesce_window_us <= MAX_WINDOW_US):
            raise ConfigError(f"coalesce_window_us must be an int in [0, {MAX_WINDOW_US}], got {coalesce_window_us!r}")
        for name, val in (("max_batch_rows", max_batch_rows), ("max_reads_per_request", max_reads_per_request)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ConfigError(f"{name} must be a positive int, got {val!r}")
        if engine is not None and not isinstance(engine, rdmaio.Engine):
            raise ConfigError(f"engine must be an rdmaio.Engine, got {type(engine).__name__}")
        self.config = config
        self.plan: ShardingPlan = config.plan
        self.metrics = ClientMetrics()
        self.coalesce_window_us = coalesce_window_us
        self.max_batch_rows = max_batch_rows
        self.max_reads_per_request = max_reads_per_request
        self._staging_cache = staging_cache_bytes
        self._connect_timeout = connect_timeout
        self._engine = engine
        self._own_engine = engine is None
        self._engine_kwargs: dict[str, Any] = {"transport": transport, "workers": 2, **(engine_options or {})}
        self._endpoints: dict[str, rdmaio.Endpoint] = {}
        self._meta: dict[str, ServerMeta] = {}
        self._routes: dict[str, _Route] = {}
        self._pool: _StagingPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: _Batch | None = None
        self._timer: asyncio.Handle | None = None
        self._inflight: list[_Batch] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = False
        self._closed = False

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **kwargs: Any) -> EmbeddingClient:
        """A client for the cluster described by a TOML file (not yet connected)."""
        return cls(ClusterConfig.from_toml(path), **kwargs)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._connected else "not connected"
        return f"<EmbeddingClient servers={list(self.plan.servers)} {state}>"

    # ------------------------------------------------------------ connecting

    async def connect(self) -> EmbeddingClient:
        """Connect to every server, read each one's metadata and check it against the plan."""
        if self._closed:
            raise ClosedError("client is closed")
        if self._connected:
            return self
        self._loop = asyncio.get_running_loop()
        try:
            if self._engine is None:
                self._engine = rdmaio.Engine(**self._engine_kwargs)
            await self._engine.start()
            results = await asyncio.gather(*(self._connect_one(s) for s in self.plan.servers),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            self._pool = _StagingPool(self._engine, self._staging_cache)
        except BaseException:
            await self._teardown()
            self._closed = True
            raise
        self._connected = True
        log.info("client connected to %d servers (%s)", len(self._endpoints), self._engine.transport)
        return self

    async def _connect_one(self, server: str) -> None:
        engine = self._engine
        assert engine is not None
        addr = self.config.address(server)
        try:
            ep = await engine.connect(addr.host, addr.port, timeout=self._connect_timeout)
        except rdmaio.RdmaioError as exc:
            raise TransportError(f"cannot connect to server {server!r} at {addr}: {exc}") from exc
        self._endpoints[server] = ep
        try:
            key = await ep.remote_key(META_REGION)
            if not HEADER.size <= key.length <= HEADER.size + MAX_META_BYTES:
                raise MetadataError(f"server {server!r}: metadata region of {key.length} bytes")
            buf = np.zeros(key.length, dtype=np.uint8)
            with engine.register(buf, access=rdmaio.Access.NONE) as mr:
                await ep.read(mr, 0, key, 0, key.length)
        except rdmaio.RegionNotFoundError as exc:
            raise MetadataError(f"server {server!r} at {addr} is not a flexemr embedding server") from exc
        except rdmaio.RdmaioError as exc:
            raise TransportError(f"reading the metadata of server {server!r}: {exc}") from exc
        meta = decode_meta(buf)
        self._check_meta(server, meta, ep)
        self._meta[server] = meta

    def _check_meta(self, server: str, meta: ServerMeta, ep: rdmaio.Endpoint) -> None:
        if meta.server != server:
            raise MetadataError(f"the server at {self.config.address(server)} calls itself {meta.server!r}, "
                                f"the plan expects {server!r}")
        try:
            their_plan = ShardingPlan.from_dict(meta.plan)
        except FlexEMRError as exc:
            raise MetadataError(f"server {server!r} sent an invalid plan: {exc}") from exc
        if their_plan != self.plan:
            raise MetadataError(f"server {server!r} serves a different sharding plan than this client's")
        expected = {s.region_name: s for s in self.plan.regions_on(server)}
        got = {e.region: e for e in meta.shards}
        if set(got) != set(expected):
            raise MetadataError(f"server {server!r} holds regions {sorted(got)}, the plan says {sorted(expected)}")
        try:
            arena = rdmaio.RemoteKey.from_bytes(meta.arena_key) if meta.arena_key is not None else None
            for name, e in got.items():
                sh = expected[name]
                nbytes = sh.nbytes(self.plan.spec(sh.table))
                own = rdmaio.RemoteKey.from_bytes(e.key)
                if e.nbytes != nbytes or own.length < nbytes:
                    raise MetadataError(f"server {server!r}: region {name!r} has {own.length} bytes, needs {nbytes}")
                if e.arena_offset is not None:
                    if arena is None or e.arena_offset + nbytes > arena.length:
                        raise MetadataError(f"server {server!r}: region {name!r} lies outside the arena")
                    self._routes[name] = _Route(server, ep, (server, ""), arena, e.arena_offset, own)
                else:
                    self._routes[name] = _Route(server, ep, (server, name), own, 0, own)
        except rdmaio.UsageError as exc:
            raise MetadataError(f"server {server!r} sent a malformed remote key: {exc}") from exc

    # -------------------------------------------------------------- accessors

    @property
    def connected(self) -> bool:
        return self._connected and not self._closed

    @property
    def engine(self) -> rdmaio.Engine:
        """The rdmaio engine in use."""
        if self._engine is None:
            raise ClosedError("client is not connected")
        return self._engine

    def endpoint(self, server: str) -> rdmaio.Endpoint:
        """The rdmaio endpoint to ``server`` (for tools that issue their own reads)."""
        self._check_open()
        try:
            return self._endpoints[server]
        except KeyError:
            raise ConfigError(f"unknown server {server!r}; known {list(self.plan.servers)}") from None

    def shard_key(self, region_name: str) -> rdmaio.RemoteKey:
        """The remote key of a shard's own region (offsets relative to the shard)."""
        self._check_open()
        try:
            return self._routes[region_name].own_key
        except KeyError:
            raise ConfigError(f"unknown region {region_name!r}") from None

    def server_meta(self, server: str) -> ServerMeta:
        """The metadata ``server`` published."""
        self._check_open()
        return self._meta[server]

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise ClosedError("client is closed")
        if not self._connected or self._loop is None:
            raise ClosedError("client is not connected: use 'async with client' or 'await client.connect()'")
        return self._loop

    # ------------------------------------------------------------------ lookups

    async def lookup(self, table: str, ids: object) -> npt.NDArray[Any]:
        """Rows ``[len(ids), dim]`` of ``table`` (original order, duplicates repeated).

        ``ids``: 1-D integer array-like in ``[0, num_rows)``; anything else
        raises (before any network traffic) :class:`InputError`,
        :class:`LookupIdError` or :class:`UnknownTableError`.
        """
        return (await self._lookup([(table, ids)]))[0]

    async def lookup_many(self, requests: Mapping[str, object]) -> dict[str, npt.NDArray[Any]]:
        """``{table: rows}`` for ``{table: ids}``: all tables in the same batch(es)."""
        if not isinstance(requests, Mapping):
            raise InputError(f"lookup_many takes a mapping {{table: ids}}, got {type(requests).__name__}")
        items = list(requests.items())
        outs = await self._lookup(items)
        return {t: o for (t, _), o in zip(items, outs)}

    async def lookup_jagged(
        self, batch: JaggedBatch, *, pooling: Literal["sum", "mean"] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Rows of every key of a KeyedJaggedTensor-style batch.

        Returns ``{table: rows}`` with ``rows`` of shape ``[len(batch.ids(table)), dim]``
        (in ``values`` order); with ``pooling="sum"``/``"mean"`` each table's rows
        are pooled per sample into ``[batch_size, dim]`` (:func:`pool_bags`).
        """
        if not isinstance(batch, JaggedBatch):
            raise InputError(f"lookup_jagged takes a JaggedBatch, got {type(batch).__name__}")
        if pooling not in (None, "sum", "mean"):
            raise InputError(f"pooling must be None, 'sum' or 'mean', got {pooling!r}")
        rows = await self.lookup_many(batch.per_table())
        if pooling is None:
            return rows
        return {t: pool_bags(r, batch.bag_offsets(t), pooling) for t, r in rows.items()}

    async def _lookup(self, items: list[tuple[str, object]]) -> list[npt.NDArray[Any]]:
        t0 = time.perf_counter()
        jobs: list[_Job] = []
        for table, ids in items:  # validate everything before touching any state
            spec = self.plan.spec(table)
            jobs.append(_Job(table, spec, validate_ids(spec, ids)))
        self._check_open()
        m = self.metrics
        m.lookups += 1
        batches: dict[int, _Batch] = {}
        for job in jobs:
            if job.ids.size == 0:
                continue
            job.uniq, job.inverse = _unique_inverse(job.ids, job.spec.num_rows)
            job.sources = self._place(job.table, job.uniq)
            m.ids_requested += int(job.ids.size)
            m.unique_ids += int(job.uniq.size)
            for b in job.sources:
                batches[id(b)] = b
        for b in batches.values():
            b.refs += 1
        try:
            if self._pending is not None and self._pending.pending_rows >= self.max_batch_rows:
                self._launch()
            for b in batches.values():
                if not b.future.done():
                    await asyncio.shield(b.future)
                if b.error is not None:
                    raise _caller_error(b.error)
            outs = [self._gather(job) for job in jobs]
        except BaseException:
            m.errors += 1
            raise
        finally:
            for b in batches.values():
                b.refs -= 1
                if b.finished and b.refs == 0:
                    self._release(b)
        m.lookup_latency.observe(time.perf_counter() - t0)
        return outs

    def _place(self, table: str, uniq: IntArray) -> list[_Batch]:
        """Borrow rows already in flight; add the rest to the pending batch."""
        sources: list[_Batch] = []
        remaining = uniq
        for b in self._inflight:
            rows = b.rows.get(table)
            if rows is None:
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
        b = self._pending
        if b is None:
            loop = self._loop
            assert loop is not None
            b = self._pending = _Batch(loop.create_future())
            if self.coalesce_window_us == 0:
                self._timer = loop.call_soon(self._launch)
            else:
                self._timer = loop.call_later(self.coalesce_window_us / 1e6, self._launch)
        b.needs.setdefault(table, []).append(remaining)
        b.pending_rows += int(remaining.size)
        sources.append(b)
        return sources

    def _gather(self, job: _Job) -> npt.NDArray[Any]:
        """Copy a caller's rows out of the staging views of the batches it depends on."""
        spec = job.spec
        if job.ids.size == 0:
            return np.empty((0, spec.dim), dtype=spec.np_dtype)
        if len(job.sources) == 1:
            b = job.sources[0]
            rows = b.rows[job.table]
            idx = job.inverse if rows.size == job.uniq.size else np.searchsorted(rows, job.uniq)[job.inverse]
            return b.views[job.table][idx]
        out = np.empty((job.uniq.size, spec.dim), dtype=spec.np_dtype)
        for b in job.sources:
            rows = b.rows[job.table]
            pos = np.searchsorted(rows, job.uniq)
            np.minimum(pos, rows.size - 1, out=pos)
            hit = rows[pos] == job.uniq
            out[hit] = b.views[job.table][pos[hit]]
        return out[job.inverse]

    # ------------------------------------------------------------------ batches

    def _launch(self) -> None:
        """Close the pending batch: fix its row sets (in-flight table) and start its reads."""
        b = self._pending
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if b is None:
            return
        self._pending = None
        shared = 0
        for table, needs in b.needs.items():
            rows = needs[0] if len(needs) == 1 else np.unique(np.concatenate(needs))
            shared += sum(int(n.size) for n in needs) - int(rows.size)
            b.rows[table] = rows
        b.needs = {}
        self.metrics.rows_shared += shared
        self._inflight.append(b)
        assert self._loop is not None
        task = self._loop.create_task(self._run_batch(b))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, b: _Batch) -> None:
        t0 = time.perf_counter()
        m = self.metrics
        try:
            assert self._pool is not None
            splits: list[tuple[SplitLookup, int]] = []
            pos = 0
            for table, rows in b.rows.items():
                split = split_lookup(self.plan, table, rows, max_read_bytes=_MAX_READ_BYTES)
                pos = -(-pos // _ALIGN) * _ALIGN
                splits.append((split, pos))
                pos += split.staging_bytes
                m.rows_read += split.num_unique
            st = b.staging = self._pool.acquire(pos)
            groups: dict[tuple[str, str], tuple[_Route, list[IntArray], list[IntArray], list[IntArray]]] = {}
            for split, base in splits:
                for sub in split.subrequests:
                    route = self._routes[sub.region_name]
                    g = groups.get(route.group)
                    if g is None:
                        g = groups[route.group] = (route, [], [], [])
                    g[1].append(sub.local_offsets + base if base else sub.local_offsets)
                    g[2].append(sub.remote_offsets + route.base if route.base else sub.remote_offsets)
                    g[3].append(sub.lengths)
            coros = []
            step = self.max_reads_per_request
            for route, lo_l, ro_l, ln_l in groups.values():
                lo = lo_l[0] if len(lo_l) == 1 else np.concatenate(lo_l)
                ro = ro_l[0] if len(ro_l) == 1 else np.concatenate(ro_l)
                ln = ln_l[0] if len(ln_l) == 1 else np.concatenate(ln_l)
                m.reads += int(ln.size)
                m.bytes_read += int(ln.sum())
                for s, e in _chunks(ln, step, _MAX_REQUEST_BYTES):
                    coros.append(route.endpoint.read_batch(st.mr, lo[s:e], route.key, ro[s:e], ln[s:e]))
            m.subrequests += len(coros)
            m.batches += 1
            if len(coros) == 1:
                await coros[0]
            elif coros:
                results = await asyncio.gather(*coros, return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
            for (split, base), table in zip(splits, b.rows):
                b.views[table] = _unique_rows(split, st.array[base : base + split.staging_bytes])
            m.batch_latency.observe(time.perf_counter() - t0)
        except asyncio.CancelledError:
            b.error = ClosedError("client closed while the lookup was in flight")
            raise
        except rdmaio.RdmaioError as exc:
            b.error = TransportError(f"embedding read failed: {exc}")
            b.error.__cause__ = exc
            log.warning("batch failed: %s", exc)
        except BaseException as exc:
            b.error = exc
            log.exception("batch failed")
        finally:
            if b in self._inflight:
                self._inflight.remove(b)
            b.finished = True
            if not b.future.done():
                b.future.set_result(None)
            if b.refs == 0:
                self._release(b)

    def _release(self, b: _Batch) -> None:
        st, b.staging = b.staging, None
        b.views = {}
        if st is None:
            return
        if self._pool is not None and b.error is None:
            self._pool.release(st)
        else:  # reads may still be in flight: rdmaio frees the memory once they end
            st.mr.close()

    # ---------------------------------------------------------------- closing

    async def _teardown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.error = ClosedError("client closed before the lookup was sent")
            pending.finished = True
            if not pending.future.done():
                pending.future.set_result(None)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pool is not None:
            self._pool.close()
        if self._engine is not None:
            if self._own_engine:
                await self._engine.aclose()
            else:
                for ep in self._endpoints.values():
                    await ep.aclose()
        self._endpoints.clear()

    async def aclose(self) -> None:
        """Fail pending lookups with :class:`ClosedError`, close endpoints (and an owned engine). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._teardown()

    async def __aenter__(self) -> EmbeddingClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
