"""Credits: a FIFO window of operations and bytes in flight, for flow control above queue pairs.

A queue pair's slots bound how many operations are in flight on it; they do
not bound *bytes*, and every caller of an endpoint shares them.  A
:class:`Credits` pool is a separate window that callers take from before
posting and give back when the operation has ended, e.g. one pool per class
of traffic on its own endpoint::

    bulk = rdmaio.Credits(max_bytes=256 << 10)           # at most 256 KiB of bulk reads in flight
    urgent = rdmaio.Credits(max_ops=8)                   # a separate class: bulk never takes these
    bulk_ep = await engine.connect(host, port, credits=bulk)
    urgent_ep = await engine.connect(host, port, credits=urgent)

Given to :meth:`Engine.connect <rdmaio.Engine.connect>`, the endpoint takes
credits for every operation it posts (a batch request: its bytes, one
operation) and returns them when the operation ends; a caller may also use a
pool directly (``async with credits.take(nbytes): ...``).

Rules: grants are first come, first served (a large request is not
overtaken by smaller ones behind it, so it cannot starve); a request larger
than the whole window is admitted once nothing else holds credits (never a
deadlock); a waiter that is cancelled leaves the queue (and passes on a grant
it had just received).  One pool belongs to one event loop.

>>> import asyncio
>>> async def demo():
...     c = Credits(max_bytes=100)
...     await c.acquire(80)
...     waiter = asyncio.ensure_future(c.acquire(40))      # 80 + 40 > 100: waits
...     await asyncio.sleep(0)
...     queued = c.waiting
...     c.release(80)
...     await waiter
...     return queued, c.in_use_bytes
>>> asyncio.run(demo())
(1, 40)
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._errors import UsageError

__all__ = ["Credits"]


def _limit(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be a positive int or None, got {value!r}")
    return value


class Credits:
    """A window of at most ``max_ops`` operations and ``max_bytes`` bytes in flight (``None``: no limit).

    See the module docstring for the rules.
    """

    def __init__(self, max_ops: int | None = None, max_bytes: int | None = None) -> None:
        self.max_ops = _limit("max_ops", max_ops)
        self.max_bytes = _limit("max_bytes", max_bytes)
        self.in_use_ops = 0
        self.in_use_bytes = 0
        self._waiters: collections.deque[tuple[asyncio.Future[None], int, int]] = collections.deque()
        #: grants made, and how many of them had to wait
        self.granted = 0
        self.waited = 0

    def __repr__(self) -> str:
        return (f"<Credits ops {self.in_use_ops}/{self.max_ops} bytes {self.in_use_bytes}/{self.max_bytes} "
                f"waiting={self.waiting}>")

    @property
    def waiting(self) -> int:
        """Requests queued for credits."""
        return sum(1 for f, _, _ in self._waiters if not f.done())

    def _fits(self, nbytes: int, ops: int) -> bool:
        if self.in_use_ops == 0 and self.in_use_bytes == 0:
            return True  # alone: admitted even if larger than the window
        if self.max_ops is not None and self.in_use_ops + ops > self.max_ops:
            return False
        return self.max_bytes is None or self.in_use_bytes + nbytes <= self.max_bytes

    def _grant(self, nbytes: int, ops: int) -> None:
        self.in_use_ops += ops
        self.in_use_bytes += nbytes
        self.granted += 1

    def try_acquire(self, nbytes: int = 0, ops: int = 1) -> bool:
        """Take the credits now if they are free and nobody waits; returns whether it did."""
        nbytes, ops = self._check(nbytes, ops)
        if self._waiters or not self._fits(nbytes, ops):
            return False
        self._grant(nbytes, ops)
        return True

    async def acquire(self, nbytes: int = 0, ops: int = 1) -> None:
        """Wait until ``ops`` operations and ``nbytes`` bytes fit in the window, then take them."""
        nbytes, ops = self._check(nbytes, ops)
        if not self._waiters and self._fits(nbytes, ops):
            self._grant(nbytes, ops)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, nbytes, ops)
        self._waiters.append(entry)
        self.waited += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just before the cancellation: give it back
                self.release(nbytes, ops)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
            raise

    def release(self, nbytes: int = 0, ops: int = 1) -> None:
        """Give back credits taken by :meth:`acquire` (or :meth:`try_acquire`)."""
        nbytes, ops = self._check(nbytes, ops)
        if ops > self.in_use_ops or nbytes > self.in_use_bytes:
            raise UsageError(f"releasing {ops} ops / {nbytes} bytes, only {self.in_use_ops} / "
                             f"{self.in_use_bytes} are taken")
        self.in_use_ops -= ops
        self.in_use_bytes -= nbytes
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            fut, nbytes, ops = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            if not self._fits(nbytes, ops):
                return
            waiters.popleft()
            self._grant(nbytes, ops)
            fut.set_result(None)

    @asynccontextmanager
    async def take(self, nbytes: int = 0, ops: int = 1) -> AsyncIterator[None]:
        """``async with credits.take(nbytes):`` -- acquire, and release on exit."""
        await self.acquire(nbytes, ops)
        try:
            yield
        finally:
            self.release(nbytes, ops)

    @staticmethod
    def _check(nbytes: int, ops: int) -> tuple[int, int]:
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise UsageError(f"nbytes must be an int >= 0, got {nbytes!r}")
        if not isinstance(ops, int) or isinstance(ops, bool) or ops < 0:
            raise UsageError(f"ops must be an int >= 0, got {ops!r}")
        return nbytes, ops
