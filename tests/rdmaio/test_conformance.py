"""One conformance suite for every transport (and both progress modes).

Each test gets a ``pair``: a target engine exposing a 16 MiB region ``table``
filled with a known pattern, and an initiator engine with an endpoint to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

import rdmaio
from tests.rdmaio.peers import peer_process
from tests.rdmaio.transports import config_params

TABLE = 16 << 20
MiB = 1 << 20
#: the killed peer's region: smaller on verbs, where the suite runs in an emulated VM (Soft-RoCE under TCG)
PEER_SIZE = {"tcp": 64 * MiB, "verbs": 16 * MiB}


def pattern(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@dataclass
class Pair:
    server: rdmaio.Engine
    client: rdmaio.Engine
    listener: rdmaio.Listener
    ep: rdmaio.Endpoint
    table: np.ndarray
    table_mr: rdmaio.MemoryRegion
    key: rdmaio.RemoteKey
    local: np.ndarray
    local_mr: rdmaio.MemoryRegion


@pytest.fixture(params=config_params())
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    transport, progress = request.param
    async with rdmaio.Engine(transport=transport, workers=2, progress=progress) as server, \
            rdmaio.Engine(transport=transport, workers=2, progress=progress) as client:
        table = pattern(TABLE, seed=1)
        table_mr = server.register(table, access=rdmaio.Access.ALL)
        server.expose("table", table_mr)
        listener = await server.listen("127.0.0.1", 0)
        ep = await client.connect("127.0.0.1", listener.port)
        key = await ep.remote_key("table")
        local = np.zeros(TABLE, dtype=np.uint8)
        local_mr = client.register(local, access=rdmaio.Access.NONE)
        yield Pair(server, client, listener, ep, table, table_mr, key, local, local_mr)


def random_sizes(rng: np.random.Generator, n: int) -> list[int]:
    """Log-uniform sizes from 1 B to 8 MiB, always including both ends."""
    sizes = [1, 8 * MiB] + [int(2 ** rng.uniform(0, 23)) for _ in range(n - 2)]
    return [max(1, min(s, 8 * MiB)) for s in sizes]


# -- correctness -------------------------------------------------------------------

async def test_read_random_offsets_and_sizes(pair: Pair) -> None:
    rng = np.random.default_rng(2)
    for size in random_sizes(rng, 24):
        roff = int(rng.integers(0, TABLE - size + 1))
        loff = int(rng.integers(0, TABLE - size + 1))
        await pair.ep.read(pair.local_mr, loff, pair.key, roff, size)
        assert np.array_equal(pair.local[loff:loff + size], pair.table[roff:roff + size]), (size, roff, loff)


async def test_write_random_offsets_and_sizes(pair: Pair) -> None:
    rng = np.random.default_rng(3)
    pair.local[:] = pattern(TABLE, seed=4)
    expected = pair.table.copy()
    for size in random_sizes(rng, 24):
        roff = int(rng.integers(0, TABLE - size + 1))
        loff = int(rng.integers(0, TABLE - size + 1))
        await pair.ep.write(pair.local_mr, loff, pair.key, roff, size)
        expected[roff:roff + size] = pair.local[loff:loff + size]
        assert np.array_equal(pair.table, expected), (size, roff, loff)


@pytest.mark.parametrize("row", [64, 256, 4096])
async def test_read_batch_gathers_rows(pair: Pair, row: int) -> None:
    rng = np.random.default_rng(row)
    n = 1000
    rows = rng.integers(0, TABLE // row, n)
    await pair.ep.read_batch(pair.local_mr, np.arange(n) * row, pair.key, rows * row, np.full(n, row))
    got = pair.local[: n * row].reshape(n, row)
    want = pair.table.reshape(-1, row)[rows]
    assert np.array_equal(got, want)


async def test_batches_with_mixed_lengths_and_empty_entries(pair: Pair) -> None:
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 5000, 300)
    lengths[::7] = 0
    local_off = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    remote_off = rng.integers(0, TABLE - 5000, 300)
    await pair.ep.read_batch(pair.local_mr, local_off, pair.key, remote_off, lengths)
    for lo, ro, n in zip(local_off, remote_off, lengths):
        assert np.array_equal(pair.local[lo:lo + n], pair.table[ro:ro + n])
    # and back: write those bytes (changed) to disjoint places
    pair.local[: int(lengths.sum())] ^= 0xFF
    dest = np.arange(300) * 5000
    expected = pair.table.copy()
    for lo, d, n in zip(local_off, dest, lengths):
        expected[d:d + n] = pair.local[lo:lo + n]
    await pair.ep.write_batch(pair.local_mr, local_off, pair.key, dest, lengths)
    assert np.array_equal(pair.table, expected)


async def test_large_batch_spans_several_requests(pair: Pair) -> None:
    n = 70_000  # more than one request's MAX_BATCH entries
    rows = np.random.default_rng(6).integers(0, TABLE // 64, n)
    await pair.ep.read_batch(pair.local_mr, np.arange(n) * 64, pair.key, rows * 64, np.full(n, 64))
    assert np.array_equal(pair.local[: n * 64].reshape(n, 64), pair.table.reshape(-1, 64)[rows])


async def test_atomics(pair: Pair) -> None:
    words = pair.table[:4096].view(np.uint64)
    words[:] = 0
    assert await pair.ep.fetch_add(pair.key, 8, 5) == 0
    assert await pair.ep.fetch_add(pair.key, 8, 7) == 5
    assert int(words[1]) == 12
    assert await pair.ep.fetch_add(pair.key, 16, -1) == 0  # wraps modulo 2**64
    assert int(words[2]) == 2**64 - 1
    assert await pair.ep.compare_swap(pair.key, 24, 0, 99) == 0
    assert await pair.ep.compare_swap(pair.key, 24, 0, 5) == 99  # expected mismatch: no swap
    assert int(words[3]) == 99
    # concurrent increments from many tasks are atomic
    await asyncio.gather(*(pair.ep.fetch_add(pair.key, 32, 1) for _ in range(2000)))
    assert int(words[4]) == 2000


async def test_ten_thousand_concurrent_ops(pair: Pair) -> None:
    rng = np.random.default_rng(7)
    offs = rng.integers(0, TABLE - 64, 10_000)

    async def one(i: int) -> None:
        await pair.ep.read(pair.local_mr, i * 64, pair.key, int(offs[i]), 64)

    await asyncio.gather(*(one(i) for i in range(10_000)))
    got = pair.local[: 10_000 * 64].reshape(-1, 64)
    want = np.stack([pair.table[o:o + 64] for o in offs])
    assert np.array_equal(got, want)


async def test_more_ops_than_queue_slots_wait_for_credit() -> None:
    async with rdmaio.Engine(transport="tcp", workers=1, sq_depth=4) as server, \
            rdmaio.Engine(transport="tcp", workers=1, sq_depth=4) as client:
        table = pattern(1 << 16)
        server.expose("t", server.register(table))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        out = np.zeros(1 << 16, dtype=np.uint8)
        mr = client.register(out)
        await asyncio.gather(*(ep.read(mr, i * 64, key, i * 64, 64) for i in range(1024)))
        assert np.array_equal(out, table)


async def test_ping(pair: Pair) -> None:
    await pair.ep.ping()


# -- protection ----------------------------------------------------------------------

async def test_out_of_bounds_is_refused_and_memory_untouched(pair: Pair) -> None:
    before = pair.table.copy()
    pair.local[:] = 0xAB
    with pytest.raises(rdmaio.OutOfBoundsError):
        await pair.ep.write(pair.local_mr, 0, pair.key, TABLE - 10, 11)
    with pytest.raises(rdmaio.OutOfBoundsError):
        await pair.ep.read(pair.local_mr, 0, pair.key, TABLE, 1)
    with pytest.raises(rdmaio.OutOfBoundsError):
        await pair.ep.read(pair.local_mr, 0, pair.key, 2**63, 8)
    with pytest.raises(rdmaio.OutOfBoundsError):  # one bad entry fails the whole batch
        await pair.ep.write_batch(pair.local_mr, [0, 100], pair.key, [0, TABLE - 5], [100, 10])
    with pytest.raises(rdmaio.OutOfBoundsError):
        await pair.ep.fetch_add(pair.key, TABLE, 1)
    assert np.array_equal(pair.table, before)
    assert (pair.local == 0xAB).all()  # failed reads wrote nothing locally either
    await pair.ep.read(pair.local_mr, 0, pair.key, 0, 16)  # the endpoint stays usable
    assert np.array_equal(pair.local[:16], pair.table[:16])


async def test_invalid_key_is_refused(pair: Pair) -> None:
    forged = rdmaio.RemoteKey(pair.key.transport, pair.key.addr, pair.key.rkey ^ 0x5A5A, pair.key.length,
                              pair.key.access, pair.key.region_id)
    with pytest.raises(rdmaio.InvalidKeyError):
        await pair.ep.read(pair.local_mr, 0, forged, 0, 8)
    with pytest.raises(rdmaio.InvalidKeyError):
        await pair.ep.write(pair.local_mr, 0, forged, 0, 8)


async def test_access_rights_are_enforced(pair: Pair) -> None:
    ro = np.full(4096, 3, dtype=np.uint8)
    wo = np.full(4096, 4, dtype=np.uint8)
    pair.server.expose("ro", pair.server.register(ro, access=rdmaio.Access.READ))
    pair.server.expose("wo", pair.server.register(wo, access=rdmaio.Access.WRITE))
    kro, kwo = await pair.ep.remote_key("ro"), await pair.ep.remote_key("wo")
    pair.local[:4096] = 9
    with pytest.raises(rdmaio.AccessDeniedError):
        await pair.ep.write(pair.local_mr, 0, kro, 0, 16)
    with pytest.raises(rdmaio.AccessDeniedError):
        await pair.ep.read(pair.local_mr, 0, kwo, 0, 16)
    with pytest.raises(rdmaio.AccessDeniedError):
        await pair.ep.fetch_add(kro, 0, 1)
    assert (ro == 3).all() and (wo == 4).all()
    await pair.ep.write(pair.local_mr, 0, kwo, 0, 16)
    assert (wo[:16] == 9).all()


async def test_misaligned_atomic(pair: Pair) -> None:
    with pytest.raises(rdmaio.AlignmentError):
        await pair.ep.fetch_add(pair.key, 3, 1)


async def test_deregistered_region_rejects_access(pair: Pair) -> None:
    extra = np.ones(4096, dtype=np.uint8)
    mr = pair.server.register(extra)
    pair.server.expose("extra", mr)
    key = await pair.ep.remote_key("extra")
    await pair.ep.read(pair.local_mr, 0, key, 0, 16)
    mr.close()
    with pytest.raises(rdmaio.InvalidKeyError):
        await pair.ep.read(pair.local_mr, 0, key, 0, 16)
    with pytest.raises(rdmaio.RegionNotFoundError):
        await pair.ep.remote_key("extra")


async def test_local_misuse_is_a_usage_error(pair: Pair) -> None:
    with pytest.raises(rdmaio.UsageError):
        await pair.ep.read(pair.local_mr, TABLE - 4, pair.key, 0, 8)
    with pytest.raises(rdmaio.UsageError):
        await pair.ep.read(pair.local_mr, -1, pair.key, 0, 8)
    with pytest.raises(rdmaio.UsageError):
        await pair.ep.read_batch(pair.local_mr, [0, 1], pair.key, [0], [8, 8])
    with pytest.raises(rdmaio.UsageError):
        await pair.ep.read_batch(pair.local_mr, np.zeros((2, 2), dtype=np.int64), pair.key, [0, 1], [1, 1])
    with pytest.raises(rdmaio.UsageError):
        await pair.ep.read_batch(pair.local_mr, [0.5], pair.key, [0], [1])
    with pytest.raises(rdmaio.UsageError):
        await pair.ep.read_batch(pair.local_mr, [-8], pair.key, [0], [1])
    with pytest.raises(rdmaio.UsageError):
        await pair.ep.read(pair.local_mr, 0, b"not a key", 0, 8)  # type: ignore[arg-type]
    with pytest.raises(rdmaio.RegionNotFoundError):
        await pair.ep.remote_key("no-such-region")
    with pytest.raises(rdmaio.UsageError):
        pair.client.register(b"read-only bytes")
    with pytest.raises(rdmaio.UsageError):
        pair.client.register(np.zeros((4, 4))[:, 0])


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


# -- lifecycle -------------------------------------------------------------------------

async def test_close_twice_and_use_after_close(pair: Pair) -> None:
    await pair.ep.aclose()
    await pair.ep.aclose()
    pair.ep.abort()
    with pytest.raises(rdmaio.ClosedError):
        await pair.ep.read(pair.local_mr, 0, pair.key, 0, 8)
    with pytest.raises(rdmaio.ClosedError):
        await pair.ep.remote_key("table")
    await pair.listener.aclose()
    await pair.listener.aclose()
    await pair.client.aclose()
    await pair.client.aclose()
    pair.client.abort()
    with pytest.raises(rdmaio.ClosedError):
        pair.client.register(bytearray(8))
    with pytest.raises(rdmaio.ClosedError):
        await pair.client.connect("127.0.0.1", 1)
    pair.local_mr.close()
    pair.local_mr.close()
    with pytest.raises(rdmaio.ClosedError):
        pair.local_mr.remote_key()


async def test_cancelled_read_keeps_its_memory_until_the_transfer_ends(pair: Pair) -> None:
    """Cancel reads in flight, then close their region at once: it is released only later."""
    buf = np.zeros(8 * MiB, dtype=np.uint8)
    mr = pair.client.register(buf)
    tasks = [asyncio.create_task(pair.ep.read(mr, 0, pair.key, 0, 8 * MiB)) for _ in range(8)]
    for _ in range(5):  # let every task (and its stripes) post
        await asyncio.sleep(0)
    for _ in range(500):  # a busy queue pair may hold them back a little (slow emulated RDMA)
        if mr._pins:
            break
        await asyncio.sleep(0.002)
    assert mr._pins > 0
    for t in tasks:
        t.cancel()
    mr.close()
    assert mr._view is not None, "region memory released while transfers could still write into it"
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, (asyncio.CancelledError, type(None))) for r in results)
    for _ in range(500):  # all transfers land, then the engine releases the buffer
        if mr._view is None:
            break
        await asyncio.sleep(0.01)
    assert mr._view is None
    assert np.array_equal(buf, pair.table[: 8 * MiB])  # every in-flight transfer completed into the pinned buffer
    await pair.ep.read(pair.local_mr, 0, pair.key, 0, 64)  # the endpoint is healthy


# tcp, with the target's responders held back (its worker polls on the loop, reader removed)

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

async def test_endpoint_context_manager_and_engine_close_with_ops_in_flight(pair: Pair) -> None:
    async with await pair.client.connect("127.0.0.1", pair.listener.port) as ep2:
        await ep2.read(pair.local_mr, 0, pair.key, 0, 8)
    assert ep2.closed
    tasks = [asyncio.create_task(pair.ep.read(pair.local_mr, 0, pair.key, 0, MiB)) for _ in range(32)]
    await asyncio.sleep(0)
    pair.client.abort()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        assert r is None or isinstance(r, (rdmaio.ClosedError, rdmaio.EndpointBrokenError))


async def test_listener_survives_a_closing_client(pair: Pair) -> None:
    for _ in range(3):
        ep = await pair.client.connect("127.0.0.1", pair.listener.port)
        ep.abort()
    ep = await pair.client.connect("127.0.0.1", pair.listener.port)
    await ep.read(pair.local_mr, 0, pair.key, 0, 8)
    assert np.array_equal(pair.local[:8], pair.table[:8])
    await ep.aclose()


@pytest.mark.parametrize("config", config_params())
async def test_peer_killed_mid_flight_fails_every_pending_op(config: tuple[str, str]) -> None:
    transport, progress = config
    size = PEER_SIZE[transport]
    with peer_process("peer_server.py", transport, progress, str(size)) as (proc, port):
        async with rdmaio.Engine(transport=transport, workers=2, progress=progress) as client:
            ep = await client.connect("127.0.0.1", port)
            key = await ep.remote_key("table")
            out = np.zeros(size, dtype=np.uint8)
            mr = client.register(out)
            await ep.read(mr, 0, key, 0, 1000)
            assert np.array_equal(out[:1000], np.arange(1000) % 251)
            tasks = [asyncio.create_task(ep.read(mr, 0, key, 0, size)) for _ in range(16)]
            tasks += [asyncio.create_task(ep.read(mr, 0, key, i, 64)) for i in range(500)]
            await asyncio.sleep(0.01)
            proc.kill()
            # The ops above may all finish before the kill lands (on verbs the peer's kernel
            # serves reads until its QPs are destroyed), so keep reads in flight until the
            # endpoint notices the death: that moment must fail them, never strand them.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while loop.time() < deadline:
                wave = [asyncio.create_task(ep.read(mr, 0, key, i, 64)) for i in range(64)]
                tasks += wave
                _, pending = await asyncio.wait(wave, timeout=5)
                assert not pending, f"{len(pending)} operations hung after the peer died"
                if any(t.exception() is not None for t in wave):
                    break
            done, pending = await asyncio.wait(tasks, timeout=5)
            assert not pending, f"{len(pending)} operations hung after the peer died"
            failures = [t.exception() for t in done if t.exception() is not None]
            assert failures, "the peer died but reads kept succeeding for 10 s"
            assert all(isinstance(e, rdmaio.EndpointBrokenError) for e in failures), failures
            with pytest.raises(rdmaio.EndpointBrokenError):
                await ep.read(mr, 0, key, 0, 8)
            await ep.aclose()


async def test_connect_to_nothing_fails_cleanly() -> None:
    async with rdmaio.Engine(transport="tcp") as engine:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        with pytest.raises(rdmaio.EndpointBrokenError):
            await engine.connect("127.0.0.1", port)


def test_engine_rejects_bad_configuration() -> None:
    with pytest.raises(rdmaio.UsageError):
        rdmaio.Engine(transport="carrier-pigeon")  # type: ignore[arg-type]
    with pytest.raises(rdmaio.UsageError):
        rdmaio.Engine(transport="tcp", progress="spin")  # type: ignore[arg-type]
    with pytest.raises(rdmaio.UsageError):
        rdmaio.Engine(transport="tcp", workers=0)


async def test_stdlib_asyncio_loop_works_too() -> None:
    def body() -> bytes:
        async def main() -> bytes:
            async with rdmaio.Engine(transport="tcp", workers=1, progress="loop") as a, \
                    rdmaio.Engine(transport="tcp", workers=1) as b:
                data = bytearray(b"hello rdmaio....")
                a.expose("d", a.register(data))
                lst = await a.listen()
                async with await b.connect("127.0.0.1", lst.port) as ep:
                    out = bytearray(16)
                    await ep.read(b.register(out), 0, await ep.remote_key("d"), 0, 16)
                    return bytes(out)

        return rdmaio.run(main(), use_uvloop=False)

    assert await asyncio.to_thread(body) == b"hello rdmaio...."


async def test_striped_large_operations() -> None:
    """Engine(stripe_bytes=...) splits big single ops over every queue pair; bytes still exact."""
    async with rdmaio.Engine(transport="tcp", workers=3) as server, \
            rdmaio.Engine(transport="tcp", workers=3, stripe_bytes=64 << 10) as client:
        table = pattern(4 * MiB, seed=9)
        server.expose("t", server.register(table))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        assert ep.num_queue_pairs == 3
        key = await ep.remote_key("t")
        out = np.zeros(4 * MiB, dtype=np.uint8)
        mr = client.register(out)
        await ep.read(mr, 1, key, 3, 3 * MiB + 5)
        assert np.array_equal(out[1:1 + 3 * MiB + 5], table[3:3 + 3 * MiB + 5])
        out[:] = pattern(4 * MiB, seed=10)
        await ep.write(mr, 0, key, 7, 2 * MiB)
        assert np.array_equal(table[7:7 + 2 * MiB], out[:2 * MiB])
        with pytest.raises(rdmaio.OutOfBoundsError):
            await ep.read(mr, 0, key, 3 * MiB, 2 * MiB)


@pytest.mark.parametrize("fast_path", [True, False])
async def test_same_host_fast_path_choice(fast_path: bool) -> None:
    """Same host and netns: queue pairs use the listener's UNIX socket unless disabled."""
    import socket

    async with rdmaio.Engine(transport="tcp", workers=2) as server, \
            rdmaio.Engine(transport="tcp", workers=2, same_host_fast_path=fast_path,
                          poll_spin_us=50) as client:
        table = pattern(1 << 20, seed=11)
        server.expose("t", server.register(table))
        lst = await server.listen()
        assert lst._side.welcome.get("unix")  # the listener offers its same-host UNIX socket
        ep = await client.connect("127.0.0.1", lst.port)
        families = {qp._sock.family for qp in ep._qps}
        assert families == ({socket.AF_UNIX} if fast_path else {socket.AF_INET})
        key = await ep.remote_key("t")
        out = np.zeros(1 << 20, dtype=np.uint8)
        mr = client.register(out)
        await asyncio.gather(*(ep.read(mr, i << 16, key, i << 16, 1 << 16) for i in range(16)))
        assert np.array_equal(out, table)


