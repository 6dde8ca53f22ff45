"""Raw-socket fuzzing of a listener: bad bytes cost the sender its connection, nobody else anything.

Every case opens real sockets to a live listener and sends random, malformed,
truncated or oversized frames — on the control path (msgpack handshake) and on
attached queue pairs (the native responder's parser).  The listener must answer
with a protocol error or close that one connection, and keep serving a
well-behaved client whose endpoint stays open across all of it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rdmaio
from rdmaio._wire import PREAMBLE, REQ_HDR, ControlCodec, Op


@dataclass
class Target:
    server: rdmaio.Engine
    client: rdmaio.Engine
    port: int
    ep: rdmaio.Endpoint
    key: rdmaio.RemoteKey
    table: np.ndarray
    out: rdmaio.MemoryRegion
    out_buf: np.ndarray


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    async with rdmaio.Engine(transport="tcp", workers=2, handshake_timeout=0.5) as server, \
            rdmaio.Engine(transport="tcp", workers=1) as client:
        table = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))
        lst = await server.listen("127.0.0.1", 0)
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        out_buf = np.zeros(1 << 16, dtype=np.uint8)
        yield Target(server, client, lst.port, ep, key, table, client.register(out_buf), out_buf)


async def still_serving(t: Target) -> None:
    """The well-behaved endpoint still works, and new clients can still connect."""
    await t.ep.read(t.out, 0, t.key, 1000, 512)
    assert np.array_equal(t.out_buf[:512], t.table[1000:1512])
    ep2 = await t.client.connect("127.0.0.1", t.port)
    assert (await ep2.remote_key("t")).rkey == t.key.rkey
    await ep2.aclose()


async def send_and_drain(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    """Send ``data`` on a fresh connection; return what the listener says until it closes (or times out)."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        try:
            await loop.sock_sendall(s, data)
        except OSError:
            return b""  # the listener already closed us: acceptable
        got = b""
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(s, 65536), deadline - loop.time())
            except (asyncio.TimeoutError, OSError):
                break
            if not chunk:
                break
            got += chunk
        return got
    finally:
        s.close()


def assert_protocol_error_or_silence(reply: bytes) -> None:
    """Whatever the listener sent back is a well-formed control stream ending in an error (or nothing)."""
    if not reply:
        return
    codec = ControlCodec()
    codec.receive_data(reply)
    msgs = codec.next_events()
    assert msgs, f"undecodable reply {reply[:40]!r}"
    assert msgs[-1]["t"] in ("error", "welcome", "attached"), msgs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
async def test_random_bytes(target: Target, data: bytes) -> None:
    assert_protocol_error_or_silence(await send_and_drain(target.port, data, timeout=0.6))
    await still_serving(target)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=8), st.binary(max_size=8),
                                                      st.none()), max_size=5),
       st.sampled_from(["hello", "attach", "get_key", "welcome", "nonsense", None]))
async def test_malformed_handshakes(target: Target, fields: dict[str, object], kind: str | None) -> None:
    msg = dict(fields)
    if kind is not None:
        msg["t"] = kind
    body = msgpack.packb(msg)
    reply = await send_and_drain(target.port, PREAMBLE + struct.pack("<I", len(body)) + body, timeout=0.6)
    assert_protocol_error_or_silence(reply)
    await still_serving(target)


async def test_truncated_oversized_and_slow_handshakes(target: Target) -> None:
    good = ControlCodec().encode({"t": "hello", "v": 1, "transport": "tcp", "nqp": 1})
    for cut in range(0, len(good)):  # every truncation: the listener times the half-handshake out
        assert_protocol_error_or_silence(await send_and_drain(target.port, good[:cut], timeout=0.8))
    reply = await send_and_drain(target.port, PREAMBLE + struct.pack("<I", 0xFFFFFFF0) + b"x" * 64)
    assert b"exceeds" in reply  # oversized frame: a protocol error, not a 4 GiB allocation
    reply = await send_and_drain(target.port, b"RDMAIO" + struct.pack("<H", 77))
    assert b"protocol" in reply
    reply = await send_and_drain(target.port, ControlCodec().encode({"t": "hello", "v": 1, "transport": "tcp",
                                                                       "nqp": 100000}))
    assert b"nqp" in reply
    reply = await send_and_drain(target.port, ControlCodec().encode({"t": "attach", "session": b"\0" * 16, "qp": 0}))
    assert b"session" in reply
    await still_serving(target)


async def _attached_qp(port: int) -> tuple[socket.socket, socket.socket]:
    """A control connection plus one attached data connection, by hand."""
    loop = asyncio.get_running_loop()
    ctl = socket.socket()
    ctl.setblocking(False)
    await loop.sock_connect(ctl, ("127.0.0.1", port))
    codec = ControlCodec()
    await loop.sock_sendall(ctl, codec.encode({"t": "hello", "v": 1, "transport": "tcp", "nqp": 1}))
    while (msg := codec.next_event()) is None:
        codec.receive_data(await loop.sock_recv(ctl, 4096))
    data = socket.socket()
    data.setblocking(False)
    await loop.sock_connect(data, ("127.0.0.1", port))
    dcodec = ControlCodec()
    await loop.sock_sendall(data, dcodec.encode({"t": "attach", "session": msg["session"], "qp": 0}))
    while dcodec.next_event() is None:
        dcodec.receive_data(await loop.sock_recv(data, 4096))
    return ctl, data


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(min_size=1, max_size=400),
    # a plausible header with hostile fields: huge counts and lengths, unknown keys, bad opcodes
    st.builds(lambda op, count, key, remote, n: REQ_HDR.pack(op, 0, 0, count, 1, key, remote, n, 0),
              st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
              st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
))
async def test_garbage_on_an_attached_queue_pair(target: Target, data: bytes) -> None:
    """The native responder sees hostile bytes from a real socket: it answers or drops that connection."""
    loop = asyncio.get_running_loop()
    before = target.table.copy()
    ctl, qp = await _attached_qp(target.port)
    try:
        await loop.sock_sendall(qp, data)
        try:
            await asyncio.wait_for(loop.sock_recv(qp, 65536), 0.2)
        except (asyncio.TimeoutError, OSError):
            pass
    finally:
        qp.close()
        ctl.close()
    # hostile requests may write inside the exposed region only if they carry its key; these do not
    assert np.array_equal(target.table, before)
    await still_serving(target)


async def test_many_bad_clients_at_once(target: Target) -> None:
    junk = [bytes([i]) * (i * 37 % 500 + 1) for i in range(40)]
    await asyncio.gather(*(send_and_drain(target.port, j, timeout=0.6) for j in junk))
    await still_serving(target)


async def test_oversized_write_request_is_rejected_without_allocation(target: Target) -> None:
    """A WRITE announcing 2**40 bytes is a protocol error; the server neither allocates nor waits."""
    loop = asyncio.get_running_loop()
    ctl, qp = await _attached_qp(target.port)
    try:
        hdr = REQ_HDR.pack(Op.WRITE, 0, 0, 1, 1, target.key.rkey, 0, 1 << 40, 0)
        await loop.sock_sendall(qp, hdr)
        got = await asyncio.wait_for(loop.sock_recv(qp, 100), 2)
        assert got == b""  # connection dropped at once
    finally:
        qp.close()
        ctl.close()
    await still_serving(target)
