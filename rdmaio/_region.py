"""Registered memory: regions and the table that owns them.

A :class:`MemoryRegion` pins a writable, C-contiguous buffer (numpy array,
bytearray, mmap ...) for the life of the registration.  It counts local
operations in flight (``_pins``) and the target side counts remote ones
(the transport's ``busy`` count).  :meth:`MemoryRegion.close` revokes remote
access at once, but the buffer reference is dropped only when both counts are
zero — a cancelled operation can never have its memory freed under it.

The :class:`RegionTable` of an engine owns its regions: it registers them with
the transport (:class:`RegionBackend`), serves the names peers ask for, keeps
closed-but-busy regions as *zombies* and reaps them (on the last unpin, or by
a 10 ms poll of the remote busy count, which has no event).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Protocol

from ._errors import ClosedError, UsageError
from ._keys import Access, RemoteKey
from ._native._rdmaio_native import ffi

__all__ = ["MemoryRegion", "RegionBackend", "RegionTable"]

#: how often closed regions that remote requests still use are polled
REAP_INTERVAL = 0.01


class RegionBackend(Protocol):
    """What a transport does for the region table (see :class:`rdmaio.transports.base.Transport`)."""

    def register(self, addr: int, length: int, access: Access) -> tuple[int, int]:
        """Make ``[addr, addr+length)`` accessible to peers: ``(key, index)`` for the region."""
        ...

    def key(self, mr: MemoryRegion) -> RemoteKey:
        """The capability peers use to reach ``mr``."""
        ...

    def revoke(self, mr: MemoryRegion) -> None:
        """New remote requests on ``mr`` fail from now on."""
        ...

    def busy(self, mr: MemoryRegion) -> int:
        """Remote requests still executing on ``mr`` (the memory must stay)."""
        ...

    def release(self, mr: MemoryRegion) -> None:
        """Drop the registration of a region nothing uses any more."""
        ...


class MemoryRegion:
    """Memory registered with an :class:`~rdmaio.Engine`.

    Create with :meth:`Engine.register`::

        buf = numpy.zeros(1 << 20, dtype=numpy.uint8)
        mr = engine.register(buf, access=rdmaio.Access.READ | rdmaio.Access.WRITE)
        key = mr.remote_key()     # hand to peers, or engine.expose("name", mr)
    """

    __slots__ = ("_table", "_view", "_cdata", "addr", "length", "access", "_key", "_index", "_pins", "_closed",
                 "__weakref__")

    def __init__(self, table: RegionTable, buf: memoryview, access: Access, cdata: Any, addr: int, key: int,
                 index: int) -> None:
        self._table = table
        self._view: memoryview | None = buf
        self._cdata = cdata
        #: virtual address of the first byte
        self.addr = addr
        #: size in bytes
        self.length = len(buf)
        #: rights granted to peers
        self.access = access
        self._key = key
        self._index = index
        self._pins = 0
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MemoryRegion {self.length} B access={self.access!r} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffer(self) -> memoryview:
        """The registered bytes as a writable ``memoryview`` of unsigned bytes."""
        if self._view is None:
            raise ClosedError("memory region is closed")
        return self._view

    def remote_key(self) -> RemoteKey:
        """The capability a peer needs to access this region."""
        if self._closed:
            raise ClosedError("memory region is closed")
        if not self.access:
            raise UsageError("region was registered without remote access (Access.NONE)")
        return self._table.key(self)

    def _check_local(self, offset: int, length: int) -> None:
        if self._closed:
            raise ClosedError("local memory region is closed")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise UsageError(f"local range [{offset}, {offset + length}) outside the {self.length}-byte region")

    def _pin(self) -> None:
        self._pins += 1

    def _unpin(self) -> None:
        self._pins -= 1
        if self._closed and self._pins == 0:
            self._table.reap(self)

    def _release(self) -> None:
        self._view = None
        self._cdata = None

    def close(self) -> None:
        """Deregister: peers lose access now; the buffer is released once no operation uses it.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._table.deregister(self)

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegionTable:
    """An engine's regions: registration, exposed names, deferred release of closed regions."""

    def __init__(self, backend: RegionBackend) -> None:
        self._backend = backend
        self._regions: weakref.WeakSet[MemoryRegion] = weakref.WeakSet()
        self._zombies: set[MemoryRegion] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._names: dict[str, MemoryRegion] = {}
        #: the engine's loop once it started (the reaper's timer runs on it)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def register(self, buf: Any, access: Access) -> MemoryRegion:
        """Validate ``buf`` and register it with the transport."""
        try:
            mv = memoryview(buf)
        except TypeError:
            raise UsageError(f"cannot register {type(buf).__name__}: it does not support the buffer protocol") from None
        if mv.readonly:
            raise UsageError("cannot register a read-only buffer")
        if not mv.c_contiguous:
            raise UsageError("cannot register a non-contiguous buffer")
        if mv.nbytes == 0:
            raise UsageError("cannot register an empty buffer")
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        access = Access(access)
        cdata = ffi.from_buffer(mv, require_writable=True)  # holds the buffer while registered
        addr = int(ffi.cast("uintptr_t", cdata))
        key, index = self._backend.register(addr, mv.nbytes, access)
        mr = MemoryRegion(self, mv, access, cdata, addr, key, index)
        self._regions.add(mr)
        return mr

    def key(self, mr: MemoryRegion) -> RemoteKey:
        return self._backend.key(mr)

    # -- names peers ask for ------------------------------------------------------------------
    def expose(self, name: str, mr: MemoryRegion) -> None:
        if not isinstance(name, str) or not name:
            raise UsageError("region names are non-empty strings")
        if mr.closed or mr._table is not self:
            raise UsageError("expose a live region registered with this engine")
        if not mr.access:
            raise UsageError("a region registered with Access.NONE cannot be exposed")
        self._names[name] = mr

    def unexpose(self, name: str) -> None:
        self._names.pop(name, None)

    def lookup(self, name: Any) -> MemoryRegion | None:
        """The live region exposed as ``name`` (any value a peer sent), else None."""
        mr = self._names.get(name) if isinstance(name, str) else None
        return None if mr is None or mr.closed else mr

    # -- closing and deferred release ---------------------------------------------------------
    def deregister(self, mr: MemoryRegion) -> None:
        """``mr`` was closed: revoke remote access and names now, release once nothing uses it."""
        for name in [n for n, r in self._names.items() if r is mr]:
            del self._names[name]
        if self._closed:
            return
        self._backend.revoke(mr)
        if mr._pins > 0 or self._backend.busy(mr) > 0:
            self._zombies.add(mr)  # released by reap once nothing touches it
            self._schedule_reaper()
        else:
            self._release(mr)

    def reap(self, mr: MemoryRegion) -> None:
        if mr._pins == 0 and not self._closed and self._backend.busy(mr) == 0:
            self._zombies.discard(mr)
            self._release(mr)

    def _release(self, mr: MemoryRegion) -> None:
        if mr._view is not None:
            self._backend.release(mr)
        mr._release()

    def _schedule_reaper(self) -> None:
        """One timer polls every closed-but-busy region (remote busy counts have no event)."""
        if self._reaper is None and self._zombies and not self._closed and self.loop is not None:
            self._reaper = self.loop.call_later(REAP_INTERVAL, self._reap_zombies)

    def _reap_zombies(self) -> None:
        self._reaper = None
        for mr in list(self._zombies):
            self.reap(mr)
        self._schedule_reaper()

    def close(self) -> None:
        """Release every region (the engine is going: no operation runs any more). Idempotent."""
        if self._closed:
            return
        for mr in list(self._regions):
            mr._closed = True
            self._release(mr)
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        self._zombies.clear()
        self._names.clear()
        self._regions.clear()
