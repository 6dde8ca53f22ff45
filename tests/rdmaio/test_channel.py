"""Message channels over write-with-immediate: order, flow control, closing, failures."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import rdmaio


@pytest.fixture
async def engines() -> AsyncIterator[tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]]:
    async with rdmaio.Engine(transport="tcp", workers=2) as server, \
            rdmaio.Engine(transport="tcp", workers=2, progress="loop") as client:
        lst = await server.listen()
        yield server, client, lst


def msg_for(i: int, rng: random.Random) -> bytes:
    return i.to_bytes(4, "little") + bytes([i % 251]) * rng.randrange(0, 3000)


async def test_echo_round_trips(engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]) -> None:
    server, client, lst = engines

    async def echo(ch: rdmaio.Channel) -> None:
        async for m in ch:
            await ch.send([m, b"!"])

    server.serve_channel("echo", echo)
    ep = await client.connect("127.0.0.1", lst.port)
    async with await ep.channel("echo", slots=4, slot_size=4096) as ch:
        for i in range(200):
            await ch.send([b"ping ", str(i).encode()])
            assert await ch.recv() == f"ping {i}!".encode()
        assert 0 <= ch.credits <= ch.slots


@pytest.mark.parametrize("seed", range(4))
async def test_slow_receiver_random_interleavings_lose_nothing(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener], seed: int) -> None:
    """Several senders race a slow, jittery receiver through an 8-slot ring."""
    server, client, lst = engines
    rng = random.Random(seed)
    got: list[bytes] = []
    credits_seen: list[int] = []
    done = asyncio.Event()

    async def sink(ch: rdmaio.Channel) -> None:
        async for m in ch:
            got.append(m)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.002)
        done.set()

    server.serve_channel("sink", sink)
    ep = await client.connect("127.0.0.1", lst.port)
    ch = await ep.channel("sink", slots=8, slot_size=4096)
    sent: dict[int, list[bytes]] = {k: [] for k in range(4)}

    async def sender(k: int) -> None:
        srng = random.Random(seed * 10 + k)
        for j in range(120):
            m = bytes([k]) + msg_for(j, srng)
            await ch.send([m])
            sent[k].append(m)
            credits_seen.append(ch.credits)
            if srng.random() < 0.2:
                await asyncio.sleep(0)

    await asyncio.gather(*(sender(k) for k in range(4)))
    await ch.aclose()
    await asyncio.wait_for(done.wait(), 10)
    assert len(got) == 4 * 120, "messages lost or duplicated"
    for k in range(4):  # each sender's messages arrive exactly once, in its order
        assert [m for m in got if m[0] == k] == sent[k]
    assert min(credits_seen) >= 0 and max(credits_seen) <= 8


async def test_sender_out_of_credits_waits_and_is_woken_by_close(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]) -> None:
    server, client, lst = engines
    stop = asyncio.Event()
    handler_saw: list[BaseException | None] = []

    async def never_reads(ch: rdmaio.Channel) -> None:
        await stop.wait()  # consume nothing: the client runs out of credits

    server.serve_channel("stuck", never_reads)
    ep = await client.connect("127.0.0.1", lst.port)
    ch = await ep.channel("stuck", slots=3, slot_size=256)
    for i in range(3):
        await ch.send([b"x" * 10])
    assert ch.credits == 0
    blocked = asyncio.create_task(ch.send([b"y"]))
    await asyncio.sleep(0.05)
    assert not blocked.done(), "a sender without credits must wait, not drop or overwrite"
    stop.set()  # the handler returns: the server closes its side
    with pytest.raises(rdmaio.ClosedError):
        await asyncio.wait_for(blocked, 5)
    with pytest.raises(rdmaio.ClosedError):
        await ch.recv()
    del handler_saw


async def test_client_close_ends_the_server_handler(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]) -> None:
    server, client, lst = engines
    received: list[bytes] = []
    ended = asyncio.Event()

    async def reader(ch: rdmaio.Channel) -> None:
        try:
            while True:
                received.append(await ch.recv())
        except rdmaio.ClosedError:
            ended.set()

    server.serve_channel("r", reader)
    ep = await client.connect("127.0.0.1", lst.port)
    ch = await ep.channel("r")
    await ch.send([b"one"])
    await ch.send([b"two"])
    await ch.aclose()
    await asyncio.wait_for(ended.wait(), 5)
    assert received == [b"one", b"two"]  # messages sent before close are still delivered
    with pytest.raises(rdmaio.ClosedError):
        await ch.send([b"after close"])


async def test_many_channels_and_refusals(engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]) -> None:
    server, client, lst = engines

    async def upper(ch: rdmaio.Channel) -> None:
        async for m in ch:
            await ch.send([m.upper()])

    server.serve_channel("upper", upper)
    ep = await client.connect("127.0.0.1", lst.port)
    chans = [await ep.channel("upper", slots=2, slot_size=128) for _ in range(10)]

    async def use(i: int, ch: rdmaio.Channel) -> None:
        for j in range(20):
            await ch.send([f"c{i}m{j}".encode()])
            assert await ch.recv() == f"C{i}M{j}".encode()

    await asyncio.gather(*(use(i, c) for i, c in enumerate(chans)))
    with pytest.raises(rdmaio.ChannelRefusedError):
        await ep.channel("no-such-service")
    with pytest.raises(rdmaio.UsageError):
        await chans[0].send([b"z" * 200])  # larger than the 128-byte slot
    with pytest.raises(rdmaio.UsageError):
        await ep.channel("upper", slots=0)
    for c in chans:
        await c.aclose()


async def test_peer_death_wakes_the_channel() -> None:
    here = Path(__file__).parent
    script = here / "channel_peer.py"
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(here.parent.parent)})
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        async with rdmaio.Engine(transport="tcp", workers=1) as client:
            ep = await client.connect("127.0.0.1", port)
            ch = await ep.channel("echo")
            await ch.send([b"hi"])
            assert await ch.recv() == b"hi"
            pending = asyncio.create_task(ch.recv())
            await asyncio.sleep(0.05)
            proc.kill()
            with pytest.raises((rdmaio.EndpointBrokenError, rdmaio.ClosedError)):
                await asyncio.wait_for(pending, 5)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
