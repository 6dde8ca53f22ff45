"""Message channels over write-with-immediate: order, flow control, closing, failures.

Every test runs on each transport configuration of ``tests/rdmaio/transports.py``
(tcp-thread, tcp-loop, verbs-thread, verbs-loop; verbs ones skip without a device).
The server uses the configuration's progress mode, the client the other one.
"""

from __future__ import annotations

import asyncio
import random
import resource
from collections.abc import AsyncIterator

import numpy as np
import pytest

import rdmaio
from rdmaio.transports.base import NO_KEY
from tests.rdmaio.peers import peer_process
from tests.rdmaio.transports import config_params

OTHER = {"thread": "loop", "loop": "thread"}


@pytest.fixture(params=config_params())
async def engines(request: pytest.FixtureRequest) -> AsyncIterator[tuple[rdmaio.Engine, rdmaio.Engine,
                                                                       rdmaio.Listener]]:
    transport, progress = request.param
    async with rdmaio.Engine(transport=transport, workers=2, progress=progress) as server, \
            rdmaio.Engine(transport=transport, workers=2, progress=OTHER[progress]) as client:
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
    await ep.aclose()


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
    await ep.aclose()


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
    await ep.aclose()


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
    await ep.aclose()


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
    # unserving refuses new channels; those already open keep working
    server.unserve_channel("upper")
    server.unserve_channel("upper")  # idempotent
    with pytest.raises(rdmaio.ChannelRefusedError):
        await ep.channel("upper")
    await chans[1].send([b"still"])
    assert await chans[1].recv() == b"STILL"
    for c in chans:
        await c.aclose()
    await ep.aclose()


@pytest.mark.parametrize("config", config_params())
async def test_peer_death_wakes_the_channel(config: tuple[str, str]) -> None:
    transport, progress = config
    with peer_process("channel_peer.py", transport, progress) as (proc, port):
        async with rdmaio.Engine(transport=transport, workers=1, progress=progress) as client:
            ep = await client.connect("127.0.0.1", port)
            ch = await ep.channel("echo")
            await ch.send([b"hi"])
            assert await ch.recv() == b"hi"
            pending = asyncio.create_task(ch.recv())
            await asyncio.sleep(0.05)
            proc.kill()
            with pytest.raises((rdmaio.EndpointBrokenError, rdmaio.ClosedError)):
                await asyncio.wait_for(pending, 5)


async def test_close_while_the_peer_streams_keeps_the_endpoint_usable(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]) -> None:
    """The client closes while the server still has writes into its ring in flight.

    On verbs a write into a deregistered ring would move both RC queue pairs to the
    error state; the close handshake keeps the ring until the server has answered.
    """
    server, client, lst = engines
    stopped = asyncio.Event()

    async def firehose(ch: rdmaio.Channel) -> None:
        try:
            for i in range(100_000):
                await ch.send([i.to_bytes(4, "little") * (15 << 10)])
        except rdmaio.RdmaioError:
            pass
        stopped.set()

    server.serve_channel("firehose", firehose)
    ep = await client.connect("127.0.0.1", lst.port)
    for k in (0, 0, 1, 3, 0, 8):  # close after k messages: the server's next 8 writes are in flight
        stopped.clear()
        ch = await ep.channel("firehose", slots=8, slot_size=64 << 10)
        for i in range(k):
            assert await ch.recv() == i.to_bytes(4, "little") * (15 << 10)
        await ch.aclose()
        await asyncio.wait_for(stopped.wait(), 10)
    await ep.ping()
    async with await ep.channel("firehose", slots=4, slot_size=64 << 10) as ch:
        assert await ch.recv() == bytes(4) * (15 << 10)
    assert ep.broken is None
    await ep.aclose()


