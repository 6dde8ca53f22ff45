"""The pooling RPC's I/O: the server's service and the ranker's channel stub (wire format: :mod:`flexemr.core.poolwire`).

Every :class:`~flexemr.EmbeddingServer` serves the message channel
``"flexemr/pool"``; a ranker opens one channel per server (lazily, on its
first pooled sub-request) and keeps it for the life of the client.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from .core.errors import ClosedError, InputError, TransportError
from .core.metrics import LocalityMetrics
from .core.plan import Shard, ShardingPlan
from .core.pooling import accumulation_dtype, server_partial_pool
from .core.poolwire import FrameAssembler, Buffer, decode_request, encode_error, encode_response, frames

__all__ = ["PoolChannel", "PoolService", "send_message"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
_CHANNEL_HEADER = 8  # rdmaio's per-message header (length, sequence)


async def send_message(ch: rdmaio.Channel, req_id: int, parts: Sequence[Buffer]) -> int:
    """Send one logical message as frames; returns the bytes handed to the channel (headers included)."""
    sent = 0
    for head, frame in frames(req_id, parts, ch.max_message):
        await ch.send([head, *frame])
        sent += len(head) + _CHANNEL_HEADER + sum(f.nbytes for f in frame)
    return sent


class PoolService:
    """Server side: answers pooling requests from the shard arrays a server holds.

    Only full-width shards (all columns) take part; a request naming a table
    whose rows this server does not hold in full width is an error response.

    >>> from flexemr.core.spec import TableSpec
    >>> from flexemr.core.poolwire import decode_response, encode_request
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
