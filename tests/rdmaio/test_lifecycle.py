"""No thread, socket or task outlives its engine (both progress modes, busy or idle at close)."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

import rdmaio


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def exercise(progress: str, close_with_ops_in_flight: bool) -> None:
    server = rdmaio.Engine(transport="tcp", workers=2, progress=progress)  # type: ignore[arg-type]
    client = rdmaio.Engine(transport="tcp", workers=2, progress=progress)  # type: ignore[arg-type]
    async with server, client:
        table = np.arange(1 << 20, dtype=np.uint64).view(np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))

        async def echo(ch: rdmaio.Channel) -> None:
            async for m in ch:
                await ch.send([m])

        server.serve_channel("echo", echo)
        lst = await server.listen()
        eps = [await client.connect("127.0.0.1", lst.port) for _ in range(3)]
        key = await eps[0].remote_key("t")
        out = client.register(np.zeros(1 << 20, dtype=np.uint8))
        ch = await eps[1].channel("echo")
        await ch.send([b"x"])
        assert await ch.recv() == b"x"
        await asyncio.gather(*(eps[0].read(out, 0, key, 64 * i, 64) for i in range(200)))
        if close_with_ops_in_flight:
            pending = [asyncio.create_task(ep.read(out, 0, key, 0, 1 << 20)) for ep in eps for _ in range(8)]
            await asyncio.sleep(0)
            client.abort()
            results = await asyncio.gather(*pending, return_exceptions=True)
            assert all(r is None or isinstance(r, (rdmaio.ClosedError, rdmaio.EndpointBrokenError))
                       for r in results)


@pytest.mark.parametrize("progress", ["thread", "loop"])
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "ops-in-flight"])
async def test_nothing_outlives_the_engines(progress: str, busy: bool) -> None:
    await exercise(progress, busy)  # warm-up: imports, lazily created loop resources
    await asyncio.sleep(0.05)
    threads, fds = threading.active_count(), open_fds()
    tasks = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    for _ in range(3):
        await exercise(progress, busy)
    for _ in range(100):  # tasks cancelled at close finish on the next iterations
        await asyncio.sleep(0.01)
        leftover = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} - tasks
        if not leftover and threading.active_count() <= threads and open_fds() <= fds:
            break
    assert not leftover, f"tasks outlived their engines: {leftover}"
    assert threading.active_count() <= threads, [t.name for t in threading.enumerate()]
    assert open_fds() <= fds, f"{open_fds() - fds} file descriptors leaked"


async def test_a_failed_progress_worker_fails_operations_instead_of_stranding_them() -> None:
    async with rdmaio.Engine(transport="tcp", workers=1) as server, \
            rdmaio.Engine(transport="tcp", workers=1, progress="thread") as client:
        table = np.arange(1 << 16, dtype=np.uint8)
        server.expose("t", server.register(table))
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        out = client.register(np.zeros(1 << 16, dtype=np.uint8))
        await ep.read(out, 0, key, 0, 4096)
        own = await client.listen()               # the failed engine must stop accepting, too
        assert client.failure is None
        # The worker's epoll descriptor now names a pipe: its next epoll_wait fails (EINVAL).
        worker = client._core.workers[0]
        r, w = os.pipe()
        os.dup2(r, worker._fd())
        os.close(r)
        os.close(w)
        inflight = asyncio.ensure_future(ep.read(out, 0, key, 0, 1 << 16))
        worker.wake()
        results = await asyncio.wait_for(asyncio.gather(inflight, return_exceptions=True), 5)
        assert results[0] is None or isinstance(results[0], rdmaio.EndpointBrokenError), results
        with pytest.raises(rdmaio.EndpointBrokenError):
            await asyncio.wait_for(ep.read(out, 0, key, 0, 64), 5)
        with pytest.raises(rdmaio.EndpointBrokenError, match="progress worker 0 failed"):
            await client.connect("127.0.0.1", lst.port)
        assert client.failure is not None and "progress worker 0 failed" in client.failure
        # the server is unaffected; the failed engine accepts nobody
        async with rdmaio.Engine(transport="tcp") as other:
            with pytest.raises(rdmaio.RdmaioError):
                await other.connect("127.0.0.1", own.port, timeout=2)
            ep2 = await other.connect("127.0.0.1", lst.port)
            buf = np.zeros(64, dtype=np.uint8)
            await ep2.read(other.register(buf), 0, await ep2.remote_key("t"), 0, 64)
            assert np.array_equal(buf, table[:64])


@pytest.mark.parametrize("progress", ["thread", "loop"])
async def test_broken_callbacks_fire_once_when_an_idle_peer_goes_away(progress: str) -> None:
    async with rdmaio.Engine(transport="tcp", progress=progress) as client:  # type: ignore[arg-type]
        server = rdmaio.Engine(transport="tcp")
        await server.start()
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        quiet = await client.connect("127.0.0.1", lst.port)
        seen: list[BaseException] = []
        removed: list[BaseException] = []
        ep.add_broken_callback(seen.append)
        ep.add_broken_callback(removed.append)
        ep.remove_broken_callback(removed.append)
        closed_first: list[BaseException] = []
        quiet.add_broken_callback(closed_first.append)
        await quiet.aclose()                      # closed by us: never "broken"
        await ep.ping()
        assert ep.broken is None and not seen
        await server.aclose()                     # the peer goes away while nothing is in flight
        for _ in range(300):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert len(seen) == 1 and ep.broken is seen[0]
        late: list[BaseException] = []
        ep.add_broken_callback(late.append)       # registered after the fact: called at once
        await asyncio.sleep(0)
        assert late == seen and not removed and not closed_first
        await asyncio.sleep(0.05)
        assert len(seen) == 1
        with pytest.raises(rdmaio.EndpointBrokenError):
            await ep.ping()


async def test_a_queue_pair_that_cannot_attach_leaves_no_trace_in_the_workers() -> None:
    import socket

    from rdmaio.transports.tcp import TcpQueuePair

    async with rdmaio.Engine(transport="tcp", workers=2, progress="thread") as engine:
        good, bad = engine._core.workers
        r, w = os.pipe()
        os.dup2(r, bad._fd())             # epoll_ctl on the second worker now fails (EINVAL)
        os.close(r)
        os.close(w)
        a, b = socket.socketpair()
        try:
            with pytest.raises(OSError):
                TcpQueuePair(asyncio.get_running_loop(), a, 999, [good, bad], 16, None, lambda exc: None)
            with open(f"/proc/self/fdinfo/{good._fd()}") as f:
                watched = [line.split()[1] for line in f if line.startswith("tfd:")]
            assert str(a.fileno()) not in watched, "the first worker still polls the failed queue pair"
        finally:
            a.close()
            b.close()


async def test_an_endpoint_whose_second_queue_pair_cannot_attach_leaves_nothing_behind() -> None:
    async with rdmaio.Engine(transport="tcp") as server, \
            rdmaio.Engine(transport="tcp", workers=2, progress="thread", same_host_fast_path=False) as client:
        lst = await server.listen()
        good, bad = client._core.workers
        r, w = os.pipe()
        os.dup2(r, bad._fd())             # the queue pair of worker 1 cannot attach
        os.close(r)
        os.close(w)
        conns = client._core.router.owners()
        with pytest.raises(Exception):
            await client.connect("127.0.0.1", lst.port)
        assert client._core.router.owners() == conns, "queue pairs of the failed endpoint are still registered"
        with open(f"/proc/self/fdinfo/{good._fd()}") as f:
            watched = [int(line.split()[1]) for line in f if line.startswith("tfd:")]
        assert watched == [good.c.wakefd], "worker 0 still polls a queue pair of the failed endpoint"
