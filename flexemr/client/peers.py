"""The client's servers: connections, metadata checks, routes, failover and reconnection.

:class:`Peers` holds one :class:`Peer` per server of the plan and, per
``(server, shard region)``, the :class:`Route` reads take.  It is the
:class:`~flexemr.client.replica.ReplicaHost` of the client's
:class:`~flexemr.client.replica.ShardWriter`.

Connecting (:meth:`Peers.open`)
    The engine starts; every server is connected, its ``"flexemr/meta"``
    region read (one rdmaio read) and checked against the plan: name, whole
    plan, row layout, every shard's table / index / rows / cols / size and
    remote keys (:meth:`Peers._check_meta`).  A server that cannot be reached
    is tolerated when every shard it holds has a reachable replica; it is
    then reconnected in the background (:meth:`Peers.reconnect_in_background`).

Failover (``docs/reliability.md``)
    Reads of a batch go, per shard, to the first connected in-service replica
    (:meth:`Peers.pick`); a server whose operation fails (EOF/reset at once,
    ``op_timeout`` when hung, or its control connection breaking while idle)
    is dropped from every route (:meth:`Peers.peer_failed`), and a background
    task reconnects with jittered exponential backoff, re-validates the
    metadata and (versioned plans) resyncs before routing reads back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import rdmaio

from ..core.config import ClusterConfig
from ..core.errors import ClosedError, ConfigError, FlexEMRError, MetadataError, TransportError
from ..core.meta import HEADER, MAX_META_BYTES, META_REGION, ServerMeta, decode_meta
from ..core.metrics import ReliabilityMetrics
from ..core.plan import Shard, ShardingPlan
from ..core.versioned import region_bytes
from .options import ClientOptions
from .replica import Backoff, ShardWriter

__all__ = ["Peer", "Peers", "Route"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """How to read one shard region: endpoint, key used for merged reads and the shard's base in it."""

    server: str
    endpoint: rdmaio.Endpoint
    group: tuple[str, str]
    key: rdmaio.RemoteKey
    base: int
    own_key: rdmaio.RemoteKey
    incarnation: int = 0  #: the server's start identity (:class:`~flexemr.core.meta.ServerMeta`)


class Peer:
    """Connection state of one server: endpoint (``None`` while down), metadata, reconnect task."""

    __slots__ = ("name", "ep", "prio_ep", "meta", "incarnation", "task", "ready", "kick", "backoff")

    def __init__(self, name: str, backoff: Backoff) -> None:
        self.name = name
        self.ep: rdmaio.Endpoint | None = None
        #: the priority lane's own endpoint (``ClientOptions(priority_lane=True)``; flexemr.client.lanes)
        self.prio_ep: rdmaio.Endpoint | None = None
        self.meta: ServerMeta | None = None
        self.incarnation: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.kick = asyncio.Event()
        self.backoff = backoff


