"""Exception hierarchy of the FlexEMR embedding layer.

Every error raised by :mod:`flexemr` derives from :class:`FlexEMRError`, and
additionally from the matching builtin so that generic handlers keep working::

    >>> from flexemr.core.errors import LookupIdError
    >>> issubclass(LookupIdError, IndexError)
    True
"""

from __future__ import annotations

__all__ = [
    "FlexEMRError",
    "ConfigError",
    "LookupIdError",
    "InputError",
    "UnknownTableError",
    "ClosedError",
    "TransportError",
    "MetadataError",
]


class FlexEMRError(Exception):
    """Root of every exception raised by the FlexEMR embedding layer."""


class ConfigError(FlexEMRError, ValueError):
    """Invalid table spec, sharding plan or cluster file."""


class LookupIdError(FlexEMRError, IndexError):
    """A lookup id is negative or ``>= num_rows`` of its table."""


class InputError(FlexEMRError, ValueError):
    """A lookup input has the wrong type, dtype or shape."""


class UnknownTableError(InputError, KeyError):
    """A lookup names a table the plan does not know.

    Derives from :class:`KeyError` as well as :class:`InputError`; ``str()``
    returns the plain message (``KeyError`` would otherwise quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ClosedError(FlexEMRError, RuntimeError):
    """The client or server is closed (or was never started)."""


class TransportError(FlexEMRError, ConnectionError):
    """Talking to an embedding server failed (connection lost, remote access refused...).

    The underlying :mod:`rdmaio` exception is chained as ``__cause__``.
    """


class MetadataError(FlexEMRError, ValueError):
    """A server's metadata blob is malformed or does not match the client's plan."""
