"""Regression tests for defects found in review (tcp transport)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest

import rdmaio


@contextlib.asynccontextmanager
async def stalled_pair() -> AsyncIterator[tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Endpoint, rdmaio.RemoteKey,
                                                 np.ndarray, list[object]]]:
    """A client endpoint to a server whose responders can be stalled (loop progress, reader removed)."""
    async with rdmaio.Engine(transport="tcp", workers=1, progress="loop", heartbeat=0) as server, \
            rdmaio.Engine(transport="tcp", workers=1, heartbeat=0) as client:
        table = np.arange(4096, dtype=np.uint64).view(np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        loop = asyncio.get_running_loop()
        w = server._core.workers[0]

        def stall() -> None:
            loop.remove_reader(w._fd())

        def resume() -> None:
            loop.add_reader(w._fd(), w._poll_on_loop)
            loop.call_soon(w._poll_on_loop)

        yield server, client, ep, key, table, [stall, resume]


async def test_broken_endpoint_never_writes_local_memory_of_failed_operations() -> None:
    # The endpoint breaks (heartbeat timeout, control connection lost, another queue pair
    # died) while a read is in flight on a queue pair that is still alive: the read fails
    # and its memory is unpinned, so a late response must not land in it any more.
    async with stalled_pair() as (server, client, ep, key, table, (stall, resume)):
        raw = bytearray(64)
        mr = client.register(raw)
        stall()
        t1 = asyncio.ensure_future(ep.read(mr, 0, key, 8, 32))
        t2 = asyncio.ensure_future(ep.read_batch(mr, np.array([32, 40]), key, np.array([64, 72]),
                                                 np.array([8, 8])))
        await asyncio.sleep(0.05)
        ep._on_broken(rdmaio.EndpointBrokenError("simulated heartbeat timeout"))
        for t in (t1, t2):
            with pytest.raises(rdmaio.EndpointBrokenError):
                await t
        mr.close()  # nothing uses the region any more: its buffer is released
        resume()
        await asyncio.sleep(0.2)
        assert raw == bytearray(64), "a failed operation's memory was written after it failed"
        await ep.aclose()


async def test_read_batch_lengths_mutated_after_posting_cannot_overflow_local_region() -> None:
    async with stalled_pair() as (server, client, ep, key, table, (stall, resume)):
        raw = np.zeros(64, dtype=np.uint8)
        mr = client.register(raw[:16])
        lengths = np.array([8, 8], dtype=np.uint64)
        stall()
        t = asyncio.ensure_future(ep.read_batch(mr, np.array([0, 8]), key, np.array([0, 8]), lengths))
        await asyncio.sleep(0.05)
        lengths[:] = [0, 16]  # the caller reuses its array while the batch is in flight
        resume()
        await t
        assert not raw[16:].any(), "bytes landed outside the registered local region"
        assert np.array_equal(raw[:16], table[:16])
        await ep.aclose()


@pytest.mark.parametrize("op", ["read", "write", "fetch_add", "compare_swap", "write_with_imm"])
async def test_out_of_range_remote_offset_is_a_usage_error_and_leaks_no_slot(op: str) -> None:
    async with rdmaio.Engine(transport="tcp", workers=1, heartbeat=0) as server, \
            rdmaio.Engine(transport="tcp", workers=1, sq_depth=2, heartbeat=0) as client:
        table = np.zeros(4096, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        mr = client.register(np.zeros(64, dtype=np.uint8))
        bad = 1 << 64
        calls = {
            "read": lambda: ep.read(mr, 0, key, bad, 8),
            "write": lambda: ep.write(mr, 0, key, bad, 8),
            "fetch_add": lambda: ep.fetch_add(key, bad, 1),
            "compare_swap": lambda: ep.compare_swap(key, bad, 0, 1),
            "write_with_imm": lambda: ep.write_with_imm(mr, 0, key, bad, 8, 1),
        }
        for _ in range(4):  # more than sq_depth: a leaked slot would hang the next call
            with pytest.raises(rdmaio.UsageError):
                await asyncio.wait_for(calls[op](), 5)
        await asyncio.wait_for(ep.read(mr, 0, key, 0, 8), 5)
        await ep.aclose()


async def test_slot_waiter_cancelled_after_its_wakeup_passes_the_slot_on() -> None:
    # A completion frees a slot and wakes one waiter; if that waiter is cancelled in the
    # same loop iteration (e.g. its wait_for timed out), the next waiter must get the slot
    # instead of hanging until some other operation completes.
    from rdmaio.transports.base import Pending as _Pending

    async with rdmaio.Engine(transport="tcp", workers=1, heartbeat=0) as server, \
            rdmaio.Engine(transport="tcp", workers=1, sq_depth=1, heartbeat=0) as client:
        server.expose("t", server.register(np.zeros(64, dtype=np.uint8), access=rdmaio.Access.ALL))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        qp = ep._qps[0]
        slot = qp._free.pop()  # an operation holds the only slot
        qp._pending[slot] = _Pending(asyncio.get_running_loop().create_future(), None, None, "fake")
        b = asyncio.ensure_future(qp.wait_slot())
        c = asyncio.ensure_future(qp.wait_slot())
        await asyncio.sleep(0)
        assert len(qp._slot_waiters) == 2
        qp._finish(slot)  # the operation completes: b is woken ...
        b.cancel()  # ... and cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await b
        await asyncio.wait_for(c, 1)
        assert qp._free == [slot]
        await ep.aclose()
