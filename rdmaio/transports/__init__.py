"""rdmaio's transports (internal): what runs under :class:`~rdmaio.Engine`.

    base.py    the seam: Transport, ClientLink / ServerLink, QueuePair (shared bookkeeping)
    tcp.py     the software transport: stream sockets, a NIC-like responder in C
    verbs.py   RC queue pairs on RDMA NICs (device layer: _ibv.py; loads libibverbs lazily)

A transport is chosen by name (:data:`TRANSPORTS`); adding one is adding a
module with a :class:`~rdmaio.transports.base.Transport` subclass and listing
it here.
"""

from __future__ import annotations

from .._errors import TransportUnavailableError, UsageError
from ._ibv import check_device_args, unavailable_reason
from .base import Transport, TransportOptions
from .tcp import TcpTransport
from .verbs import VerbsTransport

__all__ = ["TRANSPORTS", "available_transports", "open_transport"]

#: every transport, by name
TRANSPORTS: dict[str, type[Transport]] = {"tcp": TcpTransport, "verbs": VerbsTransport}


def available_transports() -> dict[str, str | None]:
    """Each transport's availability: ``None`` if usable here, else the reason it is not.

    Probing verbs loads libibverbs (the optional ``_rdmaio_verbs`` extension) on first use.
    """
    return {name: cls.unavailable_reason() for name, cls in TRANSPORTS.items()}


def open_transport(name: str, options: TransportOptions) -> Transport:
    """The transport ``name`` (``"auto"``: verbs when a device with an ACTIVE port exists, else tcp)."""
    if options.device is not None or options.port is not None or options.gid_index is not None:
        check_device_args(options.device, options.port, options.gid_index)
    if name == "auto":
        name = "verbs" if unavailable_reason() is None else "tcp"
    cls = TRANSPORTS.get(name)
    if cls is None:
        raise UsageError(f"unknown transport {name!r}; choose 'tcp', 'verbs' or 'auto'")
    reason = cls.unavailable_reason()
    if reason is not None:
        raise TransportUnavailableError(f"transport {name!r} unavailable: {reason}")
    return cls(options)
