"""An embedding server on an event loop thread of its own: what a Ray server actor holds.

A Ray actor's methods run on Ray's threads; the rdmaio engine wants one
event loop.  :class:`ServerHost` starts a thread with its own loop
(:func:`rdmaio.new_event_loop`), runs an :class:`~flexemr.EmbeddingServer`
and its metrics endpoint (:func:`flexemr.server.metrics.serve_metrics`) there,
and offers blocking methods for the actor: :meth:`ServerHost.status`,
:meth:`ServerHost.drain`, :meth:`ServerHost.close`.  It needs no Ray, so it is
tested on its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import rdmaio

from ..core.config import ClusterConfig
from ..core.errors import ClosedError
from ..server.metrics import MetricsServer, serve_metrics
from ..server.server import EmbeddingServer

__all__ = ["ServerHost"]

log = logging.getLogger(__name__)


class ServerHost:
    """Runs server ``name`` of ``config`` on ``host:port`` in a thread of its own (module docstring).

    The constructor returns once the server is ready, or raises what its
    start raised (:class:`~flexemr.ConfigError` for a port in use, ...).
    ``metrics_port=None`` serves no metrics; 0 picks a free port.
    """

    def __init__(self, config: ClusterConfig, name: str, *, host: str, port: int, seed: int = 0,
                 npy: Mapping[str, str] | None = None, transport: str = "auto", workers: int = 1,
                 metrics_host: str | None = None, metrics_port: int | None = 0, start_timeout: float = 600.0) -> None:
        self.name = name
        self._server = EmbeddingServer(config, name, host=host, port=port, seed=seed, npy=npy, transport=transport,
                                       engine_options={"workers": workers})
        self._metrics_bind = (metrics_host or host, metrics_port)
        self.metrics: MetricsServer | None = None
        self._loop = rdmaio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flexemr-server-{name}", daemon=True)
        self._thread.start()
        try:
            self._started.result(start_timeout)
        except BaseException:
            self.close()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()
            self._done.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            host, port = self._metrics_bind
            if port is not None:
                self.metrics = serve_metrics(self._server, host, port)
            await self._server.start()
        except BaseException as exc:
            if self.metrics is not None:
                self.metrics.close()
            await self._server.aclose()
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await self._server.aclose()
            if self.metrics is not None:
                self.metrics.close()

    def _call(self, coro: Any, timeout: float) -> Any:
        if self._done.is_set():
            coro.close()
            raise ClosedError(f"server {self.name!r} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def server(self) -> EmbeddingServer:
        """The server (read its state from this thread only for plain attributes)."""
        return self._server

    def status(self) -> dict[str, Any]:
        """Where the server listens, its state, sessions and metrics port (a plain dict)."""
        s = self._server
        addr = s.address if s.state in ("ready", "draining") else None
        return {"server": self.name, "state": s.state, "host": None if addr is None else addr.host,
                "port": None if addr is None else addr.port, "incarnation": s.incarnation, "pid": os.getpid(),
                "sessions": s.sessions, "metrics_port": None if self.metrics is None else self.metrics.port,
                "transport": s.engine.transport if addr is not None else None,
                "shards": len(s.shards), "pool_requests": s.stats.pool_requests}

    def drain(self, timeout: float = 10.0) -> float:
        """:meth:`EmbeddingServer.drain` on the server's loop; returns the seconds it took."""
        took: float = self._call(self._server.drain(timeout), timeout + 30.0)
        return took

    def close(self) -> None:
        """Close the server (no drain) and end the thread. Idempotent."""
        if not self._done.is_set() and self._started.done() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
