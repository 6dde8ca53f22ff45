"""Progress: turning native completions into resolved futures.

Each worker owns one native epoll set and completion queue
(``rio_worker``).  A *round* (:func:`rio_worker_poll`) waits for readiness,
services every ready connection in C and collects completions into arrays.

``progress="thread"``
    A thread per worker blocks in the round (GIL released; no spinning unless
    ``Engine(poll_spin_us=...)`` asks for a bounded poll after busy rounds),
    copies the batch out and hands it to the event loop with at most one
    wake-up per batch: a write to an eventfd the loop watches, made without
    the GIL (batches that arrive while one is queued ride along: one loop
    wake-up per poll round at most).
``progress="loop"``
    No thread: the worker's epoll fd is registered with ``loop.add_reader``
    and rounds run on the loop thread with a zero timeout.

A worker thread may be pinned to a set of CPUs (``Engine(worker_cpus=...)``).
A native round may return holding a lock on its completion source (verbs:
the CQ's poll lock) until the batch is copied out and queued
(:meth:`Worker._native_release`); a busy poll from the event loop
(:meth:`Worker.busy_poll`, verbs) takes that lock too, so it delivers the
batches the worker queued before its own: completions keep their order.

Every batch goes to one :class:`Router`, the only place that knows which
object owns a connection id: it hands the ids out, keeps the table and routes
each completion, immediate and death event to its owner.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ._native._rdmaio_native import ffi, lib

__all__ = ["CompletionSink", "Connection", "Router", "Worker"]

log = logging.getLogger(__name__)

#: (cq_conn, cq_wr, cq_status, cq_value, ev_conn, ev_code, rx_conn, rx_imm)
Batch = tuple[list[int], list[int], list[int], list[int], list[int], list[int], list[int], list[int]]


class CompletionSink(Protocol):
    def _on_batch(self, batch: Batch) -> None: ...

    def _on_worker_failed(self, index: int, err: int) -> None:
        """The worker's poll failed for good (``err`` an errno): nothing it owns completes any more."""


class Connection(Protocol):
    """What a router routes to: a queue pair or a responder, known by its connection id."""

    conn_id: int

    def _complete(self, wr: int, status: int, value: int) -> None: ...

    def _on_imm(self, imm: int) -> None: ...

    def _on_dead(self, code: int) -> None: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Connection)


class Router:
    """Connection ids and completion routing, in one place.

    Each native connection carries a 32-bit id that its worker reports with
    every completion, receive event and death.  Connections enter the table
    through :meth:`open` (which picks the id) and leave it through
    :meth:`close`; nothing else writes it.  ``on_worker_failed(index, errno)``
    is told when a worker's poll fails for good.
    """

    __slots__ = ("_owners", "_last", "_on_worker_failed_cb")

    def __init__(self, on_worker_failed: Callable[[int, int], None]) -> None:
        self._owners: dict[int, Connection] = {}
        self._last = 0
        self._on_worker_failed_cb = on_worker_failed

    def __len__(self) -> int:
        return len(self._owners)

    def owners(self) -> list[Connection]:
        return list(self._owners.values())

    def open(self, make: Callable[[int], C]) -> C:
        """``make(conn_id)`` with a fresh id (never 0, never one in use); the result is routed to from now on."""
        cid = self._last
        while True:
            cid = cid % 0xFFFFFFFF + 1
            if cid not in self._owners:
                break
        self._last = cid
        conn = make(cid)
        self._owners[cid] = conn
        return conn

    def close(self, conn: Connection) -> None:
        """Stop routing to ``conn`` and close it (idempotent)."""
        if self._owners.get(conn.conn_id) is conn:
            del self._owners[conn.conn_id]
        conn.close()

    def close_all(self) -> None:
        owners = list(self._owners.values())
        self._owners.clear()
        for conn in owners:
            conn.close()

    # -- the completion sink of every worker --------------------------------------------
    def _on_batch(self, batch: Batch) -> None:
        conns, wrs, statuses, values, ev_conns, ev_codes, rx_conns, rx_imms = batch
        get = self._owners.get
        for i in range(len(wrs)):
            owner = get(conns[i])
            if owner is not None:
                owner._complete(wrs[i], statuses[i], values[i])
        for c, imm in zip(rx_conns, rx_imms):  # WRITE_IMM landed in our memory
            owner = get(c)
            if owner is not None:
                owner._on_imm(imm)
        for c, code in zip(ev_conns, ev_codes):
            owner = get(c)
            if owner is not None:
                owner._on_dead(code)

    def _on_worker_failed(self, index: int, err: int) -> None:
        self._on_worker_failed_cb(index, err)


