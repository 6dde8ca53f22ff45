"""Authenticated connections, liveness (heartbeats) and connection retries."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import numpy as np
import pytest

import rdmaio
from rdmaio._wire import ControlCodec
from rdmaio.testing import threads_stopped
from tests.rdmaio.peers import peer_process

SECRET = b"cluster-secret-1"


async def serve(engine: rdmaio.Engine) -> tuple[rdmaio.Listener, np.ndarray]:
    table = np.arange(4096, dtype=np.uint8)
    engine.expose("t", engine.register(table, access=rdmaio.Access.ALL))

    async def echo(ch: rdmaio.Channel) -> None:
        async for m in ch:
            await ch.send([m])

    engine.serve_channel("echo", echo)
    return await engine.listen(), table


async def test_matching_secrets_authenticate_every_connection() -> None:
    async with rdmaio.Engine(transport="tcp", secret=SECRET) as server, \
            rdmaio.Engine(transport="tcp", secret=SECRET.decode()) as client:
        lst, table = await serve(server)
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        out = client.register(np.zeros(64, dtype=np.uint8))
        await ep.read(out, 0, key, 100, 64)
        assert np.array_equal(out.buffer, table[100:164])
        ch = await ep.channel("echo")  # the reverse queue pair authenticates too
        await ch.send([b"hi"])
        assert await ch.recv() == b"hi"
        await ch.aclose()


@pytest.mark.parametrize("client_secret", [None, b"wrong-secret"])
async def test_missing_or_wrong_secret_is_refused(client_secret: bytes | None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RDMAIO_SECRET", raising=False)
    async with rdmaio.Engine(transport="tcp", secret=SECRET) as server, \
            rdmaio.Engine(transport="tcp", secret=client_secret) as intruder, \
            rdmaio.Engine(transport="tcp", secret=SECRET) as friend:
        lst, _ = await serve(server)
        with pytest.raises(rdmaio.AuthenticationError):
            await intruder.connect("127.0.0.1", lst.port)
        ep = await friend.connect("127.0.0.1", lst.port)  # the listener keeps serving
        await ep.remote_key("t")


async def test_client_with_secret_refuses_a_listener_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RDMAIO_SECRET", raising=False)
    async with rdmaio.Engine(transport="tcp") as server, rdmaio.Engine(transport="tcp", secret=SECRET) as client:
        lst, _ = await serve(server)
        with pytest.raises(rdmaio.AuthenticationError):
            await client.connect("127.0.0.1", lst.port)


async def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDMAIO_SECRET", SECRET.decode())
    async with rdmaio.Engine(transport="tcp") as server, rdmaio.Engine(transport="tcp") as client:
        lst, _ = await serve(server)
        ep = await client.connect("127.0.0.1", lst.port)
        await ep.remote_key("t")
    monkeypatch.delenv("RDMAIO_SECRET")
    async with rdmaio.Engine(transport="tcp", secret=SECRET) as server, rdmaio.Engine(transport="tcp") as client:
        lst, _ = await serve(server)
        with pytest.raises(rdmaio.AuthenticationError):
            await client.connect("127.0.0.1", lst.port)


async def _raw(port: int, *frames: bytes, wait: float = 1.0) -> list[dict[str, object]]:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    await loop.sock_connect(s, ("127.0.0.1", port))
    codec = ControlCodec()
    try:
        for f in frames:
            await loop.sock_sendall(s, f)
        deadline = loop.time() + wait
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 65536), deadline - loop.time())
            except (asyncio.TimeoutError, OSError):
                break
            if not data:
                break
            codec.receive_data(data)
        return codec.next_events()
    finally:
        s.close()


async def test_nothing_is_served_before_authentication() -> None:
    async with rdmaio.Engine(transport="tcp", secret=SECRET) as server:
        lst, _ = await serve(server)
        c = ControlCodec()
        hello = c.encode({"t": "hello", "v": 1, "transport": "tcp", "nqp": 1})
        # skipping the answer and asking for a key straight away
        msgs = await _raw(lst.port, hello, c.encode({"t": "get_key", "id": 1, "name": "t"}))
        assert [m["t"] for m in msgs] == ["challenge", "error"]
        assert msgs[1]["code"] == "auth"
        # a forged answer
        c = ControlCodec()
        msgs = await _raw(lst.port, c.encode({"t": "attach", "session": b"x" * 16, "qp": 0}),
                          c.encode({"t": "auth", "nonce": b"n" * 32, "mac": b"m" * 32}))
        assert [m["t"] for m in msgs] == ["challenge", "error"]
        assert not any(m["t"] in ("welcome", "attached", "key") for m in msgs)


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not threads_stopped(pid) and time.monotonic() < deadline:
        time.sleep(0.001)


async def test_a_hung_peer_fails_operations_within_the_heartbeat_bound() -> None:
    with peer_process("peer_server.py", "tcp", "thread", str(1 << 20)) as (proc, port):  # killed even when stopped
        async with rdmaio.Engine(transport="tcp", heartbeat=0.5, dead_peer_timeout=2.0) as client:
            ep = await client.connect("127.0.0.1", port)
            key = await ep.remote_key("table")
            mr = client.register(np.zeros(1 << 20, dtype=np.uint8))
            await ep.read(mr, 0, key, 0, 64)
            os.kill(proc.pid, signal.SIGSTOP)  # alive but silent: TCP alone would wait forever
            _wait_stopped(proc.pid)  # else a worker thread may still answer a read or two
            t0 = time.monotonic()
            pending = [asyncio.create_task(ep.read(mr, 0, key, 0, 4096)) for _ in range(20)]
            done, still = await asyncio.wait(pending, timeout=5)
            elapsed = time.monotonic() - t0
            assert not still, "operations on a hung peer must fail, not hang"
            assert all(isinstance(t.exception(), rdmaio.EndpointBrokenError) for t in done)
            assert elapsed < 4.0, f"failed after {elapsed:.1f} s; bound is ~dead_peer_timeout + heartbeat"


async def test_a_stalled_event_loop_does_not_declare_a_healthy_peer_dead() -> None:
    """Our own loop stalls (a long callback; thousands of completions at once; an emulated CPU):
    the peer's pongs cannot be read meanwhile, so that time must not count as the peer's silence."""
    with peer_process("peer_server.py", "tcp", "thread", str(1 << 20)) as (proc, port):
        async with rdmaio.Engine(transport="tcp", heartbeat=0.2, dead_peer_timeout=0.8) as client:
            ep = await client.connect("127.0.0.1", port)
            key = await ep.remote_key("table")
            mr = client.register(np.zeros(1 << 20, dtype=np.uint8))
            for _ in range(3):
                time.sleep(1.5)                          # the loop is blocked for ~2x the silence bound
                await asyncio.sleep(0.5)                 # the heartbeat runs: the peer answers
                assert ep.broken is None, ep.broken
            await ep.read(mr, 0, key, 0, 64)
            os.kill(proc.pid, signal.SIGSTOP)            # a peer that is really silent is still caught
            _wait_stopped(proc.pid)
            t0 = time.monotonic()
            while ep.broken is None and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.05)
            assert isinstance(ep.broken, rdmaio.EndpointBrokenError) and time.monotonic() - t0 < 2.5


async def test_a_stalled_event_loop_does_not_make_a_listener_drop_its_clients() -> None:
    """Listener and client on one stalled loop (the verbs conformance run in an emulated VM): the
    listener's "no heartbeat for 10 x hb" check must not count the stall against the client."""
    async with rdmaio.Engine(transport="tcp", heartbeat=0.1, dead_peer_timeout=0.5) as server, \
            rdmaio.Engine(transport="tcp", heartbeat=0.1, dead_peer_timeout=0.5) as client:
        table = np.arange(4096, dtype=np.uint8)
        server.expose("t", server.register(table))
        listener = await server.listen("127.0.0.1", 0)
        ep = await client.connect("127.0.0.1", listener.port)
        key = await ep.remote_key("t")
        out = client.register(np.zeros(64, dtype=np.uint8))
        for _ in range(2):
            time.sleep(2.0)                              # 2x the listener's 1 s silence bound, 4x the client's
            await asyncio.sleep(0.4)
            assert ep.broken is None, ep.broken
        await ep.read(out, 0, key, 64, 64)
        assert out.buffer.tolist() == list(range(64, 128))
        await ep.aclose()


async def test_connect_retries_with_backoff_until_the_listener_appears() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    async with rdmaio.Engine(transport="tcp") as server, rdmaio.Engine(transport="tcp") as client:
        table = np.ones(64, dtype=np.uint8)
        server.expose("t", server.register(table))

        async def late_listener() -> rdmaio.Listener:
            await asyncio.sleep(0.3)
            return await server.listen("127.0.0.1", port)

        listener_task = asyncio.create_task(late_listener())
        ep = await client.connect("127.0.0.1", port, retries=20, backoff=0.02)
        await ep.remote_key("t")
        await listener_task
        with pytest.raises(rdmaio.EndpointBrokenError):  # no retries: refused at once
            await client.connect("127.0.0.1", 1)


def test_bad_options() -> None:
    with pytest.raises(rdmaio.UsageError):
        rdmaio.Engine(transport="tcp", secret="abc")
    with pytest.raises(rdmaio.UsageError):
        rdmaio.Engine(transport="tcp", heartbeat=1.0, dead_peer_timeout=0.5)
