"""Bad input fails before any network traffic; garbage on the wire cannot crash a server."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator

import msgpack
import numpy as np
import pytest
import pytest_asyncio

from flexemr import (
    ClosedError,
    EmbeddingClient,
    FlexEMRError,
    InputError,
    JaggedBatch,
    LocalCluster,
    LookupIdError,
    TableSpec,
    UnknownTableError,
)

SPECS = [TableSpec("user", 1000, 8), TableSpec("item", 50, 4, "float16")]
PREAMBLE = b"RDMAIO" + struct.pack("<H", 1)


def frame(msg: object) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return struct.pack("<I", len(body)) + body


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    async with LocalCluster(SPECS, servers=2, seed=3, transport="tcp") as c:
        yield c


BAD = [
    ("user", [1000], LookupIdError),
    ("user", [-1], LookupIdError),
    ("user", np.array([5, 2**40]), LookupIdError),
    ("user", np.array([1.0, 2.0]), InputError),
    ("user", np.array([True, False]), InputError),
    ("user", np.array([[1, 2]]), InputError),
    ("user", np.int64(3), InputError),
    ("user", ["a"], InputError),
    ("nope", [1], UnknownTableError),
]


async def test_bad_input_is_rejected_before_any_traffic(cluster: LocalCluster) -> None:
    client = await cluster.client()
    before = client.metrics.snapshot()
    for table, ids, exc in BAD:
        with pytest.raises(exc) as info:
            await client.lookup(table, ids)
        assert isinstance(info.value, FlexEMRError)
        assert isinstance(info.value, (IndexError, ValueError))
    # a bad table in a lookup_many stops the whole call, good tables included
    with pytest.raises(LookupIdError):
        await client.lookup_many({"item": [1, 2], "user": [1, 5000]})
    with pytest.raises(InputError):
        await client.lookup_many([("user", [1])])  # type: ignore[arg-type]
    with pytest.raises(LookupIdError):
        await client.lookup_jagged(JaggedBatch.from_lists({"item": [[1], [50]]}))
    with pytest.raises(UnknownTableError):
        await client.lookup_jagged(JaggedBatch.from_lists({"other": [[1]]}))
    with pytest.raises(InputError):
        await client.lookup_jagged({"user": [1]})  # type: ignore[arg-type]
    assert client.metrics.snapshot() == before   # no counter moved: nothing was sent
    assert np.array_equal(await client.lookup("user", [999]), cluster.model()["user"][[999]])


async def test_closed_client(cluster: LocalCluster) -> None:
    client = EmbeddingClient(cluster.config, transport="tcp")
    with pytest.raises(ClosedError):
        await client.lookup("user", [1])
    async with client:
        assert (await client.lookup("user", [1])).shape == (1, 8)
    with pytest.raises(ClosedError):
        await client.lookup("user", [1])


async def _send(host: str, port: int, payload: bytes, *, read: bool = True, half_close: bool = True) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()
        if read:
            try:
                await asyncio.wait_for(reader.read(), 2.0)
            except (asyncio.TimeoutError, ConnectionError):
                pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def _session(host: str, port: int) -> bytes:
    """A real hello; returns the session token of the welcome."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(PREAMBLE + frame({"t": "hello", "v": 1, "transport": "tcp", "nqp": 1}))
    await writer.drain()
    assert await reader.readexactly(8) == PREAMBLE
    (n,) = struct.unpack("<I", await reader.readexactly(4))
    welcome = msgpack.unpackb(await reader.readexactly(n))
    assert welcome["t"] == "welcome"
    _sessions.append(writer)
    return welcome["session"]


_sessions: list[asyncio.StreamWriter] = []


async def test_garbage_cannot_crash_a_server(cluster: LocalCluster) -> None:
    rng = np.random.default_rng(7)
    addrs = list(cluster.config.addresses.values())
    for addr in addrs:
        host, port = addr.host, addr.port
        cases = [
            os.urandom(4096),
            b"",
            PREAMBLE[:5],
            b"RDMAIO" + struct.pack("<H", 99) + frame({"t": "hello"}),
            PREAMBLE + struct.pack("<I", 0xFFFFFFFF),
            PREAMBLE + struct.pack("<I", 100) + b"short",
            PREAMBLE + frame([1, 2, 3]),
            PREAMBLE + frame({"t": 7}),
            PREAMBLE + frame({"t": "hello", "v": "x", "transport": None, "nqp": "many"}),
            PREAMBLE + frame({"t": "hello", "v": 1, "transport": "tcp", "nqp": 10**9}),
            PREAMBLE + frame({"t": "attach", "session": b"0" * 16, "qp": 0}),
            PREAMBLE + frame({"t": "get_key", "id": 1, "name": "user/0"}),
            PREAMBLE + b"\xc1" * 64,
        ]
        cases += [PREAMBLE + rng.bytes(int(rng.integers(1, 300))) for _ in range(20)]
        await asyncio.gather(*(_send(host, port, c) for c in cases))
        # truncated handshakes left open (the server must time them out, not block)
        await asyncio.gather(*(_send(host, port, c, read=False, half_close=False) for c in cases[:4]))
        # a real session, then garbage on an attached data connection
        token = await _session(host, port)
        attach = PREAMBLE + frame({"t": "attach", "session": token, "qp": 0})
        await _send(host, port, attach + os.urandom(2048))
        await _send(host, port, attach + struct.pack("<BBHIQQQQQ", 5, 0, 0, 0xFFFFFFFF, 1, 2, 3, 4, 5))
    for w in _sessions:
        w.close()
    _sessions.clear()
    for name, proc in zip(cluster.pids, cluster._procs.values()):
        assert proc.returncode is None, f"server {name} died"
    client = await cluster.client()
    ids = rng.integers(0, 1000, 200)
    assert np.array_equal(await client.lookup("user", ids), cluster.model()["user"][ids])


