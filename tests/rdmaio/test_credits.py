"""rdmaio.Credits: a FIFO window of operations and bytes in flight."""

from __future__ import annotations

import asyncio

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
