"""The native parts of RowCache (flexemr/_native/cache.c) against Python/numpy models.

* the hash index against a dict (random keys, inserts, deletes, rehashes);
* ``probe_split`` (dedup + probe + split of a pooled lookup's occurrences) against a numpy model;
* the incremental LRU log: the dict-model state machine of test_cache.py run with a log that has
  no slack, so compaction and growth happen every few operations, and a long random run against
  the model with evictions, invalidations and resizes;
* the native insert of sorted unique ids (``fxc_insert``, the client's fills): the state machine with
  such inserts, and its fallback when the LRU log has lost slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

import flexemr.core.cacheindex as cache_mod
from flexemr.core.cache import RowCache
from flexemr.core.cacheindex import _HashIndex
from flexemr.core.errors import InputError

from .test_cache import DIM, TABLES, CacheMachine, _Model


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "del"]),
                              st.lists(st.integers(0, (1 << 46) - 1) | st.integers(0, 40), max_size=30)),
                    max_size=30))
def test_hash_index_matches_a_dict(ops: list[tuple[str, list[int]]]) -> None:
    idx = _HashIndex(4)
    model: dict[int, int] = {}
    val = 0
    for op, keys in ops:
        ks = np.array(sorted(set(keys)), dtype=np.int64)
        if op == "put":
            new = ks[[k not in model for k in ks.tolist()]]
            vals = np.arange(val, val + new.size, dtype=np.int64)
            val += new.size
            idx.put_absent(new, vals)
            model.update(zip(new.tolist(), vals.tolist()))
        else:
            idx.delete(ks)
            for k in ks.tolist():
                model.pop(k, None)
        assert idx.live == len(model)
        assert idx.used <= idx.size // 2
        probe = np.array(keys + list(model), dtype=np.int64)
        assert idx.get(probe).tolist() == [model.get(k, -1) for k in probe.tolist()]


def _split_model(ids: list[int], offsets: list[int], cached: dict[int, int], admit: int) -> tuple[list[Any], ...]:
    counts: dict[int, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    hit_slots, hit_off, adm, adm_off, served = [], [0], [], [0], []
    for b in range(len(offsets) - 1):
        for k in range(offsets[b], offsets[b + 1]):
            i = ids[k]
            if i in cached:
                hit_slots.append(cached[i])
                served.append(True)
            elif counts[i] >= admit:
                adm.append(k)
                served.append(True)
            else:
                served.append(False)
        hit_off.append(len(hit_slots))
        adm_off.append(len(adm))
    return hit_slots, hit_off, adm, adm_off, served


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cached=st.lists(st.integers(0, 50), max_size=20, unique=True), bags=st.lists(
    st.lists(st.integers(0, 60), max_size=6), max_size=8), admit=st.integers(1, 3),
    capacity=st.integers(0, 25), weighted=st.booleans(), unknown=st.booleans())
def test_probe_split_matches_a_model(cached: list[int], bags: list[list[int]], admit: int, capacity: int,
                                     weighted: bool, unknown: bool) -> None:
    c = RowCache(capacity)
    c.register("t", 2)
    if cached:
        c.insert("t", np.array(cached), np.zeros((len(cached), 2), np.float32))
    present, _, _ = c.entries("t")
    ids = [i for b in bags for i in b]
    offsets = np.cumsum([0] + [len(b) for b in bags])
    w = np.arange(len(ids), dtype=np.float32) if weighted else None
    before = {i: int(s) for i, s in zip(present.tolist(), c.probe("t", present)[1].tolist())} if present.size else {}
    # probe above was a use of every cached id: take the state after it
    clock, lu_before = c._clock, c._last_use.copy()
    table = "unknown" if unknown else "t"
    r = c.probe_split(table, np.array(ids, dtype=np.int64), offsets, w, admit)
    want = _split_model(ids, offsets.tolist(), {} if unknown else before, admit)
    assert r.hit_slots.tolist() == want[0] and r.hit_offsets.tolist() == want[1]
    assert r.admitted.tolist() == want[2] and r.admitted_offsets.tolist() == want[3]
    assert r.served.tolist() == want[4]
    rest = [k for k, served in enumerate(want[4]) if not served]
    assert r.rest == len(rest)
    # every miss (admitted or the rest) by bag: one raw read per table
    miss = sorted(want[2] + rest)
    assert r.miss_positions is not None and r.miss_offsets is not None
    assert r.miss_positions.tolist() == miss
    assert r.miss_offsets.tolist() == [sum(1 for k in miss if k < e) for e in offsets.tolist()]
    assert r.distinct == len(set(ids))
    hits_distinct = [] if unknown else [i for i in dict.fromkeys(ids) if i in before]
    assert r.distinct_hits == len(hits_distinct)
    if w is not None:
        assert r.hit_weights is not None
        assert r.hit_weights.tolist() == [float(k) for k in range(len(ids)) if not unknown and ids[k] in before]
    # uses: each distinct hit once, ticks in order of first occurrence
    first = list(dict.fromkeys(ids))
    for i in hits_distinct:
        assert c._last_use[before[i]] == clock + first.index(i)
    untouched = [s for i, s in before.items() if i not in hits_distinct]
    assert (c._last_use[untouched] == lu_before[untouched]).all()
    assert c._clock == clock + len(first)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lookups=st.lists(st.lists(st.integers(0, 300), max_size=200), min_size=1, max_size=6),
       admit=st.integers(1, 3))
def test_probe_split_scratch_reused_across_lookups_of_any_size(lookups: list[list[int]], admit: int) -> None:
    """The probe's working arrays are kept between calls (grown, reused smaller): a cache that reuses them
    splits every lookup as a twin cache that allocates fresh ones each time."""
    reused, fresh = RowCache(64), RowCache(64)
    for c in (reused, fresh):
        c.insert("t", np.arange(0, 300, 5), np.zeros((60, 2), np.float32))
    for ids in lookups:
        fresh._index._scratch = ()
        a64 = np.array(ids, dtype=np.int64)
        offs = np.array([0, len(ids) // 2, len(ids)])
        r, f = (c.probe_split("t", a64, offs, None, admit) for c in (reused, fresh))
        assert r.hit_slots.tolist() == f.hit_slots.tolist() and r.served.tolist() == f.served.tolist()
        assert r.admitted.tolist() == f.admitted.tolist() and (r.distinct, r.distinct_hits) == (f.distinct,
                                                                                                f.distinct_hits)
        assert r.distinct == len(set(ids))
        for c in (reused, fresh):  # and the reads fill both alike
            c.insert("t", np.unique(a64), np.ones((np.unique(a64).size, 2), np.float32))
        assert (reused._slot_key == fresh._slot_key).all() and (reused._last_use == fresh._last_use).all()


def test_probe_split_rejects_bad_offsets() -> None:
    c = RowCache(4)
    with pytest.raises(InputError):
        c.probe_split("t", np.array([1, 2, 3]), np.array([0, 2, 1, 3]), None, 2)
    with pytest.raises(InputError):
        c.probe_split("t", np.array([1, 2, 3]), np.array([0, 2]), None, 2)
    with pytest.raises(InputError):
        c.probe_split("t", np.array([-1]), np.array([0, 1]), None, 2)


class TightLogMachine(CacheMachine):
    """test_cache.py's model-checked state machine with an LRU log that has no slack."""

    def __init__(self) -> None:
        self._slack = cache_mod._LOG_SLACK
        cache_mod._LOG_SLACK = 0
        super().__init__()

    def teardown(self) -> None:
        cache_mod._LOG_SLACK = self._slack
        super().teardown()


TightLogMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestTightLogMachine = TightLogMachine.TestCase


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_long_random_run_matches_the_model(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "_LOG_SLACK", 0)
    rng = np.random.default_rng(7)
    cap = 40
    cache, model = RowCache(cap, policy=policy), _Model(cap, policy)  # type: ignore[arg-type]
    for step in range(600):
        op = rng.integers(0, 10)
        ids = rng.zipf(1.3, size=int(rng.integers(0, 30))) % 120
        if op < 4:
            hit, _ = cache.lookup("t", ids)
            mhit, _ = model.lookup("t", ids.tolist())
            assert hit.tolist() == mhit
        elif op < 8:
            rows = np.full((ids.size, 2), step, np.float32)
            cache.insert("t", ids, rows)
            model.insert("t", ids.tolist(), rows)
        elif op == 8:
            assert cache.invalidate("t", ids) == model.invalidate("t", ids.tolist())
        else:
            cap = int(rng.integers(0, 60))
            cache.resize(cap)
            model.resize(cap)
        got = cache.entries("t")
        want = sorted((i, e[1], e[2]) for (_, i), e in model.entries.items())
        assert list(zip(*(a.tolist() for a in got))) == want


class SortedInsertMachine(TightLogMachine):
    """The state machine with inserts of sorted unique ids too (what the client fills the cache with): an
    LRU cache takes them in one native pass (``fxc_insert``), which must match the model exactly (slots
    used and evicted, last use, frequency, counters, rows)."""

    @rule(table=st.sampled_from(TABLES), ids=st.lists(st.integers(0, 11), max_size=10, unique=True).map(sorted))
    def insert_sorted(self, table: str, ids: list[int]) -> None:
        rows = self._rows(len(ids))
        self.cache.insert(table, np.array(ids, dtype=np.int64), rows)
        self.model.insert(table, ids, rows)


SortedInsertMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSortedInsertMachine = SortedInsertMachine.TestCase


def test_native_insert_falls_back_when_the_log_lost_slots() -> None:
    """An LRU log that lost its entries (not expected) makes the native insert give up before changing
    anything; the insert is then made by selection, as the model does."""
    cache, model = RowCache(4, policy="lru"), _Model(4, "lru")
    first = np.arange(4 * DIM, dtype=np.float32).reshape(4, DIM)
    cache.insert("t", np.array([1, 2, 3, 4]), first)
    model.insert("t", [1, 2, 3, 4], first)
    assert cache.lookup("t", np.array([2]))[0].tolist() == model.lookup("t", [2])[0]
    lru = cache._lru
    assert lru is not None
    lru.head = lru.tail                                   # every entry lost
    rows = np.full((3, DIM), 7.0, np.float32)
    cache.insert("t", np.array([2, 8, 9]), rows)          # 2 new ids: 2 evictions, 2 protected
    model.insert("t", [2, 8, 9], rows)
    got = cache.entries("t")
    assert list(zip(*(a.tolist() for a in got))) == sorted((i, e[1], e[2]) for (_, i), e in model.entries.items())
    assert dict(vars(cache.stats)) == model.counters
    hit, out = cache.peek("t", np.array([2, 8, 9]))
    assert hit.all() and (out == 7.0).all()


_BAD = st.sampled_from([-1, -(1 << 62), 1 << 40, (1 << 63) - 1])
_EDGE = st.integers(0, 40) | st.sampled_from([(1 << 40) - 1, (1 << 40) - 2])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.lists(_EDGE | _BAD, max_size=12), sort=st.booleans(), weighted=st.booleans())
def test_native_passes_check_the_ids_they_read(ids: list[int], sort: bool, weighted: bool) -> None:
    """int64 ids go to the native probe and insert unchecked by numpy: an id outside [0, 2**40) raises
    InputError before anything changes, ids at the bounds are served, and both agree with the checked path
    (the same ids as a list)."""
    if sort:
        ids = sorted(set(ids))
    bad = any(i < 0 or i >= 1 << 40 for i in ids)
    a64 = np.array(ids, dtype=np.int64)
    c, ref = RowCache(6), RowCache(6)
    for x in (c, ref):
        x.insert("t", np.array([0, 3, (1 << 40) - 1]), np.ones((3, 2), np.float32))
    before = (c._clock, c._last_use.copy(), c._freq.copy(), dict(vars(c.stats)), c.entries("t"))
    offs = np.array([0, len(ids) // 2, len(ids)], dtype=np.int64)
    w = np.arange(len(ids), dtype=np.float32) if weighted else None
    if bad:
        with pytest.raises(InputError):
            c.probe_split("t", a64, offs, w, 2)
        with pytest.raises(InputError):
            c.insert("t", a64, np.zeros((len(ids), 2), np.float32))
        after = (c._clock, c._last_use, c._freq, dict(vars(c.stats)), c.entries("t"))
        assert before[0] == after[0] and before[3] == after[3]
        assert all((x == y).all() for x, y in zip((before[1], before[2], *before[4]), (after[1], after[2], *after[4])))
        return
    r, f = c.probe_split("t", a64, offs, w, 2), ref.probe_split("t", ids, offs.tolist(), w, 2)
    assert r.hit_slots.tolist() == f.hit_slots.tolist() and r.served.tolist() == f.served.tolist()
    assert r.admitted.tolist() == f.admitted.tolist() and r.admitted_offsets.tolist() == f.admitted_offsets.tolist()
    assert (r.hit_weights is None) == (w is None) and (w is None or r.hit_weights.tolist() == f.hit_weights.tolist())
    rows = np.arange(2 * len(ids), dtype=np.float32).reshape(-1, 2)
    c.insert("t", a64, rows)
    ref.insert("t", ids, rows)
    assert all((x == y).all() for x, y in zip(c.entries("t"), ref.entries("t")))
    assert dict(vars(c.stats)) == dict(vars(ref.stats)) and (c._last_use == ref._last_use).all()


def test_probe_split_rejects_ill_shaped_weights_and_offsets() -> None:
    c = RowCache(4)
    with pytest.raises(InputError):
        c.probe_split("t", np.array([1, 2]), np.array([[0, 2]]), None, 2)
    with pytest.raises(InputError):
        c.probe_split("t", np.array([1, 2]), np.array([0, 2]), np.ones((2, 1), np.float32), 2)
