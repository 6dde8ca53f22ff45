"""Pooled lookups (EmbeddingBag) on the ranker: :class:`Pooler` and the pooling RPC's :class:`PoolChannel`.

A pooled lookup (:meth:`~flexemr.EmbeddingClient.lookup_pooled`) splits, per
table and vectorised (:meth:`Pooler.plan_table`), the occurrences of a batch:

* cached rows (:mod:`flexemr.client.cache`) and rows read raw (through the
  batcher, :mod:`flexemr.client.batcher`) are pooled on the ranker;
* the other rows of a bag go, per ``(server, bag)``, either to raw reads or to
  a server-side pooling RPC on the ``"flexemr/pool"`` channel, by the byte
  cost model of :func:`~flexemr.core.pooling.choose_pooling`;

then the ranker's partial and the servers' are merged with
:func:`~flexemr.core.pooling.combine_partials` (:meth:`Pooler.combine`).

Wire format and framing: :mod:`flexemr.core.poolwire`; the server side:
:mod:`flexemr.server.pooling`.  A ranker opens one channel per server
(lazily, on its first pooled lookup) and keeps it for the life of the
client.  A pooling request that fails is served by raw reads pooled on the
ranker instead, and that server is paused (raw reads only) for a jittered,
doubling delay (``docs/locality.md``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core.errors import ClosedError, InputError, TransportError, UnknownTableError
from ..core.jagged import JaggedBatch
from ..core.metrics import LocalityMetrics
from ..core.plan import ShardingPlan
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
from ..core.poolwire import POOL_CHANNEL, Buffer, FrameAssembler, decode_response, encode_request, frames
from ..core.spec import TableSpec
from .batcher import Batcher, Request, unique_inverse
from .cache import ClientCache
from .coherence import Coherence
from .options import ClientOptions
from .peers import Peers
from .replica import Backoff

__all__ = ["PoolChannel", "PooledPlan", "Pooler", "send_message", "split_weights"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
#: One pooling request of a table: (server, touched bags, rows per touched bag, ids grouped by bag, weights).
Remote = tuple[str, IntArray, IntArray, IntArray, npt.NDArray[Any] | None]

#: rdmaio's per-message header (length, sequence), counted in the pooling byte metrics.
_CHANNEL_HEADER = 8


async def send_message(ch: rdmaio.Channel, req_id: int, parts: Sequence[Buffer]) -> int:
    """Send one logical message as frames; returns the bytes handed to the channel (headers included)."""
    sent = 0
    for head, frame in frames(req_id, parts, ch.max_message):
        await ch.send([head, *frame])
        sent += len(head) + _CHANNEL_HEADER + sum(f.nbytes for f in frame)
    return sent


class PoolChannel:
    """Client side of one server's pooling channel: pipelined calls, one reader task.

    ``await call(parts)`` sends a request and waits for its response; any number
    of calls may be outstanding (the channel's credits bound what is on the
    wire).  Bytes sent/received are added to ``metrics``.
    """

    def __init__(self, ch: rdmaio.Channel, metrics: LocalityMetrics) -> None:
        self.channel = ch
        self._metrics = metrics
        self._ids = itertools.count(1)
        self._futs: dict[int, asyncio.Future[bytes]] = {}
        self._error: BaseException | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        asm = FrameAssembler()
        try:
            async for frame in self.channel:
                self._metrics.pool_bytes_received += len(frame) + _CHANNEL_HEADER
                msg = asm.add(frame)
                if msg is not None:
                    fut = self._futs.pop(msg[0], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg[1])
            self._error = ClosedError("the server closed its pooling channel")
        except asyncio.CancelledError:
            self._error = ClosedError("pooling channel closed")
            raise
        except BaseException as exc:
            self._error = TransportError(f"pooling channel failed: {exc}")
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        futs, self._futs = self._futs, {}
        for f in futs.values():
            if not f.done():
                f.set_exception(self._error or ClosedError("pooling channel closed"))

    @property
    def broken(self) -> bool:
        return self._error is not None

    async def call(self, parts: Sequence[Buffer]) -> bytes:
        """Send one request and return its response message."""
        if self._error is not None:
            raise self._error
        rid = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._futs[rid] = fut
        try:
            self._metrics.pool_bytes_sent += await send_message(self.channel, rid, parts)
        except BaseException as exc:
            # the reader may have failed this future meanwhile (the channel closed while we
            # waited for credits): retrieve that, so it is not reported as never retrieved
            self._futs.pop(rid, None)
            if fut.done():
                if not fut.cancelled():
                    fut.exception()
            else:
                fut.cancel()
            if isinstance(exc, rdmaio.RdmaioError):
                raise TransportError(f"sending a pooling request failed: {exc}") from exc
            raise
        return await fut

    async def aclose(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        try:
            await self.channel.aclose()
        except rdmaio.RdmaioError:
            pass


# ------------------------------------------------------------ pooled lookups


def split_weights(batch: JaggedBatch, w: object | None, mode: str) -> dict[str, npt.NDArray[Any]]:
    """``per_sample_weights`` (one per id of the batch, or ``{table: weights}``) per table, checked."""
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


@dataclass
class PooledPlan:
    """How one table of a pooled lookup is served (built by :meth:`Pooler.plan_table`, vectorised)."""

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
    remote: list[Remote]                 # pooling requests to servers


class Pooler:
    """Pooled lookups of one client (module docstring)."""

    def __init__(self, plan: ShardingPlan, options: ClientOptions, metrics: LocalityMetrics, peers: Peers,
                 batcher: Batcher, coherence: Coherence, cache: ClientCache | None) -> None:
        self.plan = plan
        self.metrics = metrics
        self.peers = peers
        self.batcher = batcher
        self.coherence = coherence
        self.cache = cache
        self._slots = options.pool_slots
        self._slot_size = options.pool_slot_size
        self.channels: dict[str, PoolChannel] = {}
        self.refused: set[str] = set()
        self.pause: dict[str, tuple[float, Backoff]] = {}  # server -> (no pooling before, backoff)
        self.opening: asyncio.Task[None] | None = None
        self.server_index = {name: i for i, name in enumerate(plan.servers)}
        #: tables servers may pool: (band start rows, band server index); not replicated/updatable ones
        #: (raw reads only: failover, torn-row checks) nor column-split ones
        self.routes: dict[str, tuple[IntArray, IntArray]] = {}
        for table, shards in plan.shards.items():
            spec = plan.spec(table)
            if plan.versioned or any(sh.backups for sh in shards):
                continue
            if all(sh.col_start == 0 and sh.col_end == spec.dim for sh in shards):
                self.routes[table] = (np.array([sh.row_start for sh in shards], dtype=np.int64),
                                      np.array([self.server_index[sh.server] for sh in shards], dtype=np.int64))
        peers.on_failure.append(self._drop_channel)

    def _drop_channel(self, server: str) -> None:
        self.channels.pop(server, None)

    async def lookup(self, batch: JaggedBatch, mode: PoolMode, weights: Mapping[str, npt.NDArray[Any]],
                     reqs: list[Request], use_pool: bool, t0: float) -> dict[str, npt.NDArray[Any]]:
        """``{table: [batch_size, dim]}`` for validated physical ids ``reqs`` (one per key of ``batch``)."""
        if use_pool:
            await self.open_channels()
        m = self.metrics
        m.lookups += 1
        m.pooled_lookups += 1
        plans = [self.plan_table(t, spec, ids, batch.bag_offsets(t), weights.get(t), mode, use_pool)
                 for t, spec, ids in reqs]
        raw = [p for p in plans if p.raw.any()]
        rpcs = [(p, entry) for p in plans for entry in p.remote]
        # the GEN reads join the raw reads' batch: placed when their coroutine starts, after the raw one's
        checks = [(p, self.coherence.snapshot(p.table, p.uniq[p.hit])) for p in plans if p.hit_rows is not None]
        batcher = self.batcher
        try:
            coros: list[Any] = [batcher.fetch_unique([(p.table, p.spec, p.uniq[p.raw]) for p in raw], probe=False)]
            coros += [self.rpc(p, entry) for p, entry in rpcs]
            coros += [batcher.refresh_stale(p.table, p.spec, c, p.hit_rows) for p, c in checks
                      if c is not None and p.hit_rows is not None]
            results: list[Any] = await asyncio.gather(*coros, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            raw_rows = dict(zip((id(p) for p in raw), results[0]))
            remote: dict[int, list[PartialPool]] = {}
            for (p, _), part in zip(rpcs, results[1 : 1 + len(rpcs)]):
                remote.setdefault(id(p), []).append(part)
            out = {p.table: self.combine(p, raw_rows.get(id(p)), remote.get(id(p), [])) for p in plans}
        except BaseException:
            m.errors += 1
            raise
        m.lookup_latency.observe(time.perf_counter() - t0)
        return out

    def plan_table(
        self,
        table: str,
        spec: TableSpec,
        ids: IntArray,
        offsets: IntArray,
        weights: npt.NDArray[Any] | None,
        mode: PoolMode,
        use_pool: bool,
    ) -> PooledPlan:
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
            return PooledPlan(table, spec, mode, offsets, w, z, z, bag, nob, None, nob, z, [])
        uniq, inv = unique_inverse(ids, spec.num_rows)
        hit = np.zeros(uniq.size, dtype=bool)
        hit_rows = None
        local_u = hit
        cache = self.cache
        if cache is not None:
            hit, hit_rows, nh = cache.probe(table, uniq)
            m.unique_ids += nh  # the misses are counted when (and if) they are read
            local_u = hit | (np.bincount(inv, minlength=uniq.size) >= cache.admit)
        remote_occ = ~local_u[inv]
        pooled_occ = np.zeros(ids.size, dtype=bool)
        remote: list[Remote] = []
        route = self.routes.get(table)
        r_idx = np.flatnonzero(remote_occ)
        if use_pool and route is not None and r_idx.size:
            starts, band_server = route
            srv = band_server[np.searchsorted(starts, ids[r_idx], side="right") - 1]
            nsrv = len(self.plan.servers)
            rbag = bag[r_idx]
            counts = np.bincount(srv * nb + rbag, minlength=nsrv * nb).reshape(nsrv, nb)
            for name in self.refused | (set(self.plan.servers) - set(self.channels)) | self.paused():
                counts[self.server_index[name]] = 0  # no channel to that server: raw reads only
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
        return PooledPlan(table, spec, mode, offsets, w, uniq, inv, bag, hit, hit_rows, raw, local_occ, remote)

    async def rpc(self, p: PooledPlan, entry: Remote) -> PartialPool:
        """One ``(server, table)`` pooling request; returns the server's partial as a dense ``[B, dim]`` PartialPool."""
        server, touched, lengths, ids, w = entry
        spec = p.spec
        acc = accumulation_dtype(spec.np_dtype)
        ch = self.channels.get(server)
        try:
            if ch is None or ch.broken:
                raise TransportError(f"no pooling channel to server {server!r}")
            parts = encode_request(p.table, ids, lengths, w, p.mode, num_rows=spec.num_rows, weight_dtype=acc)
            values = decode_response(await ch.call(parts))
            if values.shape != (touched.size, spec.dim):
                raise TransportError(f"server {server!r} answered {values.shape} for {touched.size} bags")
            pause = self.pause.get(server)
            if pause is not None and time.monotonic() >= pause[0]:  # not a request sent before the pause
                del self.pause[server]
        except (TransportError, ClosedError) as exc:
            if self.peers.closed:
                raise
            # The pooling channel failed, which need not mean the rows are unreadable:
            # read them raw (failover applies) and pool them here, as the server would have.
            now = time.monotonic()
            until, backoff = self.pause.get(server) or (0.0, Backoff(0.5, 30.0))
            if until <= now:  # one warning per pause, not one per lookup
                delay = backoff.next()
                self.pause[server] = (now + delay, backoff)
                log.warning("server %s: pooling request failed (%s); its rows are pooled on the ranker "
                            "for the next %.1f s", server, exc, delay)
            self.metrics.pool_fallbacks += 1
            uniq, inv = unique_inverse(ids, spec.num_rows)
            (rows,) = await self.batcher.fetch_unique([(p.table, spec, uniq)], probe=False)
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

    @staticmethod
    def combine(p: PooledPlan, raw_rows: npt.NDArray[Any] | None, remote: list[PartialPool]) -> npt.NDArray[Any]:
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

    def paused(self) -> set[str]:
        """Servers whose pooling requests failed recently: raw reads only until their pause ends."""
        if not self.pause:
            return set()
        now = time.monotonic()
        return {s for s, (until, _) in self.pause.items() if until > now}

    async def open_channels(self) -> None:
        """Open the pooling channel to every server not tried yet (once; concurrent callers share the attempt)."""
        paused = self.paused()
        todo = [s for s in self.plan.servers
                if s not in self.refused and s not in paused and self.peers.peers[s].ep is not None
                and (s not in self.channels or self.channels[s].broken)]
        if not todo:
            return
        if self.opening is None or self.opening.done():
            assert self.peers.loop is not None
            self.opening = self.peers.loop.create_task(self._open(todo))
        opening = self.opening
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if opening.cancelled() and self.peers.closed and (task is None or not task.cancelling()):
                raise ClosedError("client closed while the lookup was in flight") from None  # aclose(), not us
            raise

    async def _open(self, servers: list[str]) -> None:
        async def one(server: str) -> None:
            old = self.channels.pop(server, None)
            if old is not None:
                await old.aclose()
            ep = self.peers.peers[server].ep
            if ep is None:
                return
            try:
                ch = await ep.channel(POOL_CHANNEL, slots=self._slots, slot_size=self._slot_size)
            except (rdmaio.EndpointBrokenError, rdmaio.ClosedError, rdmaio.TimeoutError) as exc:
                self.peers.peer_failed(server, exc, ep)
                return
            except rdmaio.RdmaioError as exc:  # e.g. transport without channels, or an old server
                log.warning("server %s: no pooling channel (%s); raw reads only", server, exc)
                self.refused.add(server)
                return
            self.channels[server] = PoolChannel(ch, self.metrics)

        await asyncio.gather(*(one(s) for s in servers))

    async def aclose(self) -> None:
        """Stop opening channels, close the open ones."""
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
            await asyncio.gather(self.opening, return_exceptions=True)
        for ch in self.channels.values():
            await ch.aclose()
        self.channels.clear()
