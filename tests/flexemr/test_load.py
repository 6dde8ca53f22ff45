"""Load-aware replica reads: the choice made from measured loads, splitting, and live migration of
traffic away from an overloaded server with operations in flight (none fails, none hangs)."""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest

from flexemr import LocalCluster, ShardingPlan, TableSpec
from flexemr.client.load import LoadTracker, work_of

SPECS = [TableSpec("user", 4000, 16)]
pytestmark = pytest.mark.timeout(120)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------ the tracker


def test_choice_follows_outstanding_work_and_measured_speed() -> None:
    clock = Clock()
    t = LoadTracker(clock=clock)
    assert t.choose(["a", "b"], 100) == "a"               # nothing known: replica order (the primary)
    t.observe("a", work=10_000, ahead=0, seconds=0.010)   # a: 1 us / unit
    t.observe("b", work=10_000, ahead=0, seconds=0.002)   # b: 0.2 us / unit
    assert t.choose(["a", "b"], 100) == "b"               # b is faster
    started = t.begin("b", 100_000)                       # ... but has 100k units queued
    assert t.choose(["a", "b"], 1000) == "a"
    t.end("b", 100_000, started, ok=False)                # failed requests leave no sample
    assert t.servers["b"].outstanding == 0 and t.servers["b"].requests == 1
    assert t.choose(["a", "b"], 1000) == "b"


def test_outstanding_operations_count_as_work() -> None:
    t = LoadTracker(clock=Clock())
    for s in ("a", "b"):
        t.observe(s, work=5000, ahead=0, seconds=0.005)
    for _ in range(8):                                    # a: many small requests in flight, few bytes
        t.begin("a", work_of(64, 1))
    assert t.servers["a"].outstanding_requests == 8
    assert t.choose(["a", "b"], work_of(64, 1)) == "b"


def test_latency_is_normalised_by_the_work_it_covered() -> None:
    t = LoadTracker(clock=Clock())
    t.observe("a", work=1000, ahead=9000, seconds=0.010)  # 10 ms, but behind 9000 units: 1 us / unit
    t.observe("b", work=1000, ahead=0, seconds=0.005)     # 5 ms for 1000 units alone: 5 us / unit
    assert t.spu("a") == pytest.approx(1e-6) and t.spu("b") == pytest.approx(5e-6)
    assert t.choose(["b", "a"], 1000) == "a"


def test_an_old_estimate_decays_to_the_best_server() -> None:
    clock = Clock()
    t = LoadTracker(clock=clock, half_life=1.0)
    t.observe("a", work=1000, ahead=0, seconds=0.001)
    t.observe("b", work=1000, ahead=0, seconds=0.009)
    assert t.choose(["b", "a"], 10) == "a"
    clock.t = 1.0                                         # b not measured for one half-life: half-way
    assert t.spu("b") == pytest.approx(5e-6)
    clock.t = 30.0                                        # long unrefreshed: as good as a -> tried again
    assert t.spu("b") == pytest.approx(1e-6, rel=1e-3)
    t.begin("a", 10)
    assert t.choose(["b", "a"], 10) == "b"


def test_a_stalled_server_loses_traffic_while_nothing_completes_on_it() -> None:
    clock = Clock()
    t = LoadTracker(clock=clock)
    t.observe("a", work=1000, ahead=0, seconds=0.0001)    # a measured 10x faster than b
    t.observe("b", work=1000, ahead=0, seconds=0.001)
    started = t.begin("a", 1000)
    assert t.choose(["a", "b"], 1000) == "a"              # (1000 + 1000) x 0.1 us < 1000 x 1 us
    clock.t = 0.01                                        # a's request has waited 10 ms for 1000 units
    assert t.spu("a") == pytest.approx(1e-5)              # at least 10 us / unit: it serves no faster
    assert t.choose(["a", "b"], 1000) == "b"
    clock.t = 0.011
    t.end("a", 1000, started)                             # it answered at last: the bound goes away
    assert t.servers["a"].inflight == {}
    assert t.spu("a") < t.spu("b") * 10


