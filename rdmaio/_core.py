"""What an engine owns, in one object its listeners and endpoints share.

:class:`~rdmaio.Engine` is the public face; its state lives in a :class:`Core`:
the validated :class:`Config`, the transport, the :class:`~rdmaio._progress.Router`,
the workers, the :class:`~rdmaio._region.RegionTable`, the channel handlers and
the listeners and endpoints.  Nothing in it refers back to the Engine object,
so an engine its owner dropped can be collected, and its finalizer closes the
core (``Core.abort``): threads joined, native memory freed.

Workers come in *groups*, one per NIC (``Engine(device=[...])``; one group on
tcp or with one device), ``workers`` per group.  Every link -- an endpoint, or a
session a listener serves -- is *placed* once, when it is created
(:meth:`Core.place`): in the group of the NIC that reaches the peer, with the
group's least-loaded worker as its *home*.  Its queue pair ``i`` belongs to the
``i``-th worker after the home (wrapping around), for the link's whole life, so
a peer's completions are always polled by the same workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
import warnings
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._channel import ChannelHandler
from ._errors import ClosedError, EndpointBrokenError, UsageError
from ._progress import Router, Worker
from ._region import RegionTable
from .transports import open_transport
from .transports.base import QpOptions, Transport, TransportOptions

__all__ = ["Config", "Core", "Placement", "creation_site", "warn_unclosed"]

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
    #: pinned CPUs of each worker (all groups, in order), or None
    worker_cpus: tuple[frozenset[int], ...] | None = None
    busy_poll_us: int = 0
    qp_choice: str = "home"

    @property
    def nqp(self) -> int:
        """Queue pairs per endpoint."""
        return self.workers if self.qp_per_worker else 1


class _Listener(Protocol):
    def _abort(self) -> None: ...


class _Endpoint(Protocol):
    def abort(self) -> None: ...

    def _on_broken(self, exc: BaseException) -> None: ...


class Placement:
    """Where one link lives: its worker group and its workers, home first (see the module docstring)."""

    __slots__ = ("_core", "group", "workers", "_released")

    def __init__(self, core: Core, group: int, workers: tuple[Worker, ...]) -> None:
        self._core = core
        self.group = group
        self.workers = workers
        self._released = False

    @property
    def home(self) -> Worker:
        return self.workers[0]

    def options(self, opts: QpOptions) -> QpOptions:
        """The engine's queue-pair options for this link: queue pair ``i`` on ``workers[i]``."""
        return dataclasses.replace(opts, workers=self.workers)

    def release(self) -> None:
        """The link is gone: its home worker counts one link less (idempotent)."""
        if not self._released:
            self._released = True
            self._core.homed[self.home.index] -= 1


class Core:
    """An engine's state and resources (everything :meth:`abort` releases)."""

    def __init__(self, config: Config, transport_name: str, options: TransportOptions) -> None:
        self.config = config
        self.transport: Transport = open_transport(transport_name, options)
        total = config.workers * len(self.transport.groups)
        if config.worker_cpus is not None and len(config.worker_cpus) != total:
            self.transport.close()
            raise UsageError(f"worker_cpus needs one entry per worker: {total} ({config.workers} per device x "
                             f"{len(self.transport.groups)} device(s)), got {len(config.worker_cpus)}")
        self.router = Router(self._worker_failed)
        self.regions = RegionTable(self.transport)
        self.workers: list[Worker] = []
        #: the workers of each group (one group per NIC)
        self.groups: list[tuple[Worker, ...]] = []
        #: links (endpoints and sessions) homed on each worker
        self.homed: list[int] = []
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
        for g in range(len(self.transport.groups)):
            group = []
            for j in range(c.workers):
                i = g * c.workers + j
                w = self.transport.worker(i, self.router, c.progress, loop, g,
                                          c.worker_cpus[i] if c.worker_cpus is not None else None)
                self.workers.append(w)
                self.homed.append(0)
                group.append(w)
                w.start()
            self.groups.append(tuple(group))
        self.qp_options = QpOptions(loop, self.router, tuple(self.workers), c.nqp, not c.qp_per_worker, c.sq_depth,
                                    c.op_timeout, c.socket_buffer, c.same_host_fast_path)

    # -- placement ----------------------------------------------------------------------------------
    def place(self, group: int, peer: str) -> Placement:
        """Home a new link on the least-loaded worker of ``group`` (ties: by a hash of ``peer``, so a
        set of peers spreads the same way every time)."""
        ws = self.groups[group]
        loads = [self.homed[w.index] for w in ws]
        least = min(loads)
        tied = [k for k, n in enumerate(loads) if n == least]
        h = tied[zlib.crc32(peer.encode()) % len(tied)]
        self.homed[ws[h].index] += 1
        return Placement(self, group, ws[h:] + ws[:h])

    def group_of(self, device: str | None, local_address: str | None) -> int:
        """The group of an explicitly named ``device``, else of the NIC that owns ``local_address``
        (the first group when none does)."""
        names = self.transport.groups
        if device is not None:
            if device not in names:
                raise UsageError(f"this engine has no device {device!r} (it has {names})")
            return names.index(device)
        g = self.transport.group_for(local_address) if len(names) > 1 else 0
        return 0 if g is None else g

    async def source_address(self, host: str, port: int) -> str | None:
        """The local address the kernel would use towards ``host`` (no packet is sent), or None."""
        if len(self.transport.groups) == 1:
            return None
        assert self.loop is not None
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, _, _, _, addr = infos[0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                return str(s.getsockname()[0])
        except OSError:
            return None

    def info(self) -> dict[str, Any]:
        """What :meth:`rdmaio.Engine.info` reports."""
        c = self.config
        workers = []
        for g, ws in enumerate(self.groups):
            for w in ws:
                d: dict[str, Any] = {"index": w.index, "group": g, "device": self.transport.groups[g],
                                     "cpus": sorted(w.cpus) if w.cpus is not None else None,
                                     "cpu_error": w.cpu_error, "links": self.homed[w.index]}
                info = getattr(w, "info", None)
                if info is not None and w.c is not None:
                    d.update(info())
                workers.append(d)
        return {"transport": self.transport.name, "progress": c.progress, "devices": list(self.transport.groups),
                "workers_per_device": c.workers, "qp_choice": c.qp_choice, "busy_poll_us": c.busy_poll_us,
                "workers": workers}

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
        self.groups.clear()
        self.regions.close()
        self.transport.close()