async def test_a_tcp_worker_spins_while_spinning_finds_work_and_backs_off_when_it_does_not() -> None:
    """poll_spin_us: a target's worker that got a request polls before it blocks.  Back to back depth-1
    reads keep finding the next request there (hits); reads spaced 5 ms apart never do, so after four waits
    in a row longer than 8 x poll_spin_us the worker stops spinning (it skips its chances) instead of
    burning the CPU, until a wait is short again."""
    async with rdmaio.Engine(transport="tcp", workers=1, poll_spin_us=200) as server, \
            rdmaio.Engine(transport="tcp", workers=1) as client:
        table = pattern(1 << 16, seed=3)
        server.expose("t", server.register(table))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        mr = client.register(np.zeros(64, dtype=np.uint8))
        w = server._core.workers[0].c
        for i in range(300):  # depth 1, back to back
            await ep.read(mr, 0, key, (i * 64) % (1 << 16), 64)
        hits, spins, skips = w.spin_hits, w.spins, w.spin_skips
        assert spins > 50 and 3 * hits > spins, (spins, hits, skips)  # most find the next request (a loaded
        # machine delays some clients past the spin)
        for i in range(60):  # spaced: the next request never comes within the spin
            await ep.read(mr, 0, key, 0, 64)
            await asyncio.sleep(0.005)
        spins2, hits2, skips2 = w.spins - spins, w.spin_hits - hits, w.spin_skips - skips
        assert skips2 > spins2 > 0 and 2 * hits2 <= spins2, (spins2, hits2, skips2)
        for i in range(300):  # back to back again: short waits, spinning again
            await ep.read(mr, 0, key, 0, 64)
        assert w.spin_hits - hits - hits2 > 50
        assert bytes(mr.buffer) == table[:64].tobytes()
