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
    pooler = types.SimpleNamespace(cache_cost=rec, _stream_end=None)
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
