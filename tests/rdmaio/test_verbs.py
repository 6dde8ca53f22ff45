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
    assert (buf.ctypes.data, 4096, int(rdmaio.Access.READ | rdmaio.Access.WRITE)) not in client._core.transport.vctx._cache


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


# -- WRITE_WITH_IMM ---------------------------------------------------------------------------

IMMS = [0, 1, 0x01020304, 0x80000000, 0xFFFFFFFF]  # byte order and the top bit show up in these


@pytest.fixture(params=["thread", "loop"])
async def imm_pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[rdmaio.Engine, rdmaio.Engine,
                                                                          rdmaio.Listener, rdmaio.Endpoint]]:
    # sq_depth=64: receive queues of 64 WRs, so the tests below run through several refills
    async with rdmaio.Engine(transport="verbs", workers=2, progress=request.param, sq_depth=64) as server, \
            rdmaio.Engine(transport="verbs", workers=2, progress=request.param, sq_depth=64) as client:
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        yield server, client, lst, ep


def _server_qps(lst: rdmaio.Listener) -> list:  # type: ignore[type-arg]
    (session,) = lst._sessions.values()
    assert session.link is not None
    return session.link.qps


async def _until(cond: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < end, "timed out waiting for immediates"
        await asyncio.sleep(0.001)


async def test_write_with_imm_delivers_in_order_after_the_data(imm_pair: tuple) -> None:  # type: ignore[type-arg]
    server, client, lst, ep = imm_pair
    n = 300  # > 4 x the receive queue depth of 64
    ring = np.zeros(n * 8, dtype=np.uint8)
    ring_mr = server.register(ring, access=rdmaio.Access.WRITE)
    server.expose("ring", ring_mr)
    key = await ep.remote_key("ring")
    src = np.arange(n * 8, dtype=np.uint64).view(np.uint8)[: n * 8].copy()
    src_mr = client.register(src, access=rdmaio.Access.NONE)
    got: list[tuple[int, int, bytes]] = []  # (server QP index, imm, the 8 bytes it announces)
    qps = _server_qps(lst)
    for i, qp in enumerate(qps):
        qp.on_imm = lambda imm, i=i: got.append((i, imm, ring[(imm % n) * 8:(imm % n) * 8 + 8].tobytes()))
    qp0 = ep._qps[0]
    for j in range(n):  # all on one QP, many in flight: their immediates must arrive in posting order
        if not qp0._free:
            await qp0.wait_slot()
        qp0.post(rdmaio._wire.Op.WRITE_IMM, key, j * 8, 8, j, src_mr.addr + j * 8, src_mr, "t")
    await _until(lambda: len(got) >= n)
    await asyncio.sleep(0.05)
    assert [g[1] for g in got] == list(range(n)), "immediates lost, duplicated or reordered"
    assert {g[0] for g in got} == {0}, "an immediate arrives on the QP paired with the writer's"
    for _, imm, data in got:  # the data had landed before the immediate was delivered
        assert data == src[imm * 8:imm * 8 + 8].tobytes()
    assert all(qp.rq_posted >= 32 for qp in qps), [qp.rq_posted for qp in qps]

    # the public call, with immediates whose byte order matters, and a zero-length one
    got.clear()
    for imm in IMMS:
        await ep.write_with_imm(src_mr, 0, key, 0, 8, imm)
    await ep.write_with_imm(src_mr, 0, key, 0, 0, 0x0A0B0C0D)
    await _until(lambda: len(got) >= len(IMMS) + 1)
    assert [g[1] for g in got] == IMMS + [0x0A0B0C0D]
    with pytest.raises(rdmaio.UsageError):
        await ep.write_with_imm(src_mr, 0, key, 0, 8, 1 << 32)
    with pytest.raises(rdmaio.OutOfBoundsError):  # refused locally: nothing reaches the NIC
        await ep.write_with_imm(src_mr, 0, key, n * 8 - 4, 8, 1)


async def test_server_writes_with_imm_to_the_client(imm_pair: tuple) -> None:  # type: ignore[type-arg]
    server, client, lst, ep = imm_pair
    ring = np.zeros(4096, dtype=np.uint8)
    ring_mr = client.register(ring, access=rdmaio.Access.WRITE)
    got: list[tuple[int, int]] = []
    for i, qp in enumerate(ep._qps):
        qp.on_imm = lambda imm, i=i: got.append((i, imm))
    src = np.full(4096, 7, dtype=np.uint8)
    src_mr = server.register(src, access=rdmaio.Access.NONE)
    sqp = _server_qps(lst)[1]  # the server's side of the client's QP 1
    futs = []
    for k in range(150):  # more than sq_depth: posting waits for slots
        if not sqp._free:
            await sqp.wait_slot()
        futs.append(sqp.post(rdmaio._wire.Op.WRITE_IMM, ring_mr.remote_key(), 0, 4096, k, src_mr.addr, src_mr, "t"))
    await asyncio.gather(*futs)
    await _until(lambda: len(got) >= 150)
    assert got == [(1, k) for k in range(150)]
    assert bool((ring == 7).all())


async def test_flushed_receives_are_not_messages(imm_pair: tuple) -> None:  # type: ignore[type-arg]
    """A QP error flushes every posted receive WR: none may look like an immediate, and the
    reset QPs get a fresh receive pool (the old generation's flushes are not counted)."""
    server, client, lst, ep = imm_pair
    table = np.zeros(4096, dtype=np.uint8)
    server.expose("t", server.register(table, access=rdmaio.Access.ALL))
    key = await ep.remote_key("t")
    got: list[int] = []
    cgot: list[int] = []
    for qp in _server_qps(lst):
        qp.on_imm = got.append
    for qp in ep._qps:
        qp.on_imm = cgot.append
    buf = np.zeros(64, dtype=np.uint8)
    mr = client.register(buf)
    forged = rdmaio.RemoteKey("verbs", key.addr, key.rkey ^ 0x100, key.length, key.access)
    for _ in range(2):  # both ends go to ERR (flushing 64 receives each), then are reset
        with pytest.raises(rdmaio.InvalidKeyError):
            await ep.read(mr, 0, forged, 0, 8)
    await ep.read(mr, 0, key, 0, 8)
    (qp,) = [q for q in ep._qps if q.recoveries]
    assert qp.recoveries == 2
    await asyncio.sleep(0.1)
    assert got == [] and cgot == [], "a flushed receive WR was reported as an immediate"
    for k in range(200):  # through the recovered QP: more than three receive pools' worth
        if not qp._free:
            await qp.wait_slot()
        qp.post(rdmaio._wire.Op.WRITE_IMM, key, 0, 8, k, mr.addr, mr, "t")
    await _until(lambda: len(got) >= 200)
    await asyncio.sleep(0.05)
    assert got == list(range(200)) and cgot == []
    assert all(q.rq_posted >= 32 for q in [*ep._qps, *_server_qps(lst)])
