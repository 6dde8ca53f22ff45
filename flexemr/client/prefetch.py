"""Lookahead prefetch pipeline: fetch batch ``i + 1`` while batch ``i`` is consumed.

:class:`Prefetcher` wraps an async ``fetch(batch)`` (e.g. the embedding
lookup of a batch) and runs it ``depth`` batches ahead of the consumer, like
FBGEMM's prefetch pipeline::

    async with Prefetcher(fetch, depth=1).stream(batches) as stream:
        async for batch, rows in stream:
            model(batch, rows)          # fetch of the next batch runs meanwhile

Guarantees:

* **order** -- results come back in batch order;
* **bounded** -- at most ``depth + 1`` fetches are outstanding (the one the
  consumer waits for and ``depth`` ahead), ``depth`` while it holds a batch;
  ``depth=0`` is the sequential baseline.  With ``waits_alone=True`` no
  fetch starts while the consumer waits for one (at most ``max(depth, 1)``
  outstanding): the next ones start as soon as the awaited one completes.
  :meth:`flexemr.EmbeddingClient.prefetch` uses it with a row cache: a
  lookup started beside the awaited one probes the cache before that one's
  misses are filled, and reads them again.  At depth 1 (the client's
  default) no fetch then runs beside the awaited one; at depth ``d >= 2``
  the ``d - 1`` started while the consumer held its last result still do;
* **errors at the right batch** -- a failing fetch (or a failing source
  iterator) raises in the consumer exactly when it reaches that batch; the
  results before it are delivered first.  The stream then closes itself;
* **pays for itself** -- with ``adaptive=True`` (what
  :meth:`flexemr.EmbeddingClient.prefetch` uses) a :class:`DepthChooser`
  measures the consumer's cycle (the time from one result to the next) with
  the lookahead and without it, and keeps the faster: on a machine whose
  cores are busy, the lookahead's overlap can cost more than it hides.  The
  other way is measured again now and then;
* **cancellation-safe** -- leaving the ``async with`` block, calling
  :meth:`PrefetchStream.aclose`, an error, or cancelling the consumer
  cancels and awaits every outstanding fetch, and closes the source if it
  is an async generator: no task is leaked.

>>> import asyncio
>>> async def fetch(b):
...     await asyncio.sleep(0)
...     return b * 10
>>> async def main():
...     async with Prefetcher(fetch, depth=2).stream(range(4)) as s:
...         return [r async for _, r in s]
>>> asyncio.run(main())
[0, 10, 20, 30]
"""

from __future__ import annotations

import asyncio
import contextvars
import statistics
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import numpy.typing as npt

from ..core.errors import ClosedError, ConfigError, InputError
from ..core.jagged import JaggedBatch
from ..core.metrics import LocalityMetrics
from ..core.pooling import PoolMode

__all__ = ["DepthChooser", "PrefetchStats", "PrefetchStream", "Prefetcher", "current_stream", "lookahead"]

B = TypeVar("B")
R = TypeVar("R")


@dataclass
class PrefetchStats:
    """Counters of a :class:`PrefetchStream`."""

    started: int = 0
    completed: int = 0
    cancelled: int = 0
    max_in_flight: int = 0
    #: results handed out while the lookahead was off (adaptive streams)
    sequential: int = 0


