"""Cache sizing from the NN's memory, swap-in of hot rows after a grow, predictive prefetch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from flexemr import ConfigError, JaggedBatch, LocalCluster, TableSpec
from flexemr.apps.dlrm import DLRM
from flexemr.core.capacity import ActivationCapacity
from flexemr.core.sketch import FrequencySketch, HotRows

pytestmark = pytest.mark.timeout(60)
ROW = 16 * 4


# ------------------------------------------------------------------ pure parts


def test_sketch_never_underestimates_and_ages() -> None:
    rng = np.random.default_rng(0)
    s = FrequencySketch(width=1 << 10, depth=4)
    keys = rng.integers(0, 5000, 4000)
    s.add(keys)
    uniq, counts = np.unique(keys, return_counts=True)
    assert (s.estimate(uniq) >= counts).all()
    hot = np.full(5000, 7, dtype=np.int64)
    before = int(s.estimate(np.array([7]))[0])
    s.add(hot)                                            # crosses width * 8 additions: every counter halves
    assert s.halvings == 1
    assert int(s.estimate(np.array([7]))[0]) < before + 5000
    with pytest.raises(ConfigError):
        FrequencySketch(width=1000)


def test_hot_rows_rank_by_frequency_and_predict_with_recency() -> None:
    hot = HotRows(limit=8, width=1 << 12)
    for _ in range(10):                                   # 1..3 hot for a long time
        hot.observe("t", np.array([1, 2, 3]))
        hot.advance()
    for _ in range(3):                                    # 50, 51 are what the last batches used
        hot.observe("t", np.array([50, 51]))
        hot.advance()
    assert hot.hottest("t", 3).tolist() == [1, 2, 3]
    assert hot.predict("t", 2, half_life=1.0).tolist() == [50, 51]
    cached = np.isin(hot.candidates("t"), [1])
    assert hot.hottest("t", 2, exclude=cached).tolist() == [2, 3]
    for i in range(20):                                   # the candidate set stays bounded
        hot.observe("t", np.arange(100 + 10 * i, 110 + 10 * i))
    assert hot.candidates("t").size == 8 and hot.hottest("u", 3).size == 0


def test_activation_capacity_follows_the_window_of_batch_sizes() -> None:
    ac = ActivationCapacity(memory_budget_bytes=1 << 20, row_bytes=64, sample_bytes=1024, window=2)
    assert ac.capacity == (1 << 20) // 64
    assert ac.observe(512) == ((1 << 20) - 512 * 1024) // 64
    assert ac.observe(1024) == 0                          # the NN takes the whole budget
    assert ac.observe(8) == 0                             # still in the window
    assert ac.observe(8) == ((1 << 20) - 8 * 1024) // 64
    ac.reset()
    assert ac.capacity == (1 << 20) // 64 and ac.nn_bytes == 0
    with pytest.raises(ConfigError):
        ActivationCapacity(1 << 20, 64, 0)


def test_dlrm_declares_its_activation_bytes() -> None:
    small = DLRM([TableSpec("a", 10, 16)], bottom=(32,), top=(32,))
    big = DLRM([TableSpec(f"t{i}", 10, 16) for i in range(8)], bottom=(512, 256), top=(512, 256))
    assert 0 < small.activation_bytes_per_sample < big.activation_bytes_per_sample
    assert big.activation_bytes_per_sample % 4 == 0


# ------------------------------------------------------------------ clients


def _batch(ids: np.ndarray, samples: int) -> JaggedBatch:
    per = ids.size // samples
    return JaggedBatch(["user"], ids[: per * samples], lengths=np.full(samples, per))


async def test_capacity_is_the_budget_minus_the_nn_need() -> None:
    specs = [TableSpec("user", 4000, 16)]
    async with LocalCluster(specs, servers=1, seed=1, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=1000 * ROW, adaptive=True, nn_sample_bytes=ROW * 4,
                                      cache_window=2, swapin=False)
        cache = client.cache
        assert cache is not None and cache.capacity == 1000
        await client.lookup_jagged(_batch(np.arange(200), 200))          # NN: 200 samples x 4 rows' worth
        assert cache.capacity == 200
        await client.lookup_jagged(_batch(np.arange(10), 10))            # the big batch is still in the window
        assert cache.capacity == 200
        await client.lookup_jagged(_batch(np.arange(10), 10))
        assert cache.capacity == 960 and client.metrics.swapin_rows == 0


class Gate:
    """Holds every read of a lane until opened."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0

    def wrap(self, issue: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def gated(*args: object) -> None:
            self.waiting += 1
            await self.open.wait()
            await issue(*args)
        return gated


async def test_swap_in_reads_the_hottest_rows_and_never_blocks_a_lookup() -> None:
    specs = [TableSpec("user", 4000, 16)]
    async with LocalCluster(specs, servers=2, seed=1, in_process=True, transport="tcp") as cluster:
        model = cluster.model()["user"]
        client = await cluster.client(cache_bytes=1000 * ROW, adaptive=True, nn_sample_bytes=ROW * 4,
                                      cache_window=1, swapin_chunk_rows=128)
        cache, swap = client.cache, client._swap
        assert cache is not None and swap is not None
        hot = np.arange(0, 3000, 5)                                      # 600 hot rows, seen in every batch
        rng = np.random.default_rng(3)
        for _ in range(6):                                               # big batches: the cache stays small
            ids = np.concatenate([hot, rng.integers(0, 4000, 200)])
            await client.lookup_jagged(_batch(ids, 200))
        assert cache.capacity == 200
        gate = Gate()
        lane = swap.batcher.lane
        lane.issue = gate.wrap(lane.issue)                               # type: ignore[method-assign,assignment]
        await client.lookup_jagged(_batch(np.array([1, 2, 3, 4]), 4))    # small batch: the cache grows ...
        assert cache.capacity == 984
        await asyncio.sleep(0.05)
        assert gate.waiting >= 1 and swap.task is not None and not swap.task.done()   # ... swap-in is held
        ids = np.array([4001 % 4000, 7, 3999, 12])
        got = await asyncio.wait_for(client.lookup("user", ids), 10)     # a lookup does not wait for it
        assert (got == model[ids]).all()
        gate.open.set()
        await asyncio.wait_for(swap.task, 10)
        assert client.metrics.swapin_rows >= 500
        assert cache.contains("user", hot).mean() > 0.95                 # the hot rows are in
        hit_before = client.metrics.cache_hits
        await client.lookup("user", hot)
        assert client.metrics.cache_hits - hit_before >= 0.95 * hot.size


async def test_swap_in_stops_when_the_cache_shrinks() -> None:
    specs = [TableSpec("user", 4000, 16)]
    async with LocalCluster(specs, servers=1, seed=1, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=1000 * ROW, adaptive=True, nn_sample_bytes=ROW * 4,
                                      cache_window=1, swapin_chunk_rows=64)
        swap = client._swap
        assert swap is not None
        for _ in range(3):
            await client.lookup_jagged(_batch(np.arange(0, 4000, 4), 200))
        gate = Gate()
        swap.batcher.lane.issue = gate.wrap(swap.batcher.lane.issue)     # type: ignore[method-assign,assignment]
        await client.lookup_jagged(_batch(np.arange(4), 4))              # grow: swap-in starts, held
        await asyncio.sleep(0.02)
        await client.lookup_jagged(_batch(np.arange(0, 4000, 4), 200))   # shrink while it is held
        gate.open.set()
        assert swap.task is not None
        await asyncio.wait_for(swap.task, 10)
        assert client.metrics.swapin_rounds == 1                         # the chunk in flight, no more


async def test_predictive_prefetch_reads_what_the_next_batches_need() -> None:
    """Hot rows recur, cold rows flush them out of a small LRU cache: the predictor reads them back in
    after each lookup, so the next batches hit where lookahead alone misses."""
    specs = [TableSpec("user", 20_000, 16)]
    async with LocalCluster(specs, servers=1, seed=1, in_process=True, transport="tcp") as cluster:
        model = cluster.model()["user"]
        plain = await cluster.client(cache_bytes=300 * ROW)
        predicting = await cluster.client(cache_bytes=300 * ROW, predict_rows=100)
        rng = np.random.default_rng(5)
        hot = rng.choice(20_000, 100, replace=False)
        batches = [np.concatenate([rng.choice(hot, 50, replace=False), rng.choice(20_000, 300, replace=False)])
                   for _ in range(12)]
        hot_hits = {}
        for name, client in (("plain", plain), ("predicting", predicting)):
            cache = client.cache
            assert cache is not None
            hits = 0
            for ids in batches:
                hits += int(cache.contains("user", np.intersect1d(ids, hot)).sum())
                assert (await client.lookup("user", ids) == model[ids]).all()
                swap = client._swap
                if swap is not None and swap.predicting is not None:
                    await asyncio.wait_for(swap.predicting, 10)
            hot_hits[name] = hits
        assert predicting.metrics.predicted_rows > 0 and plain.metrics.predicted_rows == 0
        assert hot_hits["predicting"] > 1.5 * hot_hits["plain"]
    with pytest.raises(ConfigError, match="predict_rows"):
        from flexemr import ClientOptions
        ClientOptions(predict_rows=10)


async def test_predictions_never_push_out_rows_seen_more_often() -> None:
    """Admission of predicted rows: all of them while the cache has free slots; once it is full, only
    rows the sketch saw more often than the cached rows they would evict."""
    specs = [TableSpec("user", 4000, 16)]
    async with LocalCluster(specs, servers=1, seed=1, in_process=True, transport="tcp") as cluster:
        client = await cluster.client(cache_bytes=100 * ROW, predict_rows=50)
        swap, cache = client._swap, client.cache
        assert swap is not None and cache is not None
        cold, warm = np.arange(1000, 1050), np.arange(2000, 2050)
        assert swap._admit({"user": cold})["user"].tolist() == cold.tolist()     # empty cache: free slots
        for _ in range(4):                                                        # 100 rows seen 4 times
            await client.lookup("user", np.arange(100))
        if swap.predicting is not None:
            await asyncio.wait_for(swap.predicting, 10)
        assert len(cache) == 100 and cache.contains("user", np.arange(100)).all()
        swap.hot.observe("user", cold)                                            # cold rows: seen once
        for _ in range(6):                                                        # warm rows: seen 6 times
            swap.hot.observe("user", warm)
        assert swap._admit({"user": cold}) == {}
        assert swap._admit({"user": warm})["user"].tolist() == warm.tolist()
        got = swap._admit({"user": np.concatenate([cold[:10], warm[:10]])})
        assert got["user"].tolist() == warm[:10].tolist()
        coldest = cache.coldest(10)
        assert set(coldest) == {"user"} and coldest["user"].size == 10
