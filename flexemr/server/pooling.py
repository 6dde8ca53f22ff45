"""The server side of the pooling RPC: :class:`PoolService` on the ``"flexemr/pool"`` channel.

A ranker sends, in one request per lookup, the bags of every shard this
server holds that it wants pooled (wire format: :mod:`flexemr.core.poolwire`);
the service answers with one dense ``[B, dim]`` partial sum (or max) per
shard, which the ranker adds up (hierarchical pooling, ``docs/locality.md``).

Hot path, per request: no Python per job.  A ranker sends requests of a few
*kinds* (:func:`~flexemr.core.poolwire.request_key`: the same tables, shards
and bags, other ids); the first request of a kind is decoded and checked in
Python, and the native jobs of its kind are kept
(:class:`~flexemr.core.poolbind.RequestTemplate`: tables, modes, where each
job's values go in the response).  Every request is then bound to copies of
those jobs in one native call that checks its layout and points them at the
received message's ids, offsets and weights (no copy), writing into the
response buffer (the kernel's output *is* the response); one native call
pools every request bound, off the event loop, on a worker thread, with the
GIL released.  Requests that
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
import collections
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core import kernel
from ..core.errors import InputError, TransportError
from ..core.plan import Shard, ShardingPlan
from ..core.pooling import PoolMode, accumulation_dtype
from ..core.poolbind import BoundCall, RequestTemplate
from ..core.poolwire import (FRAME, Buffer, FrameAssembler, FramedLayout, decode_request, encode_error, framed_layout,
                             frames, request_key, response_layout)

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


def _error_answer(exc: BaseException) -> list[Buffer]:
    """The error response a request gets for ``exc`` (its type and message)."""
    return encode_error(f"{type(exc).__name__}: {exc}")


_Answer = Union[npt.NDArray[np.uint8], FramedAnswer]
#: Request kinds a service keeps the native jobs of (a ranker sends a few: one per set of tables it pools here),
#: and their jobs together (whatever kinds clients send, what is kept stays bounded).
_MAX_KINDS = 64
_MAX_KIND_JOBS = 1 << 15


@dataclass(frozen=True)
class _Kind:
    """What every request of one kind (:func:`~flexemr.core.poolwire.request_key`) is answered with: the head
    and size of its ok response, the zero padding (``(at, bytes)``) and native jobs of the plain layout, and the
    framed layout (``None`` without an arena, or when the head or a row is larger than a frame) and its jobs."""

    head: npt.NDArray[np.uint8]
    total: int
    pads: list[tuple[int, int]]
    plain: RequestTemplate
    layout: FramedLayout | None
    framed: RequestTemplate | None

_Pending = tuple[Buffer, Optional[int], "asyncio.Future[list[Buffer] | FramedAnswer]"]
_Answers = asyncio.Queue[Optional[tuple[int, "asyncio.Future[list[Buffer] | FramedAnswer]"]]]


_Batch = list[_Pending]
_Results = Union[list[Union[list[Buffer], FramedAnswer]], BaseException]


class _PoolThread:
    """The thread a :class:`PoolService` runs its native calls on, one batch at a time, and the way back.

    A batch goes over, and its results come back, through two eventfds: the thread blocks reading one,
    the event loop watches the other (``add_reader``).  Python makes those wake-up writes without the
    GIL; ``run_in_executor`` wakes its worker, and ``call_soon_threadsafe`` the loop, while holding it,
    so that on a 2-vCPU machine the woken thread then waits for the GIL (``docs/performance.md``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, run: Callable[[_Batch], Any],
                 done: Callable[[_Batch, _Results], None]) -> None:
        self.loop = loop
        self._run = run
        self._done = done
        self._todo: collections.deque[_Batch | None] = collections.deque()
        self._results: collections.deque[tuple[_Batch, _Results]] = collections.deque()
        self._in = os.eventfd(0, os.EFD_CLOEXEC)                       # the thread waits on it
        self._out = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)    # the loop watches it
        loop.add_reader(self._out, self._collect)
        self._thread = threading.Thread(target=self._main, name="flexemr-pool", daemon=True)
        self._thread.start()

    def submit(self, batch: _Batch) -> None:
        self._todo.append(batch)
        os.eventfd_write(self._in, 1)

    def _main(self) -> None:
        while True:
            os.eventfd_read(self._in)
            while self._todo:
                batch = self._todo.popleft()
                if batch is None:
                    return
                try:
                    out: _Results = self._run(batch)
                except BaseException as exc:  # noqa: BLE001 - handed to the loop
                    out = exc
                self._results.append((batch, out))
                os.eventfd_write(self._out, 1)

    def _collect(self) -> None:
        try:
            os.eventfd_read(self._out)
        except BlockingIOError:
            pass
        while self._results:
            self._done(*self._results.popleft())

    def close(self) -> None:
        """Stop after the batch being run (results not collected yet are dropped); idempotent."""
        if self._in < 0:
            return
        if not self.loop.is_closed():
            self.loop.remove_reader(self._out)
        self._todo.append(None)
        os.eventfd_write(self._in, 1)
        self._thread.join()
        os.close(self._in)
        os.close(self._out)
        self._in = self._out = -1


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
        self._thread: _PoolThread | None = None
        self._arena = arena
        #: (request kind (poolwire.request_key), frame payload or None) -> how its requests are answered
        self._kinds: dict[tuple[bytes, int | None], _Kind] = {}
        self._kind_jobs = 0
        #: requests answered, native calls made, rows (ids) pooled
        self.requests = 0
        self.calls = 0
        self.rows = 0

    # ------------------------------------------------------------ pooling

    def _kind(self, data: Buffer, payload: int | None) -> tuple[_Kind, int]:
        """The :class:`_Kind` of request ``data`` come on a channel of frame payload ``payload`` (built at its
        kind's first request, then cached) and its ids; :class:`InputError` for a malformed request (or one
        this server cannot answer)."""
        named = request_key(data)
        if named is None:
            decode_request(data)  # raises the precise error
            raise InputError("not a flexemr pooling request")
        key, ids = named
        if self._arena is None:
            payload = None
        kind = self._kinds.get((key, payload))
        if kind is None:
            kind = self._new_kind(data, payload)
            jobs = kind.plain.n_jobs
            if jobs <= _MAX_KIND_JOBS:  # else answered, not kept
                while self._kinds and (len(self._kinds) >= _MAX_KINDS or self._kind_jobs + jobs > _MAX_KIND_JOBS):
                    self._kind_jobs -= self._kinds.pop(next(iter(self._kinds))).plain.n_jobs  # the oldest
                self._kinds[(key, payload)] = kind
                self._kind_jobs += jobs
        return kind, ids

    def _new_kind(self, data: Buffer, payload: int | None) -> _Kind:
        """Decode one request (every check) and build the native jobs of its kind: for the plain response and,
        with a frame ``payload``, for the framed one."""
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
        head, offsets, total, lay = _layouts(shapes, payload)
        mode: PoolMode = "max" if req.op == "max" else "sum"
        buf = np.empty(total, dtype=np.uint8)
        plain = RequestTemplate(
            [kernel.PoolJob(rows, j.ids, j.offsets, mode, j.weights, fill=fill,
                            out=buf[off: off + nb * dim * acc.itemsize].view(acc).reshape(nb, dim))
             for j, (rows, _), (nb, dim, acc), off in zip(req.jobs, found, shapes, offsets)], offsets)
        pads = [(off + nb * dim * acc.itemsize, -(nb * dim * acc.itemsize) % 8)
                for (nb, dim, acc), off in zip(shapes, offsets)]
        framed = None
        if lay is not None:
            fbuf = np.empty(lay.size, dtype=np.uint8)
            framed = RequestTemplate(
                [kernel.PoolJob(rows, j.ids, j.offsets, mode, j.weights, out=fbuf[row0:], fill=fill, out_blocks=blocks)
                 for j, (rows, _), (row0, blocks) in zip(req.jobs, found, lay.rows)], [r for r, _ in lay.rows])
        return _Kind(np.frombuffer(head, dtype=np.uint8), total, [p for p in pads if p[1]], plain, lay, framed)

    def _bind(self, call: BoundCall, kind: _Kind, data: Buffer) -> _Answer:
        """Bind one request to ``call``, writing into its response buffer (returned).

        When its kind has a framed layout (it came with a frame payload) and the arena has room, the response
        is laid out in the arena as its frames (:func:`~flexemr.core.poolwire.framed_layout`): the kernel
        writes the values where they are sent from."""
        lay, arena = kind.layout, self._arena
        if lay is not None and kind.framed is not None and arena is not None:
            base = arena.take(lay.size)
            if base is not None:
                abuf = arena.buf
                abuf[base + lay.head: base + lay.head + kind.head.size] = kind.head
                for at, n in lay.pads:
                    abuf[base + at: base + at + n] = 0
                answer = FramedAnswer(lay, base, arena.extent(lay.size), kind.total)
                try:
                    call.bind(kind.framed, data, abuf, base)
                except BaseException:
                    self.release(answer)
                    raise
                return answer
        buf = np.empty(kind.total, dtype=np.uint8)
        buf[: kind.head.size] = kind.head
        for at, n in kind.pads:
            buf[at: at + n] = 0
        call.bind(kind.plain, data, buf)
        return buf

    def handle_many(self, requests: Sequence[Buffer],
                    payloads: Sequence[int | None] | None = None) -> list[list[Buffer] | FramedAnswer]:
        """Answer several requests with one native call (error responses for bad ones). Blocking: the
        kernel runs with the GIL released.

        ``payloads``: per request, the frame payload of the channel it came on, or ``None``; a request
        with one may be answered by a :class:`FramedAnswer` (in the arena; :meth:`release` it once sent)."""
        answers: list[list[Buffer] | None] = [None] * len(requests)
        kinds: list[tuple[_Kind, int] | None] = [None] * len(requests)
        for i, data in enumerate(requests):
            try:
                kinds[i] = self._kind(data, None if payloads is None else payloads[i])
            except (InputError, MemoryError) as exc:
                answers[i] = _error_answer(exc)
        call = BoundCall(sum(k[0].plain.n_jobs for k in kinds if k is not None))
        bound: list[int] = []
        bufs: dict[int, tuple[_Answer, int]] = {}
        for i, k in enumerate(kinds):
            if k is None:
                continue
            try:
                bufs[i] = self._bind(call, k[0], requests[i]), k[1]
                bound.append(i)
            except (InputError, MemoryError) as exc:
                answers[i] = _error_answer(exc)
        errors = call.run()
        for i, err in zip(bound, errors):
            if err is not None:
                answers[i] = _error_answer(err)
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
        return await self._enqueue(data, payload)

    def _enqueue(self, data: Buffer, payload: int | None) -> asyncio.Future[list[Buffer] | FramedAnswer]:
        """:meth:`submit` without a task: the future of the response."""
        fut: asyncio.Future[list[Buffer] | FramedAnswer] = asyncio.get_running_loop().create_future()
        self._queue.append((data, payload, fut))
        self._kick()
        return fut

    def _kick(self) -> None:
        if self._busy or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._busy = True
        loop = asyncio.get_running_loop()
        thread = self._thread
        if thread is None or thread.loop is not loop:  # first use, or a new event loop (the old one is gone)
            if thread is not None:
                thread.close()
            self._thread = thread = _PoolThread(loop, self._run_batch, self._finish)
        thread.submit(batch)

    def _run_batch(self, batch: list[_Pending]) -> list[list[Buffer] | FramedAnswer]:
        """On the pooling thread: one native call for ``batch``."""
        return self.handle_many([d for d, _, _ in batch], [p for _, p, _ in batch])

    def _finish(self, batch: list[_Pending], results: list[list[Buffer] | FramedAnswer] | BaseException) -> None:
        self._busy = False
        if isinstance(results, BaseException):  # a bug: every waiting request gets the error
            log.error("pooling failed", exc_info=results)
            results = [_error_answer(results)] * len(batch)
        for (_, _, fut), r in zip(batch, results):
            if not fut.done():
                fut.set_result(r)
            elif isinstance(r, FramedAnswer):  # its requester is gone
                self.release(r)
        if self._queue:
            self._kick()

    def close(self) -> None:
        """Stop the pooling thread (after the call it runs, if any); requests submitted later start a new one."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.close()
        self._busy = False

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
                        answers.put_nowait((msg[0], self._enqueue(msg[1], payload)))
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
