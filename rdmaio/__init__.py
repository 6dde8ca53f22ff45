"""rdmaio — one-sided RDMA operations (read, write, atomics) for asyncio.

Layout: the public names below are re-exported from private modules, one
responsibility each::

    _wire.py      sans-I/O protocol: control frames (msgpack) and data frames
    _keys.py      Access flags and RemoteKey capabilities
    _errors.py    the exception hierarchy (root: RdmaioError)
    _region.py    registered memory
    _engine.py    Engine (transport, workers, registration) and Listener
    _endpoint.py  Endpoint: read/write/batches/atomics, queue-pair selection
    _tcp.py       the software transport's queue pairs and responders
    _channel.py   two-sided message channels on write-with-immediate + credits
    _auth.py      shared-secret HMAC challenge-response for every connection (sans-I/O)
    _progress.py  workers: native completions -> asyncio, thread or loop driven
    _native/      the C data path (cffi, compiled at install time)
    _run.py       run() on uvloop when installed

Importing rdmaio changes nothing global: no logging config, no environment edits.
"""

from ._channel import Channel
from ._endpoint import Endpoint
from ._engine import Engine, Listener, available_transports
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
from ._region import MemoryRegion
from ._run import new_event_loop, run

__version__ = "0.1.0"

__all__ = [
    "Access",
    "AccessDeniedError",
    "AlignmentError",
    "AuthenticationError",
    "Channel",
    "ChannelRefusedError",
    "ClosedError",
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