class DepthChooser:
    """Whether a prefetch stream looks ahead: the lookahead is kept only while it makes the consumer faster.

    Every consumer cycle (one result handed out to the next) is timed
    (:meth:`cycle`) and filed under the way it ran: lookahead on (``depth``
    batches ahead) or off (sequential).  The first ``window`` cycles run with
    it on, the next ``window`` without; then the way whose median of its last
    ``window`` cycles is lower runs, and the other is measured again for
    ``window`` cycles once its samples are ``explore_every`` cycles old.  The
    cycle after a switch is not filed (it still holds the old way's work).

    >>> c = DepthChooser(1, window=2, explore_every=10)
    >>> [c.cycle(t) for t in (3.0, 3.0)]      # on: 2 cycles filed, then off
    [1, 0]
    >>> [c.cycle(t) for t in (9.0, 2.0, 2.0)]      # the switch's cycle not filed; off measured faster
    [0, 0, 0]
    >>> [c.cycle(2.0) for _ in range(7)]      # on's samples 10 cycles old: measured again
    [0, 0, 0, 0, 0, 0, 1]
    """

    def __init__(self, depth: int, *, window: int = 4, explore_every: int = 48) -> None:
        self.max_depth = depth
        self.window = window
        self.explore_every = explore_every
        self.on = depth > 0
        self.samples: dict[bool, deque[float]] = {True: deque(maxlen=window), False: deque(maxlen=window)}
        self._last: dict[bool, int] = {True: 0, False: 0}
        self._cycles = 0
        self._skip = 0
        self._forced = 0

    @property
    def depth(self) -> int:
        """Batches to look ahead now."""
        return self.max_depth if self.on else 0

    def cycle(self, seconds: float) -> int:
        """A consumer cycle took ``seconds``; returns the depth from now on."""
        self._cycles += 1
        if self.max_depth == 0:
            return 0
        if self._skip:
            self._skip -= 1
        else:
            self.samples[self.on].append(seconds)
            self._last[self.on] = self._cycles
        if self._forced:
            self._forced -= 1
            if self._forced:
                return self.depth
        on, off = self.samples[True], self.samples[False]
        if len(on) < self.window:
            want = True
        elif len(off) < self.window:
            want = False
        else:
            want = statistics.median(on) <= statistics.median(off)
            if self._cycles - self._last[not want] >= self.explore_every:
                want = not want
        if want != self.on:  # the switch's cycle, then `window` cycles filed before the next choice
            self.on = want
            self._skip = 1
            self._forced = self.window + 1
        return self.depth


_END = object()


