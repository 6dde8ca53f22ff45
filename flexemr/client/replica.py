"""Replicas: reconnect backoff, and the one-sided update and resync protocols of versioned shards.

Everything here runs on the ranker.  The server is passive: a versioned shard
replica is a registered region of slots plus a control block
(:mod:`flexemr.core.versioned`: ``LOCK``, ``GEN``, ``MEMBERS``), and a client
changes it only with rdmaio one-sided operations.

Update protocol (:meth:`ShardWriter.update`, per touched shard)
    1. take the client-local lock of the shard (one writer per shard per client);
    2. ``compare_swap(LOCK, 0 -> token)`` on every reachable replica, in replica
       order (a global order: no deadlock between writers); a lock already
       holding this client's token is ours (an earlier attempt whose reply was
       lost); a lock whose holder did not change for ``steal_after`` seconds is
       taken over (its writer is presumed dead);
    3. read the control words; the replica with the highest ``GEN`` is
       authoritative and its ``MEMBERS`` whose ``GEN`` equals it are the
       replicas in service (a restarted server has ``GEN = 0``).  A member
       this client is not connected to gets one chance to reconnect (the locks
       are released meanwhile); a member it still cannot reach is *fenced*;
    4. on every reachable member: read the row headers, write them with an odd
       version (``v | 1``: "writing"), then write the whole slots (data, zero
       padding, header with version ``(v | 1) + 1`` and the new checksum);
    5. commit: write ``GEN = auth + 1`` and ``MEMBERS = {replicas written}`` on
       every replica written (a replica that fails here is dropped and the
       commit repeated with ``GEN + 1``, so the survivors always hold the
       highest ``GEN``);
    6. release the locks (``compare_swap(LOCK, token -> 0)``).

    The update is acknowledged after 6; it fails (:class:`TransportError`) if
    no member could be written.  Invariants: (a) writers of a shard are
    serialised by ``LOCK`` on the lowest reachable member; (b) a reader accepts
    only even versions whose checksum matches, so it sees a row entirely
    before or entirely after a write; (c) every replica in service holds every
    acknowledged update, because a replica that missed one is no longer in the
    ``MEMBERS`` of the replica with the highest ``GEN``.

Resync protocol (:meth:`ShardWriter.sync`, when a server (re)connects)
    Read the control words of every reachable replica (lock-free first: if all
    agree on ``GEN`` and all are members there is nothing to do).  Otherwise,
    under the locks: replicas with a lower ``GEN`` or not in ``MEMBERS`` (a
    restarted server holds ``GEN = 0``; a server that was unreachable during an
    update was fenced) get a full copy of the shard's slots from an in-service
    replica, then all of them commit ``GEN + 1`` with the enlarged
    ``MEMBERS``.  Only replicas in service are returned: reads are routed
    to nothing else.

Failure model: fail-stop servers (crash, kill, hang).  Fencing is one
writer's decision: other clients may still reach a replica it fenced, so
readers check, per batch, that they read members of the highest-``GEN``
replica (:meth:`flexemr.client.coherence.Coherence.check_members`).  A partition that hides every
in-service replica of a shard from a reader but not a fenced one is not
handled.  An update is lost only if every in-service replica of its shard dies.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core.errors import ConfigError, FlexEMRError, InputError, TransportError
from ..core.metrics import ReliabilityMetrics
from ..core.plan import Shard, ShardingPlan, validate_ids
from ..core.versioned import (
    CTL_GEN,
    CTL_LOCK,
    HEADER_BYTES,
    Ctl,
    ctl_offset,
    pack_slots,
    slot_bytes,
    versions_of,
)

__all__ = ["Backoff", "ReplicaDown", "ReplicaHost", "ShardWriter", "check_update", "last_wins", "row_runs"]

log = logging.getLogger(__name__)

T = TypeVar("T")
IntArray = npt.NDArray[np.int64]
_U1 = np.uint64(1)
#: Bytes per single read/write of a shard copy.
_COPY_CHUNK = 32 << 20


def check_update(plan: ShardingPlan, table: str, ids: object, rows: object) -> tuple[IntArray, npt.NDArray[Any]]:
    """The ids and rows of an update of ``table`` (:meth:`flexemr.EmbeddingClient.update`), checked.

    :class:`UnknownTableError`, :class:`ConfigError` (plan not versioned),
    :class:`LookupIdError` or :class:`InputError` (``rows`` not an ndarray of
    the table dtype and shape ``[len(ids), dim]``).
    """
    spec = plan.spec(table)
    if not plan.versioned:
        raise ConfigError(f"table {table!r} is not updatable: the plan is not versioned "
                          f"(ShardingPlan.row_wise(..., versioned=True) or [sharding] versioned = true)")
    arr = validate_ids(spec, ids)
    if not isinstance(rows, np.ndarray):
        raise InputError(f"table {table!r}: rows must be a numpy array, got {type(rows).__name__}")
    if rows.dtype != spec.np_dtype:
        raise InputError(f"table {table!r}: rows must have dtype {spec.np_dtype.name}, got {rows.dtype}")
    if rows.shape != (arr.size, spec.dim):
        raise InputError(f"table {table!r}: rows must have shape ({arr.size}, {spec.dim}), got {rows.shape}")
    return arr, rows


def last_wins(ids: IntArray, rows: npt.NDArray[Any]) -> tuple[IntArray, npt.NDArray[Any]]:
    """Sorted unique ``ids`` and, for each, its row of the last occurrence.

    >>> [a.tolist() for a in last_wins(np.array([5, 2, 5]), np.array([[1], [2], [3]]))]
    [[2, 5], [[2], [3]]]
    """
    uniq, last_rev = np.unique(ids[::-1], return_index=True)
    return uniq, rows[ids.size - 1 - last_rev]


class Backoff:
    """Exponential, capped, jittered delays: ``min(cap, base * 2**n) * U(0.5, 1)``.

    >>> b = Backoff(0.1, 0.4, random.Random(1))
    >>> [0.05 <= b.next() <= 0.1, 0.1 <= b.next() <= 0.2, 0.2 <= b.next() <= 0.4, b.next() <= 0.4]
    [True, True, True, True]
    """

    def __init__(self, base: float = 0.05, cap: float = 2.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self._n = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The next delay (seconds)."""
        d = min(self.cap, self.base * (1 << min(self._n, 30)))
        self._n += 1
        return d * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        """Back to ``base`` (after a success)."""
        self._n = 0


