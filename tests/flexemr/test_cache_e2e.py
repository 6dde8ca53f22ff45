"""Ranker cache end to end: coherence under concurrent lookups, invalidate, adaptive capacity, prefetch."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from flexemr import JaggedBatch, LocalCluster, TableSpec
from flexemr.core.pooling import pool
from tests.flexemr.transports import TRANSPORTS

SPECS = [TableSpec("user", 4000, 16, "float32"), TableSpec("item", 2500, 8, "float16")]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_concurrent_lookups_share_cache_coalescing_and_dedup(transport: str) -> None:
    async with LocalCluster(SPECS, servers=2, seed=3, in_process=True, transport=transport) as cluster:
        client = await cluster.client(cache_bytes=1 << 20, coalesce_window_us=200)
        model = cluster.model()
        rng = np.random.default_rng(0)
        hot = rng.integers(0, 4000, 300)

        async def one(i: int) -> None:
            ids = np.concatenate([rng.choice(hot, 40), rng.integers(0, 4000, 10)])
            if i % 2:
                assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
            else:
                jb = JaggedBatch(["user"], ids, lengths=[20, 0, 30])
                got = (await client.lookup_pooled(jb, "sum"))["user"]
                np.testing.assert_allclose(got, pool(model["user"][ids], [0, 20, 20, 50], "sum"), rtol=1e-4,
                                           atol=1e-5)

        for _ in range(4):
            await asyncio.gather(*(one(i) for i in range(16)))
        m = client.metrics
        assert m.cache_hits > 0 and m.rows_shared > 0 and m.batches < 4 * 16
        # every unique id of a raw lookup is read, shared with a concurrent caller, or a cache hit
        assert m.unique_ids == m.rows_read + m.rows_shared + m.cache_hits
        assert m.errors == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_invalidate_keeps_the_cache_coherent(transport: str) -> None:
    async with LocalCluster(SPECS, servers=2, seed=3, in_process=True, transport=transport) as cluster:
        client = await cluster.client(cache_bytes=1 << 20)
        model = cluster.model()
        ids = np.array([5, 6, 3000, 5])
        assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        assert client.cache is not None and client.cache.contains("user", [5, 6, 3000]).all()
        # the servers' rows change behind the cache's back
        s0 = cluster.plan.shards["user"][0]
        arr = cluster.server(s0.server).shard_array(s0.region_name)
        arr[5] = -1.0
        stale = await client.lookup("user", [5])
        assert np.array_equal(stale[0], model["user"][5])            # served from the cache
        assert client.invalidate("user", [5, 7]) == 1
        assert (await client.lookup("user", [5]) == -1.0).all()      # re-read after invalidate
        jb = JaggedBatch(["user"], np.array([5, 5, 6]), lengths=[3])
        got = (await client.lookup_pooled(jb, "sum"))["user"][0]
        np.testing.assert_allclose(got, -2.0 + model["user"][6], rtol=1e-5)
        assert client.metrics.cache_invalidations == 1

        # an invalidate while a read is in flight: later lookups neither borrow it nor see it cached
        fresh = np.arange(100, 160)
        t1 = asyncio.ensure_future(client.lookup("user", fresh))
        await asyncio.sleep(0)
        await asyncio.sleep(0)     # t1's batch is launched (reads in flight)
        assert not t1.done()
        arr[100:160] = 7.0
        client.invalidate("user", fresh)
        borrowed = client.metrics.inflight_hits
        t2 = await client.lookup("user", fresh)
        assert (t2 == 7.0).all() and client.metrics.inflight_hits == borrowed
        await t1                    # may be old or new: it raced the update
        assert (await client.lookup("user", fresh) == 7.0).all()


async def test_adaptive_capacity_shrinks_under_load_and_grows_when_idle() -> None:
    async with LocalCluster(SPECS[:1], servers=2, seed=3, in_process=True, transport="tcp") as cluster:
        budget = 64 * 1024                                          # 1024 rows of 64 B
        client = await cluster.client(cache_bytes=budget, adaptive=True, cache_window=4, cache_idle_s=0.05)
        assert client.cache is not None and client.cache.capacity == 1024
        await client.lookup("user", np.arange(0, 400))             # load: 2 x 400 rows reserved
        assert client.cache.capacity == 1024 - 800
        assert client.metrics.cache_resizes == 1
        await asyncio.sleep(0.1)                                    # idle: the window is forgotten
        await client.lookup("user", np.arange(1000, 1010))
        assert client.cache.capacity >= 1024 - 2 * 10 - 1024 // 16
        assert client.metrics.cache_capacity == client.cache.capacity


async def test_small_cache_evicts() -> None:
    async with LocalCluster(SPECS[:1], servers=1, seed=3, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=64 * 50, cache_policy="lfu")
        model = cluster.model()
        for start in range(0, 400, 40):
            ids = np.arange(start, start + 40)
            assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
        assert client.metrics.cache_evictions > 0 and len(client.cache or []) <= 50


@pytest.mark.parametrize("pooled", [None, "mean"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_prefetch_order_and_equality(pooled: str | None, transport: str) -> None:
    async with LocalCluster(SPECS, servers=2, seed=8, in_process=True, transport=transport) as cluster:
        client = await cluster.client(cache_bytes=1 << 20)
        model = cluster.model()
        rng = np.random.default_rng(4)
        batches = [JaggedBatch.from_lists({t.name: [list(rng.integers(0, t.num_rows, rng.integers(0, 6)))
                                                    for _ in range(8)] for t in SPECS}) for _ in range(6)]
        seen = []
        async with client.prefetch(batches, depth=2, pooled=pooled) as stream:  # type: ignore[arg-type]
            async for jb, out in stream:
                seen.append(jb)
                for t in jb.keys:
                    ids = jb.ids(t)
                    if pooled is None:
                        assert np.array_equal(out[t], model[t][ids])
                    else:
                        np.testing.assert_allclose(out[t], pool(model[t][ids], jb.bag_offsets(t), "mean"),
                                                   rtol=2e-3, atol=1e-3)
                await asyncio.sleep(0.001)     # the model's work: the next lookups run meanwhile
            assert stream.stats.max_in_flight >= 2
        assert seen == batches
        assert client.metrics.prefetched_batches == 6 and client.metrics.cache_inserts > 0
