"""The priority lane: its own batches, endpoints and credits; bulk traffic cannot take its credits."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from flexemr import ConfigError, InputError, LocalCluster, TableSpec

SPECS = [TableSpec("user", 4000, 16)]
pytestmark = pytest.mark.timeout(60)


def test_priority_options_are_checked() -> None:
    from flexemr import ClientOptions

    with pytest.raises(ConfigError, match="priority_lane"):
        ClientOptions(priority=True)
    with pytest.raises(ConfigError, match="priority_window_bytes"):
        ClientOptions(priority_lane=True, priority_window_bytes=10)
    assert ClientOptions(priority_lane=True, priority=True).priority


async def test_priority_lookup_passes_bulk_that_has_no_credits_left() -> None:
    async with LocalCluster(SPECS, servers=2, seed=1, in_process=True, transport="tcp") as cluster:
        model = cluster.model()["user"]
        client = await cluster.client(priority_lane=True, bulk_window_bytes=4096)
        lanes = client._lanes
        assert lanes.priority is not None
        bulk_credits = [c for c in (lanes.bulk.window(s) for s in ("s0", "s1")) if c is not None]
        assert len(bulk_credits) == 2
        for c in bulk_credits:                            # every bulk credit taken (as by a stuck bulk transfer)
            await c.acquire(4096)
        bulk = asyncio.ensure_future(client.lookup("user", np.arange(0, 4000, 7)))
        await asyncio.sleep(0.05)
        assert not bulk.done() and sum(c.waiting for c in bulk_credits) >= 1
        ids = np.array([5, 2100, 5])
        got = await asyncio.wait_for(client.lookup("user", ids, priority=True), 10)
        assert (got == model[ids]).all()
        assert not bulk.done()                            # bulk still waits for its own credits
        prio = [lanes.priority.window(s) for s in ("s0", "s1")]
        assert all(c is not None and c.in_use_bytes == 0 and c.granted == 1 for c in prio)
        for c in bulk_credits:
            c.release(4096)
        assert (await asyncio.wait_for(bulk, 10) == model[np.arange(0, 4000, 7)]).all()
        granted = [c.granted for c in prio if c is not None]
        for _ in range(5):                                # more bulk: never touches the priority credits
            await client.lookup("user", np.arange(0, 4000, 3))
        assert [c.granted for c in prio if c is not None] == granted
        assert client.metrics.priority_lookups == 1


async def test_priority_lookups_use_their_own_endpoints_and_batches() -> None:
    async with LocalCluster(SPECS, servers=2, seed=1, in_process=True, transport="tcp") as cluster:
        model = cluster.model()["user"]
        client = await cluster.client(priority_lane=True, priority_max_rows=64)
        peers = client._peers
        for s in ("s0", "s1"):
            prio_ep = peers.priority_endpoint(s)
            assert prio_ep is not None and prio_ep is not peers.replica_endpoint(s)
        # issued in the same loop iteration: the bulk ones coalesce, the priority one is a batch of its own
        outs = await asyncio.gather(client.lookup("user", np.arange(10)), client.lookup("user", np.arange(10, 20)),
                                    client.lookup("user", np.arange(20, 30), priority=True))
        for i, rows in enumerate(outs):
            assert (rows == model[10 * i: 10 * i + 10]).all()
        assert client.metrics.batches == 2 and client.metrics.priority_lookups == 1
        await client.lookup("user", np.arange(100), priority=True)   # more rows than priority_max_rows: bulk
        assert client.metrics.priority_demoted == 1


async def test_priority_without_a_lane_is_an_input_error() -> None:
    async with LocalCluster(SPECS, servers=1, seed=1, in_process=True, transport="tcp") as cluster:
        client = await cluster.client()
        with pytest.raises(InputError, match="priority_lane"):
            await client.lookup("user", [1], priority=True)


async def test_a_failed_priority_endpoint_fails_the_server_over() -> None:
    async with LocalCluster(SPECS, servers=2, seed=1, in_process=True, transport="tcp", replicas=2) as cluster:
        model = cluster.model()["user"]
        client = await cluster.client(priority_lane=True, reconnect_base=0.01)
        ep = client._peers.priority_endpoint("s0")
        assert ep is not None
        client.peer_failed("s0", RuntimeError("test"), ep)       # reported through the priority endpoint
        assert client._peers.replica_endpoint("s0") is None and client._peers.priority_endpoint("s0") is None
        ids = np.arange(0, 50)
        assert (await client.lookup("user", ids, priority=True) == model[ids]).all()   # the replica serves
        assert await client.wait_healthy(10)
        assert client._peers.priority_endpoint("s0") is not None
