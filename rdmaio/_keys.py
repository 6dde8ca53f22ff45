"""Access rights and remote keys.

A :class:`RemoteKey` is a capability: whoever holds it may perform the
operations its ``access`` grants on ``length`` bytes of a peer's region.  It
travels as 40 bytes (:meth:`RemoteKey.to_bytes`).  On the tcp transport the
key is a random 64-bit value and ``addr`` is 0 (remote offsets are relative to
the region); on verbs, ``addr`` is the region's virtual address and ``rkey``
the NIC's 32-bit rkey.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ._errors import UsageError

__all__ = ["Access", "RemoteKey"]


class Access(enum.IntFlag):
    """What a peer may do to a registered region (local access is always allowed).

    >>> Access.READ | Access.WRITE
    <Access.READ|WRITE: 3>
    """

    NONE = 0
    READ = 1
    WRITE = 2
    ATOMIC = 4
    ALL = READ | WRITE | ATOMIC


_TRANSPORTS = {"tcp": 1, "verbs": 2}
_TRANSPORT_NAMES = {v: k for k, v in _TRANSPORTS.items()}
_FMT = struct.Struct("<2sBBBxxxQQQQ")  # magic, version, transport, access, addr, rkey, length, region id
_MAGIC = b"RK"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class RemoteKey:
    """A capability for one remote region.

    >>> k = RemoteKey("tcp", addr=0, rkey=0x1234, length=4096, access=Access.READ, region_id=7)
    >>> RemoteKey.from_bytes(k.to_bytes()) == k
    True
    """

    transport: str
    addr: int
    rkey: int
    length: int
    access: Access
    region_id: int = 0

    def to_bytes(self) -> bytes:
        """Serialise to 40 bytes, e.g. to hand the key to a peer out of band."""
        return _FMT.pack(_MAGIC, _VERSION, _TRANSPORTS[self.transport], int(self.access),
                         self.addr, self.rkey, self.length, self.region_id)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> RemoteKey:
        """Parse :meth:`to_bytes` output; raises :class:`UsageError` on anything else."""
        data = bytes(data)
        if len(data) != _FMT.size:
            raise UsageError(f"a remote key is {_FMT.size} bytes, got {len(data)}")
        magic, version, transport, access, addr, rkey, length, region_id = _FMT.unpack(data)
        if magic != _MAGIC or version != _VERSION:
            raise UsageError("not an rdmaio remote key (bad magic or version)")
        if transport not in _TRANSPORT_NAMES:
            raise UsageError(f"remote key names an unknown transport id {transport}")
        if access & ~int(Access.ALL):
            raise UsageError(f"remote key has unknown access bits {access:#x}")
        return cls(_TRANSPORT_NAMES[transport], addr, rkey, length, Access(access), region_id)