async def test_close_waits_for_the_peers_in_flight_write(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]) -> None:
    """Deterministic version of the race above: the server's write is still in flight
    (held back 0.3 s) when the client closes; it must not hit a released ring."""
    server, client, lst = engines
    sending = asyncio.Event()
    outcome: list[BaseException | None] = []

    async def slow_writer(ch: rdmaio.Channel) -> None:
        post = ch._post

        async def delayed(*args: int) -> object:
            await asyncio.sleep(0.3)
            return await post(*args)

        ch._post = delayed  # type: ignore[assignment]
        task = asyncio.ensure_future(ch.send([b"late" * 100]))
        sending.set()
        try:
            await task
            outcome.append(None)
        except rdmaio.RdmaioError as exc:
            outcome.append(exc)

    server.serve_channel("slow", slow_writer)
    ep = await client.connect("127.0.0.1", lst.port)
    ch = await ep.channel("slow", slots=4, slot_size=4096)
    await asyncio.wait_for(sending.wait(), 5)
    await ch.aclose()
    await asyncio.sleep(0.5)
    await ep.ping()
    for qp in ep._qps:  # every queue pair still works (on verbs: neither went to the error state)
        await asyncio.wait_for(qp.post(rdmaio._wire.Op.NOP, NO_KEY, 0, 1, 0, 0, None, "ping"), 5)
    assert ep.broken is None
    if client.transport == "verbs":
        assert outcome == [None], "the close handshake keeps the ring until in-flight writes landed"
    await ep.aclose()


async def test_channel_memory_is_bounded() -> None:
    """Rings are capped per channel and per server: a peer cannot make a server allocate without limit."""
    async with rdmaio.Engine(transport="tcp", channel_memory=1 << 20) as server, \
            rdmaio.Engine(transport="tcp") as client:
        async def idle(ch: rdmaio.Channel) -> None:
            async for _ in ch:
                pass

        server.serve_channel("idle", idle)
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        with pytest.raises(rdmaio.UsageError):  # 4094 x 16 MiB: refused before anything is allocated
            await ep.channel("idle", slots=4094, slot_size=16 << 20)
        first = await ep.channel("idle", slots=64, slot_size=4096)  # 2 x 256 KiB of the 1 MiB budget
        second = await ep.channel("idle", slots=64, slot_size=4096)
        with pytest.raises(rdmaio.ChannelRefusedError, match="budget"):
            await ep.channel("idle", slots=64, slot_size=4096)
        await first.aclose()
        for _ in range(100):  # the server releases the first channel's rings once it has closed
            try:
                third = await ep.channel("idle", slots=64, slot_size=4096)
                break
            except rdmaio.ChannelRefusedError:
                await asyncio.sleep(0.02)
        else:
            pytest.fail("closing a channel did not return its memory to the budget")
        await second.aclose()
        await third.aclose()


async def test_send_many_recv_with_and_send_region_keep_order_through_a_small_ring(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]) -> None:
    """More messages than slots, sent by send_many and send_region, arrive in order (recv_with copies them)."""
    import numpy as np

    server, client, lst = engines
    got: list[bytes] = []
    views_ok: list[bool] = []
    done = asyncio.Event()

    async def sink(ch: rdmaio.Channel) -> None:
        while True:
            try:
                m = await ch.recv_with(lambda v: (views_ok.append(v.readonly), bytes(v))[1])
            except rdmaio.ClosedError:
                break
            got.append(m)
            if len(got) % 7 == 0:
                await asyncio.sleep(0.001)  # a slow receiver: the sender runs out of credits
        done.set()

    server.serve_channel("sink", sink)
    ep = await client.connect("127.0.0.1", lst.port)
    ch = await ep.channel("sink", slots=4, slot_size=4096)
    rng = random.Random(5)
    first = [msg_for(i, rng) for i in range(20)]
    await ch.send_many([m[:10], m[10:]] for m in first)
    # 20 more from registered memory: message i at offset 4096 * i, its 8 header bytes before it
    second = [msg_for(100 + i, rng) for i in range(20)]
    arr = np.zeros(4096 * 20, dtype=np.uint8)
    for i, m in enumerate(second):
        arr[4096 * i + 8: 4096 * i + 8 + len(m)] = np.frombuffer(m, dtype=np.uint8)
    mr = client.register(arr)
    await ch.send_region(mr, [(4096 * i, len(m)) for i, m in enumerate(second)])
    with pytest.raises(rdmaio.UsageError):  # past the region's end
        await ch.send_region(mr, [(4096 * 19 + 100, 4000)])
    with pytest.raises(rdmaio.UsageError):  # larger than a slot
        await ch.send_many([[bytes(4096)]])
    await ch.aclose()
    await asyncio.wait_for(done.wait(), 10)
    mr.close()
    assert got == first + second
    assert views_ok and all(views_ok)
    await ep.aclose()


