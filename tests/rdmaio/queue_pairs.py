"""Queue pairs to run the queue-pair conformance suite on (test_queue_pairs.py).

A :class:`Harness` gives the suite one :class:`~rdmaio.transports.base.QueuePair`
connected to a target region of known contents, a local region, and control
over progress: :meth:`Harness.stall` holds completions back, :meth:`Harness.poll`
runs one progress round synchronously, :meth:`Harness.resume` lets them flow.

* ``tcp`` and ``verbs``: a real endpoint's queue pair (one worker, progress on
  the loop, so stalling is removing the worker's reader); verbs ones skip
  without an RDMA device (they run in the Soft-RoCE VM).
* ``fake``: :class:`FakeQueuePair`, a scripted transport in pure Python whose
  "NIC" executes requests against numpy arrays when the harness lets it.  It
  exists to pin the contract down: it shares nothing with tcp or verbs but the
  bookkeeping of the base class.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

import rdmaio
from rdmaio._keys import Access, RemoteKey
from rdmaio._region import RegionTable
from rdmaio._wire import Op, Status
from rdmaio.transports.base import Pending, QueuePair

TABLE = 1 << 16

_NEEDS = {Op.READ: Access.READ, Op.READ_BATCH: Access.READ, Op.WRITE: Access.WRITE, Op.WRITE_BATCH: Access.WRITE,
          Op.WRITE_IMM: Access.WRITE, Op.FETCH_ADD: Access.ATOMIC, Op.CMP_SWAP: Access.ATOMIC}


class FakeQueuePair(QueuePair):
    """A queue pair whose peer is a script: requests wait in ``queued`` until it runs them.

    ``regions`` maps an rkey to the target's ``(array, access)``; :meth:`run`
    executes every queued request there (checks like a responder's, memory
    copied with memmove) and reports each completion through ``_complete``, as
    a worker's batch would.  ``auto``: run them at the end of the loop iteration.
    """

    __slots__ = ("regions", "queued", "auto", "_gen", "destroyed")

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int, op_timeout: float | None,
                 on_broken: Callable[[BaseException], None]) -> None:
        super().__init__(loop, 1, depth, op_timeout, on_broken)
        self.regions: dict[int, tuple[np.ndarray, Access]] = {}
        self.queued: list[tuple[int, Op, RemoteKey, Any, Any, int, Any]] = []
        self.auto = True
        self._gen = 0
        self.destroyed = False

    def _post(self, op: Op, key: RemoteKey, a: Any, b: Any, arg1: int, local: Any, mr: Any, keep: Any,
              what: str) -> asyncio.Future[int]:
        self._check()
        slot = self._free.pop()
        self._gen += 1
        wr = (self._gen << 32) | slot
        fut = self._track(wr, Pending(self._loop.create_future(), mr, keep, what))
        self.queued.append((wr, op, key, a, b, arg1, local))
        if self.auto and len(self.queued) == 1:
            self._loop.call_soon(self.run)
        return fut

    def post(self, op: Op, key: RemoteKey, remote: int, arg0: int, arg1: int, local: int, mr: Any,
             what: str) -> asyncio.Future[int]:
        return self._post(op, key, remote, arg0, arg1, local, mr, None, what)

    def post_batch(self, op: Op, key: RemoteKey, remote: np.ndarray, lengths: np.ndarray, local: np.ndarray,
                   mr: Any, what: str) -> asyncio.Future[int]:
        return self._post(op, key, remote, lengths, 0, local, mr, (remote, lengths, local), what)

    def run(self) -> None:
        """The peer serves every queued request, in order (nothing once the QP broke or closed)."""
        if not self.auto and not self.queued:
            return
        todo, self.queued = self.queued, []
        for wr, op, key, a, b, arg1, local in todo:
            if self.broken is not None or self._closed:
                return
            status, value = self._execute(op, key, a, b, arg1, local)
            self._complete(wr, int(status), value)

    def _execute(self, op: Op, key: RemoteKey, a: Any, b: Any, arg1: int, local: Any) -> tuple[Status, int]:
        if op is Op.NOP:
            return Status.OK, 0
        region = self.regions.get(key.rkey)
        if region is None:
            return Status.INVALID_KEY, 0
        arr, access = region
        if not access & _NEEDS[op]:
            return Status.ACCESS, 0
        base = arr.ctypes.data
        if op in (Op.READ_BATCH, Op.WRITE_BATCH):
            if any(int(r) + int(n) > arr.nbytes for r, n in zip(a, b)):
                return Status.BOUNDS, 0
            for r, n, loc in zip(a, b, local):
                src, dst = (base + int(r), int(loc)) if op is Op.READ_BATCH else (int(loc), base + int(r))
                ctypes.memmove(dst, src, int(n))
            return Status.OK, int(b.sum())
        if op in (Op.FETCH_ADD, Op.CMP_SWAP):
            if a + 8 > arr.nbytes:
                return Status.BOUNDS, 0
            if a % 8:
                return Status.ALIGN, 0
            word = arr[a:a + 8].view(np.uint64)
            old = int(word[0])
            if op is Op.FETCH_ADD:
                word[0] = (old + b) & ((1 << 64) - 1)
            elif old == b:
                word[0] = arg1
            return Status.OK, old
        if a + b > arr.nbytes:
            return Status.BOUNDS, 0
        src, dst = (base + a, local) if op is Op.READ else (local, base + a)
        ctypes.memmove(dst, src, b)
        return Status.OK, b

    def _on_dead(self, code: int) -> None:
        self._die(rdmaio.EndpointBrokenError(f"fake connection died ({code})"))

    def _halt(self, exc: BaseException) -> None:
        self.queued.clear()  # the peer runs nothing more
        self._fail_all(exc, release=True)

    def _destroy(self) -> None:
        self.queued.clear()
        self.destroyed = True


class Harness:
    """One queue pair under test and the means to hold its completions back."""

    qp: QueuePair
    key: RemoteKey
    table: np.ndarray  # the target's bytes (this process: the suite checks writes there)
    local: rdmaio.MemoryRegion
    buf: np.ndarray  # the local region's bytes

    def __init__(self) -> None:
        #: what the queue pair's owner was told, in order (broken hook)
        self.seen: list[BaseException] = []

    def stall(self) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        raise NotImplementedError

    def poll(self) -> None:
        """One progress round, now (delivers what has arrived)."""
        raise NotImplementedError

    def forged(self) -> RemoteKey:
        """A key for the target region that the target does not know."""
        k = self.key
        return RemoteKey(k.transport, k.addr, k.rkey ^ 0x5A5A, k.length, k.access, k.region_id)


class EndpointHarness(Harness):
    def __init__(self, engine: rdmaio.Engine, ep: rdmaio.Endpoint) -> None:
        super().__init__()
        self.qp = ep._qps[0]
        self._worker = engine._core.workers[0]
        self._loop = asyncio.get_running_loop()
        ep.add_broken_callback(self.seen.append)

    stalled = False

    def stall(self) -> None:
        self._loop.remove_reader(self._worker._fd())
        self.stalled = True

    def resume(self) -> None:
        self._loop.add_reader(self._worker._fd(), self._worker._poll_on_loop)
        self._loop.call_soon(self._worker._poll_on_loop)
        self.stalled = False

    def poll(self) -> None:
        self._worker._poll_on_loop()


class _LocalMemory:
    """A region backend for memory only this side touches (the fake needs no engine)."""

    def register(self, addr: int, length: int, access: Access) -> tuple[int, int]:
        return 0, -1

    def key(self, mr: rdmaio.MemoryRegion) -> RemoteKey:
        raise rdmaio.UsageError("local memory only")

    def revoke(self, mr: rdmaio.MemoryRegion) -> None:
        pass

    def busy(self, mr: rdmaio.MemoryRegion) -> int:
        return 0

    def release(self, mr: rdmaio.MemoryRegion) -> None:
        pass


class FakeHarness(Harness):
    def __init__(self, depth: int, op_timeout: float | None) -> None:
        super().__init__()
        self.qp = self.fake = FakeQueuePair(asyncio.get_running_loop(), depth, op_timeout, self.seen.append)
        self.table = np.random.default_rng(1).integers(0, 256, TABLE, dtype=np.uint8)
        self.fake.regions[0x1234] = (self.table, Access.ALL)
        self.key = RemoteKey("fake", 0, 0x1234, TABLE, Access.ALL)
        self.buf = np.zeros(TABLE, dtype=np.uint8)
        self.local = RegionTable(_LocalMemory()).register(self.buf, Access.NONE)

    def stall(self) -> None:
        self.fake.auto = False

    def resume(self) -> None:
        self.fake.auto = True
        asyncio.get_running_loop().call_soon(self.fake.run)

    def poll(self) -> None:
        auto, self.fake.auto = self.fake.auto, True
        self.fake.run()
        self.fake.auto = auto


KINDS = ["tcp", "verbs", "fake"]


def kind_params() -> list[object]:
    avail = rdmaio.available_transports()
    params = []
    for kind in KINDS:
        marks = []
        if kind == "verbs":
            marks.append(pytest.mark.verbs)
            if avail["verbs"] is not None:
                marks.append(pytest.mark.skip(reason=f"verbs transport unavailable: {avail['verbs']}"))
        params.append(pytest.param(kind, id=kind, marks=marks))
    return params


@contextlib.asynccontextmanager
async def harness(kind: str, depth: int = 4, op_timeout: float | None = None) -> AsyncIterator[Harness]:
    """A queue pair of ``depth`` slots on transport ``kind`` ("tcp", "verbs" or "fake")."""
    if kind == "fake":
        h = FakeHarness(depth, op_timeout)
        try:
            yield h
        finally:
            h.qp.close()
        return
    async with rdmaio.Engine(transport=kind, workers=1) as server, \
            rdmaio.Engine(transport=kind, workers=1, progress="loop", sq_depth=depth, op_timeout=op_timeout,
                          heartbeat=0) as client:
        table = np.random.default_rng(1).integers(0, 256, TABLE, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        eh = EndpointHarness(client, ep)
        eh.key = await ep.remote_key("t")
        eh.table = table
        eh.buf = np.zeros(TABLE, dtype=np.uint8)
        eh.local = client.register(eh.buf, access=rdmaio.Access.NONE)
        try:
            yield eh
        finally:
            if eh.stalled:
                eh.resume()
            await ep.aclose()