def test_split_equalises_predicted_completion() -> None:
    t = LoadTracker(clock=Clock())
    t.observe("a", work=1000, ahead=0, seconds=0.001)     # 1 us / unit
    t.observe("b", work=1000, ahead=0, seconds=0.003)     # 3 us / unit
    shares = t.split(["a", "b"], 4000)
    assert sum(shares) == pytest.approx(4000)
    assert shares[0] * t.spu("a") == pytest.approx(shares[1] * t.spu("b"))
    t.begin("a", 100_000)                                 # a far behind: b takes everything
    assert t.split(["a", "b"], 4000) == pytest.approx([0, 4000])


def test_tracker_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        LoadTracker(alpha=0)
    with pytest.raises(ValueError):
        LoadTracker(half_life=0)
    with pytest.raises(ValueError):
        LoadTracker().choose([], 1)


# ------------------------------------------------------------------ clients


def _plan() -> ShardingPlan:
    return ShardingPlan.row_wise(SPECS, ["s0", "s1"], replicas=2)   # shard 0: s0 (primary), s1


async def test_reads_go_to_the_replica_the_measured_load_favours() -> None:
    async with LocalCluster(SPECS, plan=_plan(), seed=2, in_process=True, transport="tcp") as cluster:
        model = cluster.model()["user"]
        client = await cluster.client()
        ids = np.arange(0, 64)                            # shard 0 only
        tracker = client._lanes.tracker
        tracker.observe("s0", work=1 << 20, ahead=0, seconds=1.0)     # s0 measured slow
        tracker.observe("s1", work=1 << 20, ahead=0, seconds=0.001)
        before = {s: tracker.servers[s].requests for s in ("s0", "s1")}
        assert (await client.lookup("user", ids) == model[ids]).all()
        assert tracker.servers["s1"].requests == before["s1"] + 1    # read from the backup replica
        assert tracker.servers["s0"].requests == before["s0"]
        assert client.metrics.off_primary_reads == 1
        tracker.observe("s1", work=1 << 20, ahead=0, seconds=100.0)  # now s1 is the slow one
        for _ in range(4):
            tracker.observe("s0", work=1 << 20, ahead=0, seconds=0.001)
        assert (await client.lookup("user", ids + 100) == model[ids + 100]).all()
        assert tracker.servers["s0"].requests == before["s0"] + 5
        assert client.metrics.replica_moves == 1
        assert set(client.server_load()) == {"s0", "s1"}


