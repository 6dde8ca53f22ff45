"""RowCache against a dict model (hypothesis state machine) and AdaptiveCapacity."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flexemr.core.cache import AdaptiveCapacity, RowCache
from flexemr.core.errors import ConfigError, InputError

TABLES = ("a", "b")
DIM = 2
ids_st = st.lists(st.integers(0, 11), min_size=0, max_size=10)


class _Model:
    """Reference semantics, one id at a time (see flexemr.core.cache's module docstring)."""

    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity = capacity
        self.policy = policy
        self.entries: dict[tuple[str, int], list[Any]] = {}  # key -> [row, last_use, freq]
        self.clock = 0
        self.counters = dict(hits=0, misses=0, inserts=0, evictions=0, invalidations=0, updates=0)

    def _victims(self, k: int, protect: set[tuple[str, int]]) -> list[tuple[str, int]]:
        cands = [key for key in self.entries if key not in protect]
        if self.policy == "lru":
            cands.sort(key=lambda key: self.entries[key][1])
        else:
            cands.sort(key=lambda key: (self.entries[key][2], self.entries[key][1]))
        return cands[:k]

    def lookup(self, table: str, ids: list[int]) -> tuple[list[bool], list[Any]]:
        mask, rows = [], []
        for i in ids:
            key = (table, i)
            e = self.entries.get(key)
            if e is None:
                mask.append(False)
                self.counters["misses"] += 1
            else:
                mask.append(True)
                rows.append(e[0])
                e[1] = self.clock
                e[2] += 1
                self.counters["hits"] += 1
            self.clock += 1
        return mask, rows

    def insert(self, table: str, ids: list[int], rows: np.ndarray) -> None:
        last: dict[int, int] = {}
        occ: dict[int, int] = {}
        for pos, i in enumerate(ids):
            last[i] = pos
            occ[i] = occ.get(i, 0) + 1
        ticks = [self.clock + p for p in range(len(ids))]
        self.clock += len(ids)
        if self.capacity == 0 or not ids:
            return
        distinct = sorted(last, key=lambda i: last[i])
        window = set(distinct[max(0, len(distinct) - self.capacity) :])
        protect = set()
        new = []
        for i in distinct:
            key = (table, i)
            e = self.entries.get(key)
            if e is not None:
                e[0], e[1], e[2] = rows[last[i]].copy(), ticks[last[i]], e[2] + occ[i]
                if i in window:
                    protect.add(key)
            elif i in window:
                new.append(i)
        need = len(new) - (self.capacity - len(self.entries))
        if need > 0:
            for key in self._victims(need, protect):
                del self.entries[key]
                self.counters["evictions"] += 1
        for i in new:
            self.entries[(table, i)] = [rows[last[i]].copy(), ticks[last[i]], occ[i]]
            self.counters["inserts"] += 1

    def update(self, table: str, ids: list[int], rows: np.ndarray) -> int:
        done = set()
        for pos, i in enumerate(ids):
            e = self.entries.get((table, i))
            if e is not None:
                e[0] = rows[pos].copy()
                done.add(i)
        self.counters["updates"] += len(done)
        return len(done)

    def invalidate(self, table: str, ids: list[int]) -> int:
        n = 0
        for i in set(ids):
            if self.entries.pop((table, i), None) is not None:
                n += 1
        self.counters["invalidations"] += n
        return n

    def resize(self, capacity: int) -> None:
        need = len(self.entries) - capacity
        if need > 0:
            for key in self._victims(need, set()):
                del self.entries[key]
                self.counters["evictions"] += 1
        self.capacity = capacity


class CacheMachine(RuleBasedStateMachine):
    @initialize(capacity=st.integers(0, 6), policy=st.sampled_from(["lru", "lfu"]))
    def setup(self, capacity: int, policy: str) -> None:
        self.cache = RowCache(capacity, policy=policy)  # type: ignore[arg-type]
        self.model = _Model(capacity, policy)
        self.version = 0

    def _rows(self, n: int) -> np.ndarray:
        # every written row is unique, so a stale row would be detected
        self.version += 1
        return (np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) + 1000.0 * self.version)

    @rule(table=st.sampled_from(TABLES), ids=ids_st)
    def lookup(self, table: str, ids: list[int]) -> None:
        hit, rows = self.cache.lookup(table, np.array(ids, dtype=np.int64))
        mhit, mrows = self.model.lookup(table, ids)
        assert hit.tolist() == mhit
        if mrows:
            np.testing.assert_array_equal(rows, np.stack(mrows))
        else:
            assert rows.shape[0] == 0

    @rule(table=st.sampled_from(TABLES), ids=ids_st)
    def insert(self, table: str, ids: list[int]) -> None:
        rows = self._rows(len(ids))
        self.cache.insert(table, np.array(ids, dtype=np.int64), rows)
        self.model.insert(table, ids, rows)

    @rule(table=st.sampled_from(TABLES), ids=ids_st)
    def update(self, table: str, ids: list[int]) -> None:
        rows = self._rows(len(ids))
        assert self.cache.update(table, np.array(ids, dtype=np.int64), rows) == self.model.update(table, ids, rows)

    @rule(table=st.sampled_from(TABLES), ids=ids_st)
    def invalidate(self, table: str, ids: list[int]) -> None:
        assert self.cache.invalidate(table, np.array(ids, dtype=np.int64)) == self.model.invalidate(table, ids)

    @rule(capacity=st.integers(0, 8))
    def resize(self, capacity: int) -> None:
        self.cache.resize(capacity)
        self.model.resize(capacity)

    @precondition(lambda self: len(self.model.entries) > 0)
    @rule()
    def clear_is_not_counted(self) -> None:
        before = dict(vars(self.cache.stats))
        self.cache.clear()
        self.model.entries.clear()
        assert dict(vars(self.cache.stats)) == before

    @invariant()
    def capacity_respected(self) -> None:
        assert len(self.cache) <= self.cache.capacity == self.model.capacity
        assert len(self.cache) == len(self.model.entries)

    @invariant()
    def same_entries_and_metadata(self) -> None:
        for t in TABLES:
            ids, last_use, freq = self.cache.entries(t)
            expect = sorted((i, e[1], e[2]) for (tt, i), e in self.model.entries.items() if tt == t)
            assert list(zip(ids.tolist(), last_use.tolist(), freq.tolist())) == expect

    @invariant()
    def never_stale(self) -> None:
        for t in TABLES:
            keys = sorted(i for (tt, i) in self.model.entries if tt == t)
            hit, rows = self.cache.peek(t, np.array(keys, dtype=np.int64))
            assert hit.all()
            for i, row in zip(keys, rows):
                np.testing.assert_array_equal(row, self.model.entries[(t, i)][0])

    @invariant()
    def counters_match(self) -> None:
        s = self.cache.stats
        assert dict(vars(s)) == self.model.counters
        total = s.hits + s.misses
        assert s.hit_rate == (s.hits / total if total else 0.0)


CacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCacheMachine = CacheMachine.TestCase


# ------------------------------------------------------------------ unit tests


def test_large_batches_stay_consistent() -> None:
    """Many rehashes/tombstones: contents always equal the last written rows."""
    rng = np.random.default_rng(1)
    for policy in ("lru", "lfu"):
        cache = RowCache(500, policy=policy)  # type: ignore[arg-type]
        cache.register("t", 4, np.float32)
        truth = rng.standard_normal((5000, 4)).astype(np.float32)
        for _ in range(40):
            ids = rng.integers(0, 5000, 2000)
            hit, rows = cache.lookup("t", ids)
            np.testing.assert_array_equal(rows, truth[ids[hit]])
            miss = ids[~hit]
            cache.insert("t", miss, truth[miss])
            upd = rng.integers(0, 5000, 300)
            truth[upd] += 1.0
            cache.update("t", upd, truth[upd])
            cache.invalidate("t", rng.integers(0, 5000, 100))
            assert len(cache) <= 500
        s = cache.stats
        assert s.hits + s.misses == 40 * 2000
        assert s.inserts - s.evictions - s.invalidations == len(cache)


def test_lfu_keeps_frequent_rows_under_scan() -> None:
    hot = np.arange(10)
    row = np.zeros((10, 1), np.float32)
    results = {}
    for policy in ("lru", "lfu"):
        cache = RowCache(10, policy=policy)  # type: ignore[arg-type]
        cache.insert("t", hot, row)
        for _ in range(3):
            cache.lookup("t", hot)
        scan = np.arange(100, 110)
        cache.insert("t", scan[:5], row[:5])
        cache.insert("t", scan[5:], row[5:])
        results[policy] = int(cache.contains("t", hot).sum())
    assert results == {"lru": 0, "lfu": 5}


