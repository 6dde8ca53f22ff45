"""The software ("tcp") transport: queue pairs over TCP, a NIC-like responder in C.

A queue pair is one stream connection: TCP, or a UNIX-domain socket when both
engines share a host and network namespace.  The initiator side
(:class:`TcpQueuePair`) is driven from the event-loop thread: posting packs a
request into the connection's native output queue (headers and batch entries
are packed in C; write payloads are referenced, not copied, above 2 KiB) and
flushes it with one ``sendmsg``.  When the queue pair has other requests in
flight the flush is deferred to the end of the loop iteration, so requests
posted by many tasks in one iteration leave in one system call (doorbell
batching).  Responses are read by the owning worker, which scatters read
payloads straight into the local buffers and records completions.

The target side (:class:`TcpResponder`) needs no Python per request: the
worker's native round parses requests, checks key, bounds and access against
the region table and executes them on registered memory.
"""

from __future__ import annotations

import asyncio
import collections
import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ._errors import ClosedError, EndpointBrokenError, ProtocolError, TimeoutError, error_for_status
from ._native._rdmaio_native import ffi, lib
from ._wire import Op

if TYPE_CHECKING:
    import socket

    from ._progress import Worker
    from ._region import MemoryRegion

__all__ = ["TcpQueuePair", "TcpResponder", "describe_death"]

KIND_RESPONDER = 1
KIND_INITIATOR = 2

_PROTOCOL_ERRORS = {
    1: "unknown opcode",
    2: "bad batch count",
    3: "operation too large",
    4: "response for an unknown work request",
    5: "bad payload length",
    6: "out of memory",
    7: "misuse",
}


def describe_death(code: int) -> str:
    """Human text for a native connection event code."""
    if code == 0:
        return "peer closed the connection"
    if code > 0:
        return f"connection error: {os.strerror(code)}"
    return f"protocol error from peer: {_PROTOCOL_ERRORS.get(-code, str(code))}"


class _Pending:
    __slots__ = ("fut", "mr", "keep", "what", "timer")

    def __init__(self, fut: asyncio.Future[int], mr: MemoryRegion | None, keep: Any, what: str) -> None:
        self.fut = fut
        self.mr = mr
        self.keep = keep
        self.what = what
        self.timer: asyncio.TimerHandle | None = None


