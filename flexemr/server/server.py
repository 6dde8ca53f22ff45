"""The embedding server: holds shards in registered memory, serves one-sided reads.

An :class:`EmbeddingServer` is passive once started: rankers read rows with
one-sided rdmaio reads and the server's CPU only runs the rdmaio responders.
Start-up:

1. every shard the plan puts on this server gets memory: seeded random values
   (:mod:`flexemr.core.init`, a pure function of ``(seed, table, rows, cols)``)
   written into one *arena* array, shard after shard at 64-byte aligned
   offsets, or — for tables given as ``.npy`` files — a copy-on-write memory
   map of the file (full-width shards are registered in place, no copy);
   ``fill_progress(bytes filled, bytes to fill)`` follows this, a few MiB
   at a time (``flexemr serve`` draws it as a progress bar);
2. each shard is registered as its own read-only region and exposed under
   :attr:`Shard.region_name`; the arena is registered once more as a whole
   (``"flexemr/arena"``) so a client can read rows of many shards with one
   ``read_batch``;
3. the metadata blob (:mod:`flexemr.core.meta`: plan, shard map, remote keys, a
   random *incarnation* id drawn at this start) is registered and exposed as
   ``"flexemr/meta"``;

With a ``versioned`` plan every shard is laid out as header+row slots plus a
control block (:mod:`flexemr.core.versioned`), always in the arena (``.npy``
tables are copied in), and registered read/write/atomic so rankers can
update rows with one-sided writes (``docs/reliability.md``).
4. the pooling service (:class:`flexemr.server.pooling.PoolService`) is served on
   the message channel ``"flexemr/pool"``: a ranker sends the ids of a
   batch's rows this server holds, grouped by bag, and gets one partial sum
   (or max) per bag back -- hierarchical pooling (``docs/locality.md``);
5. the listener accepts any number of rankers, and the server is *ready*.

Lifecycle (:attr:`EmbeddingServer.state`)::

    new --start()--> starting --(listening)--> ready --drain()--> draining --> closed
                                                 |                            ^
                                                 +----------aclose()----------+

:meth:`EmbeddingServer.drain` takes a server out of service gracefully: it is
no longer ready, stops accepting sessions and ends the open ones (rankers
see their endpoints close and move reads to the shards' other replicas),
lets in-flight work finish (at most ``timeout`` seconds), then closes.
What a server counts itself is in :attr:`EmbeddingServer.stats`
(:class:`ServerStats`; Prometheus: :mod:`flexemr.server.metrics`).

>>> import asyncio, rdmaio
>>> from flexemr.core.spec import TableSpec
>>> from flexemr.core.plan import ShardingPlan
>>> plan = ShardingPlan.row_wise([TableSpec("t", 100, 4)], ["s0"])
>>> async def main():
...     async with EmbeddingServer(plan, "s0", transport="tcp") as server:
...         return server.address.port > 0, server.shard_array("t/0").shape
>>> rdmaio.run(main())
(True, (100, 4))
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core.config import ClusterConfig, ServerAddress
from ..core.errors import ClosedError, ConfigError
from ..core.init import BLOCK_ROWS, check_seed, init_rows, init_shard
from ..core.meta import ARENA_REGION, META_REGION, ServerMeta, ShardEntry, encode_meta
from ..core.metrics import LatencyHistogram
from ..core.plan import Shard, ShardingPlan
from ..core.poolwire import POOL_CHANNEL, Buffer
from ..core.versioned import CTL_GEN, CTL_LOCK, CTL_MEMBERS, ctl_offset, pack_slots, region_bytes, row_data
from .pooling import RESPONSE_ARENA_BYTES, FramedAnswer, PoolService, ResponseArena

__all__ = ["EmbeddingServer", "ServerState", "ServerStats"]

log = logging.getLogger(__name__)

_ALIGN = 64
#: Rows filled between two ``fill_progress`` calls (16 MiB of a 64-wide float32 table).
_FILL_ROWS = 16 * BLOCK_ROWS

#: :attr:`EmbeddingServer.state` (module docstring: the lifecycle)
ServerState = Literal["new", "starting", "ready", "draining", "closed"]


@dataclass
class ServerStats:
    """What an embedding server counts itself (cumulative unless said otherwise).

    One-sided reads never reach the server's CPU (with verbs the server cannot
    even see them), so rows and bytes read are counted by the rankers
    (:class:`~flexemr.LocalityMetrics`); the server counts the work it does
    itself: the pooling RPC.
    """

    pool_requests: int = 0          #: pooling requests answered (error responses included)
    pool_bytes_received: int = 0    #: bytes of those requests
    pool_bytes_sent: int = 0        #: bytes of the responses
    pool_channels: int = 0          #: pooling channels open now (a gauge)
    pool_channels_opened: int = 0   #: pooling channels accepted
    #: time to compute each pooling response (gather + partial pooling), seconds in
    pool_latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False)
    started_at: float | None = None  #: Unix time the server became ready
    drain_seconds: float | None = None  #: how long the last drain took


class _CountedPoolService(PoolService):
    """The pooling service, counting requests, bytes and compute time into :class:`ServerStats`."""

    def __init__(self, plan: ShardingPlan, shards: tuple[Shard, ...], arrays: dict[str, npt.NDArray[Any]],
                 stats: ServerStats, arena: ResponseArena | None = None) -> None:
        super().__init__(plan, shards, arrays, arena)
        self._stats = stats

    def handle_many(self, requests: Sequence[Buffer],
                    payloads: Sequence[int | None] | None = None) -> list[list[Buffer] | FramedAnswer]:
        # the one entry of every request (serve -> submit -> one call per batch of waiting requests, run on a
        # worker thread, one call at a time): each request of a call is counted with the call's compute time
        t0 = time.perf_counter()
        outs = super().handle_many(requests, payloads)
        dt = time.perf_counter() - t0
        st = self._stats
        for data, out in zip(requests, outs):
            st.pool_latency.observe(dt)
            st.pool_requests += 1
            st.pool_bytes_received += memoryview(data).nbytes
            st.pool_bytes_sent += out.nbytes if isinstance(out, FramedAnswer) else sum(memoryview(p).nbytes
                                                                                      for p in out)
        return outs


def _load_npy(path: str | os.PathLike[str], table: str, shape: tuple[int, int], dtype: np.dtype[Any]) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"table {table!r}: cannot memory-map {os.fspath(path)}: {exc}") from exc
    if arr.shape != shape or arr.dtype != dtype:
        raise ConfigError(f"table {table!r}: {os.fspath(path)} holds {arr.shape} {arr.dtype}, "
                          f"the plan says {shape} {dtype.name}")
    return arr


def _bind_error(addr: ServerAddress, exc: OSError) -> str:
    """One line saying why a server cannot listen on ``addr`` and what to do about it."""
    where = f"cannot listen on {addr}"
    if isinstance(exc, socket.gaierror):
        return f"{where}: cannot resolve host {addr.host!r} ({exc.strerror}); give an address or a name this host resolves"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use (another server?); stop it or pick a free port (--port, 0 = any)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{where}: this host has no address {addr.host}; listen on one of its addresses "
                f"(--host, e.g. 0.0.0.0 for all) while rankers dial the cluster file's")
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges; pick another with --port)"
    return f"{where}: {exc.strerror or exc}"


async def _check_bindable(addr: ServerAddress) -> None:
    """Raise :class:`ConfigError` (see :func:`_bind_error`) unless a listener could bind ``addr`` now."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, sockaddr = infos[0]
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except OSError as exc:
        raise ConfigError(_bind_error(addr, exc)) from exc


