"""CacheChoice (whether lookups probe the row cache or bypass it) on driven measurements, no clock; and what a
pooled lookup files with it: its own time, or in a prefetch stream the stream's cycle."""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.client import prefetch
from flexemr.client.pooled import Pooler
from flexemr.core.cache import CacheChoice
from flexemr.core.errors import ConfigError


def drive(c: CacheChoice, cost: dict[bool, list[float]], lookups: int) -> str:
    """Run ``lookups`` lookups whose time per id is taken in turn from ``cost[way]``; the ways as P/b."""
    used = {True: 0, False: 0}
    ways = []
    for _ in range(lookups):
        way = c.choose()
        seq = cost[way]
        c.observe(way, 100, 100 * seq[used[way] % len(seq)])
        used[way] += 1
        ways.append("P" if way else "b")
    return "".join(ways)


def test_warmup_then_a_trial_of_run_lookups_each_way() -> None:
    c = CacheChoice(warmup=5, run=4, explore_every=8)
    ways = drive(c, {True: [1.0], False: [2.0]}, 20)
    assert ways[:5] == "PPPPP" and ways[5:9] == "bbbb" and ways[9:13] == "PPPP"
    assert c.trials == 1 and c.switches == 0 and c.probe
    # the incumbent won: the next trial comes twice as late (16 lookups after the decision, not 8)
    ways = drive(c, {True: [1.0], False: [2.0]}, 40)
    assert ways.index("b") == 16 - 7 + 1


def test_a_challenger_clearly_faster_takes_over_and_the_interval_resets() -> None:
    c = CacheChoice(warmup=4, run=3, margin=0.2, explore_every=6)
    ways = drive(c, {True: [1.0], False: [0.5]}, 14)
    assert ways == "PPPP" + "bbb" + "PPP" + "bbbb"
    assert c.switches == 1 and not c.probe
    # now the cache is the challenger, `explore_every` lookups after the switch
    ways = drive(c, {True: [1.0], False: [0.5]}, 6)
    assert ways == "bbbPPP"


def test_the_first_sample_after_a_change_of_way_is_not_filed() -> None:
    c = CacheChoice(warmup=3, run=3, explore_every=50)
    # the switch's sample (the first bypass) is huge and the rest fast: the fast ones decide
    samples = iter([1.0, 1.0, 1.0, 50.0, 0.1, 0.1, 50.0, 1.0, 1.0, 1.0])
    for _ in range(10):
        way = c.choose()
        c.observe(way, 1, next(samples))
    assert c.switches == 1 and not c.probe


@settings(max_examples=200, deadline=None)
@given(inc=st.lists(st.floats(1.0, 2.0), min_size=1, max_size=8),
       slower=st.lists(st.floats(0.85, 3.0), min_size=1, max_size=8),
       margin=st.floats(0.0, 0.5), run=st.integers(3, 6))
def test_noise_within_the_margin_never_switches(inc: list[float], slower: list[float], margin: float,
                                                run: int) -> None:
    """A challenger whose samples are never below (1 - margin) x the incumbent's largest never takes over."""
    low = (1.0 - margin) * max(inc) * (1 + 1e-9)   # (above rounding)
    chal = [low * f if f >= 1.0 else low for f in slower]
    c = CacheChoice(warmup=run, run=run, margin=margin, explore_every=run)
    drive(c, {True: inc, False: chal}, 200)
    assert c.switches == 0 and c.probe and c.trials >= 3


@settings(max_examples=200, deadline=None)
@given(inc=st.lists(st.floats(1.0, 2.0), min_size=1, max_size=8),
       faster=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=8),
       margin=st.floats(0.0, 0.5), run=st.integers(3, 6))
def test_a_challenger_always_below_the_margin_takes_over_at_the_first_trial(inc: list[float], faster: list[float],
                                                                            margin: float, run: int) -> None:
    ceiling = (1.0 - margin) * min(inc)
    chal = [max(ceiling * f, 1e-6) for f in faster]
    c = CacheChoice(warmup=run, run=run, margin=margin, explore_every=1000)
    drive(c, {True: inc, False: chal}, 4 * run)
    assert c.trials == 1 and c.switches == 1 and not c.probe


def test_exploration_interval_is_capped() -> None:
    c = CacheChoice(warmup=0, run=3, explore_every=4, max_explore_every=16)
    ways = drive(c, {True: [1.0], False: [9.0]}, 400)
    # between two trials: the incumbent's run after the first, the lookup deciding it, then the interval
    gaps = [len(g) - 3 - 1 for g in ways.split("bbb") if g][:-1]
    assert gaps[:3] == [8, 16, 16] and set(gaps[3:]) == {16}


@pytest.mark.parametrize("kw", [{"run": 2}, {"warmup": -1}, {"margin": 1.0}, {"margin": -0.1},
                                {"explore_every": 0}, {"run": 3.5}])