class TcpQueuePair:
    """Initiator side of one queue pair (one stream connection, one owning worker)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, conn_id: int,
                 workers: list[Worker], depth: int, op_timeout: float | None,
                 on_broken: Callable[[BaseException], None]) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self.conn_id = conn_id
        self._depth = depth
        self._op_timeout = op_timeout
        self._on_broken = on_broken
        self._c = lib.rio_conn_new(self._fd, conn_id, KIND_INITIATOR, ffi.NULL, depth)
        if self._c == ffi.NULL:
            raise MemoryError("could not allocate a native connection")
        self._free: list[int] = list(range(depth - 1, -1, -1))
        self._gen = 0
        self._pending: dict[int, _Pending] = {}
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._flush_scheduled = False
        self._writer = False
        self.broken: BaseException | None = None
        self._closed = False
        for w in workers:
            rc = lib.rio_conn_attach(self._c, w.c)
            if rc:  # detach from the workers attached so far and free the native connection
                lib.rio_conn_close(self._c)
                self._c = None
                raise OSError(-rc, os.strerror(-rc))

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- posting ---------------------------------------------------------------
    async def wait_slot(self) -> None:
        while not self._free:
            self._check()
            fut = self._loop.create_future()
            self._slot_waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                # woken for a free slot but cancelled before taking it: pass the wake-up on
                if fut.done() and not fut.cancelled() and self._free:
                    self._wake_slot_waiter()
                raise
        self._check()

    def _wake_slot_waiter(self) -> None:
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_result(None)
                break

    def _check(self) -> None:
        if self.broken is not None:
            raise EndpointBrokenError(f"endpoint is broken: {self.broken}") from self.broken
        if self._closed:
            raise ClosedError("endpoint is closed")

    def _new_wr(self) -> tuple[int, int]:
        slot = self._free.pop()
        self._gen = (self._gen + 1) & 0xFFFFFFFF
        return slot, (self._gen << 32) | slot

    def _track(self, wr: int, slot: int, rc: int, mr: MemoryRegion | None, keep: Any, what: str) -> asyncio.Future[int]:
        if rc != 0:
            self._free.append(slot)
            if rc == -7:  # posting on a dead connection: the death event is on its way
                raise EndpointBrokenError("endpoint is broken")
            raise ProtocolError(f"could not post {what}: {_PROTOCOL_ERRORS.get(-rc, rc)}")
        fut = self._loop.create_future()
        p = _Pending(fut, mr, keep, what)
        if mr is not None:
            mr._pin()
        self._pending[wr] = p
        if self._op_timeout is not None:
            p.timer = self._loop.call_later(self._op_timeout, self._expire, wr)
        if len(self._pending) == 1 and not self._writer:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def post(self, op: Op, key: int, remote: int, arg0: int, arg1: int, local: int,
             mr: MemoryRegion | None, what: str) -> asyncio.Future[int]:
        """Post one single-buffer operation; the caller made sure a slot is free."""
        self._check()
        slot, wr = self._new_wr()
        try:
            rc = lib.rio_post_single(self._c, slot, wr, op, key, remote, arg0, arg1, local)
        except BaseException:  # e.g. OverflowError from cffi: give the slot back
            self._free.append(slot)
            raise
        return self._track(wr, slot, rc, mr, None, what)

    def post_batch(self, op: Op, key: int, remote: np.ndarray, lengths: np.ndarray, local: np.ndarray,
                   mr: MemoryRegion, what: str) -> asyncio.Future[int]:
        """Post one batch request (``uint64`` arrays, kept alive until completion)."""
        self._check()
        slot, wr = self._new_wr()
        try:
            rc = lib.rio_post_batch(
                self._c, slot, wr, op, key, len(remote),
                ffi.from_buffer("uint64_t[]", remote), ffi.from_buffer("uint64_t[]", lengths),
                ffi.from_buffer("uint64_t[]", local),
            )
        except BaseException:
            self._free.append(slot)
            raise
        return self._track(wr, slot, rc, mr, (remote, lengths, local), what)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed or self.broken is not None:
            return
        rc = lib.rio_flush(self._c)
        if rc == 1:
            if not self._writer:
                self._loop.add_writer(self._fd, self._on_writable)
                self._writer = True
        elif rc < 0:
            self._die(EndpointBrokenError(f"send failed: {os.strerror(-rc)}"))

    def _on_writable(self) -> None:
        rc = lib.rio_flush(self._c)
        if rc != 1:
            self._loop.remove_writer(self._fd)
            self._writer = False
        if rc < 0:
            self._die(EndpointBrokenError(f"send failed: {os.strerror(-rc)}"))

    # -- completion ------------------------------------------------------------
    def _finish(self, wr: int) -> _Pending | None:
        p = self._pending.pop(wr, None)
        if p is None:
            return None
        if p.timer is not None:
            p.timer.cancel()
        if self.broken is None and not self._closed:
            self._free.append(wr & 0xFFFFFFFF)
            self._wake_slot_waiter()
        if p.mr is not None:
            p.mr._unpin()
        return p

    def _complete(self, wr: int, status: int, value: int) -> None:
        p = self._finish(wr)
        if p is None or p.fut.done():
            return
        if status == 0:
            p.fut.set_result(value)
        else:
            p.fut.set_exception(error_for_status(status, p.what))

    def _expire(self, wr: int) -> None:
        p = self._pending.get(wr)
        if p is not None and not p.fut.done():
            # the transfer may still land: the slot and the memory stay held until it does
            p.fut.set_exception(TimeoutError(f"{p.what} did not complete within {self._op_timeout} s"))

    def _on_dead(self, code: int) -> None:
        self._die(EndpointBrokenError(describe_death(code)))

    def _die(self, exc: BaseException) -> None:
        if self.broken is not None or self._closed:
            return
        self.broken = exc
        # Detach from the workers first: the connection may still be alive (the endpoint broke
        # for another reason), and a late response must not land in memory (or follow scatter
        # lists) that failing the operations below unpins and releases.
        self._detach()
        self._fail_all(exc)
        self._on_broken(exc)

    def _detach(self) -> None:
        if self._c is not None:
            # after rio_conn_close returns no worker is inside this connection, so
            # local memory of pending operations can no longer be written
            lib.rio_conn_close(self._c)
            self._c = None
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False

    def _fail_all(self, exc: BaseException) -> None:
        for wr in list(self._pending):
            p = self._finish(wr)
            if p is not None and not p.fut.done():
                p.fut.set_exception(type(exc)(str(exc)))
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_exception(type(exc)(str(exc)))

    def close(self, exc: BaseException | None = None) -> None:
        """Detach from the workers, fail what is still pending, close the socket."""
        if self._closed:
            return
        self._detach()
        self._closed = True
        self._fail_all(exc or ClosedError("endpoint closed with the operation in flight"))
        self._sock.close()


class TcpResponder:
    """Target side of one queue pair; served entirely by the native worker."""

    def __init__(self, sock: socket.socket, conn_id: int, rtable: Any, worker: Worker,
                 on_dead: Callable[[TcpResponder, int], None]) -> None:
        self._sock = sock
        self.conn_id = conn_id
        self._on_dead_cb = on_dead
        self._c = lib.rio_conn_new(sock.fileno(), conn_id, KIND_RESPONDER, rtable, 0)
        if self._c == ffi.NULL:
            raise MemoryError("could not allocate a native connection")
        rc = lib.rio_conn_attach(self._c, worker.c)
        if rc:
            lib.rio_conn_close(self._c)
            raise OSError(-rc, os.strerror(-rc))

    #: called with the immediate of every WRITE_IMM that lands through this queue pair
    on_imm: Callable[[int], None] | None = None

    def _complete(self, wr: int, status: int, value: int) -> None:  # responders have no completions
        pass

    def _on_imm(self, imm: int) -> None:
        if self.on_imm is not None:
            self.on_imm(imm)

    def _on_dead(self, code: int) -> None:
        self._on_dead_cb(self, code)

    def close(self) -> None:
        if self._c is not None:
            lib.rio_conn_close(self._c)
            self._c = None
            self._sock.close()