class Worker:
    """One progress context: a native worker plus its driver (thread or loop reader)."""

    #: the native worker reports WRITE_IMM receive events (rx_conn / rx_imm arrays)
    _has_rx = True

    def __init__(self, index: int, sink: CompletionSink, mode: str, loop: asyncio.AbstractEventLoop,
                 cq_depth: int = 4096, cpus: frozenset[int] | None = None) -> None:
        self.index = index
        self._sink = sink
        self._mode = mode
        self._loop = loop
        #: CPUs the worker's thread is pinned to (None: not pinned)
        self.cpus = cpus
        #: why pinning failed, if it did (the thread then runs unpinned)
        self.cpu_error: str | None = None
        self.c = self._native_new(cq_depth)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._queue: collections.deque[Batch] = collections.deque()
        self._scheduled = False
        self._qlock = threading.Lock()
        self._reader = False
        self._free_on_exit = False
        #: thread mode: the eventfd the thread wakes the loop through (-1: none)
        self._notify = -1

    def start(self) -> None:
        if self._mode == "thread":
            # the thread wakes the loop by writing an eventfd the loop watches: Python makes that system call
            # without the GIL (call_soon_threadsafe makes it holding the GIL, which the woken loop then waits for)
            self._notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._loop.add_reader(self._notify, self._on_notify)
            self._thread = threading.Thread(target=self._run, name=f"rdmaio-worker-{self.index}", daemon=True)
            self._thread.start()
        else:
            self._loop.add_reader(self._fd(), self._poll_on_loop)
            self._reader = True

    # -- both modes -----------------------------------------------------------
    def _collect(self) -> Batch:
        w = self.c
        ncq, nev = w.ncq, w.nev
        nrx = w.nrx if self._has_rx else 0
        return (
            ffi.unpack(w.cq_conn, ncq) if ncq else [],
            ffi.unpack(w.cq_wr, ncq) if ncq else [],
            ffi.unpack(w.cq_status, ncq) if ncq else [],
            ffi.unpack(w.cq_value, ncq) if ncq else [],
            ffi.unpack(w.ev_conn, nev) if nev else [],
            ffi.unpack(w.ev_code, nev) if nev else [],
            ffi.unpack(w.rx_conn, nrx) if nrx else [],
            ffi.unpack(w.rx_imm, nrx) if nrx else [],
        )

    # -- loop mode ------------------------------------------------------------
    def _poll_on_loop(self) -> None:
        if self._stopping:
            return
        n = self._native_poll(0)
        try:
            batch = self._collect() if n > 0 else None
        finally:
            self._native_release()
        if batch is not None:
            self._sink._on_batch(batch)
        elif n < 0:
            log.error("worker %d: poll failed with errno %d", self.index, -n)
            self.stop()
            self._sink._on_worker_failed(self.index, -n)
            return
        if self._native_backlog():
            self._loop.call_soon(self._poll_on_loop)

    # -- thread mode ----------------------------------------------------------
    def _run(self) -> None:
        if self.cpus is not None:
            try:  # pid 0: this thread only
                os.sched_setaffinity(0, self.cpus)
            except OSError as exc:
                self.cpu_error = str(exc)
                log.warning("worker %d: could not pin to CPUs %s: %s", self.index, sorted(self.cpus), exc)
        try:
            self._rounds()
        finally:
            if self._free_on_exit:  # freed from this very thread (by a finalizer GC ran here)
                self._native_free()
                self.c = None
                self._close_notify()

    def _rounds(self) -> None:
        poll, release = self._native_poll, self._native_release
        while not self._stopping:
            n = poll(-1)
            wake = queued = False
            try:  # queued before the lock goes: a busy poll taking it next delivers this batch first
                if n > 0 and not self._stopping:
                    batch = self._collect()
                    with self._qlock:
                        self._queue.append(batch)
                        wake = not self._scheduled
                        self._scheduled = True
                    queued = True
            finally:
                release()
            if queued:
                if wake:
                    if self._loop.is_closed():  # nobody is left to deliver to
                        return
                    os.eventfd_write(self._notify, 1)
            elif n < 0:
                log.error("worker %d: poll failed with errno %d", self.index, -n)
                try:  # fail what it owned instead of leaving it pending forever
                    self._loop.call_soon_threadsafe(self._sink._on_worker_failed, self.index, -n)
                except RuntimeError:
                    pass
                return

    def _close_notify(self) -> None:
        if self._notify >= 0:
            os.close(self._notify)
            self._notify = -1

    def _on_notify(self) -> None:
        try:
            os.eventfd_read(self._notify)
        except BlockingIOError:  # a drain already took what the wake-up was for
            pass
        self._drain()

    def _drain(self) -> None:
        with self._qlock:
            batches = list(self._queue)
            self._queue.clear()
            self._scheduled = False
        for batch in batches:
            self._sink._on_batch(batch)

    def _take_queued(self) -> list[Batch]:
        """The batches the thread queued and the loop has not delivered yet (its drain finds them gone)."""
        with self._qlock:
            batches = list(self._queue)
            self._queue.clear()
        return batches

    def busy_poll(self, budget_us: int) -> bool:
        """Poll the completion source from the event loop for up to ``budget_us`` µs (if the transport
        can); True if completions were delivered.  The base worker cannot: False."""
        return False

    def wake(self) -> None:
        self._native_wake()

    def stop(self) -> None:
        """Stop the driver (joins the thread); the native worker stays until :meth:`free`."""
        self._stopping = True
        t = self._thread
        if t is not None:
            self._native_wake()
            if t is not threading.current_thread():  # on it (a finalizer run by GC there): it exits by itself
                t.join()
                self._thread = None
        if self._notify >= 0:
            try:
                self._loop.remove_reader(self._notify)
            except Exception:  # loop already closed
                pass
            if self._thread is None:  # joined: nothing writes it any more (else the thread, freed there, closes it)
                self._close_notify()
        if self._reader:
            try:
                self._loop.remove_reader(self._fd())
            except Exception:  # loop already closed
                pass
            self._reader = False

    def free(self) -> None:
        """Free the native worker (after :meth:`stop`)."""
        if self.c is None:
            return
        if self._thread is not None and self._thread is threading.current_thread():
            self._free_on_exit = True  # this thread still runs its round: it frees the worker on the way out
            return
        self._native_free()
        self.c = None

    # -- the native worker (overridden by transports with another completion source,
    #    e.g. rdmaio.transports._ibv.VerbsWorker; the batch arrays keep the same field names) --
    def _native_new(self, cq_depth: int) -> Any:
        c = lib.rio_worker_new(cq_depth)
        if c == ffi.NULL:
            raise MemoryError("could not create a native worker (epoll/eventfd/memory)")
        return c

    def _native_poll(self, timeout_ms: int) -> int:
        return int(lib.rio_worker_poll(self.c, timeout_ms))

    def _native_release(self) -> None:
        """After a round: its arrays are copied out (verbs: releases the CQ's poll lock)."""

    def _native_backlog(self) -> bool:
        return bool(lib.rio_worker_backlog(self.c))

    def _native_wake(self) -> None:
        lib.rio_worker_wake(self.c)

    def _native_free(self) -> None:
        lib.rio_worker_free(self.c)

    def _fd(self) -> int:
        return int(self.c.epfd)