async def test_recv_batch_with_takes_every_ready_message_in_order_and_defers_a_consumers_error(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener]) -> None:
    """Messages that landed together come out of one recv_batch_with call, in order, with their credits back;
    if the consumer raises, the results before come first and the error with the next call."""
    server, client, lst = engines
    rng = random.Random(3)
    sent = [msg_for(i, rng) for i in range(30)]

    async def source(ch: rdmaio.Channel) -> None:
        await ch.recv()  # the client's channel is bound: what we send now is routed to it
        await ch.send_many([m] for m in sent[:6])
        await ch.recv()
        await ch.send_many([m] for m in sent[6:])
        try:
            await ch.recv()  # until the client closes
        except rdmaio.ClosedError:
            pass

    server.serve_channel("source", source)
    ep = await client.connect("127.0.0.1", lst.port)
    ch = await ep.channel("source", slots=8, slot_size=4096)
    await ch.send([b"start"])

    async def landed(n: int) -> None:
        while len(ch._ready) < n:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(landed(6), 10)
    assert await ch.recv_batch_with(bytes) == sent[:6]  # all six in one call
    got = sent[:6]
    await ch.send([b"go on"])

    def picky(v: memoryview) -> bytes:
        if bytes(v) == sent[20]:
            raise ValueError("message 20")
        return bytes(v)

    raised = 0
    while len(got) < len(sent):
        try:
            got += await asyncio.wait_for(ch.recv_batch_with(picky), 10)
        except ValueError as exc:
            assert str(exc) == "message 20" and got == sent[:20]
            got.append(sent[20])  # consumed by the call that raised
            raised += 1
    assert got == sent and raised == 1
    assert ch.credits == ch.slots or ch._owed < ch.slots  # credits were returned as they were consumed
    await ch.aclose()
    await ep.aclose()


async def test_credits_come_back_a_quarter_ring_at_a_time(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener], monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver that consumes each message as it lands returns credits in notices of a quarter of the
    ring, not one notice per message; a sender streaming far more messages than slots never stalls for good."""
    from rdmaio import _channel

    notices: list[int] = []
    write = _channel.Channel._write

    async def counting_write(self: _channel.Channel, local: int, remote: int, length: int, imm: int) -> None:
        chan, credits, slot = _channel.unpack_imm(imm)
        if slot == _channel.CREDIT_ONLY:
            notices.append(credits)
        await write(self, local, remote, length, imm)

    monkeypatch.setattr(_channel.Channel, "_write", counting_write)
    server, client, lst = engines
    got: list[bytes] = []
    done = asyncio.Event()

    async def sink(ch: rdmaio.Channel) -> None:
        async for m in ch:
            got.append(m)
        done.set()

    server.serve_channel("sink", sink)
    ep = await client.connect("127.0.0.1", lst.port)
    ch = await ep.channel("sink", slots=16, slot_size=1024)
    sent = [i.to_bytes(4, "little") * 8 for i in range(200)]
    for k in range(0, 200, 20):  # bursts, and single messages the receiver drains between
        await ch.send_many([m] for m in sent[k: k + 17])
        for m in sent[k + 17: k + 20]:
            await ch.send([m])
    await ch.aclose()
    await asyncio.wait_for(done.wait(), 10)
    assert got == sent
    assert notices and all(n >= 4 for n in notices), notices  # 16 slots: a quarter is 4
    assert sum(notices) <= 200
    await ep.aclose()


async def test_tcp_reverse_queue_pair_gets_the_engines_socket_buffer() -> None:
    """On tcp a server's channel messages leave through the reverse queue pair: its socket has the engine's
    ``socket_buffer`` as send buffer, like the responders', so a multi-frame answer leaves in few system calls."""
    import socket

    async with rdmaio.Engine(transport="tcp", socket_buffer=1 << 20) as server, \
            rdmaio.Engine(transport="tcp") as client:
        lst = await server.listen()

        async def idle(ch: rdmaio.Channel) -> None:
            async for _ in ch:
                pass

        server.serve_channel("idle", idle)
        ep = await client.connect("127.0.0.1", lst.port)
        async with await ep.channel("idle") as ch:
            await ch.send([b"x"])
            (session,) = lst._sessions.values()
            reverse = session.link.reverse
            assert reverse is not None
            assert reverse._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 1 << 20
        await ep.aclose()


