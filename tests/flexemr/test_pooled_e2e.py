"""Pooled (EmbeddingBag) lookups end to end: local vs server-side hierarchical pooling, cache, remap."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from flexemr import (
    ClosedError,
    FlexEMRError,
    InputError,
    JaggedBatch,
    LocalCluster,
    LookupIdError,
    ShardingPlan,
    TableSpec,
    UnknownTableError,
)
from flexemr.core.pooling import pool
from flexemr.core.remap import build_remap, profile_accesses
from flexemr.server.pooling import RESPONSE_ARENA_BYTES
from flexemr.apps.workload import PROFILE_2022, generate
from tests.flexemr.transports import TRANSPORTS

SPECS = [
    TableSpec("user", 5000, 16, "float32"),
    TableSpec("item", 3001, 8, "float16"),
    TableSpec("wide", 900, 64, "float64"),
]
B = 48


def random_batch(rng: np.random.Generator, specs: list[TableSpec], plan: ShardingPlan) -> JaggedBatch:
    """Random bags plus the edge cases: empty bags, one-row bags, bags with rows on every server."""
    vals, lens = [], []
    for spec in specs:
        lengths = rng.integers(0, 14, size=B)
        lengths[:4] = 0          # empty bags
        lengths[4:8] = 1         # one-row bags
        ids = [rng.integers(0, spec.num_rows, size=int(n)) for n in lengths]
        bands = plan.shards[spec.name]
        for b in range(8, 12):   # spanning all servers: rows from every shard, several each
            ids[b] = np.concatenate([rng.integers(sh.row_start, sh.row_end, size=3) for sh in bands])
            lengths[b] = ids[b].size
        ids[12] = np.full(5, 7)  # one row repeated in a bag
        lengths[12] = 5
        vals.append(np.concatenate(ids))
        lens.append(lengths)
    return JaggedBatch([s.name for s in specs], np.concatenate(vals), lengths=np.concatenate(lens))


def reference(model: dict[str, np.ndarray], jb: JaggedBatch, mode: str, w: np.ndarray | None) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for t in jb.keys:
        ids = jb.ids(t)
        ws = None if w is None else w[pos : pos + ids.size]
        pos += ids.size
        out[t] = pool(model[t][ids], jb.bag_offsets(t), mode, ws)
    return out


def check(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for t in want:
        assert got[t].shape == want[t].shape and got[t].dtype == want[t].dtype, t
        np.testing.assert_allclose(got[t], want[t], rtol=2e-5 if want[t].dtype == np.float64 else 2e-3, atol=1e-3)


@pytest.mark.parametrize("options", [
    {"server_pooling": False},
    {"server_pooling": True},
    {"server_pooling": False, "cache_bytes": 1 << 20},
    {"server_pooling": True, "cache_bytes": 1 << 20, "cache_policy": "lfu"},
    {"server_pooling": True, "cache_bytes": 1 << 14, "adaptive": True, "pool_slot_size": 4096},  # tiny frames
], ids=["raw", "pooling", "cache", "cache+pooling", "adaptive+small-frames"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pooled_matches_reference(options: dict[str, object], transport: str) -> None:
    async with LocalCluster(SPECS, servers=3, seed=5, in_process=True, transport=transport) as cluster:
        client = await cluster.client(**options)
        model = cluster.model()
        rng = np.random.default_rng(1)
        for it in range(3):
            jb = random_batch(rng, SPECS, cluster.plan)
            for mode in ("sum", "mean", "max"):
                check(await client.lookup_pooled(jb, mode=mode), reference(model, jb, mode, None))
                if mode != "max":
                    w = rng.random(len(jb)) * 2 - 0.5
                    check(await client.lookup_pooled(jb, mode, per_sample_weights=w), reference(model, jb, mode, w))
        m = client.metrics
        if options["server_pooling"]:
            assert m.pooled_subrequests > 0 and m.pool_bytes_received > 0
            for name in cluster.plan.servers:  # answers were pooled into the servers' arenas, then given back
                svc = cluster.server(name).pool_service
                assert svc is not None and svc._arena is not None
                for _ in range(500):  # the last writes' completions may still be on their way
                    if svc._arena.free_bytes() == RESPONSE_ARENA_BYTES:
                        break
                    await asyncio.sleep(0.01)
                assert svc._arena.free_bytes() == RESPONSE_ARENA_BYTES
        else:
            assert m.pooled_subrequests == 0 and m.pool_bytes_sent == 0
        if options.get("adaptive"):  # a 16 KiB budget under ~1000-row batches: shrunk to (almost) nothing
            assert m.cache_resizes > 0 and m.cache_capacity < (1 << 14) // 512
        elif "cache_bytes" in options:
            assert m.cache_hits > 0 and m.cache_inserts > 0


async def test_cost_model_choice_is_used() -> None:
    """Several rows per (server, bag) -> pooling RPCs; one row per (server, bag) -> raw reads."""
    spec = TableSpec("t", 4000, 32, "float32")
    async with LocalCluster([spec], servers=2, seed=2, in_process=True, transport="tcp") as cluster:
        client = await cluster.client()
        client._pooler.cost.first_explore = 8  # every lookup here asks servers to pool (no exploration of raw reads)
        model = cluster.model()
        # one row on each server per bag: raw reads only
        single = JaggedBatch(["t"], np.stack([np.arange(64), np.arange(64) + 2000], axis=1).reshape(-1),
                             lengths=np.full(64, 2))
        got = await client.lookup_pooled(single, "sum")
        check(got, reference(model, single, "sum", None))
        assert client.metrics.pooled_subrequests == 0 and client.metrics.raw_subrequests == 2
        assert client.metrics.rows_read == 128
        # eight rows per server per bag: every (server, bag) pooled, nothing read raw
        client.metrics.reset()
        rng = np.random.default_rng(0)
        multi = np.concatenate([np.concatenate([rng.integers(0, 2000, 8), rng.integers(2000, 4000, 8)])
                                for _ in range(64)])
        many = JaggedBatch(["t"], multi, lengths=np.full(64, 16))
        got = await client.lookup_pooled(many, "mean")
        check(got, reference(model, many, "mean", None))
        m = client.metrics
        assert m.pooled_subrequests == 2 and m.pooled_bags == 128 and m.pooled_rows == multi.size
        assert m.raw_subrequests == 0 and m.rows_read == 0
        # the per-call override forces raw reads
        client.metrics.reset()
        check(await client.lookup_pooled(many, "mean", server_pooling=False), reference(model, many, "mean", None))
        assert client.metrics.pooled_subrequests == 0 and client.metrics.rows_read > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_failed_pooling_requests_fall_back_to_raw_reads(transport: str) -> None:
    """A pooling channel that breaks or answers with an error costs bytes, never the lookup."""
    from flexemr.core.poolwire import encode_error

    spec = TableSpec("t", 4000, 32, "float32")
    async with LocalCluster([spec], servers=2, seed=3, in_process=True, transport=transport) as cluster:
        s0, s1 = (cluster.server(name) for name in cluster.plan.servers)
        assert s0.pool_service is not None and s1.pool_service is not None
        s0.pool_service.handle_many = (  # type: ignore[method-assign]
            lambda requests: [encode_error("injected failure") for _ in requests])

        async def hang_up(ch: object) -> None:          # s1 closes every pooling channel at once
            return None

        s1.pool_service.serve = hang_up  # type: ignore[method-assign]
        client = await cluster.client()
        # the pauses run on a clock of the test's: how long a lookup takes (a pooling channel opened
        # over verbs registers its rings; the emulated VM is slow) cannot end one early
        now = [0.0]
        client._pooler.clock = lambda: now[0]
        client._pooler.cost.first_explore = 8  # every lookup here asks servers to pool (no exploration of raw reads)
        model = cluster.model()
        rng = np.random.default_rng(1)
        multi = np.concatenate([np.concatenate([rng.integers(0, 2000, 8), rng.integers(2000, 4000, 8)])
                                for _ in range(32)])
        many = JaggedBatch(["t"], multi, lengths=np.full(32, 16))
        w = rng.random(multi.size).astype(np.float32)
        check(await client.lookup_pooled(many, "sum", w), reference(model, many, "sum", w))
        m = client.metrics
        assert m.pool_fallbacks == 2 and m.rows_read == np.unique(multi).size
        # both servers are paused (at most 0.5 s at first): raw reads, no new requests to fail
        assert client._pooler.paused() == {"s0", "s1"}
        sent = m.pooled_subrequests
        check(await client.lookup_pooled(many, "max"), reference(model, many, "max", None))
        assert m.pooled_subrequests == sent and m.pool_fallbacks == 2
        # healed servers get pooling requests again once the pause is over
        del s0.pool_service.handle_many, s1.pool_service.serve
        now[0] += 0.6
        assert client._pooler.paused() == set()
        check(await client.lookup_pooled(many, "mean", w), reference(model, many, "mean", w))
        assert m.pooled_subrequests == sent + 2 and m.pool_fallbacks == 2


async def test_apis_and_errors() -> None:
    async with LocalCluster(SPECS[:2], servers=2, seed=4, in_process=True, transport="tcp") as cluster:
        client = await cluster.client()
        model = cluster.model()
        got = await client.lookup_bags("user", [1, 2, 3, 4999], offsets=[0, 3, 3, 4], mode="mean")
        np.testing.assert_allclose(got, pool(model["user"][[1, 2, 3, 4999]], [0, 3, 3, 4], "mean"), rtol=1e-5)
        jb = JaggedBatch.from_lists({"user": [[1, 2], [], [9, 9, 9]], "item": [[5], [6, 7], []]})
        check(await client.lookup_jagged(jb, pooling="max"), reference(model, jb, "max", None))
        w = {"user": np.ones(5), "item": np.full(3, 2.0)}
        got = await client.lookup_pooled(jb, "sum", per_sample_weights=w)
        check(got, reference(model, jb, "sum", np.concatenate([w["user"], w["item"]])))
        with pytest.raises(InputError):
            await client.lookup_pooled(jb, "max", per_sample_weights=np.ones(len(jb)))
        with pytest.raises(InputError):
            await client.lookup_pooled(jb, "sum", per_sample_weights=np.ones(3))
        with pytest.raises(InputError):
            await client.lookup_pooled(jb, "median")  # type: ignore[arg-type]
        empty = JaggedBatch(["user"], np.zeros(0, np.int64), lengths=np.zeros(3, np.int64))
        assert (await client.lookup_pooled(empty))["user"].tolist() == [[0.0] * 16] * 3


async def test_lookup_pooled_validates_before_opening_pool_channels() -> None:
    """Bad ids / unknown tables must raise before any network traffic (no pooling channel opened)."""
    spec = TableSpec("t", 100, 8, "float32")
    async with LocalCluster([spec], servers=2, seed=1, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(server_pooling=True)
        bad_id = JaggedBatch(["t"], np.array([1, 100]), lengths=np.array([2]))
        with pytest.raises(LookupIdError):
            await client.lookup_pooled(bad_id, "sum")
        assert client._pooler.channels == {}
        unknown = JaggedBatch(["nope"], np.array([1]), lengths=np.array([1]))
        with pytest.raises(UnknownTableError):
            await client.lookup_pooled(unknown, "sum")
        assert client._pooler.channels == {}
        assert client.metrics.lookups == 0
        # a valid pooled lookup still opens them and works
        ok = JaggedBatch(["t"], np.array([1, 2, 60, 61]), lengths=np.array([4]))
        got = (await client.lookup_pooled(ok, "sum"))["t"]
        np.testing.assert_allclose(got[0], cluster.model()["t"][[1, 2, 60, 61]].sum(axis=0), rtol=1e-5)
        assert set(client._pooler.channels) == set(cluster.plan.servers)


async def test_aclose_fails_pooled_lookups_with_closed_error_not_cancelled() -> None:
    """aclose() while pooled lookups wait for the pooling channels to open: ClosedError, not CancelledError."""
    spec = TableSpec("t", 10_000, 16, "float32")
    async with LocalCluster([spec], servers=2, seed=1, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(server_pooling=True)
        rng = np.random.default_rng(0)
        jb = JaggedBatch(["t"], rng.integers(0, 10_000, size=400), lengths=np.full(10, 40))
        tasks = [asyncio.ensure_future(client.lookup_pooled(jb, "sum")) for _ in range(3)]
        await asyncio.sleep(0)  # the lookups now wait for the channel-opening task
        await client.aclose()
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending
        for t in tasks:
            assert not t.cancelled()
            assert isinstance(t.exception(), ClosedError)


async def test_column_wise_tables_fall_back_to_raw_reads() -> None:
    async with LocalCluster(SPECS[:1], servers=2, seed=4, plan="column_wise", in_process=True,
                            transport="tcp") as cluster:
        client = await cluster.client()
        jb = random_batch(np.random.default_rng(3), SPECS[:1], cluster.plan)
        check(await client.lookup_pooled(jb, "mean"), reference(cluster.model(), jb, "mean", None))
        assert client.metrics.pooled_subrequests == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_two_processes_remap_cache_pooling(transport: str) -> None:
    """Servers in their own processes store the remapped tables; results equal the logical model."""
    specs = [TableSpec("a", 20_000, 32, "float32"), TableSpec("b", 10_000, 16, "float16")]
    stream = [generate(specs, 128, 12, PROFILE_2022, seed=s) for s in range(6)]
    remap = build_remap(profile_accesses(stream[:3], specs))
    async with LocalCluster(specs, servers=2, seed=9, transport=transport, remap=remap) as cluster:
        model = cluster.model()
        plain = await cluster.client(remap=None)
        phys_a = remap.to_physical("a", [0, 1, 2])
        rows = await plain.lookup("a", phys_a)           # the servers hold the physical layout
        assert np.array_equal(rows, model["a"][[0, 1, 2]])
        client = await cluster.client(cache_bytes=1 << 20)
        rng = np.random.default_rng(0)
        for jb in stream[3:]:
            ids = jb.ids("a")
            assert np.array_equal(await client.lookup("a", ids), model["a"][ids])
            w = rng.random(len(jb))
            check(await client.lookup_pooled(jb, "sum", per_sample_weights=w), reference(model, jb, "sum", w))
            check(await client.lookup_pooled(jb, "max"), reference(model, jb, "max", None))
        m = client.metrics
        assert m.cache_hits > 0 and m.pooled_subrequests > 0 and m.errors == 0


@pytest.mark.parametrize("module", ["flexemr.core.poolwire", "flexemr.server.pooling"])
def test_locality_doctests(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


async def test_a_pooling_channel_closing_under_a_blocked_send_leaves_no_unretrieved_future() -> None:
    """Killing a server during `flexemr rank` printed one 'Future exception was never retrieved'
    block per pending pooling call: the channel closed (failing the call's future) while the call
    still waited for send credits.  The call must raise, and nothing may be left unretrieved."""
    import asyncio
    import gc

    import rdmaio

    from flexemr.client.pooled import PoolChannel
    from flexemr.core.metrics import LocalityMetrics

    class Channel:                                   # a scripted rdmaio channel: no credits, then closed
        max_message = 1 << 16

        def __init__(self) -> None:
            self.closed = asyncio.Event()

        async def send(self, parts: object) -> None:
            await self.closed.wait()
            raise rdmaio.ClosedError("the channel is closed")

        async def send_many(self, messages: object) -> None:
            await self.send(messages)

        def __aiter__(self) -> "Channel":
            return self

        async def __anext__(self) -> bytes:
            await self.closed.wait()
            raise StopAsyncIteration

        async def aclose(self) -> None:
            self.closed.set()

    unretrieved: list[object] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx.get("message")))
    ch = Channel()
    pc = PoolChannel(ch, LocalityMetrics())          # type: ignore[arg-type]
    calls = [asyncio.ensure_future(pc.call([b"x"])) for _ in range(5)]
    await asyncio.sleep(0)
    ch.closed.set()                                  # the server closed its end
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, FlexEMRError) for r in results), results
    await pc.aclose()
    del calls, results
    gc.collect()
    await asyncio.sleep(0)
    assert unretrieved == []


async def test_pooling_runs_off_the_event_loop_and_batches_waiting_requests() -> None:
    """While a server's native pooling call is blocked, its event loop still serves raw reads and control
    traffic (in-process servers share the test's loop: pooling on the loop would hang this test); requests
    that arrive meanwhile go together into the next native call."""
    import threading

    spec = TableSpec("t", 4000, 32, "float32")
    async with LocalCluster([spec], servers=2, seed=2, in_process=True, transport="tcp") as cluster:
        client = await cluster.client()
        model = cluster.model()
        rng = np.random.default_rng(4)
        many = JaggedBatch(["t"], rng.integers(0, 4000, 64 * 16), lengths=np.full(64, 16))
        want = reference(model, many, "sum", None)
        check(await client.lookup_pooled(many, "sum"), want)          # channels open, both ways measured later
        svc = cluster.server(cluster.plan.servers[0]).pool_service
        assert svc is not None
        gate, entered = threading.Event(), threading.Event()
        original = svc.handle_many

        def blocked(requests: object, *rest: object) -> object:
            entered.set()
            assert gate.wait(60)
            return original(requests, *rest)  # type: ignore[arg-type]

        svc.handle_many = blocked  # type: ignore[method-assign]
        client._pooler.cost.choose = lambda: True  # type: ignore[method-assign]  # keep asking servers to pool
        first = asyncio.ensure_future(client.lookup_pooled(many, "sum"))
        assert await asyncio.to_thread(entered.wait, 60)
        second = asyncio.ensure_future(client.lookup_pooled(many, "sum"))
        ids = np.arange(0, 4000, 37)
        rows = await asyncio.wait_for(client.lookup("t", ids), 60)      # served while pooling is blocked
        np.testing.assert_array_equal(rows, model["t"][ids])
        assert not first.done()
        calls = svc.calls
        gate.set()
        check(await first, want)
        check(await second, want)
        assert svc.calls == calls + 2 and svc.requests >= 3            # the second request waited for the first call


async def test_tables_the_cache_leaves_with_one_row_bags_are_not_sent_to_servers() -> None:
    """With a cache serving the hot rows, what is left is mostly one row per bag: read raw, no partition, no
    pooling RPC and no turn of the cost model (PoolingCost) spent on it."""
    spec = TableSpec("t", 4000, 16, "float32")
    async with LocalCluster([spec], servers=2, seed=3, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=1 << 20, server_pooling=True)
        model = cluster.model()
        hot = np.arange(0, 4000, 50)                       # 80 rows spread over both servers
        rng = np.random.default_rng(5)
        for _ in range(3):                                  # bags of hot rows (cached: each occurs 8 times)
            bag = rng.choice(hot, size=(64, 8))
            jb = JaggedBatch(["t"], bag.reshape(-1), lengths=np.full(64, 8))
            check(await client.lookup_pooled(jb, "sum"), reference(model, jb, "sum", None))
        assert client.cache is not None and client.cache.contains("t", hot).all()
        client.metrics.reset()
        choices = client._pooler.cost._lookups
        # hot rows plus one cold row per bag: the rest is a bag of one row everywhere
        cold = rng.choice(np.setdiff1d(np.arange(4000), hot), size=64, replace=False)
        bag = np.concatenate([rng.choice(hot, size=(64, 7)), cold[:, None]], axis=1)
        jb = JaggedBatch(["t"], bag.reshape(-1), lengths=np.full(64, 8))
        check(await client.lookup_pooled(jb, "sum"), reference(model, jb, "sum", None))
        m = client.metrics
        assert m.pool_rpcs == 0 and m.pooled_rows == 0 and m.rows_read == 64
        assert client._pooler.cost._lookups == choices
        # bags of several cold rows still go to the servers when the cost model says so
        many = JaggedBatch(["t"], rng.choice(np.setdiff1d(np.arange(4000), hot), size=64 * 8), lengths=np.full(64, 8))
        for _ in range(6):
            check(await client.lookup_pooled(many, "sum"), reference(model, many, "sum", None))
        assert client.metrics.pooled_rows > 0


@pytest.mark.parametrize("server_pooling", [True, False])
async def test_the_cache_is_bypassed_while_it_was_measured_slower(server_pooling: bool) -> None:
    """Pooled lookups probe the cache or bypass it by measured time (Pooler.cache_cost, a CacheChoice); either
    way the results are the same, and a bypassed lookup neither probes nor fills the cache (also when its
    rows are read raw: without server pooling)."""
    spec = TableSpec("t", 4000, 16, "float32")
    async with LocalCluster([spec], servers=2, seed=4, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=1 << 20, server_pooling=server_pooling)
        model = cluster.model()
        rng = np.random.default_rng(6)
        jb = JaggedBatch(["t"], rng.choice(np.arange(0, 4000, 40), size=64 * 8), lengths=np.full(64, 8))
        cost = client._pooler.cache_cost
        cost._next_trial = 1 << 30                   # no trial during the test
        cost.probe = False                           # the cache was measured slower: bypassed
        assert client.cache is not None
        stats = dict(vars(client.cache.stats))
        check(await client.lookup_pooled(jb, "sum"), reference(model, jb, "sum", None))
        assert dict(vars(client.cache.stats)) == stats and len(client.cache) == 0
        cost.probe = True                            # now the cache is the faster way
        check(await client.lookup_pooled(jb, "sum"), reference(model, jb, "sum", None))
        assert client.cache.stats.misses > stats["misses"] and len(client.cache) > 0


async def test_server_pooling_with_a_cache_is_measured_apart_and_a_trial_does_not_explore_it() -> None:
    """Lookups that probe the cache have servers pool what it left by their own measurements (miss_cost); the
    lookups of a trial that bypasses the cache do not explore server pooling (they measure the cache: raw
    reads unless pooling was measured faster); lookups without the cache explore it as before (cost)."""
    from flexemr.core.cachechoice import CacheChoice

    spec = TableSpec("t", 4000, 16, "float32")
    async with LocalCluster([spec], servers=2, seed=4, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=1 << 20, server_pooling=True)
        model = cluster.model()
        rng = np.random.default_rng(6)
        pooler = client._pooler

        def batch() -> JaggedBatch:  # cold rows in bags of 8: every table poolable
            return JaggedBatch(["t"], rng.choice(4000, size=64 * 8), lengths=np.full(64, 8))

        for _ in range(3):                            # probing: miss_cost takes its turns
            jb = batch()
            check(await client.lookup_pooled(jb, "sum"), reference(model, jb, "sum", None))
        assert pooler.miss_cost._lookups == 3 and pooler.cost._lookups == 0
        assert len(pooler.miss_cost.pooled.values) + len(pooler.miss_cost.raw.values) == 3
        pooler.cache_cost = CacheChoice(warmup=0, run=3, explore_every=1000)   # a trial starts now
        rpcs = client.metrics.pool_rpcs
        for _ in range(3):                            # the trial's bypassing lookups
            jb = batch()
            check(await client.lookup_pooled(jb, "sum"), reference(model, jb, "sum", None))
        assert pooler.cache_cost.exploring and pooler.cache_cost.bypassed == 3
        assert pooler.cost._lookups == 0 and client.metrics.pool_rpcs == rpcs   # no pooling explored
        pooler.cache_cost = CacheChoice(warmup=1 << 30)
        pooler.cache_cost.probe = False               # the cache bypassed for good: pooling explored again
        jb = batch()
        check(await client.lookup_pooled(jb, "sum"), reference(model, jb, "sum", None))
        assert pooler.cost._lookups == 1 and client.metrics.pool_rpcs > rpcs
