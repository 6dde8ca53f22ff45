"""An :class:`~flexemr.EmbeddingClient` on a private event-loop thread, callable from any thread.

An ``EmbeddingClient`` is bound to the event loop it connected on.  A torch
model is called synchronously, from whatever thread runs it, usually with
no event loop at all.  :class:`ClientThread` bridges the two: it starts one
thread running its own event loop (:func:`rdmaio.new_event_loop`, uvloop
when installed), connects the client there and runs every lookup there:

* :meth:`ClientThread.call` from any other thread submits the coroutine
  (:func:`asyncio.run_coroutine_threadsafe`) and blocks until it is done;
* ``await`` :meth:`ClientThread.acall` from a coroutine on another event
  loop submits the same way and awaits a wrapped future, so that loop keeps
  running meanwhile.

Concurrent callers share the client, and so its request coalescing and
deduplication.  The thread stops, and the client is closed, when the last
holder lets go: :meth:`ClientThread.close` releases the creator's hold, and
every :class:`~flexemr.torch.RemoteEmbeddingBagCollection` built on it holds
one of its own (released by its ``close()``, or when it is garbage
collected).  Pending calls then fail with :class:`~flexemr.ClosedError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import rdmaio

from ..client.client import EmbeddingClient
from ..core.config import ClusterConfig
from ..core.errors import ClosedError, ConfigError

__all__ = ["ClientThread"]

T = TypeVar("T")

#: How long the thread may take to stop (close the client) before :meth:`ClientThread.close` gives up waiting.
STOP_TIMEOUT = 10.0


class _State:
    """What the loop thread and the handles share (the thread never refers to a handle, so handles can be collected)."""

    def __init__(self, client: EmbeddingClient, connect_timeout: float) -> None:
        self.client = client
        self.connect_timeout = connect_timeout
        self.lock = threading.Lock()
        self.holds = 1
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.pending: set[concurrent.futures.Future[Any]] = set()

    # ----------------------------------------------------------- the thread

    def main(self) -> None:
        try:
            with asyncio.Runner(loop_factory=rdmaio.new_event_loop) as runner:
                self.loop = runner.get_loop()
                runner.run(self.serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the creator, or to pending callers below
            if self.error is None:
                self.error = exc
        finally:
            with self.lock:
                self.closing = True
                pending = list(self.pending)
            for fut in pending:  # submitted but never started: the loop is gone
                if not fut.done():
                    try:
                        fut.set_exception(ClosedError("the client thread stopped"))
                    except concurrent.futures.InvalidStateError:
                        pass
            self.ready.set()

    async def serve(self) -> None:
        self.stop = asyncio.Event()
        try:
            await asyncio.wait_for(self.client.connect(), self.connect_timeout)
        except BaseException as exc:
            self.error = exc
            await self.client.aclose()
            return
        finally:
            self.ready.set()
        try:
            await self.stop.wait()
        finally:
            await self.client.aclose()

    # ---------------------------------------------------------- any thread

    def submit(self, fn: Callable[[EmbeddingClient], Awaitable[T]]) -> concurrent.futures.Future[T]:
        async def run() -> T:
            return await fn(self.client)

        with self.lock:
            if self.closing or self.loop is None:
                raise ClosedError("the client thread is closed")
            if threading.current_thread() is self.thread:
                raise ClosedError("called from the client thread itself, which would wait for itself forever; "
                                  "await the client directly there")
            coro = run()
            try:
                fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
            except RuntimeError as exc:  # the loop closed under us
                coro.close()
                raise ClosedError("the client thread is closed") from exc
            self.pending.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: concurrent.futures.Future[Any]) -> None:
        with self.lock:
            self.pending.discard(fut)

    def hold(self) -> None:
        with self.lock:
            if self.closing or self.holds == 0:
                raise ClosedError("the client thread is closed")
            self.holds += 1

    def release(self, timeout: float = STOP_TIMEOUT) -> None:
        with self.lock:
            if self.holds == 0:
                return
            self.holds -= 1
            if self.holds:
                return
            self.closing = True
        self.shutdown(timeout)

    def shutdown(self, timeout: float) -> None:
        loop, stop = self.loop, self.stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # already closed
                pass
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)


def _release(state: _State) -> None:
    state.release()


class ClientThread:
    """An :class:`~flexemr.EmbeddingClient` running on its own event-loop thread (module docstring).

    Parameters
    ----------
    client:
        A :class:`~flexemr.ClusterConfig` or the path of a cluster file (a
        client is created with ``client_options``), or an
        :class:`~flexemr.EmbeddingClient` that is not connected yet (it is
        connected on the thread, and closed with it).  A client that is
        already connected is bound to another event loop and is refused
        (:class:`~flexemr.ConfigError`).
    connect_timeout:
        Seconds the constructor waits for the connection; a failure to
        connect is raised by the constructor.
    client_options:
        Keyword arguments of :class:`~flexemr.EmbeddingClient` (``transport``,
        ``cache_bytes``, ``server_pooling``...), with a config or path only.

    >>> # with ClientThread("cluster.toml", transport="tcp") as ct:
    >>> #     pooled = ct.call(lambda c: c.lookup_pooled(batch, "sum"))      # from any thread
    >>> #     pooled = await ct.acall(lambda c: c.lookup_pooled(batch))     # from another event loop
    """

    def __init__(self, client: EmbeddingClient | ClusterConfig | str | os.PathLike[str], *,
                 connect_timeout: float = 60.0, **client_options: Any) -> None:
        if isinstance(client, (str, os.PathLike)):
            client = ClusterConfig.from_toml(client)
        if isinstance(client, ClusterConfig):
            ec = EmbeddingClient(client, **client_options)
        elif isinstance(client, EmbeddingClient):
            if client_options:
                raise ConfigError(f"client options {sorted(client_options)} apply only when a ClusterConfig is "
                                  "given; set them on the EmbeddingClient")
            if client.connected:
                raise ConfigError("this EmbeddingClient is already connected, so it is bound to the event loop it "
                                  "connected on; give the ClusterConfig, or a client that is not connected yet")
            ec = client
        else:
            raise ConfigError("expected a ClusterConfig, a cluster file path or an unconnected EmbeddingClient, "
                              f"got {type(client).__name__}")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or connect_timeout <= 0:
            raise ConfigError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
        state = _State(ec, float(connect_timeout))
        state.thread = threading.Thread(target=state.main, name="flexemr-client", daemon=True)
        state.thread.start()
        state.ready.wait()
        if state.error is not None:
            state.release()
            raise state.error
        self._state = state
        self._finalizer = weakref.finalize(self, _release, state)

    def __repr__(self) -> str:
        return f"<ClientThread {'closed' if self.closed else 'running'} {self._state.client!r}>"

    @property
    def client(self) -> EmbeddingClient:
        """The client (use it only on the thread's loop, i.e. inside functions given to :meth:`call`)."""
        return self._state.client

    @property
    def config(self) -> ClusterConfig:
        """The cluster the client talks to."""
        return self._state.client.config

    @property
    def closed(self) -> bool:
        """Whether the thread has been told to stop (every holder released it)."""
        return self._state.closing

    def call(self, fn: Callable[[EmbeddingClient], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``await fn(client)`` on the thread's loop and return its result (blocks the calling thread).

        Exceptions propagate.  ``timeout`` (seconds): :class:`TimeoutError`
        when it passes, and the call is cancelled.  Interrupting the wait
        (Ctrl-C) cancels the call too.
        """
        fut = self._state.submit(fn)
        try:
            return fut.result(timeout)
        except concurrent.futures.CancelledError:
            raise ClosedError("the client thread closed during the call") from None
        except BaseException:
            fut.cancel()
            raise

    async def acall(self, fn: Callable[[EmbeddingClient], Awaitable[T]]) -> T:
        """``await fn(client)`` on the thread's loop, awaited from another event loop (which keeps running)."""
        if asyncio.get_running_loop() is self._state.loop:
            return await fn(self._state.client)
        fut = self._state.submit(fn)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if fut.cancelled() and self._state.closing:
                raise ClosedError("the client thread closed during the call") from None
            raise

    def _hold(self, owner: object) -> weakref.finalize[Any, Any]:
        """Hold the thread for ``owner``; calling the returned finalizer, or collecting ``owner``, releases it."""
        self._state.hold()
        return weakref.finalize(owner, _release, self._state)

    def close(self) -> None:
        """Release the creator's hold: the thread stops and the client closes once no module holds it. Idempotent."""
        self._finalizer()

    def __enter__(self) -> ClientThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
