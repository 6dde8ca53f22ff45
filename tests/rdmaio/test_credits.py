"""rdmaio.Credits: a FIFO window of operations and bytes in flight."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import rdmaio


async def test_grants_are_first_come_first_served() -> None:
    c = rdmaio.Credits(max_bytes=100)
    await c.acquire(60)
    order: list[str] = []

    async def want(name: str, n: int) -> None:
        await c.acquire(n)
        order.append(name)

    big = asyncio.ensure_future(want("big", 90))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(want("small", 20))      # would fit now, but must not overtake
    await asyncio.sleep(0)
    assert order == [] and c.waiting == 2
    c.release(60)
    await big
    assert order == ["big"] and not small.done()
    c.release(90)
    await small
    assert order == ["big", "small"] and c.in_use_bytes == 20 and c.waited == 2


async def test_ops_window_and_oversized_request_alone() -> None:
    c = rdmaio.Credits(max_ops=2, max_bytes=10)
    await c.acquire(1000)                                 # larger than the window, alone: admitted
    assert not c.try_acquire(1)
    c.release(1000)
    assert c.try_acquire(5) and c.try_acquire(5)
    assert not c.try_acquire(0)                           # third operation: over max_ops
    c.release(5)
    c.release(5)
    assert (c.in_use_ops, c.in_use_bytes) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue_and_passes_the_grant_on() -> None:
    c = rdmaio.Credits(max_ops=1)
    await c.acquire()
    a = asyncio.ensure_future(c.acquire())
    b = asyncio.ensure_future(c.acquire())
    await asyncio.sleep(0)
    a.cancel()
    await asyncio.gather(a, return_exceptions=True)
    assert c.waiting == 1
    c.release()
    await b
    assert c.in_use_ops == 1
    # granted, then cancelled before it ran: the credits go back (to the next waiter)
    d = asyncio.ensure_future(c.acquire())
    e = asyncio.ensure_future(c.acquire())
    await asyncio.sleep(0)
    c.release()                                           # grants d
    d.cancel()
    await asyncio.gather(d, return_exceptions=True)
    await e
    assert c.in_use_ops == 1 and c.waiting == 0


async def test_take_releases_on_error() -> None:
    c = rdmaio.Credits(max_bytes=8)
    with pytest.raises(RuntimeError):
        async with c.take(8):
            assert c.in_use_bytes == 8
            raise RuntimeError("boom")
    assert c.in_use_bytes == 0 and c.in_use_ops == 0


def test_bad_arguments() -> None:
    with pytest.raises(rdmaio.UsageError):
        rdmaio.Credits(max_ops=0)
    with pytest.raises(rdmaio.UsageError):
        rdmaio.Credits(max_bytes=True)                    # type: ignore[arg-type]
    c = rdmaio.Credits()
    with pytest.raises(rdmaio.UsageError):
        c.try_acquire(-1)
    with pytest.raises(rdmaio.UsageError):
        c.release(1)                                      # more than taken


# ------------------------------------------------------------ classes of traffic on endpoints


async def test_endpoints_with_their_own_windows_are_separate_classes_of_traffic() -> None:
    """The priority-class recipe of the module docstring, outside any application: a bulk endpoint whose
    window is exhausted does not delay reads on an urgent endpoint to the same peer, and those never
    take bulk credits."""
    table = np.arange(1 << 16, dtype=np.uint8)
    async with rdmaio.Engine(transport="tcp", workers=1) as server, \
            rdmaio.Engine(transport="tcp", workers=1) as client:
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))
        lst = await server.listen()
        bulk, urgent = rdmaio.Credits(max_bytes=8192), rdmaio.Credits(max_ops=4)
        bulk_ep = await client.connect("127.0.0.1", lst.port, credits=bulk)
        urgent_ep = await client.connect("127.0.0.1", lst.port, credits=urgent)
        assert bulk_ep.credits is bulk and urgent_ep.credits is urgent
        key = await bulk_ep.remote_key("t")
        ukey = await urgent_ep.remote_key("t")
        local = np.zeros(1 << 16, dtype=np.uint8)
        out = client.register(local)
        # four concurrent 4 KiB bulk batches: at most two fit in the 8 KiB window at a time
        offs = np.arange(4, dtype=np.int64) * 4096
        reads = [asyncio.ensure_future(bulk_ep.read_batch(out, offs[i:i + 1], key, offs[i:i + 1],
                                                          np.array([4096]))) for i in range(4)]
        await asyncio.sleep(0)
        assert bulk.in_use_bytes == 8192 and bulk.waiting == 2
        await asyncio.gather(*reads)
        assert bulk.granted == 4 and bulk.waited == 2 and bulk.in_use_bytes == 0
        assert (local[:16384] == table[:16384]).all()
        await bulk.acquire(8192)                          # the bulk window is full (a stuck transfer)
        stuck = asyncio.ensure_future(bulk_ep.read(out, 0, key, 100, 64))
        await asyncio.sleep(0.01)
        assert not stuck.done() and bulk.waiting == 1
        await asyncio.wait_for(urgent_ep.read(out, 32768, ukey, 200, 64), 10)   # not behind bulk
        assert (local[32768:32832] == table[200:264]).all()
        assert urgent.granted == 1 and urgent.in_use_ops == 0
        assert await asyncio.wait_for(urgent_ep.fetch_add(ukey, 0, 0), 10) >= 0
        assert not stuck.done() and bulk.granted == 5     # 4 reads + ours: urgent operations took none
        bulk.release(8192)
        await asyncio.wait_for(stuck, 10)
        assert bulk.in_use_bytes == 0 and urgent.granted == 2
        with pytest.raises(rdmaio.UsageError):
            await client.connect("127.0.0.1", lst.port, credits=8192)   # type: ignore[arg-type]
