"""Running coroutines on the fastest available event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["new_event_loop", "run"]

T = TypeVar("T")


def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed (and wanted), else the stdlib loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True, debug: bool | None = None) -> T:
    """Like :func:`asyncio.run`, on uvloop when it is installed.

    >>> import rdmaio
    >>> async def answer() -> int:
    ...     return 42
    >>> rdmaio.run(answer())
    42
    """
    with asyncio.Runner(loop_factory=lambda: new_event_loop(use_uvloop), debug=debug) as runner:
        return runner.run(main)
