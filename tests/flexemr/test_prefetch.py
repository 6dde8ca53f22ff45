"""Prefetch pipeline: order, overlap, bounded lookahead, errors at the right batch, clean cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from flexemr.core.errors import ConfigError
from flexemr.client.prefetch import Prefetcher


class Recorder:
    """Fake fetcher + consumer that log (event, batch) in order with loop timestamps."""

    def __init__(self, fetch_delay: float = 0.01, fail_on: int | None = None) -> None:
        self.events: list[tuple[str, int]] = []
        self.times: dict[tuple[str, int], float] = {}
        self.fetch_delay = fetch_delay
        self.fail_on = fail_on
        self.in_flight = 0
        self.max_in_flight = 0

    def log(self, event: str, b: int) -> None:
        self.events.append((event, b))
        self.times[(event, b)] = asyncio.get_running_loop().time()

    async def fetch(self, b: int) -> int:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.log("fetch_start", b)
        try:
            await asyncio.sleep(self.fetch_delay)
            if b == self.fail_on:
                raise ValueError(f"fetch {b} failed")
            self.log("fetch_end", b)
            return b * b
        finally:
            self.in_flight -= 1


def only_current_task() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


async def test_order_and_overlap() -> None:
    rec = Recorder()
    out = []
    async with Prefetcher(rec.fetch, depth=1).stream(range(5)) as stream:
        async for b, r in stream:
            rec.log("consume_start", b)
            await asyncio.sleep(0.01)  # "compute" on batch b
            rec.log("consume_end", b)
            out.append((b, r))
    assert out == [(i, i * i) for i in range(5)]
    for i in range(4):
        # the fetch of batch i+1 runs while batch i is being consumed
        assert rec.events.index(("fetch_start", i + 1)) < rec.events.index(("consume_end", i))
        assert rec.times[("fetch_start", i + 1)] <= rec.times[("consume_end", i)]
        assert rec.times[("fetch_end", i + 1)] >= rec.times[("consume_start", i)]
        # ... but never more than one batch ahead
        assert rec.events.index(("fetch_start", i + 2 if i + 2 < 5 else i + 1)) > rec.events.index(("consume_start", i))
    assert rec.max_in_flight == 2  # depth + 1
    assert stream.stats.completed == 5 and stream.stats.cancelled == 0
    assert only_current_task()


async def test_depth_zero_is_sequential_and_depth_bounds_lookahead() -> None:
    rec = Recorder(fetch_delay=0)
    async with Prefetcher(rec.fetch, depth=0).stream(range(3)) as stream:
        async for b, _ in stream:
            rec.log("consume", b)
    assert [e for e in rec.events if e[0] != "fetch_end"] == [
        ("fetch_start", 0), ("consume", 0), ("fetch_start", 1), ("consume", 1), ("fetch_start", 2), ("consume", 2)
    ]
    rec = Recorder(fetch_delay=0.005)
    async with Prefetcher(rec.fetch, depth=3).stream(range(20)) as stream:
        async for b, _ in stream:
            assert rec.in_flight <= 3
            await asyncio.sleep(0.001)
    assert rec.max_in_flight == 4
    assert stream.stats.max_in_flight == 4


async def test_fetch_error_raises_at_its_batch() -> None:
    rec = Recorder(fail_on=2)
    seen = []
    with pytest.raises(ValueError, match="fetch 2 failed"):
        async with Prefetcher(rec.fetch, depth=2).stream(range(6)) as stream:
            async for b, _ in stream:
                seen.append(b)
    assert seen == [0, 1]
    assert only_current_task()
    assert [r async for r in stream] == []  # closed after the error


async def test_later_failure_not_seen_if_consumer_stops_early() -> None:
    rec = Recorder(fetch_delay=0, fail_on=1)
    async with Prefetcher(rec.fetch, depth=2).stream(range(3)) as stream:
        async for b, _ in stream:
            await asyncio.sleep(0.01)  # batch 1 has already failed in the background
            break
    assert only_current_task()


async def test_source_error_raises_after_earlier_batches() -> None:
    async def source() -> AsyncIterator[int]:
        yield 0
        yield 1
        raise RuntimeError("source broke")

    rec = Recorder(fetch_delay=0)
    seen = []
    with pytest.raises(RuntimeError, match="source broke"):
        async with Prefetcher(rec.fetch, depth=4).stream(source()) as stream:
            async for b, _ in stream:
                seen.append(b)
    assert seen == [0, 1]


async def test_closing_early_cancels_prefetches() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        try:
            for i in range(100):
                yield i
        finally:
            closed.set()

    never = asyncio.Event()
    running = 0

    async def fetch(b: int) -> int:
        nonlocal running
        if b == 0:
            return 0
        running += 1
        try:
            await never.wait()  # would hang without cancellation
        finally:
            running -= 1
        return b

    stream = Prefetcher(fetch, depth=3).stream(source())
    assert await stream.__anext__() == (0, 0)
    await asyncio.sleep(0)  # let the prefetches start
    assert running == 3
    await stream.aclose()
    await stream.aclose()  # idempotent
    assert closed.is_set()
    assert stream.stats.cancelled == 3
    assert running == 0
    assert only_current_task()


async def test_cancelling_the_consumer_cancels_everything() -> None:
    rec = Recorder(fetch_delay=10)
    started = asyncio.Event()

    async def consumer() -> None:
        async with Prefetcher(rec.fetch, depth=2).stream(range(10)) as stream:
            started.set()
            async for _ in stream:
                pass

    task = asyncio.create_task(consumer())
    await started.wait()
    await asyncio.sleep(0.01)
    assert rec.in_flight == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.in_flight == 0
    assert only_current_task()


async def test_overlap_beats_sequential_in_event_order() -> None:
    """With depth=1 every fetch after the first finishes while the consumer still computes."""
    rec = Recorder(fetch_delay=0.01)
    async with Prefetcher(rec.fetch, depth=1).stream(range(4)) as stream:
        async for b, _ in stream:
            await asyncio.sleep(0.02)  # consume slower than fetch
            rec.log("consume_end", b)
    for i in range(3):
        assert rec.events.index(("fetch_end", i + 1)) < rec.events.index(("consume_end", i))


def test_bad_depth() -> None:
    with pytest.raises(ConfigError):
        Prefetcher(lambda b: asyncio.sleep(0), depth=-1)


def test_depth_chooser_keeps_the_faster_way_and_measures_the_other_again() -> None:
    from flexemr.client.prefetch import DepthChooser

    c = DepthChooser(2, window=3, explore_every=20)
    depths = [c.cycle(5.0) for _ in range(3)]           # on, measured
    assert depths == [2, 2, 0]
    depths = [c.cycle(t) for t in (9.0, 1.0, 1.0, 1.0)]  # the switch's cycle (9.0) is not filed
    assert depths == [0, 0, 0, 0] and list(c.samples[False]) == [1.0, 1.0, 1.0]
    seq = [c.cycle(5.0 if c.on else 1.0) for _ in range(30)]   # on still 5x slower than off
    first_on = seq.index(2)                              # on measured again once its samples are old
    assert 10 <= first_on <= 20 and seq[first_on:first_on + 4] == [2, 2, 2, 2]
    assert seq[first_on + 4:] == [0] * (30 - first_on - 4)   # ... and given up again
    # ... unless the lookahead now pays: then it stays on
    c2 = DepthChooser(1, window=2, explore_every=4)
    for t in (5.0, 5.0, 0.0, 3.0, 3.0):
        c2.cycle(t)
    assert c2.depth == 0
    for _ in range(8):
        c2.cycle(1.0 if c2.on else 3.0)
    assert c2.on


def test_depth_chooser_with_depth_zero_stays_sequential() -> None:
    from flexemr.client.prefetch import DepthChooser

    c = DepthChooser(0)
    assert [c.cycle(1.0) for _ in range(5)] == [0] * 5


async def test_adaptive_stream_turns_a_lookahead_that_does_not_pay_off() -> None:
    """Fetches that slow the consumer down while they run (a shared core): the lookahead is switched off,
    results stay complete and in order."""
    busy = 0

    async def fetch(b: int) -> int:
        nonlocal busy
        busy += 1
        try:
            await asyncio.sleep(0.004)
            return b
        finally:
            busy -= 1

    out = []
    async with Prefetcher(fetch, depth=1, adaptive=True).stream(range(40)) as stream:
        async for b, r in stream:
            # the consumer's work takes 5x longer while a fetch runs beside it
            await asyncio.sleep(0.002)
            if busy:
                await asyncio.sleep(0.02)
            out.append(r)
        assert stream.chooser is not None and stream.stats.sequential > 20
    assert out == list(range(40))


async def test_waits_alone_starts_no_fetch_while_the_consumer_waits() -> None:
    """Fetches slower than the consumer: the consumer waits for batch i + 1, and batch i + 2's fetch starts only
    once i + 1's is done (started while it waits, it would miss the rows i + 1 is reading into a row cache), then
    runs while batch i + 1 is consumed."""
    rec = Recorder(fetch_delay=0.01)
    async with Prefetcher(rec.fetch, depth=1, waits_alone=True).stream(range(6)) as stream:
        async for b, _ in stream:
            rec.log("consume_start", b)
            await asyncio.sleep(0.001)
            rec.log("consume_end", b)
    ev = rec.events
    for i in range(4):
        assert ev.index(("fetch_end", i + 1)) < ev.index(("fetch_start", i + 2)) < ev.index(("consume_end", i + 1))
    assert rec.max_in_flight == 1
