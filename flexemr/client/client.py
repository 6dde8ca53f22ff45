"""The ranker side: :class:`EmbeddingClient`, a facade that validates its input (once, before any I/O),
translates logical ids to physical ones (``remap``) and hands the work to its components::

peers (connections, routes, failover), batcher (coalescing, reads), coherence, cache, pooled
(pooling RPC), prefetch, replica (updates, resync) -- see ``flexemr/client/__init__.py`` --
configured by one :class:`~flexemr.client.options.ClientOptions`; access.py adds the replica
plumbing and the options as attributes; leak.py catches a client never closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core.cache import RowCache
from ..core.config import ClusterConfig
from ..core.errors import ClosedError, ConfigError, InputError, TransportError
from ..core.jagged import JaggedBatch
from ..core.meta import ServerMeta
from ..core.metrics import LocalityMetrics, ReliabilityMetrics
from ..core.plan import ShardingPlan, validate_ids
from ..core.pooling import PoolMode
from .access import ClientAccess
from .batcher import Batcher, Request
from .cache import ClientCache
from .coherence import Coherence
from .lanes import Lanes
from .leak import creation_site, leaked
from .options import ClientOptions
from .peers import Peers
from .pooled import Pooler, split_weights
from .prefetch import PrefetchStream, lookahead
from .replica import check_update, last_wins
from .swapin import SwapIn

__all__ = ["EmbeddingClient"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]


class EmbeddingClient(ClientAccess):
    """Connects to every server of a cluster and looks embedding rows up.

    >>> # async with EmbeddingClient(ClusterConfig.from_toml("cluster.toml"), cache_bytes=64 << 20) as client:
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
    options:
        A :class:`ClientOptions` (default: all defaults).
    overrides:
        :class:`ClientOptions` fields by keyword (``EmbeddingClient(config,
        cache_bytes=64 << 20)``), applied on top of ``options``.

    Notes
    -----
    A lookup whose server breaks fails over to another replica of the shard
    or, with none left, raises :class:`TransportError` (``docs/reliability.md``).
    Close a client (``async with``, :meth:`aclose`): one garbage collected
    unclosed warns with :class:`ResourceWarning` (:mod:`flexemr.client.leak`).
    """

    def __init__(self, config: ClusterConfig, options: ClientOptions | None = None, **overrides: Any) -> None:
        if not isinstance(config, ClusterConfig):
            raise ConfigError(f"expected a ClusterConfig, got {type(config).__name__}")
        self.options = options = ClientOptions.merged(options, **overrides)
        self.config = config
        self.plan: ShardingPlan = config.plan
        self.metrics = LocalityMetrics()
        self.reliability = ReliabilityMetrics()
        self._l2p = {} if options.remap is None else options.remap.gather_arrays(self.plan)
        self._peers = Peers(config, options, self.reliability)
        self._cache = ClientCache(self.plan, options, self.metrics) if options.cache_bytes else None
        self._coherence = Coherence(self.plan, self._peers, self._cache)
        self._lanes = lanes = Lanes(self._peers, options, self.metrics)

        def batcher(lane: Any) -> Batcher:
            return Batcher(self.plan, options, self.metrics, self.reliability, self._peers, self._coherence,
                           self._cache, lane)

        self._batcher = batcher(lanes.bulk)
        self._prio = None if lanes.priority is None else batcher(lanes.priority)  # never coalesced with bulk
        self._swap = None if self._cache is None else SwapIn(self.plan, options, self.metrics, self._cache,
                                                             batcher(lanes.background), self._batcher)
        self._batchers = [b for b in (self._batcher, self._prio, self._swap and self._swap.batcher) if b]
        self._pooler = Pooler(self.plan, options, self.metrics, self._peers, self._batcher, self._coherence,
                              self._cache)
        self._where = creation_site()
        self._finalizer: weakref.finalize | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = False
        self._closed = False

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], options: ClientOptions | None = None,
                  **overrides: Any) -> EmbeddingClient:
        """A client for the cluster described by a TOML file (not yet connected)."""
        return cls(ClusterConfig.from_toml(path), options, **overrides)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._connected else "not connected"
        return f"<EmbeddingClient servers={list(self.plan.servers)} {state}>"

    # ------------------------------------------------------------ connecting

    async def connect(self) -> EmbeddingClient:
        """Connect to every server, read each one's metadata and check it against the plan.

        With a versioned plan the replicas of every shard are then checked
        (and brought) in sync (the resync protocol of ``docs/reliability.md``) before reads use them.

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
        peers = self._peers
        try:
            down = await peers.open()
            for b in self._batchers:
                b.start(self._loop, peers.engine)
            await peers.refresh_all()
            if self._cache is not None and self.plan.versioned:  # the GEN the shards' first cached rows are read under
                await self._batcher.read_gens(list(peers.region_shard))
        except BaseException:
            self._closed = peers.closed = True  # first: failure callbacks firing during the teardown start nothing
            await self._teardown()
            raise
        self._connected = True
        self._finalizer = weakref.finalize(self, leaked, self._where, peers, *self._batchers)
        log.info("client connected to %d servers (%s)", len(peers.peers) - len(down), peers.engine.transport)
        peers.reconnect_in_background(down)
        return self

    # -------------------------------------------------------------- accessors

    @property
    def connected(self) -> bool:
        return self._connected and not self._closed

    @property
    def engine(self) -> rdmaio.Engine:
        """The rdmaio engine in use."""
        return self._peers.engine

    @property
    def cache(self) -> RowCache | None:
        """The ranker-side row cache (``None`` without ``cache_bytes``); keys are physical ids."""
        return None if self._cache is None else self._cache.rows

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("client is closed")
        if not self._connected or self._loop is None:
            raise ClosedError("client is not connected: use 'async with client' or 'await client.connect()'")
        engine = self._peers.engine_or_none
        if engine is not None and engine.failure is not None:
            raise TransportError(f"this client's rdmaio engine failed ({engine.failure}): close the client, "
                                 f"create another")

    # ------------------------------------------------------------------ lookups

    async def lookup(self, table: str, ids: object, *, priority: bool | None = None) -> npt.NDArray[Any]:
        """Rows ``[len(ids), dim]`` of ``table`` (original order, duplicates repeated).

        ``ids``: 1-D integer array-like in ``[0, num_rows)``; anything else
        raises (before any network traffic) :class:`InputError`,
        :class:`LookupIdError` or :class:`UnknownTableError`.
        ``priority``: send it in the priority lane (own batches, endpoints and
        credits: :mod:`flexemr.client.lanes`; needs ``priority_lane=True``);
        default: the client's ``priority`` option.
        """
        t0 = time.perf_counter()
        return (await self._lookup(self._requests([(table, ids)]), t0, priority))[0]

    async def lookup_many(self, requests: Mapping[str, object], *,
                          priority: bool | None = None) -> dict[str, npt.NDArray[Any]]:
        """``{table: rows}`` for ``{table: ids}``: all tables in the same batch(es); ``priority`` as in :meth:`lookup`."""
        t0 = time.perf_counter()
        if not isinstance(requests, Mapping):
            raise InputError(f"lookup_many takes a mapping {{table: ids}}, got {type(requests).__name__}")
        outs = await self._lookup(self._requests(requests.items()), t0, priority)
        return dict(zip(requests, outs))

    async def _lookup(self, reqs: list[Request], t0: float, priority: bool | None) -> list[npt.NDArray[Any]]:
        """The rows of validated requests, through the lane ``priority`` asks for (a large lookup is bulk)."""
        if priority is None:
            priority = self.options.priority
        if not priority:
            return await self._batcher.lookup(reqs, t0)
        if self._prio is None:
            raise InputError("priority=True needs a client with a priority lane (ClientOptions(priority_lane=True))")
        if sum(int(ids.size) for _, _, ids in reqs) > self.options.priority_max_rows:
            self.metrics.priority_demoted += 1
            return await self._batcher.lookup(reqs, t0)
        self.metrics.priority_lookups += 1
        return await self._prio.lookup(reqs, t0)

    async def lookup_jagged(self, batch: JaggedBatch, *, pooling: PoolMode | None = None,
                            priority: bool | None = None) -> dict[str, npt.NDArray[Any]]:
        """Rows of every key of a KeyedJaggedTensor-style batch.

        Returns ``{table: rows}`` with ``rows`` of shape ``[len(batch.ids(table)), dim]``
        (in ``values`` order); with ``pooling="sum"``/``"mean"``/``"max"`` this is
        ``lookup_pooled(batch, mode=pooling)``: ``[batch_size, dim]`` per table.
        ``priority`` as in :meth:`lookup` (rows only).
        """
        if not isinstance(batch, JaggedBatch):
            raise InputError(f"lookup_jagged takes a JaggedBatch, got {type(batch).__name__}")
        if pooling not in (None, "sum", "mean", "max"):
            raise InputError(f"pooling must be None, 'sum', 'mean' or 'max', got {pooling!r}")
        if pooling is not None:
            return await self.lookup_pooled(batch, mode=pooling)
        if self._cache is not None:
            self._cache.observe_samples(batch.batch_size)
        return await self.lookup_many(batch.per_table(), priority=priority)

    async def lookup_bags(self, table: str, ids: object, *, offsets: object | None = None,
                          lengths: object | None = None, mode: PoolMode = "sum",
                          per_sample_weights: object | None = None) -> npt.NDArray[Any]:
        """EmbeddingBag of one table: ``ids`` cut into bags by ``offsets`` (``[B+1]``) or ``lengths`` (``[B]``).

        ``lookup_pooled`` for a one-table batch; returns ``[B, dim]``.

        >>> # await client.lookup_bags("user", [1, 2, 3], lengths=[2, 1], mode="mean")
        """
        jb = JaggedBatch([table], ids, lengths=lengths, offsets=offsets)
        out = await self.lookup_pooled(jb, mode=mode, per_sample_weights=per_sample_weights)
        return out[table]

    async def lookup_pooled(self, batch: JaggedBatch, mode: PoolMode = "sum", per_sample_weights: object | None = None,
                            *, server_pooling: bool | None = None) -> dict[str, npt.NDArray[Any]]:
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
        weights = split_weights(batch, per_sample_weights, mode)
        for t in batch.keys:  # every table known before any id is checked
            self.plan.spec(t)
        reqs = self._requests((t, batch.ids(t)) for t in batch.keys)
        use_pool = self.options.server_pooling if server_pooling is None else bool(server_pooling)
        if self._cache is not None:
            self._cache.observe_samples(batch.batch_size)
        return await self._pooler.lookup(batch, mode, weights, reqs, use_pool, t0)

    def prefetch(self, batches: Any, *, depth: int = 1,
                 pooled: PoolMode | None = None) -> PrefetchStream[Any, dict[str, npt.NDArray[Any]]]:
        """Lookahead pipeline: ``async for batch, result in client.prefetch(batches, depth=1)``.

        ``batches`` (sync or async iterable) yields :class:`JaggedBatch` es, or
        ``(JaggedBatch, per_sample_weights)`` pairs with ``pooled``.  The
        lookups of the next ``depth`` batches run while the consumer holds the
        current result (FBGEMM-style prefetch on :class:`~flexemr.client.prefetch.Prefetcher`);
        results come in order.  ``pooled=None`` gives :meth:`lookup_jagged`
        rows, else :meth:`lookup_pooled` with that mode.  With a cache, the
        rows the lookahead reads land in the cache, and no lookup starts while
        the consumer waits for one (it would probe the cache before the awaited
        lookup's misses are filled and read them again).  Use ``async with`` (or
        exhaust the stream) so outstanding lookups are cancelled on exit.
        """
        return lookahead(batches, depth, pooled, self.lookup_jagged, self.lookup_pooled, self.metrics,
                         waits_alone=self._cache is not None)

    def _requests(self, items: Iterable[tuple[str, object]]) -> list[Request]:
        """Validate every ``(table, ids)`` (the only time a lookup's ids are checked) -> physical ids."""
        reqs = []
        for table, ids in items:
            spec = self.plan.spec(table)
            reqs.append((table, spec, self._physical(table, validate_ids(spec, ids))))
        self._check_open()
        if self._swap is not None:
            self._swap.observe(reqs)
        return reqs

    def _physical(self, table: str, ids: IntArray) -> IntArray:
        """Logical -> physical ids (identity for tables without a remap)."""
        l2p = self._l2p.get(table)
        if l2p is None:
            return ids
        out: IntArray = l2p[ids]
        return out

    # -------------------------------------------------------- invalidate, update

    def invalidate(self, table: str, ids: object) -> int:
        """Coherence after the servers' rows changed: drop cached copies of ``ids`` (logical).

        Also stops later lookups from borrowing rows of batches that were
        already in flight, and keeps reads sent before this call from filling
        the cache.  Returns the number of distinct ids that were cached.

        >>> # server rows 3 and 8 of "user" were rewritten:
        >>> # client.invalidate("user", [3, 8])
        """
        spec = self.plan.spec(table)
        return self._coherence.invalidate(table, self._physical(table, validate_ids(spec, ids)))

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
        arr, values = check_update(self.plan, table, ids, rows)
        self._check_open()
        if arr.size == 0:
            return
        uniq, values = last_wins(self._physical(table, arr), values)
        try:
            await self._peers.writer.update_table(table, uniq, values, self.reliability)
        finally:
            self._coherence.invalidate(table, uniq)
            self._peers.sync_writer_stats()

    # ---------------------------------------------------------------- closing

    async def _teardown(self) -> None:
        if self._swap is not None:
            self._swap.close()
        for b in self._batchers:
            b.fail_pending()
        tasks = [*(t for b in self._batchers for t in b.tasks), *self._peers.background_tasks()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._pooler.aclose()
        for b in self._batchers:
            b.close()
        await self._peers.aclose()

    async def aclose(self) -> None:
        """Fail pending lookups with :class:`ClosedError`, close endpoints (and an owned engine). Idempotent."""
        if self._closed:
            return
        self._closed = self._peers.closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        await self._teardown()

    async def __aenter__(self) -> EmbeddingClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
