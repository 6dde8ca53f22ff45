"""Hierarchical pooling over an rdmaio channel: wire format, server service, client stub, metrics.

Every :class:`~flexemr.EmbeddingServer` serves the message channel
:data:`POOL_CHANNEL` (``"flexemr/pool"``).  A ranker opens one channel per
server (lazily, on its first pooled sub-request) and keeps it for the life of
the client.  One *pooling request* covers one ``(server, table)``
sub-request: the ids of the rows the server holds, grouped by bag, optional
per-row weights and the reduction; the server answers with one partial row
per bag it was asked about (:func:`~flexemr._pooling.server_partial_pool`),
which the ranker merges with :func:`~flexemr._pooling.combine_partials`.

Framing
    A logical message (request or response) may be larger than a channel
    slot.  It is cut into *frames* of at most ``slot_size - 8 - 12`` payload
    bytes; each frame is one channel message starting with :data:`FRAME`
    ``(request id u32, frame index u32, frame count u32)``.  Frames of
    concurrent requests may interleave on the channel; the receiver
    reassembles by request id (:class:`FrameAssembler`).  So there is no limit
    on a request's size other than memory; the slot size only sets the frame
    size.  Several requests are in flight per channel (one credit per slot);
    responses come back in the order the server finishes them.

Request (little-endian, no pickle; each array section padded to 8 bytes)::

    REQUEST  "FXPQ" u8 version=1, u8 op (0 = sum, 1 = max), u8 flags, u8 len(table),
             u32 n (rows), u32 k (bags)
    table    utf-8 name, padded
    ids      n x (u32 if flags & IDS32 else i64)      rows, grouped by bag (bag order)
    weights  n x (f64 if flags & W64 else f32)        only if flags & WEIGHTS
    lengths  k x u32                                  rows of each bag, in request order

Response::

    RESPONSE "FXPR" u8 status (0 ok, 1 error), u8 dtype (0 f32, 1 f64), u16 0, u32 k, u32 dim
    values   k x dim of dtype                         partial sums (op 0) or maxima (op 1)
    (status 1: the payload is a utf-8 error message)

Counts need not travel back: the ranker knows how many rows it sent per bag.

>>> req = encode_request("t", np.array([5, 9, 2]), np.array([2, 1]), None, "sum", num_rows=10)
>>> d = decode_request(b"".join(bytes(p) for p in req))
>>> d.table, d.ids.tolist(), d.lengths.tolist(), d.op
('t', [5, 9, 2], [2, 1], 'sum')
>>> resp = encode_response(np.ones((2, 3), np.float32))
>>> decode_response(b"".join(bytes(p) for p in resp)).tolist()
[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import rdmaio

from ._errors import ClosedError, InputError, TransportError
from ._metrics import ClientMetrics
from ._plan import Shard, ShardingPlan
from ._pooling import accumulation_dtype, server_partial_pool

__all__ = [
    "FRAME",
    "POOL_CHANNEL",
    "FrameAssembler",
    "LocalityMetrics",
    "PoolChannel",
    "PoolRequest",
    "PoolService",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "send_message",
]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]

#: Name of the channel every embedding server serves for pooling requests.
POOL_CHANNEL = "flexemr/pool"
#: Frame header: request id, frame index, frame count.
FRAME = struct.Struct("<III")
_REQ = struct.Struct("<4sBBBBII")
_RESP = struct.Struct("<4sBBHII")
_REQ_MAGIC = b"FXPQ"
_RESP_MAGIC = b"FXPR"
_VERSION = 1
_F_WEIGHTS, _F_IDS32, _F_W64 = 1, 2, 4
_OPS = {"sum": 0, "mean": 0, "max": 1}
_CHANNEL_HEADER = 8  # rdmaio's per-message header (length, sequence)

Buffer = bytes | bytearray | memoryview


def _pad(n: int) -> bytes:
    return bytes(-n % 8)


# ------------------------------------------------------------------ encoding


def encode_request(
    table: str,
    ids: npt.NDArray[Any],
    lengths: npt.NDArray[Any],
    weights: npt.NDArray[Any] | None,
    mode: str,
    *,
    num_rows: int,
    weight_dtype: npt.DTypeLike = np.float32,
) -> list[Buffer]:
    """The buffers of one pooling request (module docstring); ``ids`` grouped by bag, ``lengths`` per bag."""
    name = table.encode()
    if len(name) > 255:
        raise InputError(f"table name {table!r} is longer than 255 bytes")
    flags = 0
    if num_rows <= 1 << 32:
        flags |= _F_IDS32
        id_arr = np.ascontiguousarray(ids, dtype=np.uint32)
    else:
        id_arr = np.ascontiguousarray(ids, dtype=np.int64)
    parts: list[Buffer] = [b"", name, _pad(len(name)), id_arr.data.cast("B"), _pad(id_arr.nbytes)]
    if weights is not None:
        flags |= _F_WEIGHTS
        wdt = np.dtype(weight_dtype)
        if wdt == np.float64:
            flags |= _F_W64
        w = np.ascontiguousarray(weights, dtype=np.float64 if wdt == np.float64 else np.float32)
        parts += [w.data.cast("B"), _pad(w.nbytes)]
    parts.append(np.ascontiguousarray(lengths, dtype=np.uint32).data.cast("B"))
    parts[0] = _REQ.pack(_REQ_MAGIC, _VERSION, _OPS[mode], flags, len(name), id_arr.size, lengths.size)
    return parts


@dataclass(frozen=True)
class PoolRequest:
    """A decoded pooling request."""

    table: str
    ids: IntArray
    lengths: IntArray
    weights: npt.NDArray[Any] | None
    op: str


def decode_request(data: Buffer) -> PoolRequest:
    """Parse a request; :class:`InputError` when malformed."""
    buf = memoryview(data).cast("B")
    if buf.nbytes < _REQ.size:
        raise InputError("pooling request too short")
    magic, version, op, flags, name_len, n, k = _REQ.unpack_from(buf, 0)
    if magic != _REQ_MAGIC or version != _VERSION or op not in (0, 1):
        raise InputError("not a flexemr pooling request (bad magic, version or op)")
    pos = _REQ.size
    table = bytes(buf[pos : pos + name_len]).decode()
    pos += name_len + (-name_len % 8)
    id_dt = np.dtype(np.uint32 if flags & _F_IDS32 else np.int64)
    w_dt = np.dtype(np.float64 if flags & _F_W64 else np.float32)
    need = pos + n * id_dt.itemsize + (-(n * id_dt.itemsize) % 8) + 4 * k
    if flags & _F_WEIGHTS:
        need += n * w_dt.itemsize + (-(n * w_dt.itemsize) % 8)
    if buf.nbytes != need:
        raise InputError(f"pooling request of {buf.nbytes} bytes, its header implies {need}")
    ids = np.frombuffer(buf, dtype=id_dt, count=n, offset=pos).astype(np.int64)
    pos += n * id_dt.itemsize
    pos += -pos % 8
    weights = None
    if flags & _F_WEIGHTS:
        weights = np.frombuffer(buf, dtype=w_dt, count=n, offset=pos)
        pos += n * w_dt.itemsize
        pos += -pos % 8
    lengths = np.frombuffer(buf, dtype=np.uint32, count=k, offset=pos).astype(np.int64)
    if int(lengths.sum()) != n:
        raise InputError(f"bag lengths sum to {int(lengths.sum())}, the request has {n} rows")
    return PoolRequest(table, ids, lengths, weights, "max" if op == 1 else "sum")


def encode_response(values: npt.NDArray[Any]) -> list[Buffer]:
    """The buffers of an ok response carrying ``values`` ``[k, dim]`` (float32 or float64)."""
    v = np.ascontiguousarray(values)
    code = 1 if v.dtype == np.float64 else 0
    if code == 0 and v.dtype != np.float32:
        v = v.astype(np.float32)
    k, dim = v.shape
    return [_RESP.pack(_RESP_MAGIC, 0, code, 0, k, dim), v.data.cast("B")]


def encode_error(message: str) -> list[Buffer]:
    """The buffers of an error response."""
    return [_RESP.pack(_RESP_MAGIC, 1, 0, 0, 0, 0), message.encode()]


def decode_response(data: Buffer) -> npt.NDArray[Any]:
    """The ``[k, dim]`` values of a response; :class:`TransportError` for an error response."""
    buf = memoryview(data).cast("B")
    if buf.nbytes < _RESP.size:
        raise TransportError("pooling response too short")
    magic, status, code, _, k, dim = _RESP.unpack_from(buf, 0)
    if magic != _RESP_MAGIC:
        raise TransportError("not a flexemr pooling response")
    if status != 0:
        raise TransportError(f"server pooling failed: {bytes(buf[_RESP.size:]).decode(errors='replace')}")
    dt = np.dtype(np.float64 if code == 1 else np.float32)
    if buf.nbytes != _RESP.size + k * dim * dt.itemsize:
        raise TransportError("pooling response has the wrong size")
    out: npt.NDArray[Any] = np.frombuffer(buf, dtype=dt, count=k * dim, offset=_RESP.size).reshape(k, dim)
    return out


# ------------------------------------------------------------------- framing


def _frames(parts: Sequence[Buffer], max_payload: int) -> Iterator[list[memoryview]]:
    """Cut the concatenation of ``parts`` into frames of at most ``max_payload`` bytes (no copies)."""
    views = [memoryview(p).cast("B") for p in parts]
    frame: list[memoryview] = []
    room = max_payload
    yielded = False
    for v in views:
        while v.nbytes:
            take = v[:room]
            frame.append(take)
            room -= take.nbytes
            v = v[take.nbytes :]
            if room == 0:
                yield frame
                yielded = True
                frame, room = [], max_payload
    if frame or not yielded:
        yield frame


async def send_message(ch: rdmaio.Channel, req_id: int, parts: Sequence[Buffer]) -> int:
    """Send one logical message as frames; returns the bytes handed to the channel (headers included)."""
    max_payload = ch.max_message - FRAME.size
    total = sum(memoryview(p).nbytes for p in parts)
    count = max(1, -(-total // max_payload))
    sent = 0
    for i, frame in enumerate(_frames(parts, max_payload)):
        head = FRAME.pack(req_id, i, count)
        await ch.send([head, *frame])
        sent += FRAME.size + _CHANNEL_HEADER + sum(f.nbytes for f in frame)
    return sent


class FrameAssembler:
    """Reassembles frames into logical messages, per request id.

    >>> fa = FrameAssembler()
    >>> fa.add(FRAME.pack(7, 0, 2) + b"ab"), fa.add(FRAME.pack(7, 1, 2) + b"c")
    (None, (7, b'abc'))
    """

    def __init__(self) -> None:
        self._parts: dict[int, list[bytes]] = {}

    def add(self, frame: bytes) -> tuple[int, bytes] | None:
        """Add one frame; returns ``(request id, message)`` when a message is complete."""
        if len(frame) < FRAME.size:
            raise TransportError("pooling frame too short")
        rid, idx, count = FRAME.unpack_from(frame, 0)
        if count == 1 and idx == 0:
            return rid, frame[FRAME.size :]
        got = self._parts.setdefault(rid, [])
        if idx != len(got) or idx >= count:
            raise TransportError(f"pooling frame {idx}/{count} of request {rid} out of order")
        got.append(frame[FRAME.size :])
        if len(got) < count:
            return None
        del self._parts[rid]
        return rid, b"".join(got)


# ------------------------------------------------------------ server service


class PoolService:
    """Server side: answers pooling requests from the shard arrays a server holds.

    Only full-width shards (all columns) take part; a request naming a table
    whose rows this server does not hold in full width is an error response.

    >>> from flexemr._spec import TableSpec
    >>> plan = ShardingPlan.row_wise([TableSpec("t", 4, 2)], ["s0", "s1"])
    >>> sh = plan.shards["t"][1]                         # rows 2..3 on s1
    >>> svc = PoolService(plan, [sh], {sh.region_name: np.array([[1., 2.], [3., 4.]], np.float32)})
    >>> req = encode_request("t", np.array([2, 3, 3]), np.array([2, 1]), None, "sum", num_rows=4)
    >>> decode_response(b"".join(bytes(p) for p in svc.handle(b"".join(bytes(p) for p in req)))).tolist()
    [[4.0, 6.0], [3.0, 4.0]]
    """

    def __init__(self, plan: ShardingPlan, shards: Sequence[Shard], arrays: dict[str, npt.NDArray[Any]]) -> None:
        by_table: dict[str, list[Shard]] = {}
        for sh in shards:
            if sh.col_start == 0 and sh.col_end == plan.spec(sh.table).dim:
                by_table.setdefault(sh.table, []).append(sh)
        self._plan = plan
        self._tables: dict[str, tuple[IntArray, IntArray, list[npt.NDArray[Any]]]] = {}
        for table, lst in by_table.items():
            lst.sort(key=lambda s: s.row_start)
            self._tables[table] = (np.array([s.row_start for s in lst], dtype=np.int64),
                                   np.array([s.row_end for s in lst], dtype=np.int64),
                                   [arrays[s.region_name] for s in lst])
        self.requests = 0

    def _gather(self, table: str, ids: IntArray) -> npt.NDArray[Any]:
        entry = self._tables.get(table)
        if entry is None:
            raise InputError(f"this server holds no full-width rows of table {table!r}")
        starts, ends, arrays = entry
        if len(arrays) == 1:
            local = ids - starts[0]
            if ids.size and (int(local.min()) < 0 or int(ids.max()) >= int(ends[0])):
                raise InputError(f"table {table!r}: ids outside this server's rows")
            return arrays[0][local]
        band = np.searchsorted(starts, ids, side="right") - 1
        if ids.size and (int(band.min()) < 0 or bool((ids >= ends[np.maximum(band, 0)]).any())):
            raise InputError(f"table {table!r}: ids outside this server's rows")
        spec = self._plan.spec(table)
        out = np.empty((ids.size, spec.dim), dtype=spec.np_dtype)
        for i, arr in enumerate(arrays):  # bands of this server: a handful
            m = band == i
            out[m] = arr[ids[m] - starts[i]]
        return out

    def handle(self, data: Buffer) -> list[Buffer]:
        """Answer one request (error responses for bad requests)."""
        self.requests += 1
        try:
            req = decode_request(data)
            spec = self._plan.spec(req.table)
            rows = self._gather(req.table, req.ids)
            k = req.lengths.size
            bags = np.repeat(np.arange(k, dtype=np.int64), req.lengths)
            part = server_partial_pool(rows, bags, k, req.weights, with_max=req.op == "max",
                                       dtype=accumulation_dtype(spec.np_dtype))
            values = part.max if req.op == "max" else part.sum
            assert values is not None
            return encode_response(values)
        except Exception as exc:  # a bad request must not kill the channel
            return encode_error(f"{type(exc).__name__}: {exc}")

    async def serve(self, ch: rdmaio.Channel) -> None:
        """The channel handler: requests in, responses out, until the peer closes."""
        asm = FrameAssembler()
        try:
            async for frame in ch:
                msg = asm.add(frame)
                if msg is not None:
                    await send_message(ch, msg[0], self.handle(msg[1]))
        except (rdmaio.RdmaioError, TransportError) as exc:
            log.debug("pooling channel ended: %s", exc)


# ------------------------------------------------------------- client stub


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


# ------------------------------------------------------------------- metrics


@dataclass
class LocalityMetrics(ClientMetrics):
    """:class:`~flexemr.ClientMetrics` plus the cache, pooling and prefetch counters.

    Extra counters (cumulative)::

        cache_hits           unique ids per call served from the ranker cache
        cache_misses         unique ids per call looked up in the cache and not found
        cache_inserts        rows inserted into the cache (fills after reads)
        cache_evictions      rows evicted (capacity pressure or adaptive shrink)
        cache_invalidations  cached rows dropped by invalidate(), update() or a shard's GEN change
        cache_stale_hits     cached rows of versioned shards found stale (the shard's GEN moved) and
                             read again; counted in cache_misses, not cache_hits
        cache_resizes        adaptive capacity changes applied
        cache_capacity       current capacity in rows (a gauge)
        pooled_lookups       lookup_pooled calls
        pooled_subrequests   (server, table) sub-requests sent as pooling RPCs
        raw_subrequests      (server, table) sub-requests served by one-sided reads
        pooled_bags          (server, bag) partials computed by servers
        pooled_rows          rows pooled on servers (occurrences)
        local_pooled_rows    rows pooled on the ranker (cached or read raw; occurrences)
        pool_bytes_sent      pooling request bytes (frames + channel headers)
        pool_bytes_received  pooling response bytes
        pool_fallbacks       pooling requests that failed (channel broken or refused, bad response) and
                             were served by raw reads pooled on the ranker instead
        prefetched_batches   batches fetched through client.prefetch()

    ``network_bytes`` = ``bytes_read + pool_bytes_sent + pool_bytes_received``.

    With a cache, ``unique_ids`` counts the distinct ids per call served by the
    cache or the read path (rows pooled on servers are in ``pooled_rows``
    instead), and the invariant of :class:`~flexemr.ClientMetrics` becomes
    ``unique_ids == rows_read + rows_shared + cache_hits``.
    """

    cache_hits: int = 0
    cache_misses: int = 0
    cache_inserts: int = 0
    cache_evictions: int = 0
    cache_invalidations: int = 0
    cache_stale_hits: int = 0
    cache_resizes: int = 0
    cache_capacity: int = 0
    pooled_lookups: int = 0
    pooled_subrequests: int = 0
    raw_subrequests: int = 0
    pooled_bags: int = 0
    pooled_rows: int = 0
    local_pooled_rows: int = 0
    pool_bytes_sent: int = 0
    pool_bytes_received: int = 0
    pool_fallbacks: int = 0
    prefetched_batches: int = 0

    _COUNTERS: ClassVar[tuple[str, ...]] = ClientMetrics._COUNTERS + (
        "cache_hits", "cache_misses", "cache_inserts", "cache_evictions", "cache_invalidations", "cache_stale_hits",
        "cache_resizes",
        "cache_capacity", "pooled_lookups", "pooled_subrequests", "raw_subrequests", "pooled_bags", "pooled_rows",
        "local_pooled_rows", "pool_bytes_sent", "pool_bytes_received", "pool_fallbacks",
        "prefetched_batches")

    @property
    def network_bytes(self) -> int:
        """Bytes moved over the network: raw read payload plus pooling messages."""
        return self.bytes_read + self.pool_bytes_sent + self.pool_bytes_received

    def snapshot(self) -> dict[str, Any]:
        out = super().snapshot()
        out["network_bytes"] = self.network_bytes
        return out