def test_memory_budget_and_row_width() -> None:
    cache = RowCache(memory_budget_bytes=1000, row_bytes=16)
    assert cache.capacity == 62 and cache.slot_bytes == 16
    cache.insert("f16", [1], np.ones((1, 8), np.float16))  # 16 bytes
    with pytest.raises(InputError):
        cache.insert("big", [1], np.ones((1, 8), np.float32))  # 32 bytes > 16
    with pytest.raises(InputError):
        cache.insert("f16", [2], np.ones((1, 8), np.float32))  # dtype differs from first insert
    widening = RowCache(4)
    widening.insert("small", [1], np.full((1, 2), 7, np.int8))
    widening.insert("wide", [1], np.full((1, 3), 2.5, np.float64))
    assert widening.peek("small", [1])[1].tolist() == [[7, 7]]
    assert widening.peek("wide", [1])[1].tolist() == [[2.5, 2.5, 2.5]]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        RowCache()
    with pytest.raises(ConfigError):
        RowCache(4, policy="fifo")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RowCache(memory_budget_bytes=100)
    cache = RowCache(4)
    with pytest.raises(InputError):
        cache.lookup("t", [-1])
    with pytest.raises(InputError):
        cache.lookup("t", [[1]])
    with pytest.raises(InputError):
        cache.insert("t", [1, 2], np.zeros((1, 2), np.float32))
    hit, rows = cache.lookup("unknown", [1, 2])
    assert hit.tolist() == [False, False] and rows.shape[0] == 0
    assert cache.update("unknown", [1], np.zeros((1, 2))) == 0
    assert cache.invalidate("unknown", [1]) == 0


def test_adaptive_capacity_formula() -> None:
    ac = AdaptiveCapacity(memory_budget_bytes=10_000, row_bytes=100, window=3, inflight=2, min_capacity=5)
    assert ac.capacity == ac.max_capacity == 100
    assert ac.observe(10) == (10_000 - 2 * 10 * 100) // 100 == 80
    assert ac.observe(40) == 20          # shrink under load
    assert ac.observe(80) == 5           # clamped at min_capacity
    assert ac.observe(1) == 5            # the burst is still in the window
    assert ac.observe(1) == 5
    assert ac.observe(1) == 98           # burst left the window: grow back
    ac.reset()
    assert ac.capacity == 100
    cache = RowCache(100, policy="lru")
    cache.insert("t", np.arange(100), np.zeros((100, 1), np.float32))
    ac.observe(30)
    assert ac.apply(cache) == 40 == cache.capacity == len(cache)
    assert cache.contains("t", np.arange(60, 100)).all()  # LRU kept the most recent
    assert cache.stats.evictions == 60
    with pytest.raises(ConfigError):
        AdaptiveCapacity(100, 10, min_capacity=11)
    with pytest.raises(InputError):
        ac.observe(-1)
