"""Coherence: which rows a client may still use once the servers' rows changed.

Epochs (:attr:`Coherence.epoch`)
    Every invalidation -- :meth:`~flexemr.EmbeddingClient.invalidate`, an
    :meth:`~flexemr.EmbeddingClient.update` of this client, a shard whose
    ``GEN`` moved -- bumps the epoch.  A batch records the epoch it was sent
    in; one sent in an older epoch fills no cache and lends no rows to later
    lookups (in-flight dedup): it may have read a row before the change.

GEN tokens (versioned plans, cross-client coherence)
    Every update (of any client) commits a higher ``GEN`` on the shards it
    wrote before it is acknowledged (:mod:`flexemr.client.replica`).
    ``known_gen[region]`` is the :data:`GenToken` (replica, its incarnation,
    ``GEN``) the cached rows of that shard were read under: when a batch
    reads another token -- an update committed, reads moved to another
    replica, or the server restarted and counts from 0 again -- the shard's
    cached rows are dropped and the epoch is bumped (:meth:`Coherence.observe`).
    A lookup's cache hits are used only once a ``GEN`` read sent *after* the
    hits were taken matches the snapshot (:class:`GenCheck`); otherwise they
    are read again.

Members (:meth:`Coherence.check_members`)
    A writer that cannot reach a replica fences it; other clients may still
    reach it.  So every batch of a versioned plan reads the control words of
    each reachable replica of the shards it touches and takes rows only from
    the members of the highest-``GEN`` one.

The batcher (:mod:`flexemr.client.batcher`) does the reads; this module
holds the state and makes the decisions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import numpy as np
import numpy.typing as npt

from ..core.errors import TransportError
from ..core.plan import ShardingPlan
from ..core.versioned import Ctl
from .cache import ClientCache
from .peers import Peers, Route

__all__ = ["Coherence", "GenCheck", "GenToken"]

IntArray = npt.NDArray[np.int64]
#: A shard replica's GEN word as read: (server, server incarnation, GEN).  GEN
#: restarts at 0 with the server and differs between replicas mid-commit, so
#: only the whole token identifies a state of the shard.
GenToken = tuple[str, int, int]


class GenCheck:
    """Cache hits of one table waiting for their shards' GEN words (versioned plans).

    ``snap`` holds the token each shard's cached rows were filled under when
    the hits were taken; a hit is stale if the token read by a batch sent
    after that differs (:meth:`Coherence.moved`).
    """

    __slots__ = ("ids", "shard_of", "regions", "snap")

    def __init__(self, ids: IntArray, shard_of: IntArray, regions: dict[int, str],
                 snap: dict[str, GenToken | None]) -> None:
        self.ids = ids
        self.shard_of = shard_of
        self.regions = regions
        self.snap = snap


class Coherence:
    """Epochs, GEN tokens and members of one client (module docstring)."""

    def __init__(self, plan: ShardingPlan, peers: Peers, cache: ClientCache | None) -> None:
        self._plan = plan
        self._peers = peers
        self._cache = cache
        #: bumped by every invalidation: batches sent before it fill nothing and lend nothing
        self.epoch = 0
        #: versioned shard region -> the token its cached rows were read under
        self.known_gen: dict[str, GenToken] = {}

    def invalidate(self, table: str, phys: IntArray) -> int:
        """The servers' rows ``phys`` of ``table`` changed: new epoch, cached copies dropped (how many)."""
        self.epoch += 1
        return 0 if self._cache is None else self._cache.invalidate(table, phys)

    def snapshot(self, table: str, ids: IntArray) -> GenCheck | None:
        """What the cache hits ``ids`` were cached under (``None``: not versioned, or no hits)."""
        if not self._plan.versioned or ids.size == 0:
            return None
        shard_of = self._plan.route(table, ids)
        shards = self._plan.shards[table]
        regions = {i: shards[i].region_name for i in np.unique(shard_of).tolist()}
        return GenCheck(ids, shard_of, regions, {r: self.known_gen.get(r) for r in regions.values()})

    @staticmethod
    def moved(check: GenCheck, gens: Mapping[str, GenToken]) -> list[int]:
        """The shards (indices) of ``check`` whose token in ``gens`` differs from the snapshot."""
        return [i for i, r in check.regions.items() if gens.get(r) != check.snap[r]]

    def observe(self, gens: Mapping[str, GenToken]) -> None:
        """A batch read these GEN words: forget the cached rows of every shard whose GEN moved."""
        moved = [r for r, g in gens.items() if self.known_gen.get(r) != g]
        if not moved:
            return
        self.epoch += 1
        self.known_gen.update((r, gens[r]) for r in moved)
        if self._cache is not None:
            self._cache.drop_shards([self._peers.region_shard[r] for r in moved])

    async def check_members(
        self,
        allowed: dict[str, frozenset[str]],
        served: dict[str, list[Route]],
        ctls: Mapping[str, Mapping[str, Ctl]],
        row_regions: set[str],
        reread: Callable[[list[str]], Awaitable[dict[str, list[Route]]]],
    ) -> dict[str, Route]:
        """Versioned plans: keep only rows read from replicas in service; returns every region's token route.

        A writer that cannot reach a replica (its operation failed or timed out, its
        reconnection lags) fences it: the commit on the replicas it reached drops it from
        ``MEMBERS`` and raises ``GEN``, while other clients may still reach the fenced
        replica, which misses that update.  So a batch reads, after its lookups began, the
        control words ``ctls`` (region -> replica -> words) of every replica it can reach;
        the one with the highest ``GEN`` holds every update acknowledged before (invariant
        (c) of :mod:`flexemr.client.replica`), and only the replicas in its ``MEMBERS``
        hold them too: they are put in ``allowed`` (the batch's).  Rows of ``row_regions``
        read from any other replica are read again from one of those (``reread(regions)``,
        which returns the routes that served them); the client stops reading from the
        stale one and resyncs it in the background (:meth:`Peers.stale_replica`).
        ``served``: the routes each region's rows were read through (several when load-aware
        reads cut a shard's reads over its replicas: every one of them must be allowed).

        The *token route* of a region, whose ``GEN`` word the cache's tokens hold, is the
        first allowed replica in service (:meth:`Peers.pick`), whichever replica the rows
        came from: it holds every acknowledged update as much as they do, and being stable
        it does not drop the cache every time load-aware reads move.
        """
        region_shard = self._peers.region_shard
        for region, got in ctls.items():
            if not got:
                raise TransportError(f"shard {region}: no replica answered (replicas "
                                     f"{list(region_shard[region].replicas)})")
            auth = max(got.values(), key=lambda c: c.gen)
            replicas = region_shard[region].replicas
            allowed[region] = frozenset(s for i, s in enumerate(replicas) if auth.members >> i & 1 and s in got)
        stale = [r for r in row_regions if r in ctls and any(rt.server not in allowed[r] for rt in served[r])]
        if stale:
            for r in stale:
                for rt in served[r]:
                    if rt.server not in allowed[r]:
                        self._peers.stale_replica(r, rt.server)
            again = await reread(stale)
            bad = [r for r in stale if any(rt.server not in allowed[r] for rt in again.get(r, ()))]
            if bad:  # reread routes by `allowed`: only a replica failing meanwhile can land here
                raise TransportError(f"shard {bad[0]}: no replica in service could be read")
        return {region: self._peers.pick(region, allowed[region]) for region in ctls}
