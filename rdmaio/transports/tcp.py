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
import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .._errors import EndpointBrokenError, ProtocolError
from .._keys import RemoteKey
from .._native._rdmaio_native import ffi, lib
from .._wire import Op
from .base import BrokenHook, ImmHook, Pending, QueuePair

if TYPE_CHECKING:
    import socket

    from .._progress import Worker
    from .._region import MemoryRegion

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


class TcpQueuePair(QueuePair):
    """Initiator side of one queue pair (one stream connection, one owning worker)."""

    __slots__ = ("_sock", "_fd", "_c", "_gen", "_flush_scheduled", "_writer")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, conn_id: int,
                 workers: list[Worker], depth: int, op_timeout: float | None,
                 on_broken: BrokenHook, on_imm: ImmHook | None = None) -> None:
        super().__init__(loop, conn_id, depth, op_timeout, on_broken, on_imm)
        self._sock = sock
        self._fd = sock.fileno()
        self._c = lib.rio_conn_new(self._fd, conn_id, KIND_INITIATOR, ffi.NULL, depth)
        if self._c == ffi.NULL:
            raise MemoryError("could not allocate a native connection")
        self._gen = 0
        self._flush_scheduled = False
        self._writer = False
        for w in workers:
            rc = lib.rio_conn_attach(self._c, w.c)
            if rc:  # detach from the workers attached so far and free the native connection
                lib.rio_conn_close(self._c)
                self._c = None
                raise OSError(-rc, os.strerror(-rc))

    def __repr__(self) -> str:
        return f"<TcpQueuePair conn={self.conn_id} in_flight={len(self._pending)}>"

    # -- posting ---------------------------------------------------------------
    def _refused(self, slot: int, rc: int, what: str) -> None:
        self._free.append(slot)
        if rc == -7:  # posting on a dead connection: the death event is on its way
            raise EndpointBrokenError("endpoint is broken")
        raise ProtocolError(f"could not post {what}: {_PROTOCOL_ERRORS.get(-rc, rc)}")

    def post(self, op: Op, key: RemoteKey, remote: int, arg0: int, arg1: int, local: int,
             mr: MemoryRegion | None, what: str) -> asyncio.Future[int]:
        """Post one single-buffer operation; the caller made sure a slot is free."""
        self._check()
        slot = self._free.pop()
        self._gen = gen = (self._gen + 1) & 0xFFFFFFFF
        wr = (gen << 32) | slot
        try:
            rc = lib.rio_post_single(self._c, slot, wr, op, key.rkey, remote, arg0, arg1, local)
        except BaseException:  # e.g. OverflowError from cffi: give the slot back
            self._free.append(slot)
            raise
        if rc != 0:
            self._refused(slot, rc, what)
        fut = self._track(wr, Pending(self._loop.create_future(), mr, None, what))
        # doorbell batching: flush now only when alone in flight, else at the end of this loop iteration
        if len(self._pending) == 1 and not self._writer:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def post_batch(self, op: Op, key: RemoteKey, remote: np.ndarray, lengths: np.ndarray, local: np.ndarray,
                   mr: MemoryRegion, what: str) -> asyncio.Future[int]:
        """Post one batch request (``uint64`` arrays, kept alive until completion)."""
        self._check()
        slot = self._free.pop()
        self._gen = gen = (self._gen + 1) & 0xFFFFFFFF
        wr = (gen << 32) | slot
        try:
            rc = lib.rio_post_batch(
                self._c, slot, wr, op, key.rkey, len(remote),
                ffi.from_buffer("uint64_t[]", remote), ffi.from_buffer("uint64_t[]", lengths),
                ffi.from_buffer("uint64_t[]", local),
            )
        except BaseException:
            self._free.append(slot)
            raise
        if rc != 0:
            self._refused(slot, rc, what)
        fut = self._track(wr, Pending(self._loop.create_future(), mr, (remote, lengths, local), what))
        if len(self._pending) == 1 and not self._writer:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

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

    # -- death and close -------------------------------------------------------------
    def _on_dead(self, code: int) -> None:
        self._die(EndpointBrokenError(describe_death(code)))

    def _halt(self, exc: BaseException) -> None:
        # Detach from the workers first: the connection may still be alive (the endpoint broke
        # for another reason), and a late response must not land in memory (or follow scatter
        # lists) that failing the operations below unpins and releases.
        self._detach()
        self._fail_all(exc, release=True)

    def _destroy(self) -> None:
        self._detach()
        self._sock.close()

    def _detach(self) -> None:
        if self._c is not None:
            # after rio_conn_close returns no worker is inside this connection, so
            # local memory of pending operations can no longer be written
            lib.rio_conn_close(self._c)
            self._c = None
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False


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
