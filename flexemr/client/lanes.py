"""Read lanes: where a batch's reads go (which replica, which endpoint) and the credits they take.

A :class:`ReadLane` is what a :class:`~flexemr.client.batcher.Batcher` asks
for the route of each group of reads (:meth:`ReadLane.routes`) and wraps
every read request in (:meth:`ReadLane.issue`).  A client has two:

``bulk``
    Every lookup, prefetch, swap-in and (through the same endpoints) update
    and resync.  Its reads take credits from one :class:`rdmaio.Credits`
    window per server (``bulk_window_bytes``; ``0``: no window), so bulk
    traffic cannot fill the path to a server (socket buffers, a
    rate-limited link) with more than that many bytes.
``priority``
    ``lookup(..., priority=True)`` (or ``ClientOptions(priority=True)``): a
    batcher of its own (priority lookups never coalesce with bulk ones), a
    separate endpoint per server (its own queue pairs: its requests never
    queue behind bulk requests in a socket), and its own credit window per
    server (``priority_window_bytes``).  Bulk reads never use these
    endpoints, so they can never take those credits.

Both lanes choose replicas the same way (:mod:`flexemr.client.load`): one
:class:`~flexemr.client.load.LoadTracker` per client measures every server.
From the same measurements, the bulk lane's batches let a
:class:`~flexemr.client.workers.WorkerMap` move the bulk endpoints between
engine workers under skew (``ClientOptions(remap_workers=True)``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Protocol, Self, TypeVar

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core.metrics import LocalityMetrics
from .load import LoadTracker, work_of
from .options import ClientOptions
from .peers import Peers, Route
from .workers import WorkerMap

__all__ = ["LANES", "Lanes", "ReadItem", "ReadLane"]

IntArray = npt.NDArray[np.int64]

#: The lanes of a client.
LANES = ("bulk", "priority")


class ReadItem(Protocol):
    """A group of reads of one shard region (:class:`flexemr.client.batcher.Item`)."""

    @property
    def region(self) -> str: ...
    @property
    def local(self) -> IntArray: ...
    @property
    def remote(self) -> IntArray: ...
    @property
    def length(self) -> IntArray: ...
    @property
    def pin(self) -> str | None: ...
    def _replace(self, *, local: IntArray = ..., remote: IntArray = ..., length: IntArray = ...) -> Self: ...


I = TypeVar("I", bound=ReadItem)


def _cut(item: I, shares: Sequence[float]) -> list[I | None]:
    """``item`` cut into consecutive pieces with about ``shares`` bytes each (``None``: an empty share)."""
    csum = np.cumsum(item.length)
    total = int(csum[-1]) if csum.size else 0
    bounds = [0]
    acc = 0.0
    for s in shares[:-1]:
        acc += s
        bounds.append(int(np.searchsorted(csum, acc * total / max(sum(shares), 1e-18), side="left")))
    bounds.append(int(item.length.size))
    out: list[I | None] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        hi = max(hi, lo)
        out.append(item._replace(local=item.local[lo:hi], remote=item.remote[lo:hi], length=item.length[lo:hi])
                   if hi > lo else None)
    return out


class ReadLane:
    """One lane of a client's reads (module docstring).

    ``endpoint_of(server)``: the lane's endpoint to ``server`` (``None``: the
    server's bulk endpoint, as in its :class:`~flexemr.client.peers.Route`);
    ``window_bytes``: the lane's credit window per server (``0``: none);
    ``balanced``: choose replicas by load (else the first in-service replica,
    the primary when it is up); ``split_bytes``: a shard's reads of one
    batch larger than this may be split over its replicas.
    """

    def __init__(self, name: str, peers: Peers, tracker: LoadTracker, metrics: LocalityMetrics, *,
                 balanced: bool, split_bytes: int, window_bytes: int = 0,
                 endpoint_of: Callable[[str], rdmaio.Endpoint | None] | None = None) -> None:
        self.name = name
        self.peers = peers
        self.tracker = tracker
        self.metrics = metrics
        self.balanced = balanced
        self.split_bytes = split_bytes
        self.window_bytes = window_bytes
        self._endpoint_of = endpoint_of
        #: per server: the lane's credit window (made on first use)
        self.credits: dict[str, rdmaio.Credits] = {}
        self._last: dict[str, frozenset[str]] = {}  # region -> servers that read it in the last batch
        self._routes: dict[tuple[str, str], tuple[Route, Route]] = {}  # (server, region) -> (bulk, lane route)
        #: called once per routed batch (the bulk lane: :meth:`flexemr.client.workers.WorkerMap.tick`)
        self.on_batch: Callable[[], None] | None = None

    # --------------------------------------------------------------- routes

    def route(self, server: str, region: str) -> Route:
        """The route to ``region`` on ``server`` through this lane's endpoint (KeyError while it is down)."""
        base = self.peers.routes[(server, region)]
        if self._endpoint_of is None:
            return base
        ep = self._endpoint_of(server)
        if ep is None:
            return base
        cached = self._routes.get((server, region))
        if cached is not None and cached[0] is base and cached[1].endpoint is ep:
            return cached[1]
        lane = replace(base, endpoint=ep, group=(f"{base.group[0]}#{self.name}", base.group[1]))
        self._routes[(server, region)] = (base, lane)
        return lane

    def candidates(self, region: str, allowed: frozenset[str] | None) -> list[str]:
        """Replicas of ``region`` reads may use now (replica order); raises like :meth:`Peers.pick`."""
        peers = self.peers
        if not self.balanced:
            return [peers.pick(region, allowed).server]
        live = [s for s in peers.serving.get(region, ()) if (s, region) in peers.routes
                and (allowed is None or s in allowed)]
        if not live:
            return [peers.pick(region, allowed).server]  # the fallbacks and the error of pick
        return live

    def routes(self, items: Sequence[I], allowed: dict[str, frozenset[str]]) -> list[tuple[I, Route]]:
        """The route of every unpinned item; a region's items may be cut over several replicas."""
        if self.on_batch is not None:
            self.on_batch()
        by_region: dict[str, list[I]] = {}
        for it in items:
            by_region.setdefault(it.region, []).append(it)
        out: list[tuple[I, Route]] = []
        m = self.metrics
        primary = self.peers.region_shard
        for region, its in by_region.items():
            cands = self.candidates(region, allowed.get(region))
            used: set[str] = set()
            if len(cands) == 1:
                route = self.route(cands[0], region)
                out.extend((it, route) for it in its)
                used.add(cands[0])
            else:
                nbytes = sum(int(it.length.sum()) for it in its)
                work = work_of(nbytes, sum(int(it.length.size) for it in its), 0)
                if nbytes > self.split_bytes:
                    shares = self.tracker.split(cands, work)
                    for it in its:
                        for server, piece in zip(cands, _cut(it, shares)):
                            if piece is not None:
                                out.append((piece, self.route(server, region)))
                                used.add(server)
                    if len(used) > 1:
                        m.split_reads += 1
                else:
                    server = self.tracker.choose(cands, work)
                    route = self.route(server, region)
                    out.extend((it, route) for it in its)
                    used.add(server)
            if primary[region].server not in used:
                m.off_primary_reads += 1
            now = frozenset(used)
            last = self._last.get(region)
            if last is not None and last != now:
                m.replica_moves += 1
            self._last[region] = now
        return out

    # --------------------------------------------------------------- issue

    def window(self, server: str) -> rdmaio.Credits | None:
        """The lane's credit window to ``server`` (``None`` without one)."""
        if not self.window_bytes:
            return None
        c = self.credits.get(server)
        if c is None:
            c = self.credits[server] = rdmaio.Credits(max_bytes=self.window_bytes)
        return c

    async def issue(self, server: str, nbytes: int, reads: int, op: Callable[[], Awaitable[None]]) -> None:
        """Run one read request of ``nbytes`` in ``reads`` reads on ``server``: credits, then load accounting."""
        credits = self.window(server)
        if credits is not None:
            await credits.acquire(nbytes)
        work = work_of(nbytes, reads)
        started = self.tracker.begin(server, work)
        ok = False
        try:
            await op()
            ok = True
        finally:
            self.tracker.end(server, work, started, ok)
            if credits is not None:
                credits.release(nbytes)