async def test_static_reads_stay_on_the_primary() -> None:
    async with LocalCluster(SPECS, plan=_plan(), seed=2, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(balanced_reads=False)
        tracker = client._lanes.tracker
        tracker.observe("s0", work=1 << 20, ahead=0, seconds=1.0)
        await client.lookup("user", np.arange(64))
        assert tracker.servers["s0"].requests == 2 and tracker.servers.get("s1") is None


async def test_a_large_read_of_one_shard_is_cut_over_its_replicas() -> None:
    async with LocalCluster([TableSpec("user", 40_000, 64)], plan=ShardingPlan.row_wise(
            [TableSpec("user", 40_000, 64)], ["s0", "s1"], replicas=2), seed=4, in_process=True,
            transport="tcp") as cluster:
        model = cluster.model()["user"]
        client = await cluster.client(split_bytes=64 << 10)
        ids = np.arange(0, 20_000, 2)                     # shard 0, 10k rows x 256 B = 2.5 MiB
        got = await client.lookup("user", ids)
        assert (got == model[ids]).all()
        assert client.metrics.split_reads == 1
        load = client.server_load()
        assert load["s0"]["requests"] >= 1 and load["s1"]["requests"] >= 1


async def test_versioned_reads_spread_and_stay_coherent() -> None:
    specs = [TableSpec("emb", 2000, 8)]
    async with LocalCluster(specs, servers=2, seed=5, replicas=2, versioned=True, in_process=True,
                            transport="tcp") as cluster:
        writer = await cluster.client()
        reader = await cluster.client(split_bytes=1024, cache_bytes=64 << 10)
        ids = np.arange(0, 2000, 2)                      # one read per row: reads can be cut between rows
        for k in range(1, 6):
            rows = np.full((ids.size, 8), float(k), dtype=np.float32)
            await writer.update("emb", ids, rows)
            got = await reader.lookup("emb", ids)        # never older than the acknowledged update
            assert (got == float(k)).all()
        assert reader.metrics.split_reads >= 1
        assert writer.reliability.stale_replica_reads == reader.reliability.stale_replica_reads == 0


async def test_traffic_migrates_off_a_stalled_server_and_nothing_in_flight_fails() -> None:
    """s0 stops answering (SIGSTOP): a lookup already sent to it waits, lookups after it are routed to s1
    and complete while s0 is still stopped; once s0 resumes, the waiting one completes too."""
    async with LocalCluster(SPECS, plan=_plan(), seed=3, transport="tcp") as cluster:
        model = cluster.model()["user"]
        client = await cluster.client(op_timeout=30.0)
        await client.lookup("user", np.arange(0, 8))                  # connected, warm
        await cluster.kill("s0", signal.SIGSTOP)
        try:
            first = asyncio.ensure_future(client.lookup("user", np.arange(0, 64)))   # -> s0 (primary, tied)
            await asyncio.sleep(0.1)
            assert client._lanes.tracker.servers["s0"].outstanding > 0
            later = [await asyncio.wait_for(client.lookup("user", np.arange(100 + 64 * i, 164 + 64 * i)), 20)
                     for i in range(5)]                                # served by s1 while s0 is stopped
            assert not first.done()
            for i, rows in enumerate(later):
                assert (rows == model[100 + 64 * i: 164 + 64 * i]).all()
        finally:
            await cluster.resume("s0")
        assert (await asyncio.wait_for(first, 20) == model[:64]).all()
        assert client.metrics.replica_moves >= 1 and client.metrics.errors == 0
        assert client.reliability.peer_failures == 0 and client.healthy()


async def test_versioned_reads_under_migration_are_never_torn_nor_older_than_an_acknowledged_update() -> None:
    """A writer updates hot rows over and over while readers (load-aware, reads cut over both replicas,
    a row cache) have their replica choice pushed back and forth: every row read is whole (all columns
    of one update) and never older than the last update acknowledged before the lookup began."""
    specs = [TableSpec("emb", 2000, 8)]
    async with LocalCluster(specs, servers=2, seed=6, replicas=2, versioned=True, in_process=True,
                            transport="tcp") as cluster:
        writer = await cluster.client()
        readers = [await cluster.client(split_bytes=512, cache_bytes=32 << 10) for _ in range(2)]
        hot = np.arange(0, 2000, 9)                       # rows of both shards
        initial = cluster.model()["emb"]
        acked = 0                                         # the last acknowledged generation
        stop = asyncio.Event()
        reads = 0

        async def write() -> None:
            nonlocal acked
            for g in range(1, 41):
                await writer.update("emb", hot, np.full((hot.size, 8), float(g), dtype=np.float32))
                acked = g
                await asyncio.sleep(0)
            stop.set()

        async def read(k: int) -> None:
            nonlocal reads
            client = readers[k % 2]
            tracker = client._lanes.tracker
            rng = np.random.default_rng(k)
            while not stop.is_set():
                slow = ("s0", "s1")[int(rng.integers(2))]    # push the choice towards the other replica
                tracker.observe(slow, work=1 << 16, ahead=0, seconds=float(rng.uniform(0.001, 0.05)))
                floor = acked
                ids = np.concatenate([hot[rng.permutation(hot.size)[:40]], rng.integers(0, 2000, 20)])
                rows = await asyncio.wait_for(client.lookup("emb", ids), 20)
                is_hot = np.isin(ids, hot)
                assert (rows[~is_hot] == initial[ids[~is_hot]]).all()
                h, original = rows[is_hot], (rows[is_hot] == initial[ids[is_hot]]).all(axis=1)
                whole = (h == h[:, :1]).all(axis=1) & (h[:, 0] >= 1)
                assert (original | whole).all(), "torn row"
                assert not (original & (floor > 0)).any() and (h[whole, 0] >= floor).all(), \
                    f"read older than the acknowledged update {floor}"
                reads += 1

        await asyncio.wait_for(asyncio.gather(write(), *(read(k) for k in range(4))), 90)
        final = await readers[0].lookup("emb", hot)
        assert (final == 40.0).all()
        moves = sum(r.metrics.replica_moves for r in readers)
        assert reads >= 20 and moves >= 5 and sum(r.metrics.split_reads for r in readers) >= 1
        assert sum(r.metrics.off_primary_reads for r in readers) >= 1
        assert all(r.metrics.errors == 0 and r.reliability.stale_replica_reads == 0 for r in readers)