async def test_cancelled_callers_do_not_hurt_others() -> None:
    async with LocalCluster(SPECS, servers=2, seed=3, in_process=True, transport="tcp") as cluster:
        client = await cluster.client()
        model = cluster.model()
        ids = np.arange(0, 1000, 3)
        tasks = [asyncio.ensure_future(client.lookup("user", ids)) for _ in range(10)]
        await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, r in enumerate(results):
            if i % 2 == 0:
                assert isinstance(r, asyncio.CancelledError)
            else:
                assert np.array_equal(r, model["user"][ids])
        assert np.array_equal(await client.lookup("user", ids[:5]), model["user"][ids[:5]])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:          # a zombie is as good as dead
        return fh.read().split()[2] != "Z"


async def test_cluster_cancelled_during_startup_leaves_no_process() -> None:
    cluster = LocalCluster(SPECS, servers=2, seed=3, transport="tcp")
    task = asyncio.ensure_future(cluster.start())
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(cluster._procs) == 2:
            break
    pids = list(cluster.pids.values())
    assert pids
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for pid in pids:
        assert not _alive(pid)


async def test_cluster_startup_failure_is_reported_and_cleaned_up() -> None:
    import rdmaio

    if rdmaio.available_transports()["verbs"] is None:
        pytest.skip("verbs is available here: the server would start")
    cluster = LocalCluster(SPECS, servers=2, seed=3, transport="verbs")
    with pytest.raises(FlexEMRError, match="exited with code 1"):
        await cluster.start()
    for pid in cluster.pids.values():
        assert not _alive(pid)


async def test_a_bad_pooling_frame_ends_only_its_channel_after_the_requests_before_it() -> None:
    """Frames that land together are taken in one call: a request before a bad frame is still answered,
    the bad frame ends that channel only, and the server serves the next one."""
    import rdmaio

    from flexemr.core.poolwire import FRAME, POOL_CHANNEL, RequestJob, decode_response, encode_request, frames

    async with LocalCluster(SPECS, servers=1, seed=3, transport="tcp") as cluster:
        sh = cluster.plan.shards["user"][0]
        addr = next(iter(cluster.config.addresses.values()))
        ids = np.array([0, 5, 7, 999], dtype=np.int32)
        offsets = np.array([0, 1, 4], dtype=np.int64)
        want = cluster.model()["user"][ids]
        want = np.stack([want[0], want[1:].sum(axis=0)])

        def request(rid: int, ch: rdmaio.Channel) -> list[list[bytes | memoryview]]:
            parts = encode_request([RequestJob("user", sh.index, offsets, ids, None)], "sum")
            return [[head, *pieces] for head, pieces in frames(rid, parts, ch.max_message)]

        async with rdmaio.Engine(transport="tcp") as engine:
            ep = await engine.connect(addr.host, addr.port)
            ch = await ep.channel(POOL_CHANNEL, slots=8, slot_size=4096)
            await ch.send_many([*request(1, ch), [b"bad"], *request(2, ch)])
            msg = await asyncio.wait_for(ch.recv(), 10)
            rid, idx, count = FRAME.unpack_from(msg, 0)
            assert (rid, idx, count) == (1, 0, 1)
            got = decode_response(msg[FRAME.size:], [(2, 8)])[0]
            np.testing.assert_allclose(got, want, rtol=1e-5)
            with pytest.raises(rdmaio.ClosedError):  # the server ended the channel at the bad frame
                await asyncio.wait_for(ch.recv(), 10)
            await ch.aclose()
            ch = await ep.channel(POOL_CHANNEL, slots=8, slot_size=4096)
            await ch.send_many(request(3, ch))
            msg = await asyncio.wait_for(ch.recv(), 10)
            assert FRAME.unpack_from(msg, 0) == (3, 0, 1)
            np.testing.assert_allclose(decode_response(msg[FRAME.size:], [(2, 8)])[0], want, rtol=1e-5)
            await ch.aclose()
            await ep.aclose()
        for name, proc in zip(cluster.pids, cluster._procs.values()):
            assert proc.returncode is None, f"server {name} died"
