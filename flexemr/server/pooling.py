"""The server side of the pooling RPC: :class:`PoolService` on the ``"flexemr/pool"`` channel.

A ranker sends, in one request per lookup, the bags of every shard this
server holds that it wants pooled (wire format: :mod:`flexemr.core.poolwire`);
the service answers with one dense ``[B, dim]`` partial sum (or max) per
shard, which the ranker adds up (hierarchical pooling, ``docs/locality.md``).

Hot path, per request: the header is decoded in Python (O(jobs), not
O(rows)); the jobs are :class:`~flexemr.core.kernel.PoolJob` s on views of the
received message (ids, offsets, weights: no copy) writing into the response
buffer (the kernel's output *is* the response); one native call pools them,
off the event loop, on a worker thread, with the GIL released.  Requests that
arrive while a call runs (from any ranker) are queued and go together into
the next native call, so a busy server makes fewer, bigger calls.  The event
loop meanwhile keeps serving channels, control messages and heartbeats (the
one-sided reads do not need it at all).  A malformed request, an unknown
shard or an id out of range gives that request an error response; the other
requests of the same native call are not affected.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core import kernel
from ..core.errors import InputError, TransportError
from ..core.plan import Shard, ShardingPlan
from ..core.pooling import PoolMode, accumulation_dtype
from ..core.poolwire import (FRAME, Buffer, FrameAssembler, FramedLayout, decode_request, encode_error, framed_layout,
                             frames, response_layout)

__all__ = ["MAX_RESPONSE_BYTES", "RESPONSE_ARENA_BYTES", "FramedAnswer", "PoolService", "ResponseArena"]

log = logging.getLogger(__name__)

#: Largest response a request may ask for (B x dim values over its jobs), in bytes.
MAX_RESPONSE_BYTES = 1 << 30
#: Bytes of registered memory an embedding server answers pooling requests from (:class:`ResponseArena`).
RESPONSE_ARENA_BYTES = 32 << 20
_PAGE = 4096


class ResponseArena:
    """Registered memory that responses are written into by the kernel and sent from (thread-safe, first fit).

    ``buf`` is registered as ``mr`` with the engine whose channels send from it
    (:meth:`rdmaio.Channel.send_region`); places are taken in whole pages.
    """

    def __init__(self, buf: npt.NDArray[np.uint8], mr: rdmaio.MemoryRegion) -> None:
        self.buf = buf
        self.mr = mr
        self._free: list[tuple[int, int]] = [(0, buf.nbytes - buf.nbytes % _PAGE)]
        self._lock = threading.Lock()

    @staticmethod
    def extent(n: int) -> int:
        """The bytes a place of ``n`` bytes takes."""
        return -(-n // _PAGE) * _PAGE

    def take(self, n: int) -> int | None:
        """The offset of a free place of ``n`` bytes, now taken, or ``None`` when there is no room."""
        n = self.extent(n)
        with self._lock:
            for i, (at, size) in enumerate(self._free):
                if size >= n:
                    if size == n:
                        del self._free[i]
                    else:
                        self._free[i] = (at + n, size - n)
                    return at
        return None

    def give(self, at: int, n: int) -> None:
        """Free the place of ``n`` bytes taken at ``at``."""
        n = self.extent(n)
        with self._lock:
            free = self._free
            i = bisect.bisect(free, (at, n))
            free.insert(i, (at, n))
            if i + 1 < len(free) and at + n == free[i + 1][0]:
                free[i] = (at, n + free[i + 1][1])
                del free[i + 1]
            if i > 0 and free[i - 1][0] + free[i - 1][1] == at:
                free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
                del free[i]

    def free_bytes(self) -> int:
        """Bytes not taken."""
        with self._lock:
            return sum(n for _, n in self._free)


@dataclass(frozen=True)
class FramedAnswer:
    """An ok response the kernel wrote into a :class:`ResponseArena`, laid out as its frames."""

    layout: FramedLayout
    base: int      #: where the layout starts in the arena
    extent: int    #: bytes taken there
    nbytes: int    #: bytes of the response (its payload over all frames)


_Shapes = tuple[tuple[int, int, "np.dtype[Any]"], ...]


@functools.lru_cache(maxsize=64)
def _layouts(shapes: _Shapes, payload: int | None) -> tuple[bytes, list[int], int, FramedLayout | None]:
    """:func:`~flexemr.core.poolwire.response_layout` of an ok response with jobs of ``shapes`` and, with
    ``payload``, its :func:`~flexemr.core.poolwire.framed_layout`: computed once per shape of request (a
    ranker sends the same shapes batch after batch), shared: read only.  :class:`InputError` when too large."""
    head, offsets, total = response_layout(shapes)
    if total > MAX_RESPONSE_BYTES:
        raise InputError(f"the response would take {total} bytes, more than {MAX_RESPONSE_BYTES}")
    return head, offsets, total, None if payload is None else framed_layout(len(head), shapes, payload)


_Answer = Union[npt.NDArray[np.uint8], FramedAnswer]
_Pending = tuple[Buffer, Optional[int], "asyncio.Future[list[Buffer] | FramedAnswer]"]
_Answers = asyncio.Queue[Optional[tuple[int, "asyncio.Future[list[Buffer] | FramedAnswer]"]]]


class PoolService:
    """Server side: answers pooling requests from the shard arrays a server holds.

    Only full-width shards (all columns) take part; a job naming a shard that
    this server does not hold in full width makes its request an error
    response.

    >>> from flexemr.core.spec import TableSpec
    >>> from flexemr.core.poolwire import RequestJob, decode_response, encode_request
    >>> plan = ShardingPlan.row_wise([TableSpec("t", 4, 2)], ["s0", "s1"])
    >>> sh = plan.shards["t"][1]                         # rows 2..3 on s1
    >>> svc = PoolService(plan, [sh], {sh.region_name: np.array([[1., 2.], [3., 4.]], np.float32)})
    >>> job = RequestJob("t", 1, np.array([0, 2, 3]), np.array([0, 1, 1], np.int32), None)
    >>> resp = svc.handle(b"".join(bytes(p) for p in encode_request([job], "sum")))
    >>> decode_response(b"".join(bytes(p) for p in resp), [(2, 2)])[0].tolist()
    [[4.0, 6.0], [3.0, 4.0]]
    """

    def __init__(self, plan: ShardingPlan, shards: Sequence[Shard], arrays: dict[str, npt.NDArray[Any]],
                 arena: ResponseArena | None = None) -> None:
        kernel.tune_allocator()
        self._plan = plan
        #: (table, shard index) -> (rows, accumulation dtype)
        self._shards: dict[tuple[str, int], tuple[npt.NDArray[Any], np.dtype[Any]]] = {}
        for sh in shards:
            spec = plan.spec(sh.table)
            if sh.col_start == 0 and sh.col_end == spec.dim:
                self._shards[(sh.table, sh.index)] = (arrays[sh.region_name], accumulation_dtype(spec.np_dtype))
        self._queue: list[_Pending] = []
        self._busy = False
        self._arena = arena
        #: requests answered, native calls made, rows (ids) pooled
        self.requests = 0
        self.calls = 0
        self.rows = 0

    # ------------------------------------------------------------ pooling

    def _prepare(self, data: Buffer, payload: int | None = None) -> tuple[list[kernel.PoolJob], _Answer, int]:
        """The kernel jobs of one request, writing into its response buffer (returned), and its rows.

        With ``payload`` (the channel's frame payload) and room in the arena, the response is laid out in
        the arena as its frames (:func:`~flexemr.core.poolwire.framed_layout`): the kernel writes the
        values where they are sent from."""
        req = decode_request(data)
        fill = float("-inf") if req.op == "max" else 0.0
        found = []
        for j in req.jobs:
            entry = self._shards.get((j.table, j.shard))
            if entry is None:
                raise InputError(f"this server holds no full-width shard {j.shard} of table {j.table!r}")
            if j.weights is not None and req.op == "max":
                raise InputError("weights are only supported with sum pooling")
            found.append(entry)
        shapes = tuple((int(j.offsets.size) - 1, rows.shape[1], acc) for j, (rows, acc) in zip(req.jobs, found))
        head, offsets, total, lay = _layouts(shapes, payload if self._arena is not None else None)
        mode: PoolMode = "max" if req.op == "max" else "sum"
        rows_n = sum(int(j.ids.size) for j in req.jobs)
        framed = self._framed(lay) if lay is not None else None
        if framed is not None:
            lay, base = framed
            arena = self._arena
            assert arena is not None
            abuf = arena.buf
            abuf[base + lay.head: base + lay.head + len(head)] = np.frombuffer(head, dtype=np.uint8)
            for at, n in lay.pads:
                abuf[base + at: base + at + n] = 0
            jobs = []
            for j, (rows, _), (row0, blocks) in zip(req.jobs, found, lay.rows):
                jobs.append(kernel.PoolJob(rows, j.ids, j.offsets, mode, j.weights,
                                           out=abuf[base + row0: base + lay.size], fill=fill, out_blocks=blocks))
            return jobs, FramedAnswer(lay, base, arena.extent(lay.size), total), rows_n
        buf = np.empty(total, dtype=np.uint8)
        buf[: len(head)] = np.frombuffer(head, dtype=np.uint8)
        jobs = []
        for j, (rows, acc), (nb, dim, _), off in zip(req.jobs, found, shapes, offsets):
            n = nb * dim * acc.itemsize
            buf[off + n : off + n + (-n % 8)] = 0
            out = buf[off : off + n].view(acc).reshape(nb, dim)
            jobs.append(kernel.PoolJob(rows, j.ids, j.offsets, mode, j.weights, out=out, fill=fill))
        return jobs, buf, rows_n

    def _framed(self, lay: FramedLayout) -> tuple[FramedLayout, int] | None:
        """The framed layout of the response and its place in the arena, or ``None`` (no room: copy it)."""
        assert self._arena is not None
        base = self._arena.take(lay.size)
        return None if base is None else (lay, base)

    def handle_many(self, requests: Sequence[Buffer],
                    payloads: Sequence[int | None] | None = None) -> list[list[Buffer] | FramedAnswer]:
        """Answer several requests with one native call (error responses for bad ones). Blocking: the
        kernel runs with the GIL released.

        ``payloads``: per request, the frame payload of the channel it came on, or ``None``; a request
        with one may be answered by a :class:`FramedAnswer` (in the arena; :meth:`release` it once sent)."""
        answers: list[list[Buffer] | None] = [None] * len(requests)
        jobs: list[kernel.PoolJob] = []
        owner: list[int] = []
        bufs: dict[int, tuple[_Answer, int]] = {}
        for i, data in enumerate(requests):
            try:
                req_jobs, buf, rows = self._prepare(data, None if payloads is None else payloads[i])
            except (InputError, MemoryError) as exc:
                answers[i] = encode_error(f"{type(exc).__name__}: {exc}")
                continue
            jobs += req_jobs
            owner += [i] * len(req_jobs)
            bufs[i] = buf, rows
        results: list[npt.NDArray[Any] | BaseException]
        try:
            results = list(kernel.pool_each(jobs))
        except (InputError, MemoryError) as exc:  # a job the kernel refused outright
            results = [exc] * len(jobs)
        for i, r in zip(owner, results):
            if isinstance(r, BaseException) and answers[i] is None:
                answers[i] = encode_error(f"{type(r).__name__}: {r}")
        self.requests += len(requests)
        self.calls += 1
        out: list[list[Buffer] | FramedAnswer] = []
        for i, a in enumerate(answers):
            ans = bufs.get(i)
            if a is not None:
                if ans is not None and isinstance(ans[0], FramedAnswer):
                    self.release(ans[0])  # an error response instead
                out.append(a)
                continue
            assert ans is not None
            buf, rows = ans
            self.rows += rows
            out.append(buf if isinstance(buf, FramedAnswer) else [buf.data])
        return out

    def handle(self, data: Buffer) -> list[Buffer]:
        """Answer one request (an error response for a bad one)."""
        answer = self.handle_many([data])[0]
        assert not isinstance(answer, FramedAnswer)  # without a frame payload
        return answer

    def release(self, answer: FramedAnswer) -> None:
        """Give a :class:`FramedAnswer`'s place in the arena back (once its frames are sent, or not sent)."""
        if self._arena is not None:
            self._arena.give(answer.base, answer.extent)

    # ------------------------------------------------------------ serving

    async def submit(self, data: Buffer, payload: int | None = None) -> list[Buffer] | FramedAnswer:
        """The response to one request, pooled off the event loop (batched with other waiting requests);
        with ``payload`` (the channel's frame payload) it may be a :class:`FramedAnswer`."""
        fut: asyncio.Future[list[Buffer] | FramedAnswer] = asyncio.get_running_loop().create_future()
        self._queue.append((data, payload, fut))
        self._kick()
        return await fut

    def _kick(self) -> None:
        if self._busy or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._busy = True
        loop = asyncio.get_running_loop()
        cf = loop.run_in_executor(None, self.handle_many, [d for d, _, _ in batch], [p for _, p, _ in batch])
        cf.add_done_callback(lambda f: self._finish(batch, f))

    def _finish(self, batch: list[_Pending], f: asyncio.Future[list[list[Buffer] | FramedAnswer]]) -> None:
        self._busy = False
        try:
            results = f.result()
        except BaseException as exc:  # noqa: BLE001 - a bug: every waiting request gets the error
            log.exception("pooling failed")
            results = [encode_error(f"{type(exc).__name__}: {exc}")] * len(batch)
        for (_, _, fut), r in zip(batch, results):
            if not fut.done():
                fut.set_result(r)
            elif isinstance(r, FramedAnswer):  # its requester is gone
                self.release(r)
        if self._queue:
            self._kick()

    async def serve(self, ch: rdmaio.Channel) -> None:
        """The channel handler: requests in, responses out (in request order), until the peer closes."""
        payload = ch.max_message - FRAME.size
        asm = FrameAssembler(payload)
        answers: _Answers = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(ch, answers))
        try:
            while True:
                try:  # each frame is copied once, from the channel's ring to its place in the request;
                    # the frames that landed together are taken in one call (a request's come back to back)
                    msgs = await ch.recv_batch_with(asm.add_view)
                except rdmaio.ClosedError:
                    break
                for msg in msgs:
                    if msg is not None:
                        answers.put_nowait((msg[0], asyncio.ensure_future(self.submit(msg[1], payload))))
        except (rdmaio.RdmaioError, TransportError) as exc:
            log.debug("pooling channel ended: %s", exc)
        finally:
            answers.put_nowait(None)  # the sender answers what is queued, then ends
            try:
                await asyncio.shield(sender)
            finally:
                if not sender.done():  # this handler was cancelled: the server is closing
                    sender.cancel()

    async def _send(self, ch: rdmaio.Channel, answers: _Answers) -> None:
        broken = False
        while True:
            item = await answers.get()
            if item is None:
                return
            rid, fut = item
            parts = await fut
            if isinstance(parts, FramedAnswer):
                if broken:
                    self.release(parts)
                    continue
                assert self._arena is not None
                try:  # from the arena, where the kernel wrote the values: no copy
                    await ch.send_region(self._arena.mr, parts.layout.spans(self._arena.buf, parts.base, rid))
                except (rdmaio.RdmaioError, TransportError) as exc:
                    log.debug("pooling channel ended: %s", exc)
                    broken = True
                self.release(parts)  # every write is done (send_region waits for all, even on errors)
                continue
            if broken:
                continue
            try:  # every frame is posted as soon as a credit allows: they travel back to back
                await ch.send_many([head, *pieces] for head, pieces in frames(rid, parts, ch.max_message))
            except (rdmaio.RdmaioError, TransportError) as exc:
                log.debug("pooling channel ended: %s", exc)
                broken = True  # the requests already queued still finish (their native call may be running)