class Peers:
    """Every server of a cluster as this client sees it (module docstring)."""

    def __init__(self, config: ClusterConfig, options: ClientOptions, reliability: ReliabilityMetrics) -> None:
        self.config = config
        self.plan: ShardingPlan = config.plan
        self.reliability = reliability
        self._connect_timeout = options.connect_timeout
        self._reconnect_base = float(options.reconnect_base)
        self._reconnect_cap = float(options.reconnect_cap)
        self._engine: rdmaio.Engine | None = options.engine
        self._own_engine = options.engine is None
        self._engine_kwargs = options.engine_kwargs(config.secret)
        self.priority_lane = options.priority_lane
        self.peers: dict[str, Peer] = {}
        self.meta: dict[str, ServerMeta] = {}
        self.routes: dict[tuple[str, str], Route] = {}       # (server, region) -> route
        self.serving: dict[str, list[str]] = {}               # region -> replicas reads may use
        self.region_shard: dict[str, Shard] = {sh.region_name: sh for shards in self.plan.shards.values()
                                               for sh in shards}
        self.writer = ShardWriter(self, self.plan, token=secrets.randbits(63) | 1,
                                  lock_timeout=float(options.update_lock_timeout))
        self.writer.on_copy = options.resync_progress
        self.resyncing: set[str] = set()  # regions a background resync is bringing back (stale_replica)
        self.tasks: set[asyncio.Task[None]] = set()  # background resyncs
        #: called with a server's name when it fails (e.g. its pooling channel is dropped)
        self.on_failure: list[Callable[[str], None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    @property
    def engine(self) -> rdmaio.Engine:
        """The rdmaio engine in use."""
        if self._engine is None:
            raise ClosedError("client is not connected")
        return self._engine

    @property
    def engine_or_none(self) -> rdmaio.Engine | None:
        return self._engine

    # ------------------------------------------------------------ connecting

    async def open(self) -> dict[str, BaseException]:
        """Start the engine and connect to every server; returns the unreachable ones that may stay down
        (every shard they hold has a reachable replica), raises for any other failure."""
        self.loop = asyncio.get_running_loop()
        if self._engine is None:
            self._engine = rdmaio.Engine(**self._engine_kwargs)
        await self._engine.start()
        for s in self.plan.servers:
            self.peers[s] = Peer(s, Backoff(self._reconnect_base, self._reconnect_cap))
        results = await asyncio.gather(*(self._open_peer(s, self._connect_timeout) for s in self.plan.servers),
                                       return_exceptions=True)
        return self._tolerable_failures(dict(zip(self.plan.servers, results)))

    async def refresh_all(self) -> None:
        """Which replicas of every region reads may use (versioned: after bringing them in sync)."""
        await asyncio.gather(*(self.refresh_region(r) for r in self.region_shard))

    def reconnect_in_background(self, down: Mapping[str, BaseException]) -> None:
        """Servers :meth:`open` started without: reconnect them in the background."""
        assert self.loop is not None
        for server, exc in down.items():
            log.warning("server %s is down at start (%s); its replicas serve, reconnecting in the background",
                        server, exc)
            peer = self.peers[server]
            peer.task = self.loop.create_task(self._reconnect(peer))

    def _tolerable_failures(self, results: Mapping[str, BaseException | None]) -> dict[str, BaseException]:
        """The servers ``open`` may start without (unreachable, every shard replicated elsewhere); else raise."""
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
        for shard in self.region_shard.values():
            if all(s in down for s in shard.replicas):
                raise down[shard.replicas[0]]
        return down

    async def _open_peer(self, server: str, timeout: float) -> None:
        """Connect to ``server``, read and check its metadata, install its endpoint and routes."""
        engine = self.engine
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
            prio = await engine.connect(addr.host, addr.port, timeout=timeout) if self.priority_lane else None
        except rdmaio.RdmaioError as exc:
            ep.abort()
            raise TransportError(f"cannot connect the priority lane to server {server!r} at {addr}: {exc}") from exc
        except BaseException:
            ep.abort()
            raise
        peer = self.peers[server]
        peer.prio_ep = prio
        if prio is not None:
            prio.add_broken_callback(lambda exc: self.peer_failed(server, exc, prio))
        if peer.incarnation is not None and peer.incarnation != meta.incarnation:
            self.reliability.restarts_seen += 1
            log.info("server %s restarted (incarnation %#x -> %#x)", server, peer.incarnation, meta.incarnation)
        peer.ep, peer.meta, peer.incarnation = ep, meta, meta.incarnation
        self.meta[server] = meta
        self.routes.update(routes)
        # notice a server that dies while this client is not reading from it
        # (e.g. the backup replica): fail it over and reconnect now, not when
        # the next read finds out the hard way
        ep.add_broken_callback(lambda exc: self.peer_failed(server, exc, ep))
        peer.ready.set()

    async def _read_meta(self, server: str, ep: rdmaio.Endpoint) -> ServerMeta:
        engine = self.engine
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

    def _check_meta(self, server: str, meta: ServerMeta, ep: rdmaio.Endpoint) -> dict[tuple[str, str], Route]:
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
        routes: dict[tuple[str, str], Route] = {}
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
                    routes[(server, name)] = Route(server, ep, (server, ""), arena, e.arena_offset, own,
                                                   meta.incarnation)
                else:
                    routes[(server, name)] = Route(server, ep, (server, name), own, 0, own, meta.incarnation)
        except rdmaio.UsageError as exc:
            raise MetadataError(f"server {server!r} sent a malformed remote key: {exc}") from exc
        return routes

    # ------------------------------------------------------------ replicas

    async def refresh_region(self, region: str) -> None:
        """Recompute which replicas of ``region`` reads may use (versioned: after bringing them in sync)."""
        shard = self.region_shard[region]
        eps = {s: self.peers[s].ep for s in shard.replicas}
        if self.plan.versioned:
            serving = await self.writer.sync(shard)
        else:
            serving = [s for s in shard.replicas if eps[s] is not None]
        # a replica that failed (and maybe came back, not yet resynced) while the
        # sync ran is not vouched for by it: its own reconnect will add it
        self.serving[region] = [s for s in serving if self.peers[s].ep is eps[s] and self.live(s)]

    def priority_endpoint(self, server: str) -> rdmaio.Endpoint | None:
        """The live priority-lane endpoint to ``server`` (``None`` while it is down or without the lane)."""
        peer = self.peers.get(server)
        return None if peer is None or peer.ep is None else peer.prio_ep

    def replica_endpoint(self, server: str) -> rdmaio.Endpoint | None:
        """The live endpoint to ``server`` (``None`` while it is down)."""
        peer = self.peers.get(server)
        return None if peer is None else peer.ep

    def replica_key(self, server: str, region: str) -> rdmaio.RemoteKey | None:
        """The key of ``region``'s own region on ``server`` (``None`` while it is down)."""
        route = self.routes.get((server, region))
        peer = self.peers.get(server)
        if route is None or peer is None or peer.ep is not route.endpoint:
            return None
        return route.own_key

    async def wait_connected(self, server: str, timeout: float) -> bool:
        """Hurry the reconnection of ``server`` and wait up to ``timeout`` s for it; True if connected."""
        peer = self.peers[server]
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
        peer = self.peers.get(server)
        if peer is None or self.closed or peer.ep is None or (ep is not None and ep is not peer.ep
                                                               and ep is not peer.prio_ep):
            return
        self.reliability.peer_failures += 1
        if isinstance(exc, rdmaio.TimeoutError) or isinstance(exc.__cause__, rdmaio.TimeoutError):
            self.reliability.peer_timeouts += 1  # not seen at once (control connection, NIC error): waited for
        log.warning("server %s failed (%s: %s); failing over, reconnecting in the background", server,
                    type(exc).__name__, exc)
        old, peer.ep = peer.ep, None
        prio, peer.prio_ep = peer.prio_ep, None
        peer.ready.clear()
        old.abort()  # in-flight operations fail now (a hung server: no late writes into our buffers)
        if prio is not None:
            prio.abort()
        for key in [k for k in self.routes if k[0] == server]:
            del self.routes[key]
        for region, servers in self.serving.items():
            if server in servers:
                self.serving[region] = [s for s in servers if s != server]
        for callback in self.on_failure:
            callback(server)
        if (peer.task is None or peer.task.done()) and self.loop is not None:
            peer.task = self.loop.create_task(self._reconnect(peer))

    async def _reconnect(self, peer: Peer) -> None:
        """Background: reconnect with backoff, validate the metadata, resync, route reads back."""
        timeout = min(self._connect_timeout, max(2.0, self._reconnect_cap))
        while not self.closed:
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
            if self.closed:
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
                await asyncio.gather(*(self.refresh_region(r) for r in regions))
            except (FlexEMRError, rdmaio.RdmaioError) as exc:
                log.warning("resync after reconnecting to %s failed (%s); retrying", peer.name, exc)
                continue
            self.sync_writer_stats()
            peer.backoff.reset()
            if peer.ep is not None:
                return

    def sync_writer_stats(self) -> None:
        w, r = self.writer, self.reliability
        r.resync_copies, r.fenced, r.lock_steals = w.copies, w.fenced, w.steals

    def pick(self, region: str, allowed: frozenset[str] | None = None) -> Route:
        """The route of the first connected, in-service replica of ``region`` (the primary when it is up).

        Plans place primaries evenly, so preferring them spreads the reads.  ``allowed``
        (versioned plans, see :meth:`flexemr.client.coherence.Coherence.check_members`): only these
        replicas, which the batch's control words show in service -- also one this client has not
        resynced itself yet.
        """
        live = [s for s in self.serving.get(region, ()) if (s, region) in self.routes
                and (allowed is None or s in allowed)]
        if not live and allowed is not None:
            live = [s for s in self.region_shard[region].replicas if s in allowed and (s, region) in self.routes]
        if not live:
            shard = self.region_shard[region]
            raise TransportError(f"no replica of shard {region} is available (replicas {list(shard.replicas)}; "
                                 f"down or resyncing)")
        return self.routes[(live[0], region)]

    def stale_replica(self, region: str, server: str) -> None:
        """``server`` holds ``region`` but is out of service (fenced): stop reading it there, resync it."""
        self.reliability.stale_replica_reads += 1
        servers = self.serving.get(region, [])
        if server in servers:
            log.info("shard %s on %s is out of service (fenced by another client); resyncing it", region, server)
            self.serving[region] = [s for s in servers if s != server]
        if region in self.resyncing or self.closed or self.loop is None:
            return
        self.resyncing.add(region)

        async def resync() -> None:
            try:
                await self.refresh_region(region)
                self.sync_writer_stats()
            except (FlexEMRError, rdmaio.RdmaioError) as exc:
                log.warning("resync of shard %s failed (%s); it stays out of service", region, exc)
            finally:
                self.resyncing.discard(region)

        task = self.loop.create_task(resync())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -------------------------------------------------------------- status

    def replica_status(self) -> dict[str, list[str]]:
        """Region -> replicas lookups currently read from (in-sync, connected)."""
        return {r: [s for s in servers if self.live(s)] for r, servers in self.serving.items()}

    def live(self, server: str) -> bool:
        ep = self.peers[server].ep
        return ep is not None and ep.broken is None

    def healthy(self) -> bool:
        """True when every server is connected and every replica of every shard serves reads."""
        if not all(self.live(s) for s in self.peers):
            return False
        status = self.replica_status()
        return all(len(status[r]) == len(sh.replicas) for r, sh in self.region_shard.items())

    async def wait_healthy(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until :meth:`healthy`; returns whether it is."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                return False
            for p in self.peers.values():
                if p.ep is None:
                    p.kick.set()
            await asyncio.sleep(0.02)
        return True

    def endpoint(self, server: str) -> rdmaio.Endpoint:
        """The endpoint to ``server``; :class:`TransportError` while it is down."""
        peer = self.peers.get(server)
        if peer is None:
            raise ConfigError(f"unknown server {server!r}; known {list(self.plan.servers)}")
        if peer.ep is None:
            raise TransportError(f"server {server!r} is down (reconnecting)")
        return peer.ep

    def shard_key(self, region_name: str, server: str | None = None) -> rdmaio.RemoteKey:
        """The remote key of a shard's own region on ``server`` (default: its primary)."""
        shard = self.region_shard.get(region_name)
        if shard is None:
            raise ConfigError(f"unknown region {region_name!r}")
        key = self.replica_key(server or shard.server, region_name)
        if key is None:
            raise TransportError(f"region {region_name!r} on {server or shard.server!r} is down (reconnecting)")
        return key

    # -------------------------------------------------------------- closing

    def background_tasks(self) -> list[asyncio.Task[None]]:
        """Resyncs and reconnections still running."""
        return [*self.tasks, *(p.task for p in self.peers.values() if p.task is not None)]

    async def aclose(self) -> None:
        """Close the endpoints (an owned engine entirely); the background tasks must be cancelled first."""
        self.closed = True
        if self._engine is not None:
            if self._own_engine:
                await self._engine.aclose()
            else:
                for p in self.peers.values():
                    for ep in (p.ep, p.prio_ep):
                        if ep is not None:
                            await ep.aclose()
        for p in self.peers.values():
            p.ep = p.prio_ep = None

    def abort(self) -> None:
        """Synchronous :meth:`aclose` (an owned engine, or this client's endpoints, closed at once)."""
        self.closed = True
        if self._engine is not None and self._own_engine:
            self._engine.abort()
        for p in self.peers.values():
            for ep in (p.ep, p.prio_ep):
                if ep is not None:
                    ep.abort()
            p.ep = p.prio_ep = None
