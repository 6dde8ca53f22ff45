"""One conformance suite for every QueuePair implementation (tcp, verbs, a scripted fake).

The contract of :class:`rdmaio.transports.base.QueuePair`: operations complete
with their results; a slot is held from posting until the operation ends and
each end wakes one slot waiter (a waiter cancelled right after its wake-up
passes it on); local memory stays pinned until the operation ends, whatever
happened to its future (cancelled, timed out, failed); closing or breaking fails
everything in flight and every waiter, and a broken queue pair tells its owner
once.  A new transport's queue pair gets a harness in queue_pairs.py and must
pass all of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

import rdmaio
from rdmaio._wire import Op
from rdmaio.transports.base import NO_KEY
from tests.rdmaio.queue_pairs import Harness, harness, kind_params

pytestmark = pytest.mark.parametrize("kind", kind_params())


def read(h: Harness, remote: int = 0, n: int = 64, local: int = 0) -> asyncio.Future[int]:
    return h.qp.post(Op.READ, h.key, remote, n, 0, h.local.addr + local, h.local, "read")


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


async def test_operations_complete_with_their_results(kind: str) -> None:
    async with harness(kind) as h:
        qp = h.qp
        await read(h, 100, 64)
        assert np.array_equal(h.buf[:64], h.table[100:164])
        h.buf[:32] = 7
        await qp.post(Op.WRITE, h.key, 200, 32, 0, h.local.addr, h.local, "write")
        assert (h.table[200:232] == 7).all()
        word = h.table[:8].view(np.uint64)
        word[0] = 5
        assert await qp.post(Op.FETCH_ADD, h.key, 0, 3, 0, 0, None, "fetch_add") == 5
        assert await qp.post(Op.CMP_SWAP, h.key, 0, 8, 99, 0, None, "compare_swap") == 8
        assert int(word[0]) == 99
        await qp.post(Op.NOP, NO_KEY, 0, 1, 0, 0, None, "ping")
        remote = np.array([1000, 3000], dtype=np.uint64)
        lengths = np.array([16, 24], dtype=np.uint64)
        await qp.post_batch(Op.READ_BATCH, h.key, remote, lengths,
                            np.array([h.local.addr + 4096, h.local.addr + 4112], dtype=np.uint64), h.local, "batch")
        assert np.array_equal(h.buf[4096:4112], h.table[1000:1016])
        assert np.array_equal(h.buf[4112:4136], h.table[3000:3024])
        assert qp.in_flight == 0 and len(qp._free) == 4 and h.local._pins == 0 and h.seen == []


async def test_slots_bound_what_is_in_flight(kind: str) -> None:
    async with harness(kind, depth=4) as h:
        qp = h.qp
        h.stall()
        futs = [read(h, i * 64, 64, i * 64) for i in range(4)]
        assert not qp._free and qp.in_flight == 4 and h.local._pins == 4
        waiter = asyncio.ensure_future(qp.wait_slot())
        await asyncio.sleep(0.02)
        assert not waiter.done(), "wait_slot returned while every slot was held"
        h.resume()
        await asyncio.wait_for(waiter, 10)
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert qp.in_flight == 0 and len(qp._free) == 4 and h.local._pins == 0
        assert np.array_equal(h.buf[:256], h.table[:256])


async def test_corked_posts_leave_together_and_never_wait_for_the_cork(kind: str) -> None:
    """cork(True)/cork(False) only batches the doorbell: corked operations complete in order, also when
    the poster awaits them before uncorking (the end of the loop iteration sends them); pairs nest."""
    async with harness(kind, depth=4) as h:
        qp = h.qp
        sent: list[int] = []
        if kind == "tcp":  # count the flushes (each one a sendmsg of whatever is queued)
            real = type(qp)._flush

            def counted(self: object) -> None:
                sent.append(qp.in_flight)
                real(self)  # type: ignore[arg-type]

            type(qp)._flush = counted  # type: ignore[method-assign]
        try:
            qp.cork(True)
            qp.cork(True)
            futs = [read(h, i * 64, 64, i * 64) for i in range(3)]
            assert sent == []                      # corked: the first post did not go out alone
            qp.cork(False)
            assert sent == []                      # still corked once
            qp.cork(False)
            if kind == "tcp":
                assert sent == [3]                 # all three in one flush, at the last cork(False)
            await asyncio.wait_for(asyncio.gather(*futs), 10)
            assert np.array_equal(h.buf[:192], h.table[:192])
            qp.cork(True)                          # awaited while corked: the loop's turn sends it
            await asyncio.wait_for(read(h, 640, 64, 640), 10)
            qp.cork(False)
            assert np.array_equal(h.buf[640:704], h.table[640:704])
            sent.clear()
            await asyncio.wait_for(read(h, 0, 64), 10)  # uncorked: alone in flight, sent at once
            assert kind != "tcp" or sent[:1] == [1]
        finally:
            if kind == "tcp":
                type(qp)._flush = real  # type: ignore[method-assign]


async def test_slot_waiters_are_served_in_order(kind: str) -> None:
    async with harness(kind, depth=1) as h:
        qp = h.qp
        order: list[int] = []

        async def user(i: int) -> None:
            if not qp._free:
                await qp.wait_slot()
            order.append(i)
            await read(h, 64 * i, 64, 64 * i)

        h.stall()
        users = [asyncio.ensure_future(user(i)) for i in range(6)]
        await asyncio.sleep(0.01)
        assert order == [0], "only one operation fits in one slot"
        h.resume()
        await asyncio.wait_for(asyncio.gather(*users), 10)
        assert order == list(range(6))
        assert np.array_equal(h.buf[:384], h.table[:384])


async def test_a_waiter_cancelled_right_after_its_wakeup_passes_the_slot_on(kind: str) -> None:
    # A completion frees the only slot and wakes waiter b; b is cancelled in the same loop
    # iteration (its wait_for timed out, say).  The wake-up must go to c, which would
    # otherwise hang until some other operation completes (it did on verbs).
    async with harness(kind, depth=1) as h:
        qp = h.qp
        h.stall()
        op = read(h)  # holds the only slot
        b = asyncio.ensure_future(qp.wait_slot())
        c = asyncio.ensure_future(qp.wait_slot())
        await asyncio.sleep(0.01)
        assert not b.done() and not c.done()
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while qp.in_flight:  # one progress round at a time, until the completion is delivered
            h.poll()
            if not qp.in_flight:
                break
            assert loop.time() < end, "the operation did not complete"
            await asyncio.sleep(0.001)
        b.cancel()  # woken by that completion, cancelled before it ran
        with pytest.raises(asyncio.CancelledError):
            await b
        await asyncio.wait_for(c, 2)
        assert qp._free, "the slot is free for c"
        await op
        h.resume()


async def test_memory_stays_pinned_until_the_operation_ends(kind: str) -> None:
    async with harness(kind) as h:
        qp = h.qp
        h.stall()
        fut = read(h, 0, 4096)
        assert h.local._pins == 1
        fut.cancel()  # the caller gave up: the transfer may still land
        await asyncio.sleep(0.01)
        assert qp.in_flight == 1 and h.local._pins == 1 and len(qp._free) == 3
        h.resume()
        await until(lambda: qp.in_flight == 0, "the cancelled operation ended")
        assert h.local._pins == 0 and len(qp._free) == 4
        assert np.array_equal(h.buf[:4096], h.table[:4096]), "the transfer landed in the pinned buffer"


async def test_a_timed_out_operation_holds_its_slot_and_memory_until_it_ends(kind: str) -> None:
    async with harness(kind, op_timeout=0.05) as h:
        qp = h.qp
        h.stall()
        fut = read(h, 0, 256)
        with pytest.raises(rdmaio.TimeoutError, match="did not complete within 0.05 s"):
            await asyncio.wait_for(fut, 5)
        assert qp.in_flight == 1 and h.local._pins == 1
        h.resume()
        await until(lambda: qp.in_flight == 0, "the timed-out operation ended")
        assert h.local._pins == 0 and len(qp._free) == 4
        await read(h, 0, 64)  # the queue pair is fine


async def test_close_fails_everything_in_flight_and_is_idempotent(kind: str) -> None:
    async with harness(kind) as h:
        qp = h.qp
        h.stall()
        futs = [read(h, 64 * i) for i in range(4)]
        waiter = asyncio.ensure_future(qp.wait_slot())
        await asyncio.sleep(0)
        qp.close()
        for f in futs:
            with pytest.raises(rdmaio.ClosedError):
                await f
        with pytest.raises(rdmaio.ClosedError):
            await waiter
        assert qp.in_flight == 0 and h.local._pins == 0, "closing releases what can no longer be touched"
        qp.close()
        with pytest.raises(rdmaio.ClosedError):
            read(h)
        with pytest.raises(rdmaio.ClosedError):
            await qp.wait_slot()
        assert h.seen == [], "closing is not breaking"


async def test_a_broken_queue_pair_fails_everything_and_tells_its_owner_once(kind: str) -> None:
    async with harness(kind) as h:
        qp = h.qp
        h.stall()
        futs = [read(h, 64 * i, 64, 64 * i) for i in range(4)]
        waiter = asyncio.ensure_future(qp.wait_slot())
        await asyncio.sleep(0)
        exc = rdmaio.EndpointBrokenError("test: the link broke")
        qp._die(exc)
        qp._die(rdmaio.EndpointBrokenError("test: broke again"))
        for f in futs:
            with pytest.raises(rdmaio.EndpointBrokenError, match="the link broke"):
                await f
        with pytest.raises(rdmaio.EndpointBrokenError):
            await waiter
        with pytest.raises(rdmaio.EndpointBrokenError):
            read(h)
        await asyncio.sleep(0.01)
        assert h.seen == [exc]
        # memory stays pinned until nothing can write it any more (verbs: the flushes), then never again
        h.resume()
        await until(lambda: qp.in_flight == 0 and h.local._pins == 0, "the failed operations ended")
        before = h.buf[:256].copy()
        await asyncio.sleep(0.05)
        assert np.array_equal(h.buf[:256], before), "released memory of a failed operation was written"


async def test_a_refused_operation_fails_alone(kind: str) -> None:
    async with harness(kind) as h:
        with pytest.raises(rdmaio.InvalidKeyError):
            await asyncio.wait_for(h.qp.post(Op.READ, h.forged(), 0, 8, 0, h.local.addr, h.local, "read"), 10)
        await asyncio.wait_for(read(h, 512, 64), 10)  # (verbs: after the queue pair's recovery)
        assert np.array_equal(h.buf[:64], h.table[512:576])
        assert h.seen == [] and h.qp.in_flight == 0 and h.local._pins == 0
