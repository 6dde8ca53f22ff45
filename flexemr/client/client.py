"""The ranker side: :class:`EmbeddingClient`.

Life of a lookup (``await client.lookup(table, ids)``)::

    validate ids (numpy, before any I/O)          InputError / LookupIdError / UnknownTableError
    uniq, inverse = unique(ids)                   duplicates fetched once
    in-flight check: rows of uniq already being fetched by a sent batch are
        borrowed from it (searchsorted against its sorted row array)
    the rest joins the *pending batch*            concurrent callers share it
    ... the coalescing window closes ...
    launch: per table np.unique over all callers' rows (when more than one),
        split_lookup(sorted_unique=True: no second validation or unique; runs of
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
    ``searchsorted`` per batch and table; not on versioned plans, where a sent
    read may predate an acknowledged update) and only adds the misses to the
    pending batch; it then waits for every batch it depends on and copies its
    rows out.  A batch's staging buffer is reference counted by its callers and
    returns to the client's pool when the last one has copied its rows.

Locality (``docs/locality.md``)
    * **cache** (``cache_bytes=...``): unique ids are first looked up in a
      ranker-side :class:`~flexemr.core.cache.RowCache`; only misses join the
      read path above, and the rows read are inserted when the batch lands
      (unless an :meth:`EmbeddingClient.invalidate` happened meanwhile).
      On versioned plans hits are checked against their shards' ``GEN``
      words, read by the same batch (cross-client coherence).
      ``adaptive=True`` sizes it with :class:`~flexemr.core.cache.AdaptiveCapacity`
      from the rows of recent batches (shrinks under load, grows when idle).
    * **pooled lookups** (:meth:`EmbeddingClient.lookup_pooled`): cached rows
      (and rows read raw) are pooled locally; the other rows of a bag go, per
      ``(server, bag)``, either to raw reads or to a server-side pooling RPC
      on the ``"flexemr/pool"`` channel, by the byte cost model of
      :func:`~flexemr.core.pooling.choose_pooling`; partials are merged with
      :func:`~flexemr.core.pooling.combine_partials`.
    * **remap** (``remap=RowRemap``): logical ids become physical ids before
      anything else; the cache is keyed by physical ids.
    * **prefetch** (:meth:`EmbeddingClient.prefetch`): lookups of the next
      ``depth`` batches run while the current one is consumed.

Reliability (``docs/reliability.md``)
    Reads of a batch go, per shard, to the first connected in-service replica;
    a server whose operation fails (EOF/reset at once, ``op_timeout`` when
    hung) is dropped from every route, its reads are re-issued on another
    replica, and a background task reconnects with jittered exponential
    backoff, re-validates the metadata and (versioned plans) resyncs before
    routing reads back.  Versioned tables are read as header+row slots and
    validated per batch (:mod:`flexemr.core.versioned`); :meth:`EmbeddingClient.update`
    writes rows with the protocol of :mod:`flexemr.client.replica`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core.errors import ClosedError, ConfigError, FlexEMRError, InputError, MetadataError, TransportError
from ..core.cache import AdaptiveCapacity, CachePolicy, RowCache
from ..core.errors import UnknownTableError
from ..core.jagged import JaggedBatch
from .pooled import PoolChannel
from ..core.metrics import LocalityMetrics, ReliabilityMetrics
from ..core.poolwire import POOL_CHANNEL, decode_response, encode_request
from ..core.meta import HEADER, MAX_META_BYTES, META_REGION, ServerMeta, decode_meta
from ..core.config import ClusterConfig
from ..core.plan import Shard, ShardingPlan, validate_ids
from ..core.pooling import (
    PartialPool,
    PoolMode,
    _segment_reduce,
    accumulation_dtype,
    choose_pooling,
    combine_partials,
    pool,
    server_partial_pool,
)
from .prefetch import Prefetcher, PrefetchStream
from ..core.remap import RowRemap
from .replica import Backoff, ShardWriter
from ..core.spec import TableSpec
from ..core.split import SplitLookup, split_lookup
from ..core.versioned import Ctl, ctl_offset, region_bytes, row_data, slot_bytes, validate_slots

__all__ = ["MAX_WINDOW_US", "EmbeddingClient", "ReliabilityMetrics"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
#: A shard replica's GEN word as read: (server, server incarnation, GEN).  GEN
#: restarts at 0 with the server and differs between replicas mid-commit, so
#: only the whole token identifies a state of the shard.
GenToken = tuple[str, int, int]

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
    incarnation: int = 0  #: the server's start identity (:class:`~flexemr.core.meta.ServerMeta`)


class _Peer:
    """Connection state of one server: endpoint (``None`` while down), metadata, reconnect task."""

    __slots__ = ("name", "ep", "meta", "incarnation", "task", "ready", "kick", "backoff")

    def __init__(self, name: str, backoff: Backoff) -> None:
        self.name = name
        self.ep: rdmaio.Endpoint | None = None
        self.meta: ServerMeta | None = None
        self.incarnation: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.kick = asyncio.Event()
        self.backoff = backoff


class _Batch:
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
        self.staging: _Staging | None = None
        self.finished = False
        self.error: BaseException | None = None
        self.gen_regions: set[str] = set()  # versioned shards whose GEN word this batch also reads
        self.gens: dict[str, GenToken] = {}  # ... and what it read
        #: versioned, replicated shards: the replicas this batch may take rows from (in service
        #: according to the control words it read; see _check_members)
        self.allowed: dict[str, frozenset[str]] = {}


class _GenCheck:
    """Cache hits of one table waiting for their shards' GEN words (versioned plans).

    ``snap`` holds the generation each shard's cached rows were filled under
    when the hits were taken; a hit is stale if the GEN read by ``batch``
    (sent after the hits were taken) differs.
    """

    __slots__ = ("batch", "ids", "shard_of", "regions", "snap")

    def __init__(self, batch: _Batch | None, ids: IntArray, shard_of: IntArray, regions: dict[int, str],
                 snap: dict[str, GenToken | None]) -> None:
        self.batch = batch
        self.ids = ids
        self.shard_of = shard_of
        self.regions = regions
        self.snap = snap


class _Job:
    __slots__ = ("table", "spec", "ids", "uniq", "inverse", "sources", "hit", "hit_rows", "gen")

    def __init__(self, table: str, spec: TableSpec, ids: IntArray) -> None:
        self.table = table
        self.spec = spec
        self.ids = ids
        self.uniq: IntArray = _EMPTY
        self.inverse: IntArray = _EMPTY
        self.sources: list[_Batch] = []
        self.hit: npt.NDArray[np.bool_] | None = None
        self.hit_rows: npt.NDArray[Any] | None = None
        self.gen: _GenCheck | None = None


class _Item(NamedTuple):
    """One group of reads of a batch: ``length[i]`` bytes at ``remote[i]`` (offset in the shard region)
    of ``region`` into the staging buffer at ``local[i]``; ``pin``: read from this replica only (never
    re-issued elsewhere: the control words of one replica), else from whichever replica serves."""

    region: str
    local: IntArray
    remote: IntArray
    length: IntArray
    pin: str | None = None


@dataclass
class _PooledPlan:
    """How one table of a pooled lookup is served (built by ``_plan_pooled``, vectorised)."""

    table: str
    spec: TableSpec
    mode: PoolMode
    offsets: IntArray
    weights: npt.NDArray[Any] | None
    uniq: IntArray                       # sorted unique physical ids
    inverse: IntArray                    # occurrence -> index into uniq
    bag: IntArray                        # occurrence -> bag
    hit: npt.NDArray[np.bool_]           # uniq rows served by the cache
    hit_rows: npt.NDArray[Any] | None
    raw: npt.NDArray[np.bool_]           # uniq rows to read raw (then pooled locally)
    local_occ: IntArray                  # occurrences pooled on the ranker (sorted)
    remote: list[tuple[str, IntArray, IntArray, IntArray, npt.NDArray[Any] | None]]
    #        (server, touched bags, rows per touched bag, ids grouped by bag, weights)


# -------------------------------------------------------------------- client


class EmbeddingClient:
    """Connects to every server of a cluster and looks embedding rows up.

    >>> # async with EmbeddingClient(ClusterConfig.from_toml("cluster.toml")) as client:
    >>> #     rows = await client.lookup("user", np.array([3, 1, 3]))        # [3, dim]
    >>> #     many = await client.lookup_many({"user": [1, 2], "item": [9]})
    >>> #     per_table = await client.lookup_jagged(jagged_batch)
    >>> #     pooled = await client.lookup_pooled(jagged_batch, mode="mean")   # {table: [B, dim]}
    >>> #     async for batch, pooled in client.prefetch(batches, depth=1, pooled="sum"): ...
    >>> #     client.invalidate("user", [3])      # after the servers' row 3 changed

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
    cache_bytes:
        Memory budget of the ranker-side row cache (``0``: no cache).  Slots
        are as wide as the widest table row.
    cache_policy:
        ``"lru"`` or ``"lfu"`` (:class:`~flexemr.core.cache.RowCache`).
    adaptive:
        Resize the cache with :class:`~flexemr.core.cache.AdaptiveCapacity`: the
        rows of the last ``cache_window`` read batches are reserved for
        staging (x2: one batch in flight plus one prefetched); after
        ``cache_idle_s`` seconds without a batch the window is forgotten and
        the cache may use the whole budget again.  Resizes happen when the
        target moves by at least 1/16 of the budget.
    cache_admit:
        Pooled lookups with a cache read a row raw (and cache it) when it
        occurs at least this often in the batch; rarer uncached rows are left
        to the pooling cost model.
    server_pooling:
        Let :meth:`lookup_pooled` ask servers to pool (per ``(server, bag)``
        by the cost model of :func:`~flexemr.core.pooling.choose_pooling`).
    remap:
        A :class:`~flexemr.core.remap.RowRemap` the servers' tables were stored
        with: ids are translated logical -> physical before splitting.
    pool_slots, pool_slot_size:
        Shape of each pooling channel (messages in flight, bytes per frame).
    op_timeout:
        Seconds after which an rdmaio operation on a hung server fails
        (``rdmaio.Engine(op_timeout=...)``; ignored with ``engine=``); the
        server is then treated as dead: its endpoint is dropped, reads fail
        over to a replica and a background task reconnects.  ``None``: no
        timeout (a SIGSTOPped server then blocks its lookups).
    reconnect_base, reconnect_cap:
        Reconnection backoff: ``min(cap, base * 2**attempt)`` seconds, jittered
        by a factor in ``[0.5, 1]``.
    torn_timeout:
        Versioned tables: how long a row may keep failing validation (a writer
        at work, or died mid-write) before the lookup fails.
    update_lock_timeout:
        Versioned tables: how long :meth:`update` waits for a shard lock.

    Reliability (``docs/reliability.md``): a lookup whose server breaks fails
    over to another replica of the shard or, with none left, raises
    :class:`TransportError` at once (connection reset/EOF) or after
    ``op_timeout`` (hung server).  :meth:`update` writes rows of versioned
    tables to every replica in service.
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
        cache_bytes: int = 0,
        cache_policy: CachePolicy = "lru",
        adaptive: bool = False,
        cache_window: int = 16,
        cache_idle_s: float = 1.0,
        cache_admit: int = 2,
        server_pooling: bool = True,
        remap: RowRemap | None = None,
        pool_slots: int = 16,
        pool_slot_size: int = 256 << 10,
        op_timeout: float | None = 2.0,
        reconnect_base: float = 0.05,
        reconnect_cap: float = 2.0,
        torn_timeout: float = 2.0,
        update_lock_timeout: float = 10.0,
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
        for name, val, lo in (("cache_bytes", cache_bytes, 0), ("cache_window", cache_window, 1),
                              ("cache_admit", cache_admit, 1), ("pool_slots", pool_slots, 1),
                              ("pool_slot_size", pool_slot_size, 4096)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {val!r}")
        if remap is not None and not isinstance(remap, RowRemap):
            raise ConfigError(f"remap must be a RowRemap, got {type(remap).__name__}")
        for name, fval in (("reconnect_base", reconnect_base), ("reconnect_cap", reconnect_cap),
                           ("torn_timeout", torn_timeout), ("update_lock_timeout", update_lock_timeout),
                           ("op_timeout", 1.0 if op_timeout is None else op_timeout)):
            if isinstance(fval, bool) or not isinstance(fval, (int, float)) or not fval > 0:
                raise ConfigError(f"{name} must be a positive number, got {fval!r}")
        self.config = config
        self.plan: ShardingPlan = config.plan
        self.metrics = LocalityMetrics()
        # -- remap: logical -> physical gather tables
        self.remap = remap
        self._l2p: dict[str, IntArray] = {}
        if remap is not None:
            for t in remap.tables:
                if t not in self.plan.tables:
                    raise ConfigError(f"remap table {t!r} is not in the plan")
                n = self.plan.spec(t).num_rows
                if remap.physical_to_logical(t).size != n:
                    raise ConfigError(f"remap of table {t!r} has {remap.physical_to_logical(t).size} rows, "
                                      f"the table {n}")
                self._l2p[t] = remap.to_physical(t, np.arange(n, dtype=np.int64))
        # -- cache
        self._cache: RowCache | None = None
        self._adaptive: AdaptiveCapacity | None = None
        self._cache_seen = (0, 0, 0)
        self.cache_admit = cache_admit
        self.cache_idle_s = float(cache_idle_s)
        if cache_bytes:
            row_bytes = max(s.dim * s.np_dtype.itemsize for s in self.plan.tables.values())
            self._cache = RowCache(memory_budget_bytes=cache_bytes, row_bytes=row_bytes, policy=cache_policy)
            for spec in self.plan.tables.values():
                self._cache.register(spec.name, spec.dim, spec.np_dtype)
            if adaptive:
                self._adaptive = AdaptiveCapacity(cache_bytes, row_bytes, cache_window, inflight=2)
            self.metrics.cache_capacity = self._cache.capacity
        elif adaptive:
            raise ConfigError("adaptive=True needs cache_bytes > 0")
        self._epoch = 0
        self._known_gen: dict[str, GenToken] = {}  # versioned shard region -> what its cached rows were read under
        self._last_batch_end = time.monotonic()
        # -- server pooling
        self.server_pooling = bool(server_pooling)
        self._pool_slots = pool_slots
        self._pool_slot_size = pool_slot_size
        self._pool_channels: dict[str, PoolChannel] = {}
        self._pool_refused: set[str] = set()
        self._pool_pause: dict[str, tuple[float, Backoff]] = {}  # server -> (no pooling before, backoff)
        self._pool_opening: asyncio.Task[None] | None = None
        self._server_index = {name: i for i, name in enumerate(self.plan.servers)}
        self._pool_routes: dict[str, tuple[IntArray, IntArray]] = {}
        for table, shards in self.plan.shards.items():
            spec = self.plan.spec(table)
            if self.plan.versioned or any(sh.backups for sh in shards):
                continue  # replicated / updatable: raw reads only (failover, torn-row checks)
            if all(sh.col_start == 0 and sh.col_end == spec.dim for sh in shards):
                self._pool_routes[table] = (np.array([sh.row_start for sh in shards], dtype=np.int64),
                                            np.array([self._server_index[sh.server] for sh in shards],
                                                     dtype=np.int64))
        self.coalesce_window_us = coalesce_window_us
        self.max_batch_rows = max_batch_rows
        self.max_reads_per_request = max_reads_per_request
        self._staging_cache = staging_cache_bytes
        self._connect_timeout = connect_timeout
        self._engine = engine
        self._own_engine = engine is None
        self._engine_kwargs: dict[str, Any] = {"transport": transport, "workers": 2, "op_timeout": op_timeout,
                                               **(engine_options or {})}
        if config.secret is not None:  # the cluster file's secret authenticates every rdmaio connection
            self._engine_kwargs.setdefault("secret", config.secret)
        # -- servers, replicas, failover
        self.reliability = ReliabilityMetrics()
        self.reconnect_base = float(reconnect_base)
        self.reconnect_cap = float(reconnect_cap)
        self.torn_timeout = float(torn_timeout)
        self._peers: dict[str, _Peer] = {}
        self._meta: dict[str, ServerMeta] = {}
        self._routes: dict[tuple[str, str], _Route] = {}        # (server, region) -> route
        self._serving: dict[str, list[str]] = {}                 # region -> replicas reads may use
        self._region_shard: dict[str, Shard] = {sh.region_name: sh for shards in self.plan.shards.values()
                                                for sh in shards}
        self._vslot: dict[str, tuple[int, int]] = {}             # versioned table -> (row bytes, slot bytes)
        if self.plan.versioned:
            for t, spec in self.plan.tables.items():
                self._vslot[t] = (spec.row_bytes, slot_bytes(spec))
        self._writer = ShardWriter(self, self.plan, token=secrets.randbits(63) | 1,
                                   lock_timeout=float(update_lock_timeout))
        self._pool: _StagingPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: _Batch | None = None
        self._timer: asyncio.Handle | None = None
        self._inflight: list[_Batch] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._resyncing: set[str] = set()  # regions a background resync is bringing back (_stale_replica)
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
        """Connect to every server, read each one's metadata and check it against the plan.

        With a versioned plan the replicas of every shard are then checked
        (and brought) in sync (:meth:`ShardWriter.sync`) before reads use them.

        A server that cannot be reached (refused, timed out) is tolerated when
        every shard it holds has another replica that is reachable: the client
        starts without it and reconnects in the background, like after a
        failure (``healthy()`` is false meanwhile).  Otherwise, and for any
        other error (metadata, authentication), :meth:`connect` raises.
        """
        if self._closed:
            raise ClosedError("client is closed")
        if self._connected:
            return self
        self._loop = asyncio.get_running_loop()
        try:
            if self._engine is None:
                self._engine = rdmaio.Engine(**self._engine_kwargs)
            await self._engine.start()
            for s in self.plan.servers:
                self._peers[s] = _Peer(s, Backoff(self.reconnect_base, self.reconnect_cap))
            results = await asyncio.gather(*(self._open_peer(s, self._connect_timeout) for s in self.plan.servers),
                                           return_exceptions=True)
            down = self._tolerable_failures(dict(zip(self.plan.servers, results)))
            self._pool = _StagingPool(self._engine, self._staging_cache)
            await asyncio.gather(*(self._refresh_region(r) for r in self._region_shard))
            if self._cache is not None and self._vslot:  # the GEN every shard's first cached rows are read under
                b = self._pending_batch()
                b.gen_regions.update(self._region_shard)
                self._launch()
                await b.future
                if b.error is not None:
                    raise b.error
        except BaseException:
            self._closed = True  # first: failure callbacks firing during the teardown start nothing
            await self._teardown()
            raise
        self._connected = True
        log.info("client connected to %d servers (%s)", len(self._peers) - len(down), self._engine.transport)
        for server, exc in down.items():
            log.warning("server %s is down at start (%s); its replicas serve, reconnecting in the background",
                        server, exc)
            peer = self._peers[server]
            peer.task = self._loop.create_task(self._reconnect(peer))
        return self

    def _tolerable_failures(self, results: Mapping[str, BaseException | None]) -> dict[str, BaseException]:
        """The servers ``connect`` may start without (unreachable, every shard replicated elsewhere); else raise."""
        down: dict[str, BaseException] = {}
        for server, r in results.items():
            if r is None:
                continue
            cause = r.__cause__
            unreachable = isinstance(r, TransportError) and (
                cause is None or isinstance(cause, (rdmaio.EndpointBrokenError, rdmaio.TimeoutError, OSError))
            ) and not isinstance(cause, rdmaio.AuthenticationError)
            if not unreachable:
                raise r
            down[server] = r
        for region, shard in self._region_shard.items():
            if all(s in down for s in shard.replicas):
                raise down[shard.replicas[0]]
        return down

    async def _open_peer(self, server: str, timeout: float) -> None:
        """Connect to ``server``, read and check its metadata, install its endpoint and routes."""
        engine = self._engine
        assert engine is not None
        addr = self.config.address(server)
        try:
            ep = await engine.connect(addr.host, addr.port, timeout=timeout)
        except rdmaio.AuthenticationError as exc:
            hint = ("the cluster file has no [cluster] secret: add the servers' secret there "
                    "(flexemr gen cluster --secret/--random-secret writes one)" if self.config.secret is None
                    else "the cluster file's [cluster] secret differs from the server's")
            raise TransportError(f"cannot connect to server {server!r} at {addr}: {exc}; {hint}") from exc
        except rdmaio.RdmaioError as exc:
            raise TransportError(f"cannot connect to server {server!r} at {addr}: {exc}") from exc
        try:
            try:
                meta = await asyncio.wait_for(self._read_meta(server, ep), timeout)
            except asyncio.TimeoutError:
                raise TransportError(f"server {server!r} at {addr}: no metadata within {timeout} s") from None
            routes = self._check_meta(server, meta, ep)
        except BaseException:
            ep.abort()
            raise
        peer = self._peers[server]
        if peer.incarnation is not None and peer.incarnation != meta.incarnation:
            self.reliability.restarts_seen += 1
            log.info("server %s restarted (incarnation %#x -> %#x)", server, peer.incarnation, meta.incarnation)
        peer.ep, peer.meta, peer.incarnation = ep, meta, meta.incarnation
        self._meta[server] = meta
        self._routes.update(routes)
        # notice a server that dies while this client is not reading from it
        # (e.g. the backup replica): fail it over and reconnect now, not when
        # the next read finds out the hard way
        ep.add_broken_callback(lambda exc: self.peer_failed(server, exc, ep))
        peer.ready.set()

    async def _read_meta(self, server: str, ep: rdmaio.Endpoint) -> ServerMeta:
        engine = self._engine
        assert engine is not None
        addr = self.config.address(server)
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
        return decode_meta(buf.data)

    def _check_meta(self, server: str, meta: ServerMeta, ep: rdmaio.Endpoint) -> dict[tuple[str, str], _Route]:
        """Validate a server's metadata against the plan (identity, shards, sizes); its routes."""
        if meta.server != server:
            raise MetadataError(f"the server at {self.config.address(server)} calls itself {meta.server!r}, "
                                f"the plan expects {server!r}")
        try:
            their_plan = ShardingPlan.from_dict(meta.plan)
        except FlexEMRError as exc:
            raise MetadataError(f"server {server!r} sent an invalid plan: {exc}") from exc
        diff = self.plan.difference(their_plan)
        if diff is not None:
            raise MetadataError(f"server {server!r} serves a different sharding plan than this client's "
                                f"(here vs there: {diff}); start every server and ranker from the same "
                                f"cluster file")
        if meta.layout != ("versioned" if self.plan.versioned else "plain"):
            raise MetadataError(f"server {server!r} stores rows in the {meta.layout!r} layout, the plan says "
                                f"versioned={self.plan.versioned}")
        expected = {s.region_name: s for s in self.plan.regions_on(server)}
        got = {e.region: e for e in meta.shards}
        if set(got) != set(expected):
            raise MetadataError(f"server {server!r} holds regions {sorted(got)}, the plan says {sorted(expected)}")
        routes: dict[tuple[str, str], _Route] = {}
        try:
            arena = rdmaio.RemoteKey.from_bytes(meta.arena_key) if meta.arena_key is not None else None
            for name, e in got.items():
                sh = expected[name]
                spec = self.plan.spec(sh.table)
                if (e.table, e.index, e.rows, e.cols) != (sh.table, sh.index, (sh.row_start, sh.row_end),
                                                          (sh.col_start, sh.col_end)):
                    raise MetadataError(f"server {server!r}: region {name!r} is described as {e.table!r} "
                                        f"#{e.index} rows {e.rows} cols {e.cols}, the plan disagrees")
                nbytes = region_bytes(spec, sh.num_rows) if self.plan.versioned else sh.nbytes(spec)
                own = rdmaio.RemoteKey.from_bytes(e.key)
                if e.nbytes != nbytes or own.length < nbytes:
                    raise MetadataError(f"server {server!r}: region {name!r} has {own.length} bytes, needs {nbytes}")
                if e.arena_offset is not None:
                    if arena is None or e.arena_offset + nbytes > arena.length:
                        raise MetadataError(f"server {server!r}: region {name!r} lies outside the arena")
                    routes[(server, name)] = _Route(server, ep, (server, ""), arena, e.arena_offset, own,
                                                    meta.incarnation)
                else:
                    routes[(server, name)] = _Route(server, ep, (server, name), own, 0, own, meta.incarnation)
        except rdmaio.UsageError as exc:
            raise MetadataError(f"server {server!r} sent a malformed remote key: {exc}") from exc
        return routes

    # ------------------------------------------------------------ replicas

    async def _refresh_region(self, region: str) -> None:
        """Recompute which replicas of ``region`` reads may use (versioned: after bringing them in sync)."""
        shard = self._region_shard[region]
        eps = {s: self._peers[s].ep for s in shard.replicas}
        if self.plan.versioned:
            serving = await self._writer.sync(shard)
        else:
            serving = [s for s in shard.replicas if eps[s] is not None]
        # a replica that failed (and maybe came back, not yet resynced) while the
        # sync ran is not vouched for by it: its own reconnect will add it
        self._serving[region] = [s for s in serving if self._peers[s].ep is eps[s] and self._live(s)]

    def replica_endpoint(self, server: str) -> rdmaio.Endpoint | None:
        """The live endpoint to ``server`` (``None`` while it is down)."""
        peer = self._peers.get(server)
        return None if peer is None else peer.ep

    def replica_key(self, server: str, region: str) -> rdmaio.RemoteKey | None:
        """The key of ``region``'s own region on ``server`` (``None`` while it is down)."""
        route = self._routes.get((server, region))
        peer = self._peers.get(server)
        if route is None or peer is None or peer.ep is not route.endpoint:
            return None
        return route.own_key

    async def wait_connected(self, server: str, timeout: float) -> bool:
        """Hurry the reconnection of ``server`` and wait up to ``timeout`` s for it; True if connected."""
        peer = self._peers[server]
        if peer.ep is not None:
            return True
        peer.kick.set()
        try:
            await asyncio.wait_for(peer.ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return peer.ep is not None

    def peer_failed(self, server: str, exc: BaseException, ep: rdmaio.Endpoint | None = None) -> None:
        """An operation on ``server`` failed: drop its endpoint now, reroute, reconnect in the background.

        ``ep``: the endpoint the failed operation used; nothing happens if the
        server was already reconnected through another one.
        """
        peer = self._peers.get(server)
        if peer is None or self._closed or peer.ep is None or (ep is not None and ep is not peer.ep):
            return
        self.reliability.peer_failures += 1
        log.warning("server %s failed (%s: %s); failing over, reconnecting in the background", server,
                    type(exc).__name__, exc)
        old, peer.ep = peer.ep, None
        peer.ready.clear()
        old.abort()  # in-flight operations fail now (a hung server: no late writes into our buffers)
        for key in [k for k in self._routes if k[0] == server]:
            del self._routes[key]
        for region, servers in self._serving.items():
            if server in servers:
                self._serving[region] = [s for s in servers if s != server]
        self._pool_channels.pop(server, None)
        if (peer.task is None or peer.task.done()) and self._loop is not None:
            peer.task = self._loop.create_task(self._reconnect(peer))

    async def _reconnect(self, peer: _Peer) -> None:
        """Background: reconnect with backoff, validate the metadata, resync, route reads back."""
        timeout = min(self._connect_timeout, max(2.0, self.reconnect_cap))
        while not self._closed:
            engine = self._engine
            if engine is not None and engine.failure is not None:
                log.error("not reconnecting to %s: this client's engine failed (%s)", peer.name, engine.failure)
                return
            delay = peer.backoff.next()
            peer.kick.clear()
            try:
                await asyncio.wait_for(peer.kick.wait(), delay)
            except asyncio.TimeoutError:
                pass
            if self._closed:
                return
            if peer.ep is None:
                try:
                    await self._open_peer(peer.name, timeout)
                except (FlexEMRError, rdmaio.RdmaioError, OSError) as exc:
                    log.debug("reconnecting to %s: %s", peer.name, exc)
                    continue
                self.reliability.reconnects += 1
                log.info("server %s reconnected", peer.name)
            try:
                regions = [sh.region_name for sh in self.plan.regions_on(peer.name)]
                await asyncio.gather(*(self._refresh_region(r) for r in regions))
            except (FlexEMRError, rdmaio.RdmaioError) as exc:
                log.warning("resync after reconnecting to %s failed (%s); retrying", peer.name, exc)
                continue
            self._sync_writer_stats()
            peer.backoff.reset()
            if peer.ep is not None:
                return

    def _sync_writer_stats(self) -> None:
        w, r = self._writer, self.reliability
        r.resync_copies, r.fenced, r.lock_steals = w.copies, w.fenced, w.steals

    def replica_status(self) -> dict[str, list[str]]:
        """Region -> replicas lookups currently read from (in-sync, connected)."""
        return {r: [s for s in servers if self._live(s)] for r, servers in self._serving.items()}

    def _live(self, server: str) -> bool:
        ep = self._peers[server].ep
        return ep is not None and ep.broken is None

    def healthy(self) -> bool:
        """True when every server is connected and every replica of every shard serves reads."""
        if not all(self._live(s) for s in self._peers):
            return False
        status = self.replica_status()
        return all(len(status[r]) == len(sh.replicas) for r, sh in self._region_shard.items())

    async def wait_healthy(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until :meth:`healthy`; returns whether it is."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                return False
            for p in self._peers.values():
                if p.ep is None:
                    p.kick.set()
            await asyncio.sleep(0.02)
        return True

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
        """The rdmaio endpoint to ``server`` (for tools that issue their own reads).

        :class:`TransportError` while the server is down (reconnecting).
        """
        self._check_open()
        peer = self._peers.get(server)
        if peer is None:
            raise ConfigError(f"unknown server {server!r}; known {list(self.plan.servers)}")
        if peer.ep is None:
            raise TransportError(f"server {server!r} is down (reconnecting)")
        return peer.ep

    def shard_key(self, region_name: str, server: str | None = None) -> rdmaio.RemoteKey:
        """The remote key of a shard's own region (offsets relative to the shard).

        ``server``: which replica (default: the shard's primary ``Shard.server``).
        """
        self._check_open()
        shard = self._region_shard.get(region_name)
        if shard is None:
            raise ConfigError(f"unknown region {region_name!r}")
        key = self.replica_key(server or shard.server, region_name)
        if key is None:
            raise TransportError(f"region {region_name!r} on {server or shard.server!r} is down (reconnecting)")
        return key

    def server_meta(self, server: str) -> ServerMeta:
        """The metadata ``server`` published."""
        self._check_open()
        return self._meta[server]

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise ClosedError("client is closed")
        if not self._connected or self._loop is None:
            raise ClosedError("client is not connected: use 'async with client' or 'await client.connect()'")
        failure = self._engine.failure if self._engine is not None else None
        if failure is not None:
            raise TransportError(f"this client's rdmaio engine failed ({failure}): close the client, create another")
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
        self, batch: JaggedBatch, *, pooling: PoolMode | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Rows of every key of a KeyedJaggedTensor-style batch.

        Returns ``{table: rows}`` with ``rows`` of shape ``[len(batch.ids(table)), dim]``
        (in ``values`` order); with ``pooling="sum"``/``"mean"``/``"max"`` this is
        ``lookup_pooled(batch, mode=pooling)``: ``[batch_size, dim]`` per table.
        """
        if not isinstance(batch, JaggedBatch):
            raise InputError(f"lookup_jagged takes a JaggedBatch, got {type(batch).__name__}")
        if pooling not in (None, "sum", "mean", "max"):
            raise InputError(f"pooling must be None, 'sum', 'mean' or 'max', got {pooling!r}")
        if pooling is not None:
            return await self.lookup_pooled(batch, mode=pooling)
        return await self.lookup_many(batch.per_table())

    async def lookup_bags(
        self,
        table: str,
        ids: object,
        *,
        offsets: object | None = None,
        lengths: object | None = None,
        mode: PoolMode = "sum",
        per_sample_weights: object | None = None,
    ) -> npt.NDArray[Any]:
        """EmbeddingBag of one table: ``ids`` cut into bags by ``offsets`` (``[B+1]``) or ``lengths`` (``[B]``).

        ``lookup_pooled`` for a one-table batch; returns ``[B, dim]``.

        >>> # await client.lookup_bags("user", [1, 2, 3], lengths=[2, 1], mode="mean")
        """
        jb = JaggedBatch([table], ids, lengths=lengths, offsets=offsets)
        out = await self.lookup_pooled(jb, mode=mode, per_sample_weights=per_sample_weights)
        return out[table]

    async def _lookup(self, items: list[tuple[str, object]]) -> list[npt.NDArray[Any]]:
        t0 = time.perf_counter()
        jobs: list[_Job] = []
        for table, ids in items:  # validate everything before touching any state
            spec = self.plan.spec(table)
            jobs.append(_Job(table, spec, self._physical(table, validate_ids(spec, ids))))
        self._check_open()
        m = self.metrics
        m.lookups += 1
        live = [job for job in jobs if job.ids.size]
        for job in live:
            job.uniq, job.inverse = _unique_inverse(job.ids, job.spec.num_rows)
            m.ids_requested += int(job.ids.size)
        try:
            rows = await self._fetch_unique([(j.table, j.spec, j.uniq) for j in live], probe=True)
        except BaseException:
            m.errors += 1
            raise
        got = {id(j): r for j, r in zip(live, rows)}
        outs = []
        for job in jobs:
            r = got.get(id(job))
            outs.append(np.empty((0, job.spec.dim), dtype=job.spec.np_dtype) if r is None else r[job.inverse])
        m.lookup_latency.observe(time.perf_counter() - t0)
        return outs

    def _physical(self, table: str, ids: IntArray) -> IntArray:
        """Logical -> physical ids (identity for tables without a remap)."""
        l2p = self._l2p.get(table)
        if l2p is None:
            return ids
        out: IntArray = l2p[ids]
        return out

    async def _fetch_unique(
        self, reqs: list[tuple[str, TableSpec, IntArray]], *, probe: bool
    ) -> list[npt.NDArray[Any]]:
        """Rows ``[len(uniq), dim]`` for sorted unique physical ids, per request.

        ``probe``: look the ids up in the cache first (else the caller did).
        Misses go through in-flight dedup and the pending (coalescing) batch;
        the rows read are inserted into the cache unless an invalidation
        happened since their batch was sent.
        """
        m = self.metrics
        cache = self._cache
        jobs: list[_Job] = []
        batches: dict[int, _Batch] = {}
        for table, spec, uniq in reqs:
            job = _Job(table, spec, uniq)
            miss = uniq
            if probe and cache is not None and uniq.size:
                hit, hit_rows = cache.lookup(table, uniq)
                nh = int(np.count_nonzero(hit))
                m.cache_hits += nh
                m.cache_misses += int(uniq.size) - nh
                if nh:
                    job.hit, job.hit_rows = hit, hit_rows
                    miss = uniq[~hit]
                    job.gen = self._gen_check(table, uniq[hit])
                    if job.gen is not None and job.gen.batch is not None:
                        batches[id(job.gen.batch)] = job.gen.batch
            m.unique_ids += int(uniq.size)
            job.uniq = miss
            job.inverse = np.arange(miss.size, dtype=np.int64)
            job.ids = miss
            if miss.size:
                job.sources = self._place(table, miss)
                for b in job.sources:
                    batches[id(b)] = b
            jobs.append(job)
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
            for job in jobs:
                if job.gen is not None:
                    assert job.hit_rows is not None
                    await self._refresh_stale(job.table, job.spec, job.gen, job.hit_rows)
            outs: list[npt.NDArray[Any]] = []
            for job in jobs:
                miss_rows = self._gather(job)
                if cache is not None and job.uniq.size and all(b.epoch == self._epoch for b in job.sources):
                    cache.insert(job.table, job.uniq, miss_rows)
                if job.hit is None:
                    outs.append(miss_rows)
                    continue
                rows = np.empty((job.hit.size, job.spec.dim), dtype=job.spec.np_dtype)
                rows[job.hit] = job.hit_rows
                rows[~job.hit] = miss_rows
                outs.append(rows)
            self._sync_cache_metrics()
            return outs
        finally:
            for b in batches.values():
                b.refs -= 1
                if b.finished and b.refs == 0:
                    self._release(b)

    # ----------------------------------------------------------------- cache

    @property
    def cache(self) -> RowCache | None:
        """The ranker-side row cache (``None`` without ``cache_bytes``); keys are physical ids."""
        return self._cache

    def invalidate(self, table: str, ids: object) -> int:
        """Coherence after the servers' rows changed: drop cached copies of ``ids`` (logical).

        Also stops later lookups from borrowing rows of batches that were
        already in flight, and keeps reads sent before this call from filling
        the cache.  Returns the number of distinct ids that were cached.

        >>> # server rows 3 and 8 of "user" were rewritten:
        >>> # client.invalidate("user", [3, 8])
        """
        spec = self.plan.spec(table)
        return self._invalidate_physical(table, self._physical(table, validate_ids(spec, ids)))

    def _invalidate_physical(self, table: str, phys: IntArray) -> int:
        self._epoch += 1
        n = 0
        if self._cache is not None:
            n = self._cache.invalidate(table, phys)
            self._sync_cache_metrics()
        return n

    # Cross-client coherence of versioned tables.  Every update (of any client)
    # commits a higher GEN on the shards it wrote before it is acknowledged.
    # ``_known_gen[region]`` is the GenToken (replica, its incarnation, GEN) the
    # cached rows of that shard were read under: when a batch reads another
    # token -- an update committed, reads moved to another replica, or the
    # server restarted and counts from 0 again -- the shard's cached rows are
    # dropped and the epoch is bumped (reads in flight then fill nothing).  A
    # lookup's cache hits are used only once a GEN read sent *after* the hits
    # were taken matches the snapshot; otherwise they are read again.

    def _gen_check(self, table: str, ids: IntArray, *, place: bool = True) -> _GenCheck | None:
        """Snapshot what the hit rows ``ids`` were cached under (versioned tables), and with ``place``
        have the pending batch read their shards' GEN now (else :meth:`_refresh_stale` does)."""
        if table not in self._vslot or ids.size == 0:
            return None
        shard_of = self.plan.route(table, ids)
        shards = self.plan.shards[table]
        regions = {i: shards[i].region_name for i in np.unique(shard_of).tolist()}
        check = _GenCheck(None, ids, shard_of, regions, {r: self._known_gen.get(r) for r in regions.values()})
        if place:
            self._place_gen_check(check)
        return check

    def _place_gen_check(self, check: _GenCheck) -> _Batch:
        b = check.batch = self._pending_batch()
        b.gen_regions.update(check.regions.values())
        return b

    async def _refresh_stale(self, table: str, spec: TableSpec, check: _GenCheck,
                             hit_rows: npt.NDArray[Any]) -> None:
        """Replace, in ``hit_rows``, the hits whose shard's GEN moved since they were cached by fresh reads."""
        b = check.batch or self._place_gen_check(check)
        if not b.future.done():
            await asyncio.shield(b.future)
        if b.error is not None:
            raise _caller_error(b.error)
        moved = [i for i, r in check.regions.items() if b.gens.get(r) != check.snap[r]]
        if not moved:
            return
        stale = np.isin(check.shard_of, moved)
        n = int(np.count_nonzero(stale))
        m = self.metrics
        m.cache_stale_hits += n
        m.cache_hits -= n
        m.cache_misses += n
        m.unique_ids -= n  # the re-read below counts them again
        (rows,) = await self._fetch_unique([(table, spec, check.ids[stale])], probe=False)
        hit_rows[stale] = rows

    def _observe_gens(self, gens: Mapping[str, GenToken]) -> None:
        """A batch read these GEN words: forget the cached rows of every shard whose GEN moved."""
        moved = [r for r, g in gens.items() if self._known_gen.get(r) != g]
        if not moved:
            return
        self._epoch += 1
        self._known_gen.update((r, gens[r]) for r in moved)
        cache = self._cache
        if cache is None:
            return
        by_table: dict[str, list[Shard]] = {}
        for r in moved:
            sh = self._region_shard[r]
            by_table.setdefault(sh.table, []).append(sh)
        for table, shards in by_table.items():
            ids = cache.entries(table)[0]
            drop = np.zeros(ids.size, dtype=bool)
            for sh in shards:
                drop |= (ids >= sh.row_start) & (ids < sh.row_end)
            if drop.any():
                cache.invalidate(table, ids[drop])
        self._sync_cache_metrics()

    # ---------------------------------------------------------------- updates

    async def update(self, table: str, ids: object, rows: object) -> None:
        """Write ``rows`` (``[len(ids), dim]``, the table dtype) as rows ``ids`` of ``table`` on every replica.

        Versioned plans only (``ShardingPlan(..., versioned=True)`` or
        ``[sharding] versioned = true``).  Once this returns, every later
        lookup -- of this client or any other, on any replica serving reads --
        returns the new rows; concurrent lookups see each row entirely old or
        entirely new.  Duplicate ids: the last occurrence wins.  This client's
        cache entries of the rows are dropped at once; other clients' caches
        find the shard's ``GEN`` moved on their next hit and re-read
        (``docs/reliability.md``, "Cache coherence").  Protocol:
        :mod:`flexemr.client.replica`.

        Raises, before any network traffic, :class:`UnknownTableError`,
        :class:`ConfigError` (plan not versioned), :class:`LookupIdError` or
        :class:`InputError` (ids not 1-D integers; ``rows`` not an ndarray of
        the table dtype and shape ``[len(ids), dim]``); :class:`TransportError`
        if a touched shard has no reachable replica in service (the update may
        then be partly applied: each row is either old or new).
        """
        spec = self.plan.spec(table)
        if not self.plan.versioned:
            raise ConfigError(f"table {table!r} is not updatable: the plan is not versioned "
                              f"(ShardingPlan.row_wise(..., versioned=True) or [sharding] versioned = true)")
        arr = validate_ids(spec, ids)
        if not isinstance(rows, np.ndarray):
            raise InputError(f"table {table!r}: rows must be a numpy array, got {type(rows).__name__}")
        if rows.dtype != spec.np_dtype:
            raise InputError(f"table {table!r}: rows must have dtype {spec.np_dtype.name}, got {rows.dtype}")
        if rows.shape != (arr.size, spec.dim):
            raise InputError(f"table {table!r}: rows must have shape ({arr.size}, {spec.dim}), got {rows.shape}")
        self._check_open()
        if arr.size == 0:
            return
        phys = self._physical(table, arr)
        uniq, last_rev = np.unique(phys[::-1], return_index=True)
        values = rows[phys.size - 1 - last_rev]          # last occurrence of each id, in uniq order
        shard_of = self.plan.route(table, uniq)
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        bounds = list(zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [uniq.size])).tolist()))
        shards = self.plan.shards[table]
        try:
            results = await asyncio.gather(
                *(self._writer.update(shards[int(shard_of[lo])], uniq[lo:hi], values[lo:hi]) for lo, hi in bounds),
                return_exceptions=True)
        finally:
            self._invalidate_physical(table, uniq)
            self._sync_writer_stats()
        for r in results:
            if isinstance(r, BaseException):
                self.reliability.failed_updates += 1
                if isinstance(r, (FlexEMRError, asyncio.CancelledError)):
                    raise r
                raise TransportError(f"update of table {table!r} failed: {r}") from r
        self.reliability.updates += 1
        self.reliability.rows_updated += int(uniq.size)

    def _sync_cache_metrics(self) -> None:
        cache = self._cache
        if cache is None:
            return
        st = cache.stats
        ins, ev, inv = self._cache_seen
        m = self.metrics
        m.cache_inserts += st.inserts - ins
        m.cache_evictions += st.evictions - ev
        m.cache_invalidations += st.invalidations - inv
        m.cache_capacity = cache.capacity
        self._cache_seen = (st.inserts, st.evictions, st.invalidations)

    def _adapt(self, rows: int) -> None:
        """Adaptive capacity: record a read batch of ``rows`` rows, resize when the target moved enough."""
        ac, cache = self._adaptive, self._cache
        if ac is None or cache is None:
            return
        target = ac.observe(rows)
        self._resize_cache(target)

    def _resize_cache(self, target: int) -> None:
        ac, cache = self._adaptive, self._cache
        assert ac is not None and cache is not None
        step = max(1, ac.max_capacity // 16)
        if target != cache.capacity and (abs(target - cache.capacity) >= step or target == ac.max_capacity):
            cache.resize(target)
            self.metrics.cache_resizes += 1
            self._sync_cache_metrics()

    def _idle_check(self) -> None:
        if self._adaptive is not None and time.monotonic() - self._last_batch_end > self.cache_idle_s:
            self._adaptive.reset()
            self._resize_cache(self._adaptive.capacity)

    # --------------------------------------------------------- pooled lookups

    async def lookup_pooled(
        self,
        batch: JaggedBatch,
        mode: PoolMode = "sum",
        per_sample_weights: object | None = None,
        *,
        server_pooling: bool | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """EmbeddingBag lookup: ``{table: [batch_size, dim]}`` pooled per sample.

        ``mode``: ``"sum"``, ``"mean"`` (sum / number of rows) or ``"max"``;
        empty bags give zeros; results equal
        ``pool(model[t][ids], batch.bag_offsets(t), mode, weights)`` (float
        tolerance: partial sums are added in another order).
        ``per_sample_weights``: one weight per id, aligned with
        ``batch.values`` (TorchRec's ``weights``), or ``{table: weights}``;
        ``sum``/``mean`` only.  ``server_pooling`` overrides the client's
        setting for this call.  The output dtype is
        :func:`~flexemr.core.pooling.accumulation_dtype` of the table.

        >>> # jb = JaggedBatch.from_lists({"user": [[1, 2], [], [7]]})
        >>> # (await client.lookup_pooled(jb, mode="mean"))["user"].shape   -> (3, dim)
        """
        t0 = time.perf_counter()
        if not isinstance(batch, JaggedBatch):
            raise InputError(f"lookup_pooled takes a JaggedBatch, got {type(batch).__name__}")
        if mode not in ("sum", "mean", "max"):
            raise InputError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
        weights = self._split_weights(batch, per_sample_weights, mode)
        specs = [self.plan.spec(t) for t in batch.keys]  # validate everything before any network traffic
        ids_all = [self._physical(t, validate_ids(spec, batch.ids(t))) for t, spec in zip(batch.keys, specs)]
        self._check_open()
        use_pool = self.server_pooling if server_pooling is None else bool(server_pooling)
        if use_pool:
            await self._open_pool_channels()
        m = self.metrics
        m.lookups += 1
        m.pooled_lookups += 1
        plans = [self._plan_pooled(t, spec, ids, batch.bag_offsets(t), weights.get(t), mode, use_pool)
                 for t, spec, ids in zip(batch.keys, specs, ids_all)]
        raw = [p for p in plans if p.raw.any()]
        rpcs = [(p, entry) for p in plans for entry in p.remote]
        # the GEN reads join the raw reads' batch: placed when their coroutine starts, after the raw one's
        checks = [(p, self._gen_check(p.table, p.uniq[p.hit], place=False)) for p in plans if p.hit_rows is not None]
        try:
            coros: list[Any] = [self._fetch_unique([(p.table, p.spec, p.uniq[p.raw]) for p in raw], probe=False)]
            coros += [self._pool_rpc(p, entry) for p, entry in rpcs]
            coros += [self._refresh_stale(p.table, p.spec, c, p.hit_rows) for p, c in checks
                      if c is not None and p.hit_rows is not None]
            results: list[Any] = await asyncio.gather(*coros, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            raw_rows = dict(zip((id(p) for p in raw), results[0]))
            remote: dict[int, list[PartialPool]] = {}
            for (p, _), part in zip(rpcs, results[1 : 1 + len(rpcs)]):
                remote.setdefault(id(p), []).append(part)
            out = {p.table: self._combine(p, raw_rows.get(id(p)), remote.get(id(p), [])) for p in plans}
        except BaseException:
            m.errors += 1
            raise
        m.lookup_latency.observe(time.perf_counter() - t0)
        return out

    def _split_weights(self, batch: JaggedBatch, w: object | None, mode: str) -> dict[str, npt.NDArray[Any]]:
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

    def _plan_pooled(
        self,
        table: str,
        spec: TableSpec,
        ids: IntArray,
        offsets: IntArray,
        weights: npt.NDArray[Any] | None,
        mode: PoolMode,
        use_pool: bool,
    ) -> _PooledPlan:
        """Split one table's occurrences: cached / raw (pooled on the ranker) / pooled per server (vectorised)."""
        m = self.metrics
        nb = int(offsets.size - 1)
        acc = accumulation_dtype(spec.np_dtype)
        w = None if weights is None else weights.astype(acc, copy=False)
        bag = np.repeat(np.arange(nb, dtype=np.int64), np.diff(offsets))
        m.ids_requested += int(ids.size)
        if ids.size == 0:
            z = np.zeros(0, dtype=np.int64)
            nob = np.zeros(0, dtype=bool)
            return _PooledPlan(table, spec, mode, offsets, w, z, z, bag, nob, None, nob, z, [])
        uniq, inv = _unique_inverse(ids, spec.num_rows)
        hit = np.zeros(uniq.size, dtype=bool)
        hit_rows = None
        local_u = hit
        cache = self._cache
        if cache is not None:
            hit, hit_rows = cache.lookup(table, uniq)
            nh = int(np.count_nonzero(hit))
            m.cache_hits += nh
            m.cache_misses += int(uniq.size) - nh
            m.unique_ids += nh  # the misses are counted when (and if) they are read
            local_u = hit | (np.bincount(inv, minlength=uniq.size) >= self.cache_admit)
        remote_occ = ~local_u[inv]
        pooled_occ = np.zeros(ids.size, dtype=bool)
        remote: list[tuple[str, IntArray, IntArray, IntArray, npt.NDArray[Any] | None]] = []
        route = self._pool_routes.get(table)
        r_idx = np.flatnonzero(remote_occ)
        if use_pool and route is not None and r_idx.size:
            starts, band_server = route
            srv = band_server[np.searchsorted(starts, ids[r_idx], side="right") - 1]
            nsrv = len(self.plan.servers)
            rbag = bag[r_idx]
            counts = np.bincount(srv * nb + rbag, minlength=nsrv * nb).reshape(nsrv, nb)
            for name in self._pool_refused | (set(self.plan.servers) - set(self._pool_channels)) | self._paused():
                counts[self._server_index[name]] = 0  # no channel to that server: raw reads only
            mask = choose_pooling(counts, spec.dim, spec.np_dtype.itemsize)
            sel = mask[srv, rbag]
            pooled_occ[r_idx[sel]] = True
            for s_i in np.flatnonzero(mask.any(axis=1)).tolist():
                occ = r_idx[sel & (srv == s_i)]               # ascending = grouped by bag
                touched = np.flatnonzero(mask[s_i])
                remote.append((self.plan.servers[s_i], touched, counts[s_i, touched], ids[occ],
                               None if w is None else w[occ]))
            m.pooled_subrequests += len(remote)
            m.pooled_bags += int(np.count_nonzero(mask))
            m.pooled_rows += int(np.count_nonzero(sel))
        raw = local_u & ~hit
        raw[inv[remote_occ & ~pooled_occ]] = True
        if raw.any():
            band_first = self.plan.route(table, uniq[raw])
            shards = self.plan.shards[table]
            m.raw_subrequests += len({shards[i].server for i in np.unique(band_first).tolist()})
        local_occ = np.flatnonzero(~pooled_occ)
        m.local_pooled_rows += int(local_occ.size)
        return _PooledPlan(table, spec, mode, offsets, w, uniq, inv, bag, hit, hit_rows, raw, local_occ, remote)

    async def _pool_rpc(
        self, p: _PooledPlan, entry: tuple[str, IntArray, IntArray, IntArray, npt.NDArray[Any] | None]
    ) -> PartialPool:
        """One ``(server, table)`` pooling request; returns the server's partial as a dense ``[B, dim]`` PartialPool."""
        server, touched, lengths, ids, w = entry
        spec = p.spec
        acc = accumulation_dtype(spec.np_dtype)
        ch = self._pool_channels.get(server)
        try:
            if ch is None or ch.broken:
                raise TransportError(f"no pooling channel to server {server!r}")
            parts = encode_request(p.table, ids, lengths, w, p.mode, num_rows=spec.num_rows, weight_dtype=acc)
            values = decode_response(await ch.call(parts))
            if values.shape != (touched.size, spec.dim):
                raise TransportError(f"server {server!r} answered {values.shape} for {touched.size} bags")
            pause = self._pool_pause.get(server)
            if pause is not None and time.monotonic() >= pause[0]:  # not a request sent before the pause
                del self._pool_pause[server]
        except (TransportError, ClosedError) as exc:
            if self._closed:
                raise
            # The pooling channel failed, which need not mean the rows are unreadable:
            # read them raw (failover applies) and pool them here, as the server would have.
            now = time.monotonic()
            until, backoff = self._pool_pause.get(server) or (0.0, Backoff(0.5, 30.0))
            if until <= now:  # one warning per pause, not one per lookup
                delay = backoff.next()
                self._pool_pause[server] = (now + delay, backoff)
                log.warning("server %s: pooling request failed (%s); its rows are pooled on the ranker "
                            "for the next %.1f s", server, exc, delay)
            self.metrics.pool_fallbacks += 1
            uniq, inv = _unique_inverse(ids, spec.num_rows)
            (rows,) = await self._fetch_unique([(p.table, spec, uniq)], probe=False)
            bags = np.repeat(np.arange(touched.size, dtype=np.int64), lengths)
            part = server_partial_pool(rows[inv], bags, int(touched.size), w, with_max=p.mode == "max", dtype=acc)
            pooled = part.max if p.mode == "max" else part.sum
            assert pooled is not None
            values = pooled
        nb = int(p.offsets.size - 1)
        count = np.zeros(nb, dtype=np.int64)
        count[touched] = lengths
        psum = np.zeros((nb, spec.dim), dtype=acc)
        if p.mode == "max":
            pmax = np.full((nb, spec.dim), -np.inf, dtype=acc)
            pmax[touched] = values
            return PartialPool(psum, count, pmax)
        psum[touched] = values
        return PartialPool(psum, count, None)

    def _combine(self, p: _PooledPlan, raw_rows: npt.NDArray[Any] | None,
                 remote: list[PartialPool]) -> npt.NDArray[Any]:
        """Pool the ranker's rows of every bag and merge them with the servers' partials."""
        spec = p.spec
        nb = int(p.offsets.size - 1)
        acc = accumulation_dtype(spec.np_dtype)
        if p.uniq.size == 0:
            return np.zeros((nb, spec.dim), dtype=acc)
        urows = np.empty((p.uniq.size, spec.dim), dtype=spec.np_dtype)
        if p.hit_rows is not None and p.hit_rows.size:
            urows[p.hit] = p.hit_rows
        if raw_rows is not None:
            urows[p.raw] = raw_rows
        if not remote:  # every row is here: plain pooling
            return pool(urows[p.inverse], p.offsets, p.mode, p.weights, dtype=acc)
        occ = p.local_occ
        count = np.bincount(p.bag[occ], minlength=nb).astype(np.int64)
        offs = np.concatenate((np.zeros(1, np.int64), np.cumsum(count)))
        vals = urows[p.inverse[occ]].astype(acc, copy=False)
        if p.mode == "max":
            local = PartialPool(np.zeros((nb, spec.dim), dtype=acc), count,
                                _segment_reduce(np.maximum, vals, offs, -np.inf, acc))
        else:
            if p.weights is not None:
                vals = vals * p.weights[occ][:, None]
            local = PartialPool(_segment_reduce(np.add, vals, offs, 0.0, acc), count, None)
        return combine_partials([local, *remote], p.mode)

    def _paused(self) -> set[str]:
        """Servers whose pooling requests failed recently: raw reads only until their pause ends."""
        if not self._pool_pause:
            return set()
        now = time.monotonic()
        return {s for s, (until, _) in self._pool_pause.items() if until > now}

    async def _open_pool_channels(self) -> None:
        """Open the pooling channel to every server not tried yet (once; concurrent callers share the attempt)."""
        paused = self._paused()
        todo = [s for s in self.plan.servers
                if s not in self._pool_refused and s not in paused and self._peers[s].ep is not None
                and (s not in self._pool_channels or self._pool_channels[s].broken)]
        if not todo:
            return
        if self._pool_opening is None or self._pool_opening.done():
            assert self._loop is not None
            self._pool_opening = self._loop.create_task(self._open_channels(todo))
        opening = self._pool_opening
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if opening.cancelled() and self._closed and (task is None or not task.cancelling()):
                raise ClosedError("client closed while the lookup was in flight") from None  # aclose(), not us
            raise

    async def _open_channels(self, servers: list[str]) -> None:
        async def one(server: str) -> None:
            old = self._pool_channels.pop(server, None)
            if old is not None:
                await old.aclose()
            ep = self._peers[server].ep
            if ep is None:
                return
            try:
                ch = await ep.channel(POOL_CHANNEL, slots=self._pool_slots, slot_size=self._pool_slot_size)
            except (rdmaio.EndpointBrokenError, rdmaio.ClosedError, rdmaio.TimeoutError) as exc:
                self.peer_failed(server, exc, ep)
                return
            except rdmaio.RdmaioError as exc:  # e.g. transport without channels, or an old server
                log.warning("server %s: no pooling channel (%s); raw reads only", server, exc)
                self._pool_refused.add(server)
                return
            self._pool_channels[server] = PoolChannel(ch, self.metrics)

        await asyncio.gather(*(one(s) for s in servers))

    # ---------------------------------------------------------------- prefetch

    def prefetch(
        self,
        batches: Any,
        *,
        depth: int = 1,
        pooled: PoolMode | None = None,
    ) -> PrefetchStream[Any, dict[str, npt.NDArray[Any]]]:
        """Lookahead pipeline: ``async for batch, result in client.prefetch(batches, depth=1)``.

        ``batches`` (sync or async iterable) yields :class:`JaggedBatch` es, or
        ``(JaggedBatch, per_sample_weights)`` pairs with ``pooled``.  The
        lookups of the next ``depth`` batches run while the consumer holds the
        current result (FBGEMM-style prefetch on :class:`~flexemr.client.prefetch.Prefetcher`);
        results come in order.  ``pooled=None`` gives :meth:`lookup_jagged`
        rows, else :meth:`lookup_pooled` with that mode.  With a cache, the
        rows the lookahead reads land in the cache.  Use ``async with`` (or
        exhaust the stream) so outstanding lookups are cancelled on exit.
        """
        if pooled not in (None, "sum", "mean", "max"):
            raise InputError(f"pooled must be None, 'sum', 'mean' or 'max', got {pooled!r}")

        async def fetch(item: Any) -> dict[str, npt.NDArray[Any]]:
            jb, w = item if isinstance(item, tuple) else (item, None)
            self.metrics.prefetched_batches += 1
            if pooled is None:
                if w is not None:
                    raise InputError("per_sample_weights need pooled=...")
                return await self.lookup_jagged(jb)
            return await self.lookup_pooled(jb, mode=pooled, per_sample_weights=w)

        return Prefetcher(fetch, depth).stream(batches)

    def _place(self, table: str, uniq: IntArray) -> list[_Batch]:
        """Borrow rows already in flight; add the rest to the pending batch."""
        sources: list[_Batch] = []
        remaining = uniq
        # A sent batch may have read a row before an update that was acknowledged
        # before this lookup began: versioned plans never borrow from one.
        for b in () if self.plan.versioned else self._inflight:
            rows = b.rows.get(table)
            if rows is None or b.epoch != self._epoch:  # sent before an invalidate(): maybe stale
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
        b = self._pending_batch()
        b.needs.setdefault(table, []).append(remaining)
        b.pending_rows += int(remaining.size)
        sources.append(b)
        return sources

    def _pending_batch(self) -> _Batch:
        """The batch that the current coalescing window fills (opened, and its launch scheduled, on demand)."""
        b = self._pending
        if b is None:
            loop = self._loop
            assert loop is not None
            b = self._pending = _Batch(loop.create_future())
            if self.coalesce_window_us == 0:
                self._timer = loop.call_soon(self._launch)
            else:
                self._timer = loop.call_later(self.coalesce_window_us / 1e6, self._launch)
        return b

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
        self._idle_check()
        b.epoch = self._epoch
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
            splits: list[tuple[SplitLookup, int, int]] = []
            pos = 0
            for table, rows in b.rows.items():
                split = split_lookup(self.plan, table, rows, max_read_bytes=_MAX_READ_BYTES, sorted_unique=True)
                vs = self._vslot.get(table)
                nbytes = split.staging_bytes if vs is None else int(rows.size) * vs[1]
                pos = -(-pos // _ALIGN) * _ALIGN
                splits.append((split, pos, nbytes))
                pos += nbytes
                m.rows_read += split.num_unique
            # versioned plans: the control words (LOCK, GEN, MEMBERS) of every connected replica of the
            # replicated shards read here, and of the shards whose GEN the cache needs, ride in this batch
            row_regions = {sub.region_name for split, _, _ in splits for sub in split.subrequests}
            ctl_regions = sorted(b.gen_regions | {r for r in row_regions if len(self._region_shard[r].replicas) > 1}
                                 ) if self._vslot else []
            ctl_pins = [(r, s) for r in ctl_regions for s in self._region_shard[r].replicas
                        if self._live(s) and (s, r) in self._routes]
            ctl_base = pos = -(-pos // 8) * 8
            pos += 24 * len(ctl_pins)
            st = b.staging = self._pool.acquire(pos)
            items: list[_Item] = []
            for split, base, _ in splits:
                vs = self._vslot.get(split.table)
                for sub in split.subrequests:
                    lo, ro, ln = sub.local_offsets, sub.remote_offsets, sub.lengths
                    if vs is not None:  # versioned: the same runs of rows, strided by the slot size
                        rb, slot = vs
                        lo, ro, ln = lo // rb * slot, ro // rb * slot, ln // rb * slot
                    items.append(_Item(sub.region_name, lo + base if base else lo, ro, ln))
            for i, (region, server) in enumerate(ctl_pins):
                sh = self._region_shard[region]
                items.append(_Item(region, np.array([ctl_base + 24 * i], dtype=np.int64),
                                   np.array([ctl_offset(self.plan.spec(sh.table), sh.num_rows)], dtype=np.int64),
                                   np.array([24], dtype=np.int64), server))
            m.batches += 1
            served, unread = await self._read_items(b, st, items)
            if ctl_regions:
                words = st.array[ctl_base : ctl_base + 24 * len(ctl_pins)].view("<u8").reshape(-1, 3)
                ctls: dict[str, dict[str, Ctl]] = {r: {} for r in ctl_regions}
                for (region, server), w in zip(ctl_pins, words.tolist()):
                    if (region, server) not in unread:
                        ctls[region][server] = Ctl(*w)
                served = await self._check_members(b, st, items, served, ctls, row_regions)
                b.gens = {r: (served[r].server, served[r].incarnation, ctls[r][served[r].server].gen)
                          for r in b.gen_regions}
            for (split, base, nbytes), table in zip(splits, b.rows):
                if table in self._vslot:
                    b.views[table] = await self._validated_rows(b, st, split.spec, b.rows[table], base)
                else:
                    b.views[table] = _unique_rows(split, st.array[base : base + split.staging_bytes])
            if b.gens:
                self._observe_gens(b.gens)
            m.batch_latency.observe(time.perf_counter() - t0)
            self._last_batch_end = time.monotonic()
            if b.rows:  # a batch of GEN reads only says nothing about the load
                self._adapt(sum(int(r.size) for r in b.rows.values()))
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
            if b in self._inflight:
                self._inflight.remove(b)
            b.finished = True
            if not b.future.done():
                b.future.set_result(None)
            if b.refs == 0:
                self._release(b)

    def _pick(self, region: str, allowed: frozenset[str] | None = None) -> _Route:
        """The route of the first connected, in-service replica of ``region`` (the primary when it is up).

        Plans place primaries evenly, so preferring them spreads the reads.  ``allowed``
        (versioned plans, see :meth:`_check_members`): only these replicas, which the batch's
        control words show in service -- also one this client has not resynced itself yet.
        """
        live = [s for s in self._serving.get(region, ()) if (s, region) in self._routes
                and (allowed is None or s in allowed)]
        if not live and allowed is not None:
            live = [s for s in self._region_shard[region].replicas if s in allowed and (s, region) in self._routes]
        if not live:
            shard = self._region_shard[region]
            raise TransportError(f"no replica of shard {region} is available (replicas {list(shard.replicas)}; "
                                 f"down or resyncing)")
        return self._routes[(live[0], region)]

    async def _check_members(self, b: _Batch, st: _Staging, items: list[_Item], served: dict[str, _Route],
                             ctls: dict[str, dict[str, Ctl]], row_regions: set[str]) -> dict[str, _Route]:
        """Versioned plans: keep only rows read from replicas in service; returns the route of every region.

        A writer that cannot reach a replica (its operation failed or timed out, its
        reconnection lags) fences it: the commit on the replicas it reached drops it from
        ``MEMBERS`` and raises ``GEN``, while other clients may still reach the fenced
        replica, which misses that update.  So a batch reads, after its lookups began, the
        control words of every replica it can reach; the one with the highest ``GEN`` holds
        every update acknowledged before (invariant (c) of :mod:`flexemr.client.replica`), and
        only the replicas in its ``MEMBERS`` hold them too.  Rows read from any other
        replica are read again from one of those; the client stops reading from the
        stale one and resyncs it in the background (:meth:`_refresh_region`).
        """
        for region, got in ctls.items():
            if not got:
                raise TransportError(f"shard {region}: no replica answered (replicas "
                                     f"{list(self._region_shard[region].replicas)})")
            auth = max(got.values(), key=lambda c: c.gen)
            replicas = self._region_shard[region].replicas
            b.allowed[region] = frozenset(s for i, s in enumerate(replicas) if auth.members >> i & 1 and s in got)
        stale = [r for r in row_regions if r in ctls and served[r].server not in b.allowed[r]]
        if stale:
            for r in stale:
                self._stale_replica(r, served[r].server)
            more, _ = await self._read_items(b, st, [it for it in items if it.pin is None and it.region in stale])
            served.update(more)
        for region in ctls:
            if region not in row_regions:  # GEN only (cache hits): the token of the replica reads would use
                served[region] = self._pick(region, b.allowed[region])
        return served

    def _stale_replica(self, region: str, server: str) -> None:
        """``server`` holds ``region`` but is out of service (fenced): stop reading it there, resync it."""
        self.reliability.stale_replica_reads += 1
        servers = self._serving.get(region, [])
        if server in servers:
            log.info("shard %s on %s is out of service (fenced by another client); resyncing it", region, server)
            self._serving[region] = [s for s in servers if s != server]
        if region in self._resyncing or self._closed or self._loop is None:
            return
        self._resyncing.add(region)

        async def resync() -> None:
            try:
                await self._refresh_region(region)
                self._sync_writer_stats()
            except (FlexEMRError, rdmaio.RdmaioError) as exc:
                log.warning("resync of shard %s failed (%s); it stays out of service", region, exc)
            finally:
                self._resyncing.discard(region)

        task = self._loop.create_task(resync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_items(self, b: _Batch, st: _Staging,
                          items: list[_Item]) -> tuple[dict[str, _Route], set[tuple[str, str]]]:
        """Issue the reads of ``items``; a failed server's share is re-read elsewhere.

        Each round groups the reads by the server (and key) now serving their
        region; a group that fails marks its server down (:meth:`peer_failed`,
        which drops it from every route) and is re-issued in the next round.
        Rounds end when everything landed or a region has no replica left
        (:class:`TransportError`).  Items pinned to a replica are never re-issued
        elsewhere.  Returns the route that served each region (unpinned items)
        and the ``(region, server)`` of every pinned item that could not be read.
        """
        m = self.metrics
        step = self.max_reads_per_request
        served: dict[str, _Route] = {}
        unread: set[tuple[str, str]] = set()
        pending = items
        while pending:
            groups: dict[tuple[str, str], tuple[_Route, list[_Item], list[IntArray]]] = {}
            for item in pending:
                if item.pin is None:
                    route = self._pick(item.region, b.allowed.get(item.region))
                else:
                    pinned = self._routes.get((item.pin, item.region)) if self._live(item.pin) else None
                    if pinned is None:
                        unread.add((item.region, item.pin))
                        continue
                    route = pinned
                g = groups.get(route.group)
                if g is None:
                    g = groups[route.group] = (route, [], [])
                g[1].append(item)
                g[2].append(item.remote + self._routes[(route.server, item.region)].base)  # offsets in route.key

            async def run_group(route: _Route, its: list[_Item], ro_parts: list[IntArray]) -> None:
                lo = np.concatenate([i.local for i in its]) if len(its) > 1 else its[0].local
                ro = np.concatenate(ro_parts) if len(ro_parts) > 1 else ro_parts[0]
                ln = np.concatenate([i.length for i in its]) if len(its) > 1 else its[0].length
                m.reads += int(ln.size)
                m.bytes_read += int(ln.sum())
                chunks = _chunks(ln, step, _MAX_REQUEST_BYTES)
                m.subrequests += len(chunks)
                coros = [route.endpoint.read_batch(st.mr, lo[s:e], route.key, ro[s:e], ln[s:e]) for s, e in chunks]
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
                    served.update((item.region, route) for item in its if item.pin is None)
                    continue
                if not isinstance(r, rdmaio.RdmaioError) or isinstance(r, rdmaio.UsageError):
                    raise r
                b.tainted = True
                self.peer_failed(route.server, r, route.endpoint)
                self.reliability.failover_reads += 1
                pending.extend(it for it in its if it.pin is None)
                unread.update((it.region, it.pin) for it in its if it.pin is not None)
        return served, unread

    async def _validated_rows(self, b: _Batch, st: _Staging, spec: TableSpec, rows: IntArray,
                              base: int) -> npt.NDArray[Any]:
        """Versioned table: check every slot read (vectorised), re-read the torn ones; the ``[n, dim]`` view."""
        slot = self._vslot[spec.name][1]
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
            items: list[_Item] = []
            for lo_i, hi_i in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [bad.size])).tolist()):
                shard = self.plan.shards[spec.name][int(shard_of[lo_i])]
                sel = slice(lo_i, hi_i)
                items.append(_Item(shard.region_name, base + bad[sel] * slot,
                                   (bad_rows[sel] - shard.row_start) * slot,
                                   np.full(hi_i - lo_i, slot, dtype=np.int64)))
            await self._read_items(b, st, items)
            ok[bad] = validate_slots(spec, slots[bad], bad_rows)
        return row_data(spec, slots)

    def _release(self, b: _Batch) -> None:
        st, b.staging = b.staging, None
        b.views = {}
        if st is None:
            return
        if self._pool is not None and b.error is None and not b.tainted:
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
        reconnects = [p.task for p in self._peers.values() if p.task is not None]
        for t in [*self._tasks, *reconnects]:
            t.cancel()
        if self._tasks or reconnects:
            await asyncio.gather(*self._tasks, *reconnects, return_exceptions=True)
        if self._pool_opening is not None and not self._pool_opening.done():
            self._pool_opening.cancel()
            await asyncio.gather(self._pool_opening, return_exceptions=True)
        for ch in self._pool_channels.values():
            await ch.aclose()
        self._pool_channels.clear()
        if self._pool is not None:
            self._pool.close()
        if self._engine is not None:
            if self._own_engine:
                await self._engine.aclose()
            else:
                for p in self._peers.values():
                    if p.ep is not None:
                        await p.ep.aclose()
        for p in self._peers.values():
            p.ep = None

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