def test_bad_arguments(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CacheChoice(**kw)  # type: ignore[arg-type]


class _Recorder:
    def __init__(self) -> None:
        self.samples: list[tuple[bool, int, float]] = []

    def observe(self, probe: bool, ids: int, seconds: float) -> None:
        self.samples.append((probe, ids, seconds))


def test_a_lookup_files_its_own_time_or_its_streams_cycle() -> None:
    """Outside a prefetch stream a lookup's time is filed; inside one, the time from the stream's previous
    completion (the consumer's cycle: lookups overlap each other and the consumer); the first lookup of a
    stream files nothing."""
    rec = _Recorder()
    pooler = types.SimpleNamespace(cache_cost=rec, _stream_end={})
    observe = Pooler._observe_cache
    observe(pooler, True, 10, 1.0, 1.5)                   # a direct call: its own 0.5 s
    token = object()
    ctx_token = prefetch._STREAM.set(token)
    try:
        observe(pooler, True, 10, 2.0, 2.4)               # the stream's first lookup: nothing to compare with
        observe(pooler, False, 10, 2.1, 3.0)              # started before the last completed: 3.0 - 2.4
        observe(pooler, True, 10, 3.5, 3.7)               # the consumer held the result meanwhile: 3.7 - 3.0
        other = object()
        prefetch._STREAM.set(other)
        observe(pooler, True, 10, 4.0, 4.2)               # another stream's first lookup
    finally:
        prefetch._STREAM.reset(ctx_token)
    assert rec.samples == [(True, 10, 0.5), (False, 10, pytest.approx(0.6)), (True, 10, pytest.approx(0.7))]
    assert prefetch.current_stream() is None


def test_a_challenger_must_beat_every_bracketing_sample() -> None:
    """Its median 2x lower is not enough while one of its samples is slower than the incumbent's fastest
    (a load swing that happened to slow one incumbent lookup down)."""
    c = CacheChoice(warmup=3, run=3, margin=0.2, explore_every=50)
    samples = iter([1.0, 1.0, 0.6, 9.9, 0.5, 0.7, 9.9, 1.0, 1.0, 1.0])
    for _ in range(10):
        way = c.choose()
        c.observe(way, 1, next(samples))
    assert c.trials == 1 and c.switches == 0 and c.probe


def test_streams_taking_turns_each_file_their_own_cycle() -> None:
    """Two prefetch streams on one client whose lookups complete in turns (and a direct lookup between them):
    each stream's cycle is timed from its own previous completion."""
    rec = _Recorder()
    pooler = types.SimpleNamespace(cache_cost=rec, _stream_end={})
    observe = Pooler._observe_cache
    a, b = object(), object()
    ctx = prefetch._STREAM.set(a)
    try:
        for i in range(4):
            prefetch._STREAM.set(a)
            observe(pooler, True, 10, i + 0.0, i + 0.2)   # stream a completes at i + 0.2
            prefetch._STREAM.set(b)
            observe(pooler, True, 10, i + 0.1, i + 0.6)   # stream b at i + 0.6
            prefetch._STREAM.set(None)
            observe(pooler, True, 10, i + 0.7, i + 0.8)   # a direct lookup: its own 0.1 s
    finally:
        prefetch._STREAM.reset(ctx)
    cycles = [s for _, _, s in rec.samples]
    assert cycles == pytest.approx([0.1] + [1.0, 1.0, 0.1] * 3)


def test_a_trial_whose_challenger_is_never_timed_ends_without_a_verdict() -> None:
    """Samples that never come (lookups whose cycles could not be measured) end a trial after a bounded number of
    lookups, the incumbent kept; later trials still run."""
    c = CacheChoice(warmup=2, run=3, explore_every=4, max_explore_every=64)
    ways = []
    for _ in range(200):
        way = c.choose()
        ways.append(way)
        if way:                                              # only the incumbent's lookups are ever timed
            c.observe(way, 10, 1.0)
    assert c.probe and c.switches == 0
    assert not c.exploring or ways[-1] is False
    assert sum(ways[-60:]) >= 45                             # the cache serves most lookups, not the bypass
    assert ways.count(False) < 100


def test_a_trials_bypassing_lookups_pool_as_measured_on_the_caches_misses() -> None:
    """While the cache is in use, lookups without it are never measured (``cost`` has no samples): a trial's
    bypassing lookups then follow what was measured on the cache's misses (``miss_cost``), each model by its
    own judge; with no measurement at all they read raw."""
    from flexemr.core.pooling import PoolingCost

    def pooler(cost: PoolingCost, miss: PoolingCost) -> types.SimpleNamespace:
        return types.SimpleNamespace(cost=cost, miss_cost=miss)

    faster = Pooler._pooling_measured_faster
    assert faster(pooler(PoolingCost(judge="least"), PoolingCost())) is False
    miss = PoolingCost(first_explore=0)
    for t in (1.0, 1.1, 1.2):
        miss.pooled.add(t)
        miss.raw.add(2.0)
    assert faster(pooler(PoolingCost(judge="least"), miss)) is True
    cost = PoolingCost(judge="least")
    for p, r in ((0.5, 1.0), (9.0, 1.0), (9.0, 1.0)):   # pooling once fastest of all: "least" says pool
        cost.pooled.add(p)
        cost.raw.add(r)
    assert faster(pooler(cost, miss)) is True
    median = PoolingCost()
    for p, r in ((0.5, 1.0), (9.0, 1.0), (9.0, 1.0)):   # ... the median says read raw
        median.pooled.add(p)
        median.raw.add(r)
    assert faster(pooler(median, miss)) is False
