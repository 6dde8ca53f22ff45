"""What an engine owns, in one object its listeners and endpoints share.

:class:`~rdmaio.Engine` is the public face; its state lives in a :class:`Core`:
the validated :class:`Config`, the transport, the :class:`~rdmaio._progress.Router`,
the workers, the :class:`~rdmaio._region.RegionTable`, the channel handlers and
the listeners and endpoints.  Nothing in it refers back to the Engine object,
so an engine its owner dropped can be collected, and its finalizer closes the
core (``Core.abort``): threads joined, native memory freed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._channel import ChannelHandler
from ._errors import ClosedError, EndpointBrokenError, UsageError
from ._progress import Router, Worker
from ._region import RegionTable
from .transports import open_transport
from .transports.base import QpOptions, Transport, TransportOptions

__all__ = ["Config", "Core", "creation_site", "warn_unclosed"]

log = logging.getLogger(__name__)

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def creation_site() -> str:
    """``file:line`` of the first caller outside rdmaio (for the unclosed-resource warning)."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(_PACKAGE):
        f = f.f_back  # type: ignore[assignment]
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"


def _release(what: str, release: Callable[[], None]) -> None:
    try:
        release()
    except Exception:  # noqa: BLE001 - a finalizer must not raise; say what could not be freed
        log.exception("releasing an unclosed %s", what)


def warn_unclosed(what: str, site: str, loop: asyncio.AbstractEventLoop | None, release: Callable[[], None]) -> None:
    """A finalizer's body: free what an unclosed object held, then say so with a ResourceWarning.

    Garbage collection may run it on any thread.  Off the loop's thread, while the
    loop runs, the release is handed to the loop (asyncio objects are not thread-safe).
    """
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is not None and running is not loop and loop.is_running():
        try:
            loop.call_soon_threadsafe(_release, what, release)
        except RuntimeError:  # closed meanwhile: nothing runs on it any more
            _release(what, release)
    else:
        _release(what, release)
    warnings.warn(f"unclosed {what} created at {site}: it was released when collected; close it with aclose() "
                  f"(or use 'async with')", ResourceWarning, stacklevel=2)


@dataclass(frozen=True)
class Config:
    """An engine's options, validated (see :class:`~rdmaio.Engine` for what each means)."""

    workers: int
    progress: str
    qp_per_worker: bool
    sq_depth: int
    op_timeout: float | None
    connect_timeout: float
    handshake_timeout: float
    stripe_bytes: int
    socket_buffer: int
    same_host_fast_path: bool
    secret: bytes | None
    heartbeat: float
    dead_peer_timeout: float
    max_sessions: int
    channel_memory: int

    @property
    def nqp(self) -> int:
        """Queue pairs per endpoint."""
        return self.workers if self.qp_per_worker else 1


class _Listener(Protocol):
    def _abort(self) -> None: ...


class _Endpoint(Protocol):
    def abort(self) -> None: ...

    def _on_broken(self, exc: BaseException) -> None: ...


class Core:
    """An engine's state and resources (everything :meth:`abort` releases)."""

    def __init__(self, config: Config, transport_name: str, options: TransportOptions) -> None:
        self.config = config
        self.transport: Transport = open_transport(transport_name, options)
        self.router = Router(self._worker_failed)
        self.regions = RegionTable(self.transport)
        self.workers: list[Worker] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.qp_options: QpOptions | None = None
        self.channel_handlers: dict[str, ChannelHandler] = {}
        self.channel_bytes = 0  # rings of channels peers opened to this engine
        self.listeners: set[_Listener] = set()
        self.endpoints: weakref.WeakSet[Any] = weakref.WeakSet()  # an endpoint its owner dropped goes
        self.failure: str | None = None
        self.closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to ``loop`` and start the workers."""
        self.loop = loop
        self.regions.loop = loop
        c = self.config
        for i in range(c.workers):
            w = self.transport.worker(i, self.router, c.progress, loop)
            self.workers.append(w)
            w.start()
        self.qp_options = QpOptions(loop, self.router, tuple(self.workers), c.nqp, not c.qp_per_worker, c.sq_depth,
                                    c.op_timeout, c.socket_buffer, c.same_host_fast_path)

    def check_open(self) -> None:
        if self.closed:
            raise ClosedError("engine is closed")

    def check_started(self) -> QpOptions:
        """The queue-pair options of a started, usable engine (else the error saying why not)."""
        self.check_open()
        if self.qp_options is None:
            raise UsageError("engine not started: use 'async with Engine(...)' or 'await engine.start()'")
        if self.failure is not None:
            raise EndpointBrokenError(f"engine unusable: {self.failure}")
        return self.qp_options

    def _worker_failed(self, index: int, err: int) -> None:
        if self.closed or self.failure is not None:
            return
        self.failure = f"progress worker {index} failed: {os.strerror(err)}"
        log.error("engine unusable: %s", self.failure)
        for lst in list(self.listeners):
            lst._abort()
        for ep in list(self.endpoints):
            ep._on_broken(EndpointBrokenError(f"engine unusable: {self.failure}"))
        for owner in self.router.owners():
            owner._on_dead(err)

    def abort(self) -> None:
        """Close listeners and endpoints, stop the workers, free every native object. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for lst in list(self.listeners):
            lst._abort()
        for ep in list(self.endpoints):
            ep.abort()
        for w in self.workers:
            w.stop()
        self.router.close_all()
        for w in self.workers:
            w.free()
        self.workers.clear()
        self.regions.close()
        self.transport.close()
