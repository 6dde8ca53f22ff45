"""Replicated plans: TOML, failover when a server dies or hangs, recovery, metadata identity."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tomllib

import numpy as np
import pytest

from flexemr import (
    ClusterConfig,
    ConfigError,
    LocalCluster,
    ShardingPlan,
    TableSpec,
    TransportError,
)
from flexemr.core.meta import ServerMeta, decode_meta, encode_meta
from flexemr.core.toml import dumps_toml
from flexemr.client.replica import Backoff
from tests.flexemr.transports import TRANSPORTS

SPECS = [TableSpec("user", 4000, 16), TableSpec("item", 600, 8, "float16")]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------- plans


def test_plan_replicas_toml_round_trip() -> None:
    d = {"servers": ["s0", "s1", "s2"], "tables": [t.to_dict() for t in SPECS],
         "sharding": {"kind": "row_wise", "replicas": 2, "versioned": True}}
    plan = ShardingPlan.from_dict(d)
    assert plan.replicas == 2 and plan.versioned
    for sh in plan.shards["user"]:
        assert len(set(sh.replicas)) == 2
    assert {s.region_name for s in plan.regions_on("s1")} >= {"user/0", "user/1"}
    again = ShardingPlan.from_dict(tomllib.loads(dumps_toml(plan.to_dict())))
    assert again == plan
    assert tomllib.loads(plan.to_toml())["shards"][0]["servers"] == ["s0", "s1"]   # replicated: a list of servers
    assert ShardingPlan.from_dict({**d, "sharding": {"kind": "row_wise"}}) != plan  # versioned/replicas matter
    cfg = ClusterConfig.from_dict({**plan.to_dict(), "servers": {s: {"host": "h", "port": 1} for s in plan.servers}})
    assert cfg.plan == plan


@pytest.mark.parametrize("sharding, shards, match", [
    ({"kind": "row_wise", "replicas": 4}, None, "replicas must be"),
    ({"kind": "row_wise", "replicas": 0}, None, "replicas must be"),
    ({"kind": "column_wise", "versioned": True}, None, "cannot be versioned"),
    ({"kind": "row_wise", "versioned": "yes"}, None, "versioned must be"),
    ({"kind": "explicit", "replicas": 2}, [{"table": "t", "server": "s0"}], "list each shard"),
    ({"kind": "explicit"}, [{"table": "t", "servers": ["s0", "s0"]}], "distinct servers"),
    ({"kind": "explicit"}, [{"table": "t", "servers": ["s0", "s9"]}], "unknown server"),
    ({"kind": "explicit"}, [{"table": "t", "server": "s0", "servers": ["s1"]}], "not both"),
])
def test_bad_replica_plans(sharding: dict[str, object], shards: object, match: str) -> None:
    d: dict[str, object] = {"servers": ["s0", "s1", "s2"], "tables": [{"name": "t", "num_rows": 9, "dim": 4}],
                            "sharding": sharding}
    if shards is not None:
        d["shards"] = shards
    with pytest.raises(ConfigError, match=match):
        ShardingPlan.from_dict(d)


def test_meta_carries_incarnation_and_layout() -> None:
    m = ServerMeta("s0", "tcp", {}, {"kind": "random", "seed": 0}, None, (), 12345, "versioned")
    assert decode_meta(encode_meta(m)) == m


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(0.01, 0.1)
    delays = [b.next() for _ in range(20)]
    assert all(0.005 <= d <= 0.1 for d in delays) and max(delays[10:]) <= 0.1 and len(set(delays)) > 10
    b.reset()
    assert b.next() <= 0.01


# ---------------------------------------------------------------- failover


async def _stream(client: object, model: dict[str, np.ndarray], stop: asyncio.Event, out: list[float],
                  seed: int) -> int:
    """Lookups until ``stop``; every row checked; returns how many were done (records each latency)."""
    rng = np.random.default_rng(seed)
    n = 0
    while not stop.is_set():
        ids = rng.integers(0, 4000, 64)
        t0 = time.monotonic()
        rows = await client.lookup("user", ids)  # type: ignore[attr-defined]
        out.append(time.monotonic() - t0)
        assert np.array_equal(rows, model["user"][ids])
        n += 1
    return n


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_failover_on_kill_and_recovery_after_restart(transport: str) -> None:
    fds0 = _fds()
    async with LocalCluster(SPECS, servers=3, seed=5, replicas=2, transport=transport) as cluster:
        client = await cluster.client()
        model = cluster.model()
        stop = asyncio.Event()
        lat: list[float] = []
        tasks = [asyncio.ensure_future(_stream(client, model, stop, lat, i)) for i in range(4)]
        await asyncio.sleep(0.3)
        await cluster.kill("s1")                     # SIGKILL mid-stream
        await asyncio.sleep(0.5)
        assert client.reliability.peer_failures == 1
        assert all("s1" not in v for v in client.replica_status().values())
        # every shard still has a replica: pooled lookups and jagged lookups work too
        ids = np.arange(0, 600, 3)
        assert np.array_equal(await client.lookup("item", ids), model["item"][ids])
        await cluster.restart("s1")
        assert await client.wait_healthy(10.0)
        assert client.reliability.reconnects == 1 and client.reliability.restarts_seen == 1
        before = client.metrics.bytes_read
        await asyncio.sleep(0.3)
        stop.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert sum(done) > 20
        # nothing waited for a dead server: the kill was noticed through the control connection at
        # once, no operation had to run out of op_timeout (not a wall-clock bound on the lookups: in
        # the emulated VM a loaded host stalls the whole guest for a second and more at times)
        assert client.reliability.peer_timeouts == 0
        assert client.metrics.bytes_read > before
        # reads are routed back: s1 serves its regions again
        status = client.replica_status()
        assert all(status[sh.region_name] == list(sh.replicas) for sh in cluster.plan.regions_on("s1"))
        assert client.metrics.errors == 0
    assert _fds() <= fds0 + 2
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_replica_left_fails_fast_and_recovers(transport: str) -> None:
    async with LocalCluster(SPECS, servers=2, seed=5, transport=transport, in_process=True) as cluster:
        client = await cluster.client(reconnect_base=0.01, reconnect_cap=0.05)
        model = cluster.model()
        await cluster.kill("s0")
        t0 = time.monotonic()
        for _ in range(3):
            with pytest.raises(TransportError):
                await client.lookup("user", np.arange(0, 4000, 10))
        assert time.monotonic() - t0 < 1.0
        # rows of the live server still come back
        hi = np.arange(3000, 4000)
        assert np.array_equal(await client.lookup("user", hi), model["user"][hi])
        await cluster.restart("s0")
        assert await client.wait_healthy(5.0)
        ids = np.arange(0, 4000, 10)
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])


async def test_a_replica_that_dies_unread_is_noticed_and_restored_before_it_is_needed() -> None:
    # The client reads only shard 0, from its primary; the backup dies and comes back without
    # the client ever reading from it.  When the primary dies next, the backup must be usable.
    async with LocalCluster(SPECS, servers=2, seed=5, replicas=2, transport="tcp", in_process=True) as cluster:
        client = await cluster.client(reconnect_base=0.01, reconnect_cap=0.05)
        model = cluster.model()
        shard = cluster.plan.shards["user"][0]
        primary, backup = shard.replicas
        ids = np.arange(shard.row_start, shard.row_end, 7)
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        await cluster.kill(backup)
        for _ in range(500):                          # noticed without any lookup touching it
            if client.reliability.peer_failures:
                break
            await asyncio.sleep(0.01)
        assert client.reliability.peer_failures == 1 and not client.healthy()
        await cluster.restart(backup)
        assert await client.wait_healthy(10.0)
        await cluster.kill(primary)
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        assert client.reliability.peer_failures == 2


@pytest.mark.parametrize("versioned", [False, True])
async def test_a_client_starts_while_a_replicated_server_is_down(versioned: bool) -> None:
    async with LocalCluster(SPECS, servers=3, seed=5, replicas=2, versioned=versioned, transport="tcp",
                            in_process=True) as cluster:
        model = cluster.model()
        await cluster.kill("s1")
        client = await cluster.client(reconnect_base=0.01, reconnect_cap=0.05)
        assert not client.healthy()
        ids = np.arange(0, 4000, 3)
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        if versioned:
            await client.update("user", [1, 2], np.ones((2, 16), np.float32))
        await cluster.restart("s1")
        assert await client.wait_healthy(10.0)
        if versioned:                       # the restarted replica was brought in sync before serving
            for sh in cluster.plan.shards["user"]:
                if sh.row_start <= 1 < sh.row_end and "s1" in sh.replicas:
                    assert client.replica_status()[sh.region_name] == list(sh.replicas)
            assert (await client.lookup("user", [1, 2]) == 1).all()
        await cluster.kill("s0")            # now s1 must carry the shards it shares with s0
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])  # rows 1, 2 not among ids


async def test_a_client_does_not_start_without_every_shard() -> None:
    async with LocalCluster(SPECS, servers=2, seed=5, transport="tcp", in_process=True) as cluster:
        await cluster.kill("s1")            # no replicas: s1's shards are unreachable
        with pytest.raises(TransportError, match="s1"):
            await cluster.client()


async def test_a_failed_client_engine_is_reported_not_retried() -> None:
    async with LocalCluster(SPECS, servers=2, seed=5, transport="tcp", in_process=True) as cluster:
        client = await cluster.client(engine_options={"progress": "thread", "workers": 1})
        await client.lookup("user", [1, 2, 3])
        worker = client.engine._core.workers[0]
        r, w = os.pipe()
        os.dup2(r, worker._fd())          # the client's only progress worker fails on its next poll
        os.close(r)
        os.close(w)
        worker.wake()
        for _ in range(300):
            if client.engine.failure:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(TransportError, match="engine failed"):
            await client.lookup("user", [1, 2, 3])
        await asyncio.sleep(0.1)
        assert all(p.task is None or p.task.done() for p in client._peers.peers.values()), "reconnecting forever"


async def test_hung_server_fails_over_within_op_timeout() -> None:
    async with LocalCluster(SPECS, servers=3, seed=5, replicas=2, transport="tcp") as cluster:
        # primaries only: load-aware reads may route around s2 when it looked slow in the
        # first lookup (a loaded machine), and a hung server nobody reads is not noticed
        client = await cluster.client(op_timeout=0.5, reconnect_cap=0.3, balanced_reads=False)
        model = cluster.model()
        ids = np.arange(0, 4000, 5)
        assert any(sh.replicas[0] == "s2" for sh in cluster.plan.shards["user"]), "s2 is read"
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        await cluster.kill("s2", signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            rows = await asyncio.wait_for(client.lookup("user", ids), 5)
            took = time.monotonic() - t0
            assert np.array_equal(rows, model["user"][ids])
            assert took < 1.5, took
            assert all("s2" not in servers for servers in client.replica_status().values())
            rows = await client.lookup("user", ids)     # s2 is out of the routes now: no second timeout
            assert np.array_equal(rows, model["user"][ids])
            assert client.reliability.peer_failures == 1
            assert client.reliability.peer_timeouts == 1  # a hung server is noticed by op_timeout alone
        finally:
            await cluster.resume("s2")
        assert await client.wait_healthy(10.0)
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        assert client.reliability.restarts_seen == 0


async def test_reconnect_validates_identity() -> None:
    """A different server answering on a known address is refused; the client keeps failing over."""
    async with LocalCluster(SPECS, servers=2, seed=5, replicas=2, transport="tcp", in_process=True) as cluster:
        client = await cluster.client(reconnect_base=0.01, reconnect_cap=0.05)
        model = cluster.model()
        addr = cluster.config.address("s0")
        await cluster.kill("s0")
        from flexemr import EmbeddingServer

        other = ShardingPlan.row_wise([TableSpec("user", 4000, 16)], ["s0"])
        async with EmbeddingServer(other, "s0", host=addr.host, port=addr.port, transport="tcp"):
            ids = np.arange(4000)
            for _ in range(5):
                assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
                await asyncio.sleep(0.05)
            assert client.reliability.reconnects == 0
            assert client.replica_status()["user/0"] == ["s1"]
        await cluster.restart("s0")
        assert await client.wait_healthy(5.0)
