"""The mapping-aware engine: placement of links on workers, queue-pair choice,
CPU affinity, thread domains and busy-polled completions.

The placement and queue-pair tests run on every transport configuration (verbs
inside the Soft-RoCE VM); thread domains and busy polling are verbs features.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

import rdmaio
from tests.rdmaio.transports import config_params

VERBS_REASON = rdmaio.available_transports()["verbs"]
needs_verbs = pytest.mark.skipif(VERBS_REASON is not None, reason=f"verbs unavailable: {VERBS_REASON}")

TABLE = 1 << 20
CPU = min(os.sched_getaffinity(0))  # a CPU this process may use


@dataclass
class Setup:
    server: rdmaio.Engine
    client: rdmaio.Engine
    port: int
    table: np.ndarray
    out: np.ndarray
    mr: rdmaio.MemoryRegion


@pytest.fixture(params=config_params())
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    transport, progress = request.param
    # same_host_fast_path=False: operations complete through the workers, never inside post
    kw = {"transport": transport, "progress": progress, "workers": 3, "same_host_fast_path": False}
    async with rdmaio.Engine(**kw) as server, rdmaio.Engine(**kw) as client:  # type: ignore[arg-type]
        table = np.random.default_rng(2).integers(0, 256, TABLE, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))
        lst = await server.listen("127.0.0.1", 0)
        out = np.zeros(TABLE, dtype=np.uint8)
        yield Setup(server, client, lst.port, table, out, client.register(out))


def _links(engine: rdmaio.Engine) -> list[int]:
    return [w["links"] for w in engine.info()["workers"]]


async def test_links_are_placed_on_the_least_loaded_worker_and_keep_it(setup: Setup) -> None:
    eps = [await setup.client.connect("127.0.0.1", setup.port) for _ in range(3)]
    homes = [ep.workers[0] for ep in eps]
    assert sorted(homes) == [0, 1, 2]                      # balanced when created
    for ep in eps:                                         # queue pair i on the i-th worker after home
        h = ep.workers[0]
        assert ep.workers == tuple((h + i) % 3 for i in range(3))
        assert ep.device == setup.client.devices[0]
    assert _links(setup.client) == [1, 1, 1]
    assert sorted(_links(setup.server)) == [1, 1, 1]       # the sessions the listener serves, too
    key = await eps[0].remote_key("t")
    for _ in range(3):                                     # operations never move a link
        await asyncio.gather(*(ep.read(setup.mr, 0, key, 0, 4096) for ep in eps))
    assert [ep.workers[0] for ep in eps] == homes
    gone = eps[1].workers[0]
    await eps[1].aclose()
    assert _links(setup.client)[gone] == 0
    again = await setup.client.connect("127.0.0.1", setup.port)
    assert again.workers[0] == gone                        # the freed worker is the least loaded
    for ep in (eps[0], eps[2], again):
        await ep.aclose()
    assert _links(setup.client) == [0, 0, 0]


async def _spread(ep: rdmaio.Endpoint, setup: Setup, n: int = 24) -> list[int]:
    """Queue-pair loads right after ``n`` concurrent reads were posted (none can have completed:
    completions reach the loop after this task resumes)."""
    key = await ep.remote_key("t")
    tasks = [asyncio.ensure_future(ep.read(setup.mr, i * 4096, key, i * 4096, 4096)) for i in range(n)]
    await asyncio.sleep(0)
    loads = [qp.in_flight for qp in ep._qps]
    await asyncio.gather(*tasks)
    assert np.array_equal(setup.out[: n * 4096], setup.table[: n * 4096])
    return loads


async def test_qp_choice_home_keeps_every_operation_on_the_home_queue_pair(setup: Setup) -> None:
    ep = await setup.client.connect("127.0.0.1", setup.port)
    assert ep.qp_choice == "home"
    loads = await _spread(ep, setup)
    await ep.aclose()
    assert loads[0] > 0 and loads[1:] == [0, 0]


async def test_qp_choice_least_loaded_and_fixed_index(setup: Setup) -> None:
    ep = await setup.client.connect("127.0.0.1", setup.port)
    ep.qp_choice = "least_loaded"
    assert all(n > 0 for n in await _spread(ep, setup))
    ep.qp_choice = 2
    loads = await _spread(ep, setup)
    assert loads[:2] == [0, 0] and loads[2] > 0
    for bad in (3, -1, "fastest", True, 1.0):
        with pytest.raises(rdmaio.UsageError):
            ep.qp_choice = bad  # type: ignore[assignment]
    assert ep.qp_choice == 2
    await ep.aclose()


async def test_engine_wide_qp_choice() -> None:
    async with rdmaio.Engine(transport="tcp", workers=2, same_host_fast_path=False) as server, \
            rdmaio.Engine(transport="tcp", workers=2, qp_choice="least_loaded", same_host_fast_path=False) as client:
        table = np.arange(TABLE, dtype=np.uint8)
        server.expose("t", server.register(table))
        lst = await server.listen("127.0.0.1", 0)
        ep = await client.connect("127.0.0.1", lst.port)
        assert ep.qp_choice == "least_loaded" and client.info()["qp_choice"] == "least_loaded"
        out = np.zeros(TABLE, dtype=np.uint8)
        assert all(n > 0 for n in await _spread(ep, Setup(server, client, lst.port, table, out,
                                                              client.register(out))))
        await ep.aclose()
    with pytest.raises(rdmaio.UsageError, match="qp_choice"):
        rdmaio.Engine(transport="tcp", qp_choice="random")  # type: ignore[arg-type]


async def test_worker_cpus_pin_each_worker_thread() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    last = cpus[-1]
    async with rdmaio.Engine(transport="tcp", workers=2, worker_cpus=[last, set(cpus)]) as server, \
            rdmaio.Engine(transport="tcp", workers=1, worker_cpus=[{last}]) as client:
        table = np.arange(4096, dtype=np.uint8)
        server.expose("t", server.register(table))
        lst = await server.listen("127.0.0.1", 0)
        ep = await client.connect("127.0.0.1", lst.port)
        out = np.zeros(4096, dtype=np.uint8)
        await ep.read(client.register(out), 0, await ep.remote_key("t"), 0, 4096)  # the worker ran its rounds
        assert np.array_equal(out, table)
        info = client.info()["workers"]
        assert info[0]["cpus"] == [last] and info[0]["cpu_error"] is None
        assert [w["cpus"] for w in server.info()["workers"]] == [[last], cpus]
        thread = client._core.workers[0]._thread
        assert thread is not None and thread.native_id is not None
        assert os.sched_getaffinity(thread.native_id) == {last}
        assert os.sched_getaffinity(0) == set(cpus)        # the caller's own affinity is untouched
        await ep.aclose()


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 2, "worker_cpus": [CPU]}, "one entry per worker"),
    ({"workers": 1, "worker_cpus": [10_000]}, "may not run on"),
    ({"workers": 1, "worker_cpus": [[]]}, "non-empty"),
    ({"workers": 1, "worker_cpus": ["0"]}, "CPU numbers"),
    ({"workers": 1, "worker_cpus": "0"}, "sequence"),
    ({"workers": 1, "worker_cpus": [CPU], "progress": "loop"}, "progress='thread'"),
    ({"busy_poll_us": -1}, "busy_poll_us"),
    ({"busy_poll_us": 10_001}, "busy_poll_us"),
])
def test_mapping_arguments_are_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(rdmaio.UsageError, match=match):
        rdmaio.Engine(transport="tcp", **kwargs)  # type: ignore[arg-type]


async def test_info_describes_the_layout_and_busy_poll_is_settable_per_endpoint() -> None:
    async with rdmaio.Engine(transport="tcp", workers=2, busy_poll_us=50) as server:
        info = server.info()
        assert info["transport"] == "tcp" and info["devices"] == ["tcp"] == server.devices
        assert info["busy_poll_us"] == 50 and info["workers_per_device"] == 2
        assert [(w["index"], w["group"], w["device"], w["links"]) for w in info["workers"]] == \
            [(0, 0, "tcp", 0), (1, 0, "tcp", 0)]
        lst = await server.listen("127.0.0.1", 0)
        async with rdmaio.Engine(transport="tcp", workers=1) as client:
            ep = await client.connect("127.0.0.1", lst.port)
            assert ep.busy_poll_us == 0
            ep.busy_poll_us = 100                           # tcp ignores it; operations still work
            await ep.ping()
            for bad in (-1, 10_001, 1.5, True):
                with pytest.raises(rdmaio.UsageError):
                    ep.busy_poll_us = bad  # type: ignore[assignment]
            assert ep.busy_poll_us == 100
            with pytest.raises(rdmaio.UsageError, match="no device"):
                await client.connect("127.0.0.1", lst.port, device="mlx5_9")
            await ep.aclose()


def test_several_devices_are_checked_before_any_is_opened() -> None:
    for kwargs in ({"device": ["rxe0", "rxe0"]}, {"device": []}, {"device": ["rxe0", ""]},
                   {"device": ["rxe0", "rxe1"], "port": [1]}, {"device": "rxe0", "gid_index": [1, 2]},
                   {"device": ["rxe0", "rxe1"], "port": [1, 0]}):
        with pytest.raises(rdmaio.UsageError):
            rdmaio.Engine(transport="verbs", **kwargs)  # type: ignore[arg-type]


# -- verbs ------------------------------------------------------------------------------------------

_FALLBACK = re.compile(r"engine PD \((ibv_alloc_td|ibv_alloc_parent_domain|ibv_create_cq_ex in the parent "
                       r"domain): .+\)")


@pytest.mark.verbs
@needs_verbs
@pytest.mark.parametrize("progress", ["thread", "loop"])
async def test_verbs_workers_report_their_thread_domain_or_why_not(progress: str) -> None:
    async with rdmaio.Engine(transport="verbs", workers=2, progress=progress) as engine:
        workers = engine.info()["workers"]
        assert len(workers) == 2
        for w in workers:
            assert w["thread_domain"] == (w["domain"] == "thread domain")
            assert w["thread_domain"] or _FALLBACK.fullmatch(w["domain"]), w["domain"]
            assert w["comp_vector"] >= 0
        if not workers[0]["thread_domain"]:  # rxe has no thread domains: the fallback is what runs here
            pytest.skip(f"the device has no thread domains: {workers[0]['domain']}")
        # a device with thread domains: every worker has its own
        assert all(w["thread_domain"] for w in workers)


@pytest.mark.verbs
@needs_verbs
@pytest.mark.parametrize("progress", ["thread", "loop"])
async def test_verbs_busy_polled_depth_one_operations_are_correct_and_ordered(progress: str) -> None:
    async with rdmaio.Engine(transport="verbs", workers=2, progress=progress) as server, \
            rdmaio.Engine(transport="verbs", workers=2, progress=progress, busy_poll_us=2000) as client:
        table = np.random.default_rng(5).integers(0, 256, TABLE, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.ALL))
        lst = await server.listen("127.0.0.1", 0)
        ep = await client.connect("127.0.0.1", lst.port)
        assert ep.busy_poll_us == 2000
        key = await ep.remote_key("t")
        out = np.zeros(TABLE, dtype=np.uint8)
        mr = client.register(out)
        rng = np.random.default_rng(6)
        for i in range(300):                                # depth 1: reads, writes, atomics, a ping
            off = int(rng.integers(0, TABLE // 64)) * 64
            await ep.read(mr, off, key, off, 64)
            assert np.array_equal(out[off:off + 64], table[off:off + 64])
            if i % 50 == 0:
                out[off:off + 64] ^= 0xFF
                await ep.write(mr, off, key, off, 64)
                assert np.array_equal(table[off:off + 64], out[off:off + 64])
                old = await ep.fetch_add(key, 0, 1)
                assert old + 1 == int(table[:8].view(np.uint64)[0])
                await ep.ping()
        # concurrent callers mixed with depth-1 ones: every result right
        await asyncio.gather(*(ep.read(mr, i * 8192, key, i * 8192, 8192) for i in range(64)),
                             *(ep.read(mr, (64 + i) * 64, key, (64 + i) * 64, 64) for i in range(8)))
        assert np.array_equal(out[: 64 * 8192], table[: 64 * 8192])
        home = client.info()["workers"][ep.workers[0]]
        assert home["busy_polls"] > 0                       # the loop did poll the CQ itself
        ep.busy_poll_us = 0
        await ep.read(mr, 0, key, 0, 64)                    # and the worker path still works after it
        assert np.array_equal(out[:64], table[:64])
        await ep.aclose()

