"""rdmaio — one-sided RDMA operations (read, write, atomics) for asyncio.

Layout: the public names below are re-exported from private modules, one
responsibility each (lower layers never import higher ones; see docs/architecture.md)::

    _errors.py _keys.py _wire.py _auth.py _run.py
                  errors; Access and RemoteKey; wire codecs (sans-I/O); HMAC auth; run()
    _control.py   the control plane as sans-I/O state machines (client and server ends)
    _sockets.py   socket glue around them
    _progress.py  workers (native completions -> asyncio) and the Router (connection ids)
    _region.py    MemoryRegion and the RegionTable that owns regions
    transports/   the transport seam (base.py) and the tcp and verbs transports
    _channel.py   two-sided message channels on write-with-immediate + credits
    _credits.py   Credits: a FIFO window of operations and bytes (flow control per class of traffic)
    _core.py      an engine's state, shared by its listeners and endpoints
    _endpoint.py  Endpoint: read/write/batches/atomics, queue-pair selection
    _listener.py  Listener: sessions, key lookups, channel admission
    _engine.py    Engine, the public face of _core
    _native/      the C data path (cffi, compiled at install time)

Importing rdmaio changes nothing global: no logging config, no environment edits.
"""

from ._channel import Channel
from ._credits import Credits
from ._endpoint import Endpoint
from ._engine import Engine
from ._errors import (
    AccessDeniedError,
    AlignmentError,
    AuthenticationError,
    ChannelRefusedError,
    ClosedError,
    EndpointBrokenError,
    InvalidKeyError,
    InvalidRequestError,
    OutOfBoundsError,
    ProtocolError,
    RdmaioError,
    RegionNotFoundError,
    RemoteAccessError,
    TimeoutError,
    TransportUnavailableError,
    UsageError,
)
from ._keys import Access, RemoteKey
from ._listener import Listener
from ._region import MemoryRegion
from ._run import new_event_loop, run
from .transports import available_transports

__version__ = "0.1.0"

__all__ = [
    "Access",
    "AccessDeniedError",
    "AlignmentError",
    "AuthenticationError",
    "Channel",
    "ChannelRefusedError",
    "ClosedError",
    "Credits",
    "Endpoint",
    "EndpointBrokenError",
    "Engine",
    "InvalidKeyError",
    "InvalidRequestError",
    "Listener",
    "MemoryRegion",
    "OutOfBoundsError",
    "ProtocolError",
    "RdmaioError",
    "RegionNotFoundError",
    "RemoteAccessError",
    "RemoteKey",
    "TimeoutError",
    "TransportUnavailableError",
    "UsageError",
    "available_transports",
    "new_event_loop",
    "run",
]
