"""Everything an :class:`~flexemr.EmbeddingClient` is configured with: :class:`ClientOptions`.

The options are validated here, once, when the dataclass is built; the
client's components read them and check nothing again.

>>> opts = ClientOptions(cache_bytes=64 << 20, coalesce_window_us=200)
>>> opts.cache_bytes, opts.server_pooling
(67108864, True)
>>> ClientOptions(coalesce_window_us=-1)
Traceback (most recent call last):
    ...
flexemr.core.errors.ConfigError: coalesce_window_us must be an int in [0, 10000], got -1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

import rdmaio

from ..core.cache import CachePolicy
from ..core.errors import ConfigError
from ..core.remap import RowRemap

__all__ = ["MAX_WINDOW_US", "ClientOptions"]

#: Upper bound of ``coalesce_window_us``.
MAX_WINDOW_US = 10_000


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ClientOptions:
    """How an :class:`~flexemr.EmbeddingClient` connects, batches, caches, pools and recovers.

    ``EmbeddingClient(config, options)`` or, equivalently,
    ``EmbeddingClient(config, **fields)``; every field has a default.  A bad
    value raises :class:`~flexemr.ConfigError` when the options are built.

    Parameters
    ----------
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
    connect_timeout:
        Seconds to connect to a server and read its metadata.
    cache_bytes:
        Memory budget of the ranker-side row cache (``0``: no cache).  Slots
        are as wide as the widest table row.
    cache_policy:
        ``"lru"`` or ``"lfu"`` (:class:`~flexemr.core.cache.RowCache`).
    adaptive:
        Resize the cache with :class:`~flexemr.core.cache.AdaptiveCapacity`
        (needs ``cache_bytes``): the rows of the last ``cache_window`` read
        batches are reserved for staging (x2: one batch in flight plus one
        prefetched); after ``cache_idle_s`` seconds without a batch the
        window is forgotten and the cache may use the whole budget again.
        Resizes happen when the target moves by at least 1/16 of the budget.
    cache_window:
        Batches the adaptive capacity looks back on.
    cache_idle_s:
        Seconds without a batch after which the adaptive capacity forgets its window.
    cache_admit:
        Pooled lookups with a cache read a row raw (and cache it) when it
        occurs at least this often in the batch; rarer uncached rows are left
        to the pooling cost model.
    server_pooling:
        Let :meth:`~flexemr.EmbeddingClient.lookup_pooled` ask servers to pool
        when measured lookups say it is faster
        (:class:`~flexemr.core.pooling.PoolingCost`; per shard by the byte
        model of :func:`~flexemr.core.pooling.choose_pooling`).
    remap:
        A :class:`~flexemr.RowRemap` the servers' tables were stored with:
        ids are translated logical -> physical before splitting.
    pool_slots:
        Messages in flight per pooling channel.
    pool_slot_size:
        Bytes per pooling channel frame (at least 4096).  The default ring,
        8 x 512 KiB, is as large as 16 x 256 KiB but cuts a request or
        response into half as many frames, and a server spends Python on
        every frame it receives or sends: ``flexemr bench serverpool
        --callgrind`` counts 36.9 instead of 38.1 server instructions per
        pooled row (compare shape), 189 instead of 193 (Criteo shape).
    op_timeout:
        Seconds after which an rdmaio operation on a hung server fails
        (``rdmaio.Engine(op_timeout=...)``; ignored with ``engine=``); the
        server is then treated as dead: its endpoint is dropped, reads fail
        over to a replica and a background task reconnects.  ``None``: no
        timeout (a SIGSTOPped server then blocks its lookups).
    reconnect_base:
        Reconnection backoff: ``min(reconnect_cap, reconnect_base * 2**attempt)``
        seconds, jittered by a factor in ``[0.5, 1]``.
    reconnect_cap:
        The longest reconnection delay (seconds).
    torn_timeout:
        Versioned tables: how long a row may keep failing validation (a writer
        at work, or died mid-write) before the lookup fails.
    update_lock_timeout:
        Versioned tables: how long :meth:`~flexemr.EmbeddingClient.update`
        waits for a shard lock.
    balanced_reads:
        Load-aware replica reads (:mod:`flexemr.client.load`): a batch reads a
        shard from whichever in-service replica is predicted to answer first
        (measured outstanding work and latency per server), and cuts a shard's
        reads larger than ``split_bytes`` over its replicas.  ``False``: the
        first in-service replica (the primary while it is up).
    split_bytes:
        A shard's reads of one batch larger than this may be cut over its replicas.
    remap_workers:
        Under skew, move this client's endpoints between the engine's workers
        (:mod:`flexemr.client.workers`): when the servers whose endpoints share
        a worker carry materially more of the measured load than another
        worker, an endpoint is switched to its queue pair owned by the lighter
        worker (``rdmaio.Endpoint.qp_choice``); operations in flight are not
        touched.  Counted in ``LocalityMetrics.worker_moves``.  Endpoints with
        one queue pair, or whose ``qp_choice`` is not ``"home"`` (set through
        ``engine_options`` or by hand), are never moved.
    bulk_window_bytes:
        Bytes of bulk reads (every lookup not in the priority lane, prefetch,
        swap-in) in flight per server at most (``0``: no window).  Keeps bulk
        traffic from filling the path to a server, so priority lookups do not
        wait behind it.
    priority_lane:
        Open a second endpoint per server for the priority lane
        (:mod:`flexemr.client.lanes`): ``lookup(..., priority=True)`` then
        rides its own queue pairs and credits, never coalesced with bulk lookups.
    priority:
        The default of ``lookup(..., priority=...)`` (needs ``priority_lane``).
    priority_window_bytes:
        Bytes of priority-lane reads in flight per server at most.
    priority_max_rows:
        A priority lookup with more unique rows than this is bulk traffic:
        it is sent in the bulk lane (``LocalityMetrics.priority_demoted``).
    nn_sample_bytes:
        With ``adaptive``: the ranker's NN memory per sample (activations; the
        DLRM declares it, :attr:`flexemr.apps.dlrm.DLRM.activation_bytes_per_sample`).
        The cache capacity is then the budget minus ``nn_sample_bytes`` x the
        largest batch (samples) of the last ``cache_window`` batches
        (:class:`~flexemr.core.capacity.ActivationCapacity`); ``0``: the older
        staging-rows estimate of :class:`~flexemr.core.cache.AdaptiveCapacity`.
    swapin:
        With ``adaptive``: when the capacity grows, read the hottest uncached
        rows (frequency sketch) into the cache in the background
        (:mod:`flexemr.client.swapin`); lookups never wait for it.
    swapin_chunk_rows:
        Rows per background swap-in read.
    predict_rows:
        Predictive prefetch (needs ``cache_bytes``): after every lookup, read
        up to this many uncached rows the frequency-and-recency predictor
        expects next into the cache in the background (``0``: off).
    resync_progress:
        Called while a resync copies a shard to a replica that fell behind:
        ``resync_progress(region, bytes copied, bytes to copy)`` (e.g. a
        progress bar; ``flexemr rank`` shows one).  ``None``: not called.

    Examples
    --------
    >>> ClientOptions(adaptive=True)
    Traceback (most recent call last):
        ...
    flexemr.core.errors.ConfigError: adaptive=True needs cache_bytes > 0
    """

    transport: str = "auto"
    engine: rdmaio.Engine | None = None
    engine_options: Mapping[str, Any] | None = None
    coalesce_window_us: int = 0
    max_batch_rows: int = 1 << 22
    max_reads_per_request: int = 16384
    staging_cache_bytes: int = 256 << 20
    connect_timeout: float = 10.0
    cache_bytes: int = 0
    cache_policy: CachePolicy = "lru"
    adaptive: bool = False
    cache_window: int = 16
    cache_idle_s: float = 1.0
    cache_admit: int = 2
    server_pooling: bool = True
    remap: RowRemap | None = None
    pool_slots: int = 8
    pool_slot_size: int = 512 << 10
    op_timeout: float | None = 2.0
    reconnect_base: float = 0.05
    reconnect_cap: float = 2.0
    torn_timeout: float = 2.0
    update_lock_timeout: float = 10.0
    balanced_reads: bool = True
    split_bytes: int = 256 << 10
    remap_workers: bool = True
    bulk_window_bytes: int = 0
    priority_lane: bool = False
    priority: bool = False
    priority_window_bytes: int = 1 << 20
    priority_max_rows: int = 4096
    nn_sample_bytes: int = 0
    swapin: bool = True
    swapin_chunk_rows: int = 4096
    predict_rows: int = 0
    resync_progress: Callable[[str, int, int], None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.transport, str):
            raise ConfigError(f"transport must be a string, got {type(self.transport).__name__}")
        if self.engine is not None and not isinstance(self.engine, rdmaio.Engine):
            raise ConfigError(f"engine must be an rdmaio.Engine, got {type(self.engine).__name__}")
        if self.engine_options is not None:
            if not isinstance(self.engine_options, Mapping):
                raise ConfigError(f"engine_options must be a mapping, got {type(self.engine_options).__name__}")
            object.__setattr__(self, "engine_options", MappingProxyType(dict(self.engine_options)))
        w = self.coalesce_window_us
        if not _is_int(w) or not 0 <= w <= MAX_WINDOW_US:
            raise ConfigError(f"coalesce_window_us must be an int in [0, {MAX_WINDOW_US}], got {w!r}")
        for name in ("max_batch_rows", "max_reads_per_request"):
            val = getattr(self, name)
            if not _is_int(val) or val < 1:
                raise ConfigError(f"{name} must be a positive int, got {val!r}")
        for name, lo in (("staging_cache_bytes", 0), ("cache_bytes", 0), ("cache_window", 1), ("cache_admit", 1),
                         ("pool_slots", 1), ("pool_slot_size", 4096), ("split_bytes", 0),
                         ("bulk_window_bytes", 0), ("priority_window_bytes", 4096), ("priority_max_rows", 1),
                         ("nn_sample_bytes", 0), ("swapin_chunk_rows", 1), ("predict_rows", 0)):
            val = getattr(self, name)
            if not _is_int(val) or val < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {val!r}")
        if self.cache_policy not in ("lru", "lfu"):
            raise ConfigError(f"cache_policy must be 'lru' or 'lfu', got {self.cache_policy!r}")
        if self.remap is not None and not isinstance(self.remap, RowRemap):
            raise ConfigError(f"remap must be a RowRemap, got {type(self.remap).__name__}")
        for name in ("connect_timeout", "reconnect_base", "reconnect_cap", "torn_timeout", "update_lock_timeout",
                     "op_timeout"):
            val = getattr(self, name)
            if name == "op_timeout" and val is None:
                continue
            if not _is_number(val) or not val > 0:
                raise ConfigError(f"{name} must be a positive number, got {val!r}")
        if not _is_number(self.cache_idle_s) or self.cache_idle_s < 0:
            raise ConfigError(f"cache_idle_s must be a number >= 0, got {self.cache_idle_s!r}")
        for name in ("adaptive", "server_pooling", "balanced_reads", "remap_workers", "priority_lane", "priority", "swapin"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.adaptive and not self.cache_bytes:
            raise ConfigError("adaptive=True needs cache_bytes > 0")
        if self.priority and not self.priority_lane:
            raise ConfigError("priority=True needs priority_lane=True")
        if self.predict_rows and not self.cache_bytes:
            raise ConfigError("predict_rows > 0 needs cache_bytes > 0 (predicted rows are read into the cache)")
        if self.resync_progress is not None and not callable(self.resync_progress):
            raise ConfigError(f"resync_progress must be callable, got {type(self.resync_progress).__name__}")

    @classmethod
    def merged(cls, options: ClientOptions | None = None, **overrides: Any) -> ClientOptions:
        """``options`` (default: every default) with ``overrides`` applied, validated.

        :class:`TypeError` for a name that is no option (as for an unknown
        keyword argument), :class:`~flexemr.ConfigError` for a bad value.

        >>> ClientOptions.merged(ClientOptions(cache_bytes=1 << 20), adaptive=True).adaptive
        True
        """
        if options is not None and not isinstance(options, ClientOptions):
            raise ConfigError(f"options must be a ClientOptions, got {type(options).__name__}")
        unknown = set(overrides) - set(cls.names())
        if unknown:
            raise TypeError(f"unknown EmbeddingClient option(s) {sorted(unknown)}; options: {', '.join(cls.names())}")
        if options is None:
            return cls(**overrides)
        return replace(options, **overrides) if overrides else options

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option's name, in field order (``EmbeddingClient``'s keyword arguments).

        >>> ClientOptions.names()[:3]
        ('transport', 'engine', 'engine_options')
        """
        return tuple(f.name for f in fields(cls))

    def engine_kwargs(self, secret: str | None = None) -> dict[str, Any]:
        """Keyword arguments of the :class:`rdmaio.Engine` a client creates (``secret``: the cluster file's).

        >>> sorted(ClientOptions(transport="tcp").engine_kwargs("s3cret"))
        ['op_timeout', 'secret', 'transport', 'workers']
        """
        kwargs: dict[str, Any] = {"transport": self.transport, "workers": 2, "op_timeout": self.op_timeout,
                                  **(self.engine_options or {})}
        if secret is not None:  # the cluster file's secret authenticates every rdmaio connection
            kwargs.setdefault("secret", secret)
        return kwargs
