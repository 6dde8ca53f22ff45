"""Verbs-only behaviour beyond the conformance suite (runs inside the Soft-RoCE VM).

    python -m rdmaio.testing.softroce -- .venv/bin/python -m pytest tests/rdmaio/test_verbs.py -q
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

import rdmaio

pytestmark = [
    pytest.mark.verbs,
    pytest.mark.skipif(rdmaio.available_transports()["verbs"] is not None,
                       reason=f"verbs unavailable: {rdmaio.available_transports()['verbs']}"),
]


@pytest.fixture(params=["thread", "loop"])
async def ctx(request: pytest.FixtureRequest) -> AsyncIterator[tuple[rdmaio.Endpoint, rdmaio.RemoteKey, np.ndarray,
                                                                      rdmaio.MemoryRegion, np.ndarray, rdmaio.Engine]]:
    async with rdmaio.Engine(transport="verbs", workers=2, progress=request.param) as server, \
            rdmaio.Engine(transport="verbs", workers=2, progress=request.param) as client:
        table = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        out = np.zeros(1 << 20, dtype=np.uint8)
        mr = client.register(out)
        yield ep, key, table, mr, out, client


async def test_forged_key_recovers_the_queue_pair_and_replays_concurrent_ops(ctx: tuple) -> None:  # type: ignore[type-arg]
    ep, key, table, mr, out, _ = ctx
    forged = rdmaio.RemoteKey("verbs", key.addr, key.rkey ^ 0x100, key.length, key.access)
    good = [asyncio.create_task(ep.read(mr, i * 4096, key, i * 4096, 4096)) for i in range(64)]
    bad = asyncio.create_task(ep.read(mr, 0, forged, 0, 8))
    good += [asyncio.create_task(ep.read(mr, (64 + i) * 4096, key, (64 + i) * 4096, 4096)) for i in range(64)]
    await asyncio.gather(*good)  # ops flushed by the error are re-posted after the reset
    with pytest.raises(rdmaio.InvalidKeyError):
        await bad
    assert np.array_equal(out[: 128 * 4096], table[: 128 * 4096])
    assert sum(qp.recoveries for qp in ep._qps) >= 1
    assert await ep.fetch_add(key, 0, 0) == int(table[:8].view(np.uint64)[0])


async def test_registration_cache_shares_one_nic_registration(ctx: tuple) -> None:  # type: ignore[type-arg]
    ep, key, table, mr, out, client = ctx
    buf = np.zeros(4096, dtype=np.uint8)
    a = client.register(buf)
    b = client.register(buf)
    assert a._key == b._key  # same lkey/rkey: one ibv_reg_mr
    a.close()
    await ep.read(b, 0, key, 0, 4096)  # still registered: b holds a reference
    assert np.array_equal(buf, table[:4096])
    b.close()
    assert (buf.ctypes.data, 4096, int(rdmaio.Access.READ | rdmaio.Access.WRITE)) not in client._verbs._cache


async def test_batches_larger_than_one_doorbell(ctx: tuple) -> None:  # type: ignore[type-arg]
    ep, key, table, mr, out, _ = ctx
    n = 5000  # several chunks of chained WRs
    rows = np.random.default_rng(3).integers(0, (1 << 20) // 64, n)
    await ep.read_batch(mr, np.arange(n) * 64, key, rows * 64, np.full(n, 64))
    assert np.array_equal(out[: n * 64].reshape(n, 64), table.reshape(-1, 64)[rows])


async def test_key_for_another_transport_is_a_usage_error(ctx: tuple) -> None:  # type: ignore[type-arg]
    ep, key, table, mr, out, _ = ctx
    with pytest.raises(rdmaio.UsageError):
        await ep.read(mr, 0, rdmaio.RemoteKey("tcp", 0, 1, 8, rdmaio.Access.READ), 0, 8)
