"""No thread, socket or task outlives its engine (both progress modes, busy or idle at close)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

import numpy as np
import pytest

import rdmaio
from rdmaio._progress import Worker


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


# -- what is never closed is released when collected, with a ResourceWarning ----------------------

def worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("rdmaio-worker")]


@pytest.mark.parametrize("progress", ["thread", "loop"])
async def test_an_unclosed_engine_warns_and_releases_its_threads_and_memory(progress: str) -> None:
    before = worker_threads()
    engine = rdmaio.Engine(transport="tcp", workers=2, progress=progress)  # type: ignore[arg-type]
    await engine.start()
    mr = engine.register(np.zeros(64, dtype=np.uint8))
    lst = await engine.listen()
    assert len(worker_threads()) == len(before) + (2 if progress == "thread" else 0)
    core = engine._core
    with pytest.warns(ResourceWarning, match=r"unclosed <Engine transport=tcp .*> created at .*test_lifecycle\.py:\d+"):
        del engine
        gc.collect()
    assert core.closed and lst.closed and mr.closed and mr._view is None
    assert core.workers == [] and worker_threads() == before


def test_an_engine_never_started_warns_too() -> None:
    engine = rdmaio.Engine(transport="tcp")
    core = engine._core
    with pytest.warns(ResourceWarning, match="unclosed <Engine"):
        del engine
        gc.collect()
    assert core.closed


async def test_a_closed_engine_or_endpoint_does_not_warn() -> None:
    async with rdmaio.Engine(transport="tcp") as server, rdmaio.Engine(transport="tcp") as client:
        lst = await server.listen()
        ep = await client.connect("127.0.0.1", lst.port)
        await ep.aclose()
        del ep
        other = rdmaio.Engine(transport="tcp")
        other.abort()
        del other
        gc.collect()  # a warning here would fail the test (pytest: filterwarnings = error)


async def test_an_unclosed_endpoint_warns_and_releases_its_queue_pairs() -> None:
    async with rdmaio.Engine(transport="tcp") as server, \
            rdmaio.Engine(transport="tcp", workers=2, same_host_fast_path=False) as client:
        table = np.arange(4096, dtype=np.uint8)
        server.expose("t", server.register(table))
        lst = await server.listen()
        await asyncio.sleep(0.05)
        conns, fds = len(client._core.router), open_fds()
        ep = await client.connect("127.0.0.1", lst.port)
        key = await ep.remote_key("t")
        out = client.register(np.zeros(64, dtype=np.uint8))
        await ep.read(out, 0, key, 0, 64)
        assert len(client._core.router) == conns + 2 and open_fds() > fds
        with pytest.warns(ResourceWarning, match=r"unclosed <Endpoint 127\.0\.0\.1:\d+ qps=2 open> created at "
                                                 r".*test_lifecycle\.py:\d+"):
            del ep
            gc.collect()
        assert len(client._core.router) == conns and not client._core.endpoints
        for _ in range(100):  # the server ends the session: its control connection saw EOF
            if not lst._sessions and open_fds() == fds:
                break
            await asyncio.sleep(0.01)
        assert not lst._sessions and open_fds() == fds, "sockets of the collected endpoint are still open"


async def test_a_finalizer_run_off_the_loop_thread_hands_the_release_to_the_loop() -> None:
    engine = rdmaio.Engine(transport="tcp", workers=1, progress="thread")
    await engine.start()
    core = engine._core
    with pytest.warns(ResourceWarning, match="unclosed <Engine"):  # (warnings of any thread are recorded)
        t = threading.Thread(target=engine._finalizer)  # as if garbage collection ran it on another thread
        t.start()
        t.join()
    assert not core.closed, "the engine was released off its loop's thread"
    await asyncio.sleep(0)
    assert core.closed and core.workers == []


def test_a_worker_stopped_and_freed_from_its_own_thread_frees_itself_on_the_way_out() -> None:
    class Sink:
        def _on_batch(self, batch: object) -> None:
            pass

        def _on_worker_failed(self, index: int, err: int) -> None:
            pass

    loop = asyncio.new_event_loop()
    try:
        w = Worker(0, Sink(), "thread", loop)
        seen: list[object] = []
        real_poll = w._native_poll

        def poll(timeout_ms: int) -> int:
            if not seen:  # a finalizer that garbage collection runs on this very thread
                w.stop()
                w.free()
                seen.append(w.c)  # still in use by this thread: not freed under it
            return real_poll(0)

        w._native_poll = poll  # type: ignore[method-assign]
        w.start()
        thread = w._thread
        assert thread is not None
        thread.join(5)
        assert not thread.is_alive() and seen and seen[0] is not None
        assert w.c is None, "the worker thread did not free its native worker when it left"
    finally:
        loop.close()
