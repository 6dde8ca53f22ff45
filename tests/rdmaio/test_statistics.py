"""Read-only statistics for operators: queue-pair slot waits and a listener's open sessions."""

from __future__ import annotations

import asyncio

import numpy as np

import rdmaio


async def test_slot_waits_count_operations_that_found_every_slot_taken() -> None:
    server = rdmaio.Engine(transport="tcp", workers=1)
    client = rdmaio.Engine(transport="tcp", workers=1, sq_depth=2, qp_per_worker=True)
    async with server, client:
        table = np.arange(1 << 16, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.READ))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        out = client.register(np.zeros(1 << 16, dtype=np.uint8))
        await ep.read(out, 0, key, 0, 64)
        assert ep.slot_waits == 0  # one operation at a time never waits
        n = 40
        await asyncio.gather(*(ep.read(out, 64 * i, key, 64 * i, 64) for i in range(n)))
        assert bytes(out.buffer[: 64 * n]) == bytes(table[: 64 * n])
        slots = 2 * ep.num_queue_pairs
        # every operation beyond the slots of the queue pairs had to wait for one
        assert n - slots <= ep.slot_waits <= n, (ep.slot_waits, slots)
        before = ep.slot_waits
        await ep.read(out, 0, key, 0, 64)
        assert ep.slot_waits == before


async def test_listener_counts_open_sessions() -> None:
    server = rdmaio.Engine(transport="tcp", workers=1)
    client = rdmaio.Engine(transport="tcp", workers=1)
    async with server, client:
        lst = await server.listen()
        assert lst.sessions == 0
        eps = [await client.connect("127.0.0.1", lst.port) for _ in range(3)]
        assert lst.sessions == 3
        await eps[0].aclose()
        for _ in range(200):
            if lst.sessions == 2:
                break
            await asyncio.sleep(0.01)
        assert lst.sessions == 2
        await lst.aclose()
        assert lst.sessions == 0