class EmbeddingServer:
    """One embedding server of a plan (an async context manager).

    Parameters
    ----------
    config:
        A :class:`ClusterConfig` (address taken from it) or a bare
        :class:`ShardingPlan` (listens on ``host``/``port``, default
        ``127.0.0.1`` and a free port).
    name:
        This server's name in the plan.
    host, port:
        Override the listening address (``port=0``: any free port; the bound
        one is :attr:`address`).
    seed:
        Seed of the random initialisation (:mod:`flexemr.core.init`).
    npy:
        ``{table: path}`` of ``.npy`` files (``[num_rows, dim]`` of the table
        dtype) to serve instead of random values; memory-mapped copy-on-write.
    transport:
        rdmaio transport: ``"auto"`` (verbs when an RDMA device is up, else tcp),
        ``"tcp"`` or ``"verbs"``.  Ignored when ``engine`` is given.
    engine:
        An existing :class:`rdmaio.Engine` to use (not closed by the server).
    engine_options:
        Extra keyword arguments for :class:`rdmaio.Engine` (e.g. ``workers``).
    fill_progress:
        Called as ``fill_progress(bytes filled, bytes to fill)`` while
        :meth:`start` fills the shards (seeded values, or rows copied from
        ``.npy`` files), every few MiB and once at the end, from a worker
        thread; ``None``: not called.

    Notes
    -----
    Use ``async with EmbeddingServer(...) as server`` (or :meth:`start` /
    :meth:`aclose`); :meth:`serve_forever` waits until the server is closed.
    """

    def __init__(
        self,
        config: ClusterConfig | ShardingPlan,
        name: str,
        *,
        host: str | None = None,
        port: int | None = None,
        seed: int = 0,
        npy: Mapping[str, str | os.PathLike[str]] | None = None,
        transport: str = "auto",
        engine: rdmaio.Engine | None = None,
        engine_options: Mapping[str, Any] | None = None,
        fill_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if isinstance(config, ClusterConfig):
            plan = config.plan
            default = config.address(name) if name in plan.servers else ServerAddress("127.0.0.1", 0)
        elif isinstance(config, ShardingPlan):
            plan = config
            default = ServerAddress("127.0.0.1", 0)
        else:
            raise ConfigError(f"expected ClusterConfig or ShardingPlan, got {type(config).__name__}")
        if name not in plan.servers:
            raise ConfigError(f"unknown server {name!r}; the plan has {list(plan.servers)}")
        self.plan = plan
        self.name = name
        self._bind = ServerAddress(default.host if host is None else host, default.port if port is None else port)
        self.seed = check_seed(seed)
        self._npy = dict(npy or {})
        for table in self._npy:
            plan.spec(table)  # UnknownTableError for a table the plan lacks
        if fill_progress is not None and not callable(fill_progress):
            raise ConfigError(f"fill_progress must be callable, got {type(fill_progress).__name__}")
        self._fill_progress = fill_progress
        if engine is not None and not isinstance(engine, rdmaio.Engine):
            raise ConfigError(f"engine must be an rdmaio.Engine, got {type(engine).__name__}")
        self._engine = engine
        self._own_engine = engine is None
        self._engine_kwargs: dict[str, Any] = {"transport": transport, "workers": 2, **(engine_options or {})}
        secret = config.secret if isinstance(config, ClusterConfig) else None
        if secret is not None:  # the cluster file's secret authenticates every rdmaio connection
            self._engine_kwargs.setdefault("secret", secret)
        self.shards: tuple[Shard, ...] = plan.regions_on(name)
        self._arrays: dict[str, npt.NDArray[Any]] = {}
        self._region_bufs: dict[str, npt.NDArray[Any]] = {}
        self._regions: list[rdmaio.MemoryRegion] = []
        self._exposed: list[str] = []
        self._pool_served = False
        self._listener: rdmaio.Listener | None = None
        self._address: ServerAddress | None = None
        self._closed = asyncio.Event()
        self._started = False
        self._closing = False
        self.arena_bytes = 0
        self.pool_service: PoolService | None = None
        #: Random id of this start of the server (published in the metadata).
        self.incarnation = secrets.randbits(63)
        #: What this server counted (:class:`ServerStats`).
        self.stats = ServerStats()
        self._state: ServerState = "new"

    def __repr__(self) -> str:
        where = str(self._address) if self._address else "not started"
        return f"<EmbeddingServer {self.name} {where} shards={len(self.shards)}>"

    # ---------------------------------------------------------------- memory

    def _reporter(self, total: int) -> Callable[..., None]:
        """``report(n, final=False)``: ``n`` more bytes filled; calls ``fill_progress`` at most every 16 MiB,
        and once with ``final=True``."""
        done, told = 0, 0
        callback = self._fill_progress

        def report(n: int, final: bool = False) -> None:
            nonlocal done, told
            done += n
            if callback is not None and (final or done - told >= 16 << 20):
                told = done
                callback(total if final else done, total)   # at the end: all, alignment padding included

        return report

    def _allocate(self) -> tuple[npt.NDArray[np.uint8] | None, dict[str, int]]:
        """Fill shard memory: arena offsets for seeded (and copied) shards, mmap views for npy ones."""
        if self.plan.versioned:
            return self._allocate_versioned()
        offsets: dict[str, int] = {}
        pos = 0
        in_place: dict[str, npt.NDArray[Any]] = {}
        maps: dict[str, np.ndarray] = {}
        for sh in self.shards:
            spec = self.plan.spec(sh.table)
            if sh.table in self._npy:
                if sh.table not in maps:
                    maps[sh.table] = _load_npy(self._npy[sh.table], sh.table, (spec.num_rows, spec.dim),
                                               spec.np_dtype)
                view = maps[sh.table][sh.row_start : sh.row_end, sh.col_start : sh.col_end]
                if view.flags.c_contiguous and view.flags.writeable:
                    in_place[sh.region_name] = view
                    continue
            offsets[sh.region_name] = pos
            pos += -(-sh.nbytes(spec) // _ALIGN) * _ALIGN
        arena = np.empty(pos, dtype=np.uint8) if pos else None
        report = self._reporter(sum(sh.nbytes(self.plan.spec(sh.table)) for sh in self.shards
                                    if sh.region_name not in in_place))
        for sh in self.shards:
            spec = self.plan.spec(sh.table)
            if sh.region_name in in_place:
                self._arrays[sh.region_name] = in_place[sh.region_name]
                continue
            assert arena is not None
            off = offsets[sh.region_name]
            out = arena[off : off + sh.nbytes(spec)].view(spec.np_dtype).reshape(sh.num_rows, sh.num_cols)
            row_bytes = sh.num_cols * spec.np_dtype.itemsize
            # chunks of rows (a Python loop over chunks only), cut at multiples of _FILL_ROWS in the table so
            # that no seeded block of rows is drawn twice
            cuts = [sh.row_start, *range((sh.row_start // _FILL_ROWS + 1) * _FILL_ROWS, sh.row_end, _FILL_ROWS),
                    sh.row_end]
            for a, b in zip(cuts, cuts[1:]):
                lo, hi = a - sh.row_start, b - sh.row_start
                if sh.table in maps:
                    out[lo:hi] = maps[sh.table][a:b, sh.col_start : sh.col_end]
                else:
                    init_rows(spec, self.seed, a, b, sh.col_start, sh.col_end, out=out[lo:hi])
                report((hi - lo) * row_bytes)
            self._arrays[sh.region_name] = out
        report(0, final=True)
        for name, arr in self._arrays.items():
            self._region_bufs[name] = arr
        self.arena_bytes = pos
        return arena, offsets

    def _allocate_versioned(self) -> tuple[npt.NDArray[np.uint8] | None, dict[str, int]]:
        """Versioned layout: every shard as slots (version 0) + control block, back to back in the arena."""
        offsets: dict[str, int] = {}
        pos = 0
        for sh in self.shards:
            offsets[sh.region_name] = pos
            pos += -(-region_bytes(self.plan.spec(sh.table), sh.num_rows) // _ALIGN) * _ALIGN
        arena = np.zeros(pos, dtype=np.uint8) if pos else None
        maps: dict[str, np.ndarray] = {}
        report = self._reporter(pos)
        for sh in self.shards:
            spec = self.plan.spec(sh.table)
            assert arena is not None
            off = offsets[sh.region_name]
            buf = arena[off : off + region_bytes(spec, sh.num_rows)]
            if sh.table in self._npy:
                if sh.table not in maps:
                    maps[sh.table] = _load_npy(self._npy[sh.table], sh.table, (spec.num_rows, spec.dim),
                                               spec.np_dtype)
                values = np.asarray(maps[sh.table][sh.row_start : sh.row_end])
            else:
                values = init_shard(spec, sh, self.seed)
            cut = ctl_offset(spec, sh.num_rows)
            rows = np.arange(sh.row_start, sh.row_end, dtype=np.int64)
            slots = buf[:cut].reshape(sh.num_rows, -1)
            slots[...] = pack_slots(spec, values, rows, np.zeros(sh.num_rows, dtype=np.uint64))
            ctl = buf[cut : cut + 24].view(np.uint64)
            ctl[CTL_LOCK // 8], ctl[CTL_GEN // 8] = 0, 0
            ctl[CTL_MEMBERS // 8] = (1 << len(sh.replicas)) - 1
            self._arrays[sh.region_name] = row_data(spec, slots)
            self._region_bufs[sh.region_name] = buf
            report(buf.nbytes)
        report(0, final=True)
        self.arena_bytes = pos
        return arena, offsets

    def shard_slots(self, region_name: str) -> npt.NDArray[np.uint8]:
        """The raw bytes of a shard region (versioned: slots + control block)."""
        try:
            return self._region_bufs[region_name]
        except KeyError:
            raise ConfigError(f"server {self.name!r} holds no region {region_name!r}") from None

    def shard_array(self, region_name: str) -> npt.NDArray[Any]:
        """The ``[rows, cols]`` array backing a shard region (after :meth:`start`)."""
        try:
            return self._arrays[region_name]
        except KeyError:
            raise ConfigError(f"server {self.name!r} holds no region {region_name!r}") from None

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> EmbeddingServer:
        """Allocate and register the shards, publish the metadata, listen. Idempotent."""
        if self._closing:
            raise ClosedError(f"server {self.name!r} is closed")
        if self._started:
            return self
        self._state = "starting"
        try:
            if self._engine is None:
                self._engine = rdmaio.Engine(**self._engine_kwargs)
            engine = self._engine
            await engine.start()
            await _check_bindable(self._bind)  # before allocating what may be gigabytes
            try:
                arena, offsets = await asyncio.get_running_loop().run_in_executor(None, self._allocate)
            except MemoryError as exc:
                need = sum(region_bytes(self.plan.spec(sh.table), sh.num_rows) if self.plan.versioned
                           else sh.nbytes(self.plan.spec(sh.table)) for sh in self.shards)
                raise ConfigError(f"server {self.name!r}: cannot allocate its shards ({need / (1 << 30):.1f} GiB; "
                                  f"{exc or 'out of memory'}): spread the tables over more servers or make them "
                                  f"smaller") from None
            arena_key: bytes | None = None
            if arena is not None:
                arena_mr = engine.register(arena, access=rdmaio.Access.READ)
                self._regions.append(arena_mr)
                self._expose(ARENA_REGION, arena_mr)
                arena_key = arena_mr.remote_key().to_bytes()
            entries = []
            versioned = self.plan.versioned
            access = rdmaio.Access.ALL if versioned else rdmaio.Access.READ
            for sh in self.shards:
                spec = self.plan.spec(sh.table)
                arr = self._region_bufs[sh.region_name]
                mr = engine.register(arr, access=access)
                self._regions.append(mr)
                self._expose(sh.region_name, mr)
                nbytes = region_bytes(spec, sh.num_rows) if versioned else sh.nbytes(spec)
                entries.append(ShardEntry(sh.region_name, sh.table, sh.index, (sh.row_start, sh.row_end),
                                          (sh.col_start, sh.col_end), nbytes, mr.remote_key().to_bytes(),
                                          offsets.get(sh.region_name)))
            npy_tables = sorted(t for t in self._npy if any(s.table == t for s in self.shards))
            init: dict[str, Any] = {"kind": "random", "seed": self.seed}
            if npy_tables:
                init = {"kind": "mixed", "seed": self.seed, "npy": npy_tables}
            blob = encode_meta(ServerMeta(self.name, engine.transport, self.plan.to_dict(), init, arena_key,
                                          tuple(entries), self.incarnation,
                                          "versioned" if versioned else "plain"))
            meta_buf = np.frombuffer(bytearray(blob), dtype=np.uint8)
            meta_mr = engine.register(meta_buf, access=rdmaio.Access.READ)
            self._regions.append(meta_mr)
            self._expose(META_REGION, meta_mr)
            # responses are pooled into registered memory and sent from there (no copy into the channel)
            resp = np.empty(RESPONSE_ARENA_BYTES, dtype=np.uint8)
            resp.fill(0)  # resident now (on verbs registering pins it): the first answers pay no page faults
            resp_mr = engine.register(resp, access=rdmaio.Access.NONE)
            self._regions.append(resp_mr)
            self.pool_service = _CountedPoolService(self.plan, self.shards, self._arrays, self.stats,
                                                    ResponseArena(resp, resp_mr))
            engine.serve_channel(POOL_CHANNEL, self._serve_pool)
            self._pool_served = True
            try:
                self._listener = await engine.listen(self._bind.host, self._bind.port)
            except OSError as exc:
                raise ConfigError(_bind_error(self._bind, exc)) from exc
            self._address = ServerAddress(self._bind.host, self._listener.port)
        except BaseException:
            self._state = "closed"
            await self._teardown()
            raise
        self._started = True
        self._state = "ready"
        self.stats.started_at = time.time()
        log.info("server %s listening on %s (%d shards, %d arena bytes, %s)", self.name, self._address,
                 len(self.shards), self.arena_bytes, engine.transport)
        return self

    async def _serve_pool(self, ch: rdmaio.Channel) -> None:
        """Channel handler of ``"flexemr/pool"`` (ends at once unless the server is ready)."""
        if self._state != "ready" or self.pool_service is None:
            return
        st = self.stats
        st.pool_channels += 1
        st.pool_channels_opened += 1
        try:
            await self.pool_service.serve(ch)
        finally:
            st.pool_channels -= 1

    def _expose(self, name: str, mr: rdmaio.MemoryRegion) -> None:
        assert self._engine is not None
        self._engine.expose(name, mr)
        self._exposed.append(name)

    @property
    def address(self) -> ServerAddress:
        """Where the server listens (the bound port when started with port 0)."""
        if self._address is None:
            raise ClosedError(f"server {self.name!r} is not started")
        return self._address

    @property
    def engine(self) -> rdmaio.Engine:
        """The rdmaio engine serving this server's regions."""
        if self._engine is None:
            raise ClosedError(f"server {self.name!r} is not started")
        return self._engine

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def state(self) -> ServerState:
        """``"new"``, ``"starting"``, ``"ready"``, ``"draining"`` or ``"closed"`` (module docstring)."""
        return self._state

    @property
    def ready(self) -> bool:
        """True while the shards are loaded and served (readiness: started, not draining or closed)."""
        return self._state == "ready"

    @property
    def sessions(self) -> int:
        """Rankers' rdmaio sessions open now (0 when not listening)."""
        return 0 if self._listener is None else self._listener.sessions

    async def drain(self, timeout: float = 10.0) -> float:
        """Take the server out of service gracefully, then close it; returns the seconds it took.

        1. the server is no longer :attr:`ready` (state ``"draining"``: readiness
           probes fail from now on);
        2. its listener stops accepting sessions and ends the open ones: each
           ranker sees its endpoint close and moves reads to the shards' other
           replicas (reads in flight on the endpoint are re-issued there,
           ``client.reliability.failover_reads``; pooling requests fall back to
           reads, ``pool_fallbacks``); rankers keep reconnecting in the background
           and take the server back when it (or its successor) is ready again;
        3. in-flight work ends (pooling handlers, the transport's pending
           completions), then the memory is released (:meth:`aclose`).

        Steps 2-3 get at most ``timeout`` seconds; past it the server is
        closed at once.  Lookups on shards without another replica fail once
        the server is gone (``TransportError``), as when it dies.  Idempotent;
        a server that never started is just closed.
        """
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
            raise ConfigError(f"drain timeout must be a number >= 0, got {timeout!r}")
        if self._closing or self._state == "draining":
            await self._closed.wait()
            return self.stats.drain_seconds or 0.0
        if self._state != "ready":
            await self.aclose()
            return 0.0
        t0 = time.monotonic()
        self._state = "draining"
        log.info("server %s draining (%d sessions, timeout %.1f s)", self.name, self.sessions, timeout)
        try:
            if self._listener is not None:
                await asyncio.wait_for(self._listener.aclose(), timeout)
            while self.stats.pool_channels and time.monotonic() - t0 < timeout:
                await asyncio.sleep(0.005)
        except asyncio.TimeoutError:
            log.warning("server %s: drain timed out after %.1f s; closing now", self.name, timeout)
        finally:
            self.stats.drain_seconds = time.monotonic() - t0
            await self.aclose()
        log.info("server %s drained in %.3f s", self.name, self.stats.drain_seconds)
        return self.stats.drain_seconds

    async def serve_forever(self) -> None:
        """Start if needed, then wait until :meth:`aclose` is called."""
        await self.start()
        await self._closed.wait()

    async def _teardown(self) -> None:
        engine = self._engine
        if engine is None:
            return
        if self._own_engine:
            await engine.aclose()
        else:
            if self._listener is not None:
                await self._listener.aclose()
            for name in self._exposed:
                engine.unexpose(name)
            if self._pool_served:
                engine.unserve_channel(POOL_CHANNEL)
                self._pool_served = False
            for mr in self._regions:
                mr.close()
        if self.pool_service is not None:  # its thread ends (after a native call it may be running)
            self.pool_service.close()
        self._listener = None
        self._exposed.clear()
        self._regions.clear()

    async def aclose(self) -> None:
        """Stop listening, drop the sessions and release all memory. Idempotent."""
        if self._closing:
            return
        self._closing = True
        try:
            await self._teardown()
        finally:
            self._state = "closed"
            self._arrays.clear()
            self._region_bufs.clear()
            self._closed.set()
            log.info("server %s closed", self.name)

    async def __aenter__(self) -> EmbeddingServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
