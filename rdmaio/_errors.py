"""The rdmaio exception hierarchy.

One root, :class:`RdmaioError`, then families that tell a caller what to do:

* misuse of the API (:class:`UsageError`, also a :class:`ValueError`) — fix the call;
* the remote side refused an operation (:class:`RemoteAccessError` and its
  subclasses, carrying the completion ``status``) — like an RDMA NIC's remote
  access / invalid key completion errors; the endpoint stays usable;
* the world broke it (:class:`EndpointBrokenError`, with ``__cause__`` when
  there is one) — the peer is gone, every in-flight operation fails promptly;
* you closed it (:class:`ClosedError`) — use after ``aclose()``;
* :class:`TimeoutError` — an operation or handshake took longer than allowed;
* :class:`ProtocolError` — the peer broke the wire protocol;
* :class:`TransportUnavailableError` — the requested transport cannot run here.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AccessDeniedError",
    "AlignmentError",
    "AuthenticationError",
    "ChannelRefusedError",
    "ClosedError",
    "EndpointBrokenError",
    "InvalidKeyError",
    "InvalidRequestError",
    "OutOfBoundsError",
    "ProtocolError",
    "RdmaioError",
    "RegionNotFoundError",
    "RemoteAccessError",
    "TimeoutError",
    "TransportUnavailableError",
    "UsageError",
]


class RdmaioError(Exception):
    """Root of every error rdmaio raises on purpose."""


class UsageError(RdmaioError, ValueError):
    """The API was called wrongly (bad offsets, lengths, dtypes, flags ...)."""


class ClosedError(RdmaioError):
    """The engine, endpoint, listener or region was closed by its owner."""


class TransportUnavailableError(RdmaioError):
    """The requested transport cannot be used on this machine; the message says why."""


class ProtocolError(RdmaioError):
    """The peer sent bytes that break the rdmaio wire protocol."""


class AuthenticationError(RdmaioError, PermissionError):
    """The peer could not be authenticated (no secret, wrong secret, or no proof)."""


class TimeoutError(RdmaioError, builtins.TimeoutError):
    """An operation, connect or handshake did not finish in the allowed time."""


class EndpointBrokenError(RdmaioError, ConnectionError):
    """The connection to the peer broke; operations in flight on it have failed."""


class RegionNotFoundError(RdmaioError, KeyError):
    """The peer exposes no region under that name."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message
        return str(self.args[0]) if self.args else ""


class ChannelRefusedError(RdmaioError):
    """The peer serves no channel under that name (or cannot open one now)."""


class RemoteAccessError(RdmaioError):
    """The target refused the operation; ``status`` is the completion status code."""

    status: int = 0

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidKeyError(RemoteAccessError):
    """No valid region matches the remote key (never registered, or deregistered)."""

    status = 1


class AccessDeniedError(RemoteAccessError):
    """The region does not grant the access this operation needs."""

    status = 2


class OutOfBoundsError(RemoteAccessError):
    """The operation reaches outside the remote region."""

    status = 3


class AlignmentError(RemoteAccessError):
    """An atomic operation's remote address is not 8-byte aligned."""

    status = 4


class InvalidRequestError(RemoteAccessError):
    """The target rejected the request as malformed."""

    status = 5


_BY_STATUS: dict[int, type[RemoteAccessError]] = {
    cls.status: cls
    for cls in (InvalidKeyError, AccessDeniedError, OutOfBoundsError, AlignmentError, InvalidRequestError)
}


def error_for_status(status: int, what: str) -> RemoteAccessError:
    """Map a completion status to its exception (``what`` names the operation)."""
    cls = _BY_STATUS.get(status, RemoteAccessError)
    doc = (cls.__doc__ or "remote error").splitlines()[0].rstrip(".")
    return cls(f"{what} failed (status {status}): {doc[0].lower()}{doc[1:]}", status)
