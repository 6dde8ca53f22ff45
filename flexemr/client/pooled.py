"""Pooled lookups on the ranker: the pooling RPC's channel stub (:class:`PoolChannel`).

Wire format and framing: :mod:`flexemr.core.poolwire`; the server side:
:mod:`flexemr.server.pooling`.  A ranker opens one channel per server
(lazily, on its first pooled sub-request) and keeps it for the life of the
client.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import rdmaio

from ..core.errors import ClosedError, TransportError
from ..core.metrics import LocalityMetrics
from ..core.poolwire import Buffer, FrameAssembler, frames

__all__ = ["PoolChannel", "send_message"]

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