def row_runs(local: IntArray) -> tuple[IntArray, IntArray]:
    """``(first position, length)`` of the runs of consecutive values in sorted ``local``.

    >>> [a.tolist() for a in row_runs(np.array([3, 4, 5, 9, 11, 12]))]
    [[0, 3, 4], [3, 1, 2]]
    """
    if local.size == 0:
        return local, local
    starts = np.concatenate(([0], np.flatnonzero(np.diff(local) != 1) + 1)).astype(np.int64)
    lengths = np.diff(np.concatenate((starts, [local.size]))).astype(np.int64)
    return starts, lengths


class ReplicaDown(Exception):
    """Internal: one replica could not be used (the host was told and reconnects in the background)."""


class ReplicaHost(Protocol):
    """What :class:`ShardWriter` needs from the client."""

    @property
    def engine(self) -> rdmaio.Engine: ...

    def replica_endpoint(self, server: str) -> rdmaio.Endpoint | None:
        """The live endpoint to ``server`` (``None`` while it is down)."""

    def replica_key(self, server: str, region: str) -> rdmaio.RemoteKey | None:
        """The key of ``region`` on ``server`` (``None`` while it is down)."""

    def peer_failed(self, server: str, exc: BaseException) -> None:
        """Report a failed operation: the host drops the endpoint and reconnects with backoff."""

    async def wait_connected(self, server: str, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``server`` is connected again; True if it is."""


class ShardWriter:
    """The update and resync protocols of versioned shards (module docstring)."""

    def __init__(self, host: ReplicaHost, plan: ShardingPlan, *, token: int, lock_timeout: float = 10.0,
                 steal_after: float = 5.0, reconnect_wait: float = 2.0) -> None:
        if not 0 < token < 1 << 64:
            raise ValueError("token must be a non-zero u64")
        self._host = host
        self._plan = plan
        self.token = token
        self.lock_timeout = lock_timeout
        self.steal_after = steal_after
        self.reconnect_wait = reconnect_wait
        self._local: dict[str, asyncio.Lock] = {}
        #: called as a resync copies a shard: ``(region, bytes copied, bytes to copy)`` (read from the
        #: in-sync replica plus written to each lagging one); ``None``: not called
        self.on_copy: Callable[[str, int, int], None] | None = None
        self.copies = 0          # shard copies made by resync
        self.fenced = 0          # replicas dropped from MEMBERS by this client
        self.steals = 0          # locks taken over from a silent holder

    # -------------------------------------------------------------- plumbing

    def _local_lock(self, region: str) -> asyncio.Lock:
        lk = self._local.get(region)
        if lk is None:
            lk = self._local[region] = asyncio.Lock()
        return lk

    async def _on(self, server: str, region: str,
                  op: Callable[[rdmaio.Endpoint, rdmaio.RemoteKey], Awaitable[T]]) -> T:
        """Run one operation on a replica; any rdmaio failure -> :class:`ReplicaDown` (host told)."""
        ep = self._host.replica_endpoint(server)
        key = self._host.replica_key(server, region)
        if ep is None or key is None:
            raise ReplicaDown(server)
        try:
            return await op(ep, key)
        except rdmaio.RdmaioError as exc:
            self._host.peer_failed(server, exc)
            raise ReplicaDown(server) from exc

    def _buffer(self, arr: npt.NDArray[Any]) -> rdmaio.MemoryRegion:
        return self._host.engine.register(arr, access=rdmaio.Access.NONE)

    async def _gather_ok(self, servers: Sequence[str], make: Callable[[str], Awaitable[T]]) -> dict[str, T]:
        """Run ``make(server)`` on all servers concurrently; the ones that raised ReplicaDown are left out."""
        results = await asyncio.gather(*(make(s) for s in servers), return_exceptions=True)
        out: dict[str, T] = {}
        for s, r in zip(servers, results):
            if isinstance(r, ReplicaDown):
                continue
            if isinstance(r, BaseException):
                raise r
            out[s] = r
        return out

    # ----------------------------------------------------------------- locks

    async def _lock_one(self, shard: Shard, server: str, deadline: float) -> None:
        spec = self._plan.spec(shard.table)
        off = ctl_offset(spec, shard.num_rows) + CTL_LOCK
        region = shard.region_name
        seen, since = -1, time.monotonic()
        delay = 2e-4
        while True:
            old = await self._on(server, region, lambda ep, k: ep.compare_swap(k, off, 0, self.token))
            if old in (0, self.token):
                return
            now = time.monotonic()
            if old != seen:
                seen, since = old, now
            elif now - since > self.steal_after:
                got = await self._on(server, region, lambda ep, k: ep.compare_swap(k, off, old, self.token))
                if got == old:
                    self.steals += 1
                    log.warning("shard %s on %s: lock held by %#x for %.1f s; taken over", region, server, old,
                                now - since)
                    return
            if now > deadline:
                raise TransportError(f"shard {region} on {server}: lock busy for {self.lock_timeout} s")
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 0.02)

    async def _lock_all(self, shard: Shard, servers: Sequence[str], deadline: float) -> list[str]:
        """Lock ``servers`` in replica order; replicas that fail are skipped (reported down)."""
        locked: list[str] = []
        try:
            for s in shard.replicas:
                if s in servers:
                    try:
                        await self._lock_one(shard, s, deadline)
                    except ReplicaDown:
                        continue
                    locked.append(s)
        except BaseException:
            await self._unlock_all(shard, locked)
            raise
        return locked

    async def _unlock_all(self, shard: Shard, servers: Sequence[str]) -> None:
        spec = self._plan.spec(shard.table)
        off = ctl_offset(spec, shard.num_rows) + CTL_LOCK

        async def one(s: str) -> int:
            return await self._on(s, shard.region_name, lambda ep, k: ep.compare_swap(k, off, self.token, 0))

        await asyncio.shield(self._gather_ok(servers, one))

    # ----------------------------------------------------------- control words

    async def _read_ctls(self, shard: Shard, servers: Sequence[str]) -> dict[str, Ctl]:
        spec = self._plan.spec(shard.table)
        off = ctl_offset(spec, shard.num_rows)

        async def one(s: str) -> Ctl:
            buf = np.zeros(3, dtype=np.uint64)
            with self._buffer(buf) as mr:
                await self._on(s, shard.region_name, lambda ep, k: ep.read(mr, 0, k, off, 24))
            return Ctl(int(buf[0]), int(buf[1]), int(buf[2]))

        return await self._gather_ok(servers, one)

    async def _commit(self, shard: Shard, servers: list[str], gen: int) -> list[str]:
        """Write ``GEN``/``MEMBERS`` on ``servers`` until every survivor holds the same, newest pair."""
        spec = self._plan.spec(shard.table)
        off = ctl_offset(spec, shard.num_rows) + CTL_GEN
        while True:
            mask = sum(1 << shard.replicas.index(s) for s in servers)
            words = np.array([gen, mask], dtype=np.uint64)

            async def one(s: str) -> None:
                with self._buffer(words) as mr:
                    await self._on(s, shard.region_name, lambda ep, k: ep.write(mr, 0, k, off, 16))

            ok = await self._gather_ok(servers, one)
            if len(ok) == len(servers):
                return servers
            if not ok:
                raise TransportError(f"shard {shard.region_name}: no replica took the commit")
            self.fenced += len(servers) - len(ok)
            servers = [s for s in servers if s in ok]
            gen += 1

    @staticmethod
    def _members(shard: Shard, ctl: Ctl) -> list[str]:
        return [s for i, s in enumerate(shard.replicas) if ctl.members >> i & 1]

    # ---------------------------------------------------------------- update

    async def update(self, shard: Shard, rows: IntArray, data: npt.NDArray[Any]) -> int:
        """Write sorted unique table rows ``rows`` (values ``data``) to every member replica of ``shard``.

        Returns the number of replicas written; :class:`TransportError` if none.
        """
        region = shard.region_name
        waited: set[str] = set()
        async with self._local_lock(region):
            deadline = time.monotonic() + self.lock_timeout
            while True:
                connected = [s for s in shard.replicas if self._host.replica_endpoint(s) is not None]
                missing: list[str] = []
                locked = await self._lock_all(shard, connected, deadline)
                try:
                    ctls = await self._read_ctls(shard, locked)
                    if not ctls:
                        raise TransportError(f"shard {region}: no replica reachable "
                                             f"(replicas {list(shard.replicas)})")
                    auth = max(ctls.values(), key=lambda c: c.gen)
                    members = self._members(shard, auth)
                    missing = [s for s in members if s not in ctls and s not in waited]
                    if not missing:
                        # a member whose GEN lags (restarted, or missed a commit) is fenced; resync copies it
                        targets = [s for s in members if s in ctls and ctls[s].gen == auth.gen]
                        if not targets:
                            raise TransportError(f"shard {region}: no replica in service is reachable")
                        written = await self._gather_ok(
                            targets, lambda s: self._write_rows(shard, s, rows, data))
                        if not written:
                            raise TransportError(f"shard {region}: the update reached no replica")
                        ok = [s for s in targets if s in written]
                        self.fenced += len(members) - len(ok)
                        done = await self._commit(shard, ok, auth.gen + 1)
                        return len(done)
                finally:
                    await self._unlock_all(shard, locked)
                waited.update(missing)
                await asyncio.gather(*(self._host.wait_connected(s, self.reconnect_wait) for s in missing))

    async def update_table(self, table: str, rows: IntArray, data: npt.NDArray[Any],
                           reliability: ReliabilityMetrics) -> None:
        """:meth:`update` every shard of ``table`` that sorted unique ``rows`` touch, concurrently.

        Raises the first failure (a :class:`TransportError` for anything not a
        flexemr error); counted in ``reliability`` (``updates``, ``rows_updated``,
        ``failed_updates``).
        """
        shard_of = self._plan.route(table, rows)
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        bounds = zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [rows.size])).tolist())
        shards = self._plan.shards[table]
        results = await asyncio.gather(
            *(self.update(shards[int(shard_of[lo])], rows[lo:hi], data[lo:hi]) for lo, hi in bounds),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                reliability.failed_updates += 1
                if isinstance(r, (FlexEMRError, asyncio.CancelledError)):
                    raise r
                raise TransportError(f"update of table {table!r} failed: {r}") from r
        reliability.updates += 1
        reliability.rows_updated += int(rows.size)

    async def _write_rows(self, shard: Shard, server: str, rows: IntArray, data: npt.NDArray[Any]) -> None:
        spec = self._plan.spec(shard.table)
        region = shard.region_name
        slot = slot_bytes(spec)
        n = int(rows.size)
        local = rows - shard.row_start
        hdr_off = local * slot
        idx8 = np.arange(n, dtype=np.int64) * HEADER_BYTES
        eight = np.full(n, HEADER_BYTES, dtype=np.int64)
        headers = np.zeros(n, dtype=np.uint64)
        with self._buffer(headers) as mr:
            await self._on(server, region, lambda ep, k: ep.read_batch(mr, idx8, k, hdr_off, eight))
        versions = versions_of(headers.view(np.uint8).reshape(n, HEADER_BYTES))
        odd = versions | _U1
        marks = odd.copy()  # checksum 0 + odd version: "a writer is at work"
        with self._buffer(marks) as mr:
            await self._on(server, region, lambda ep, k: ep.write_batch(mr, idx8, k, hdr_off, eight))
        slots = pack_slots(spec, data, rows, odd + _U1)
        first, count = row_runs(local)
        with self._buffer(slots.reshape(-1)) as mr:
            await self._on(server, region, lambda ep, k: ep.write_batch(
                mr, first * slot, k, local[first] * slot, count * slot))

    # ---------------------------------------------------------------- resync

    async def sync(self, shard: Shard) -> list[str]:
        """Bring every reachable replica of ``shard`` in sync; returns the replicas in service (replica order)."""
        region = shard.region_name
        async with self._local_lock(region):
            connected = [s for s in shard.replicas if self._host.replica_endpoint(s) is not None]
            if len(shard.replicas) == 1 or not connected:
                return connected
            ctls = await self._read_ctls(shard, connected)
            if ctls:
                auth = max(ctls.values(), key=lambda c: c.gen)
                members = self._members(shard, auth)
                if all(c.gen == auth.gen for c in ctls.values()) and all(s in members for s in ctls):
                    return [s for s in shard.replicas if s in ctls]
            locked = await self._lock_all(shard, list(ctls), time.monotonic() + self.lock_timeout)
            try:
                ctls = await self._read_ctls(shard, locked)
                if not ctls:
                    return []
                auth_server = max(ctls, key=lambda s: ctls[s].gen)
                auth = ctls[auth_server]
                members = self._members(shard, auth)
                insync = [s for s in shard.replicas if s in ctls and ctls[s].gen == auth.gen and s in members]
                if auth_server not in insync:
                    insync.insert(0, auth_server)
                lag = [s for s in shard.replicas if s in ctls and s not in insync]
                if not lag:
                    return insync
                source = insync[0]
                total = ctl_offset(self._plan.spec(shard.table), shard.num_rows) * (1 + len(lag))
                moved = 0

                def tick(n: int) -> None:
                    nonlocal moved
                    moved += n
                    if self.on_copy is not None:
                        self.on_copy(region, moved, total)

                image = await self._read_image(shard, source, tick)
                if image is None:
                    return [s for s in insync if s != source]
                copied = await self._gather_ok(lag, lambda s: self._write_image(shard, s, image, tick))
                self.copies += len(copied)
                log.info("shard %s: copied %d bytes from %s to %s", region, image.size, source, sorted(copied))
                final = [s for s in shard.replicas if s in insync or s in copied]
                done = await self._commit(shard, final, auth.gen + 1)
                return [s for s in shard.replicas if s in done]
            finally:
                await self._unlock_all(shard, locked)

    async def _read_image(self, shard: Shard, server: str,
                          tick: Callable[[int], None] | None = None) -> npt.NDArray[np.uint8] | None:
        spec = self._plan.spec(shard.table)
        size = ctl_offset(spec, shard.num_rows)
        image = np.empty(size, dtype=np.uint8)
        with self._buffer(image) as mr:
            try:
                for lo in range(0, size, _COPY_CHUNK):
                    n = min(_COPY_CHUNK, size - lo)
                    await self._on(server, shard.region_name, lambda ep, k: ep.read(mr, lo, k, lo, n))
                    if tick is not None:
                        tick(n)
            except ReplicaDown:
                return None
        return image

    async def _write_image(self, shard: Shard, server: str, image: npt.NDArray[np.uint8],
                           tick: Callable[[int], None] | None = None) -> None:
        with self._buffer(image) as mr:
            for lo in range(0, image.size, _COPY_CHUNK):
                n = min(_COPY_CHUNK, image.size - lo)
                await self._on(server, shard.region_name, lambda ep, k: ep.write(mr, lo, k, lo, n))
                if tick is not None:
                    tick(n)