async def test_send_region_writes_are_done_together_and_keep_the_first_error() -> None:
    """send_region's writes: awaited as one, done only once sealed and every write is, the first error kept."""
    from rdmaio._channel import _Writes

    loop = asyncio.get_running_loop()
    w = _Writes(loop)
    a, b, c = loop.create_future(), loop.create_future(), loop.create_future()
    for f in (a, b, c):
        w.add(f)
    b.set_exception(rdmaio.EndpointBrokenError("second write"))
    a.set_result(0)
    await asyncio.sleep(0)
    assert not w.fut.done()  # c is still in flight
    c.set_exception(rdmaio.ClosedError("third write"))
    await asyncio.sleep(0)
    assert not w.fut.done()  # not sealed: more writes may come
    w.seal()
    assert w.fut.done() and isinstance(w.error, rdmaio.EndpointBrokenError)
    empty = _Writes(loop)
    empty.seal()
    assert empty.fut.done() and empty.error is None


@pytest.mark.parametrize("how", ["send_many", "send_region"])
async def test_a_sender_waiting_for_credits_ends_when_close_begins(
        engines: tuple[rdmaio.Engine, rdmaio.Engine, rdmaio.Listener], how: str) -> None:
    """aclose() while a sender waits for credits: the peer returns none after our close, so the sender ends
    with ClosedError as close begins (not once close gave up waiting for it), and what it had posted is
    written first."""
    server, client, lst = engines
    release = asyncio.Event()
    got: list[bytes] = []

    async def reads_one(ch: rdmaio.Channel) -> None:
        got.append(await ch.recv())  # one message, then the application is busy
        await release.wait()

    server.serve_channel("busy", reads_one)
    ep = await client.connect("127.0.0.1", lst.port)
    ch = await ep.channel("busy", slots=4, slot_size=4096)
    if how == "send_region":
        arr = np.zeros(4096 * 12, dtype=np.uint8)
        arr.reshape(12, 4096)[:, 8:108] = 7  # each message's 100 bytes, behind its 8-byte header room
        mr = client.register(arr)
        sender = asyncio.create_task(ch.send_region(mr, [(4096 * i, 100) for i in range(12)]))
    else:
        sender = asyncio.create_task(ch.send_many([b"\x07" * 100] for _ in range(12)))
    while ch.credits or not got:  # the sender used every credit and waits for more
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(ch.aclose())
    with pytest.raises(rdmaio.ClosedError, match="closing"):
        await asyncio.wait_for(sender, 10)  # a bound against a hang, not a timing
    await closing
    assert got == [b"\x07" * 100]
    release.set()
    await ep.aclose()