class _SourceError:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class PrefetchStream(AsyncIterator[tuple[B, R]], Generic[B, R]):
    """Async iterator of ``(batch, fetch(batch))``; made by :meth:`Prefetcher.stream`."""

    def __init__(self, fetch: Callable[[B], Awaitable[R]], source: AsyncIterable[B] | Iterable[B], depth: int,
                 adaptive: bool = False, waits_alone: bool = False) -> None:
        self._fetch = fetch
        self._depth = depth
        self._waits_alone = waits_alone
        #: with ``adaptive``: whether looking ahead pays (module docstring)
        self.chooser = DepthChooser(depth) if adaptive and depth > 0 else None
        self._handed: float | None = None
        self._async_source: AsyncIterator[B] | None = None
        self._sync_source: Iterator[B] | None = None
        if isinstance(source, AsyncIterable):
            self._async_source = aiter(source)
        else:
            self._sync_source = iter(source)
        self._pending: deque[tuple[B, asyncio.Task[R]] | _SourceError] = deque()
        self._exhausted = False
        self._closed = False
        self._current: asyncio.Task[R] | None = None
        self.stats = PrefetchStats()

    async def _run(self, batch: B) -> R:
        return await self._fetch(batch)

    @property
    def in_flight(self) -> int:
        """Fetches started and not yet done."""
        return sum(1 for e in self._pending if not isinstance(e, _SourceError) and not e[1].done())

    async def _next_batch(self) -> B | object:
        if self._async_source is not None:
            return await anext(self._async_source, _END)
        assert self._sync_source is not None
        return next(self._sync_source, _END)

    async def _fill(self, n: int) -> None:
        """Start fetches until ``n`` are pending (or the source is exhausted)."""
        while not self._exhausted and len(self._pending) < n:
            try:
                item = await self._next_batch()
            except Exception as exc:  # delivered when the consumer reaches it
                self._exhausted = True
                self._pending.append(_SourceError(exc))
                break
            if item is _END:
                self._exhausted = True
                break
            batch: B = item  # type: ignore[assignment]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._pending.append((batch, task))
            self.stats.started += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)

    def __aiter__(self) -> PrefetchStream[B, R]:
        return self

    async def __anext__(self) -> tuple[B, R]:
        if self._closed:
            raise StopAsyncIteration
        try:
            await self._fill(max(self._depth, 1) if self._waits_alone else self._depth + 1)
            if not self._pending:
                await self.aclose()
                raise StopAsyncIteration
            head = self._pending.popleft()
            if isinstance(head, _SourceError):
                raise head.exc
            batch, task = head
            self._current = task
            result = await task
            self._current = None
            self.stats.completed += 1
            ch = self.chooser
            if ch is not None:
                now = time.perf_counter()
                if self._handed is not None:
                    self._depth = ch.cycle(now - self._handed)
                self._handed = now
                self.stats.sequential += not ch.on
            if self._waits_alone:
                await self._fill(self._depth)   # the lookahead of the batch handed out
            return batch, result
        except StopAsyncIteration:
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Cancel and await every outstanding fetch and close the source (idempotent)."""
        if self._closed:
            return
        self._closed = True
        tasks = [e[1] for e in self._pending if not isinstance(e, _SourceError)]
        if self._current is not None:
            tasks.append(self._current)
            self._current = None
        self._pending.clear()
        for t in tasks:
            if not t.done():
                t.cancel()
                self.stats.cancelled += 1
        if tasks:
            # retrieve every outcome (also exceptions of fetches never consumed)
            await asyncio.gather(*tasks, return_exceptions=True)
        closer = getattr(self._async_source, "aclose", None)
        if closer is not None:
            await closer()
        sync_closer = getattr(self._sync_source, "close", None)
        if sync_closer is not None:
            sync_closer()

    async def __aenter__(self) -> PrefetchStream[B, R]:
        if self._closed:
            raise ClosedError("prefetch stream is closed")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Prefetcher(Generic[B, R]):
    """Runs ``fetch`` ``depth`` batches ahead of the consumer (module docstring).

    ``fetch`` is called inside a task per batch, so a synchronous exception
    in it is an error of that batch.  Single event loop; a :class:`Prefetcher`
    may make several streams.
    """

    def __init__(self, fetch: Callable[[B], Awaitable[R]], depth: int = 1, *, adaptive: bool = False,
                 waits_alone: bool = False) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ConfigError(f"depth must be an integer >= 0, got {depth!r}")
        if not callable(fetch):
            raise ConfigError("fetch must be callable")
        self.fetch = fetch
        self.depth = depth
        self.adaptive = adaptive
        #: start no fetch while the consumer waits for one (module docstring)
        self.waits_alone = waits_alone

    def stream(self, batches: AsyncIterable[B] | Iterable[B]) -> PrefetchStream[B, R]:
        """A :class:`PrefetchStream` over ``batches`` (sync or async iterable); with ``adaptive``, its
        lookahead runs only while it pays (:class:`DepthChooser`)."""
        return PrefetchStream(self.fetch, batches, self.depth, self.adaptive, self.waits_alone)


Rows = dict[str, npt.NDArray[Any]]

#: the :func:`lookahead` stream whose fetch is running (set in each fetch's task)
_STREAM: contextvars.ContextVar[object | None] = contextvars.ContextVar("flexemr_prefetch_stream", default=None)


def current_stream() -> object | None:
    """A token of the :meth:`flexemr.EmbeddingClient.prefetch` stream whose lookup runs in this task (``None``:
    a lookup called directly).  Lookups of one stream overlap one another and the consumer, so the time a
    choice costs is measured as the stream's cycle (from one lookup's completion to the next), not per lookup."""
    return _STREAM.get()


def lookahead(
    batches: Any,
    depth: int,
    pooled: PoolMode | None,
    lookup_jagged: Callable[[JaggedBatch], Awaitable[Rows]],
    lookup_pooled: Callable[..., Awaitable[Rows]],
    metrics: LocalityMetrics,
    waits_alone: bool = False,
) -> PrefetchStream[Any, Rows]:
    """The stream of :meth:`flexemr.EmbeddingClient.prefetch` (the client's lookups passed in).

    ``batches`` yields :class:`~flexemr.JaggedBatch` es, or ``(batch,
    per_sample_weights)`` pairs with ``pooled``; each is fetched with
    ``lookup_jagged(batch)`` or ``lookup_pooled(batch, mode=pooled,
    per_sample_weights=...)`` and counted in ``metrics.prefetched_batches``.
    The lookahead is adaptive (:class:`DepthChooser`): it stays on only while
    it makes the consumer's cycle shorter.  ``waits_alone``: see :class:`Prefetcher` (the client sets it when
    it has a row cache).
    """
    if pooled not in (None, "sum", "mean", "max"):
        raise InputError(f"pooled must be None, 'sum', 'mean' or 'max', got {pooled!r}")

    token = object()

    async def fetch(item: Any) -> Rows:
        jb, w = item if isinstance(item, tuple) else (item, None)
        metrics.prefetched_batches += 1
        _STREAM.set(token)  # this fetch's task only
        if pooled is None:
            if w is not None:
                raise InputError("per_sample_weights need pooled=...")
            return await lookup_jagged(jb)
        return await lookup_pooled(jb, mode=pooled, per_sample_weights=w)

    return Prefetcher(fetch, depth, adaptive=True, waits_alone=waits_alone).stream(batches)
