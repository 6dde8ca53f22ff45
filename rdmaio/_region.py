"""Registered memory regions.

A :class:`MemoryRegion` pins a writable, C-contiguous buffer (numpy array,
bytearray, mmap ...) for the life of the registration.  It counts local
operations in flight (``_pins``) and the target side counts remote ones in the
native region table (``busy``).  :meth:`MemoryRegion.close` revokes remote
access at once, but the buffer reference is dropped only when both counts are
zero — a cancelled operation can never have its memory freed under it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ClosedError, UsageError
from ._keys import Access, RemoteKey

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["MemoryRegion"]


class MemoryRegion:
    """Memory registered with an :class:`~rdmaio.Engine`.

    Create with :meth:`Engine.register`::

        buf = numpy.zeros(1 << 20, dtype=numpy.uint8)
        mr = engine.register(buf, access=rdmaio.Access.READ | rdmaio.Access.WRITE)
        key = mr.remote_key()     # hand to peers, or engine.expose("name", mr)
    """

    __slots__ = ("_engine", "_view", "_cdata", "addr", "length", "access", "_key", "_index", "_pins", "_closed",
                 "__weakref__")

    def __init__(self, engine: Engine, buf: Any, access: Access, cdata: Any, addr: int, key: int, index: int) -> None:
        self._engine = engine
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
        return self._engine._transport_key(self)

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
            self._engine._reap(self)

    def _in_use(self) -> bool:
        return self._pins > 0 or self._engine._remote_busy(self) > 0

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
        self._engine._deregister(self)

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