@pytest.mark.parametrize("pull_min", [32 << 10, 0])
async def test_tcp_same_host_messages_are_pulled_by_the_receiver(monkeypatch: pytest.MonkeyPatch,
                                                                 pull_min: int) -> None:
    """Same host over tcp: the server's large channel messages reach the client's ring by one copy that the
    client makes from the server's memory (pulled writes); small ones, and everything with pulling off
    (``PULL_MIN_BYTES = 0``), travel in the stream.  Every message arrives intact and in order either way."""
    from rdmaio.transports.tcp import TcpTransport

    monkeypatch.setattr(TcpTransport, "PULL_MIN_BYTES", pull_min)
    rng = np.random.default_rng(3)
    sizes = [100, 40 << 10, 200 << 10, 5, 511 << 10, 64 << 10]
    msgs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]

    async def echo(ch: rdmaio.Channel) -> None:
        async for m in ch:
            await ch.send([m])

    async with rdmaio.Engine(transport="tcp") as server, rdmaio.Engine(transport="tcp") as client:
        lst = await server.listen()
        server.serve_channel("echo", echo)
        ep = await client.connect("127.0.0.1", lst.port)
        async with await ep.channel("echo", slots=4, slot_size=512 << 10) as ch:
            for m in msgs * 3:
                await ch.send([m])
                assert await ch.recv() == m
            (session,) = lst._sessions.values()
            sent = session.link.reverse.pulled
            got = ep._link._reverse.pulled  # type: ignore[union-attr]
        await ep.aclose()
    big = sum(n >= 32 << 10 for n in sizes) * 3
    assert (sent, got) == ((big, big) if pull_min else (0, 0))


async def test_tcp_pulls_need_the_same_host_fast_path() -> None:
    """Without the UNIX-socket fast path (TCP between the engines) nothing is pulled."""
    async with rdmaio.Engine(transport="tcp", same_host_fast_path=False) as server, \
            rdmaio.Engine(transport="tcp", same_host_fast_path=False) as client:
        lst = await server.listen()

        async def echo(ch: rdmaio.Channel) -> None:
            async for m in ch:
                await ch.send([m])

        server.serve_channel("echo", echo)
        ep = await client.connect("127.0.0.1", lst.port)
        async with await ep.channel("echo", slots=2, slot_size=256 << 10) as ch:
            payload = bytes(range(256)) * 800
            await ch.send([payload])
            assert await ch.recv() == payload
            (session,) = lst._sessions.values()
            assert session.link.reverse.pulled == 0
        await ep.aclose()


async def test_tcp_pulls_cross_processes() -> None:
    """A server in another process: its large messages are pulled from that process's memory (when this host
    lets a process read its peer's memory at all: the client probes before it asks)."""
    with peer_process("channel_peer.py", "tcp", "thread") as (_proc, port):
        async with rdmaio.Engine(transport="tcp", workers=1) as client:
            ep = await client.connect("127.0.0.1", port)
            link = ep._link
            assert link is not None
            if not link.pull_pid:  # type: ignore[attr-defined]
                pytest.skip("this host does not let a process read its peer's memory (process_vm_readv refused)")
            async with await ep.channel("echo", slots=2, slot_size=256 << 10) as ch:
                msgs = [bytes([i]) * (100 << 10) + b"end" for i in range(6)]
                for m in msgs:
                    await ch.send([m])
                    assert await ch.recv() == m
                assert link._reverse.pulled == len(msgs)  # type: ignore[attr-defined]
            await ep.aclose()


def test_rings_are_resident_when_made() -> None:
    """make_rings writes every page (as registering pins it on verbs): the first messages through a new
    channel's 2 x 4 MiB of rings fault no pages in."""
    from rdmaio._channel import make_rings

    recv, send = make_rings(8, 512 << 10)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    recv[::4096] = 1
    send[::4096] = 1
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 16, f"{faults} page faults writing rings that should be resident"
    assert not recv[1:4096].any() and not send[1:4096].any()
