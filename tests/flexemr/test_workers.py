"""Under skew the client moves its own queue-pair-to-worker mapping (flexemr.client.workers): the
greedy assignment and its hysteresis, and a live move on a tcp cluster with lookups in flight."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from flexemr import LocalCluster, ShardingPlan, TableSpec
from flexemr.client.workers import assign

pytestmark = pytest.mark.timeout(120)

TWO = (0, 1)


# ------------------------------------------------------------------ the policy


def test_hot_endpoints_sharing_a_worker_are_spread() -> None:
    loads = {"a": 10.0, "b": 9.0, "c": 1.0}
    moves = assign(loads, {"a": TWO, "b": TWO, "c": (1, 0)}, {"a": 0, "b": 0, "c": 1})
    assert moves == {"b": 1}                           # the heavier stays, the next goes to the idle worker


def test_heaviest_first_onto_the_least_loaded_worker() -> None:
    loads = {"a": 8.0, "b": 5.0, "c": 4.0, "d": 3.0}
    cur = {"a": 0, "b": 0, "c": 0, "d": 0}
    moves = assign(loads, {k: TWO for k in loads}, cur)
    after = {k: moves.get(k, cur[k]) for k in loads}
    per = [sum(loads[k] for k in loads if after[k] == w) for w in TWO]
    assert sorted(per) == [9.0, 11.0]                  # greedy: a->0, b->1, c->1, d->0
    assert after["a"] != after["b"]


def test_balanced_or_small_gains_do_not_move() -> None:
    assert assign({"a": 10.0, "b": 9.0}, {"a": TWO, "b": (1, 0)}, {"a": 0, "b": 1}) == {}
    # moving b would take the busiest worker from 12 to 10: less than the 25 % threshold
    loads = {"a": 10.0, "b": 2.0, "c": 8.0}
    assert assign(loads, {k: TWO for k in loads}, {"a": 0, "b": 0, "c": 1}) == {}
    assert assign(loads, {k: TWO for k in loads}, {"a": 0, "b": 0, "c": 1}, threshold=0.1) == {"b": 1}


def test_hysteresis_the_new_mapping_is_stable() -> None:
    loads = {"a": 10.0, "b": 9.0, "c": 1.0, "d": 1.0}
    ws = {k: TWO for k in loads}
    cur = {"a": 0, "b": 0, "c": 1, "d": 1}
    moves = assign(loads, ws, cur)
    assert moves
    cur.update(moves)
    assert assign(loads, ws, cur) == {}                # applied once, then kept
    # a small shift of load does not move anything back
    assert assign({**loads, "b": 11.0}, ws, cur) == {}


def test_idle_load_and_fixed_endpoints() -> None:
    loads = {"a": 10.0, "b": 9.0}
    assert assign(loads, {"a": TWO, "b": TWO}, {"a": 0, "b": 0}, min_load=100.0) == {}
    assert assign({"a": 0.0, "b": 0.0}, {"a": TWO, "b": TWO}, {"a": 0, "b": 0}) == {}
    # c is pinned (a user's qp_choice) on worker 1 and carries 30: a and b both stay on worker 0
    assert assign({**loads, "c": 30.0}, {"a": TWO, "b": TWO}, {"a": 0, "b": 0}, fixed={"c": 1}) == {}
    # only workers an endpoint owns a queue pair on are candidates
    assert assign(loads, {"a": (0,), "b": (0,)}, {"a": 0, "b": 0}) == {}
    with pytest.raises(ValueError):
        assign(loads, {"a": TWO}, {"a": 0}, threshold=1.0)


# ------------------------------------------------------------------ a client


SPECS = [TableSpec("user", 3000, 16)]


def _plan() -> ShardingPlan:
    return ShardingPlan.row_wise(SPECS, ["s0", "s1", "s2"])   # shard i on server i


async def test_skewed_load_moves_an_endpoint_to_the_other_worker_live() -> None:
    """Three servers on two workers: two share a home worker.  Load only on those two: the client moves
    one of them to its queue pair on the other worker, with lookups in flight, none failing."""
    async with LocalCluster(SPECS, plan=_plan(), seed=7, in_process=True, transport="tcp") as cluster:
        model = cluster.model()["user"]
        client = await cluster.client(engine_options={"workers": 2}, server_pooling=False)
        peers = client._peers.peers
        eps = {s: peers[s].ep for s in ("s0", "s1", "s2")}
        assert all(ep is not None and ep.num_queue_pairs == 2 for ep in eps.values())
        homes = {s: ep.workers[0] for s, ep in eps.items() if ep is not None}
        hot = next([a, b] for a in homes for b in homes if a < b and homes[a] == homes[b])
        assert all(eps[s].qp_choice == "home" for s in hot)     # type: ignore[union-attr]
        rows = {s: next(sh for sh in client.config.plan.shards["user"] if sh.server == s) for s in hot}
        wm = client._lanes.workers
        assert wm is not None
        wm.interval = 0.0                                       # check on every batch

        async def one(i: int) -> None:
            sh = rows[hot[i % 2]]
            ids = np.arange(sh.row_start, sh.row_end)[(i * 37) % 200::3]
            assert (await client.lookup("user", ids) == model[ids]).all()

        for k in range(30):                                     # 8 lookups in flight at a time
            await asyncio.gather(*(one(8 * k + i) for i in range(8)))
            if client.metrics.worker_moves:
                break
        assert client.metrics.worker_moves >= 1
        used = {s: eps[s].workers[0 if eps[s].qp_choice == "home" else eps[s].qp_choice]  # type: ignore[union-attr,index]
                for s in hot}
        assert used[hot[0]] != used[hot[1]]                     # the hot servers are on different workers now
        moved = [s for s in hot if eps[s].qp_choice != "home"]  # type: ignore[union-attr]
        assert len(moved) == 1
        # lookups go on through the moved endpoint's new queue pair, correct; nothing failed during the move
        ep = eps[moved[0]]
        assert ep is not None and isinstance(ep.qp_choice, int)
        seen = [0] * ep.num_queue_pairs
        tasks = [asyncio.ensure_future(one(i)) for i in range(16)]
        while not all(t.done() for t in tasks):
            for i, qp in enumerate(ep._qps):
                seen[i] = max(seen[i], qp.in_flight)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert seen[ep.qp_choice] > 0 and seen[0] == 0
        assert client.metrics.errors == 0 and client.reliability.peer_failures == 0
        assert client.metrics.snapshot()["worker_moves"] == client.metrics.worker_moves


async def test_explicit_qp_choice_and_the_option_are_respected() -> None:
    async with LocalCluster(SPECS, plan=_plan(), seed=7, in_process=True, transport="tcp") as cluster:
        off = await cluster.client(remap_workers=False)
        assert off._lanes.workers is None
        client = await cluster.client(engine_options={"workers": 2, "qp_choice": "least_loaded"},
                                      server_pooling=False)
        wm = client._lanes.workers
        assert wm is not None
        wm.interval = 0.0
        wm.min_load = 0.0
        model = cluster.model()["user"]
        for k in range(10):
            ids = np.arange(k, 1000, 5)                          # shard 0 only
            assert (await client.lookup("user", ids) == model[ids]).all()
        assert client.metrics.worker_moves == 0
        assert all(p.ep is not None and p.ep.qp_choice == "least_loaded" for p in client._peers.peers.values())
