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
  ``depth=0`` is the sequential baseline;
* **errors at the right batch** -- a failing fetch (or a failing source
  iterator) raises in the consumer exactly when it reaches that batch; the
  results before it are delivered first.  The stream then closes itself;
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

__all__ = ["PrefetchStats", "PrefetchStream", "Prefetcher", "lookahead"]

B = TypeVar("B")
R = TypeVar("R")


@dataclass
class PrefetchStats:
    """Counters of a :class:`PrefetchStream`."""

    started: int = 0
    completed: int = 0
    cancelled: int = 0
    max_in_flight: int = 0


_END = object()


class _SourceError:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class PrefetchStream(AsyncIterator[tuple[B, R]], Generic[B, R]):
    """Async iterator of ``(batch, fetch(batch))``; made by :meth:`Prefetcher.stream`."""

    def __init__(self, fetch: Callable[[B], Awaitable[R]], source: AsyncIterable[B] | Iterable[B], depth: int) -> None:
        self._fetch = fetch
        self._depth = depth
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

    async def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self._depth + 1:
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
            await self._fill()
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

    def __init__(self, fetch: Callable[[B], Awaitable[R]], depth: int = 1) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ConfigError(f"depth must be an integer >= 0, got {depth!r}")
        if not callable(fetch):
            raise ConfigError("fetch must be callable")
        self.fetch = fetch
        self.depth = depth

    def stream(self, batches: AsyncIterable[B] | Iterable[B]) -> PrefetchStream[B, R]:
        """A :class:`PrefetchStream` over ``batches`` (sync or async iterable)."""
        return PrefetchStream(self.fetch, batches, self.depth)


Rows = dict[str, npt.NDArray[Any]]


def lookahead(
    batches: Any,
    depth: int,
    pooled: PoolMode | None,
    lookup_jagged: Callable[[JaggedBatch], Awaitable[Rows]],
    lookup_pooled: Callable[..., Awaitable[Rows]],
    metrics: LocalityMetrics,
) -> PrefetchStream[Any, Rows]:
    """The stream of :meth:`flexemr.EmbeddingClient.prefetch` (the client's lookups passed in).

    ``batches`` yields :class:`~flexemr.JaggedBatch` es, or ``(batch,
    per_sample_weights)`` pairs with ``pooled``; each is fetched with
    ``lookup_jagged(batch)`` or ``lookup_pooled(batch, mode=pooled,
    per_sample_weights=...)`` and counted in ``metrics.prefetched_batches``.
    """
    if pooled not in (None, "sum", "mean", "max"):
        raise InputError(f"pooled must be None, 'sum', 'mean' or 'max', got {pooled!r}")

    async def fetch(item: Any) -> Rows:
        jb, w = item if isinstance(item, tuple) else (item, None)
        metrics.prefetched_batches += 1
        if pooled is None:
            if w is not None:
                raise InputError("per_sample_weights need pooled=...")
            return await lookup_jagged(jb)
        return await lookup_pooled(jb, mode=pooled, per_sample_weights=w)

    return Prefetcher(fetch, depth).stream(batches)