class Lanes:
    """A client's lanes and the one load tracker they share (module docstring)."""

    def __init__(self, peers: Peers, options: ClientOptions, metrics: LocalityMetrics) -> None:
        self.tracker = LoadTracker()
        self.bulk = ReadLane("bulk", peers, self.tracker, metrics, balanced=options.balanced_reads,
                             split_bytes=options.split_bytes, window_bytes=options.bulk_window_bytes)
        #: swap-in and predictive prefetch: bulk traffic (the same credit windows), a lane object of its own
        self.background = ReadLane("bulk", peers, self.tracker, metrics, balanced=options.balanced_reads,
                                   split_bytes=options.split_bytes, window_bytes=options.bulk_window_bytes)
        self.background.credits = self.bulk.credits
        #: moves the bulk endpoints between engine workers under skew (``remap_workers``)
        self.workers: WorkerMap | None = None
        if options.remap_workers:
            self.workers = WorkerMap(peers, self.tracker, metrics)
            self.bulk.on_batch = self.workers.tick
        self.priority: ReadLane | None = None
        if options.priority_lane:
            self.priority = ReadLane("priority", peers, self.tracker, metrics, balanced=options.balanced_reads,
                                     split_bytes=options.split_bytes, window_bytes=options.priority_window_bytes,
                                     endpoint_of=peers.priority_endpoint)
