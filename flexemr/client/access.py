"""What :class:`~flexemr.EmbeddingClient` offers besides lookups and updates: the replica plumbing
that tools and the update protocol use (:class:`~flexemr.client.replica.ReplicaHost`), and each
:class:`~flexemr.ClientOptions` field read as an attribute (``client.server_pooling``)."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

import rdmaio

from .options import ClientOptions

if TYPE_CHECKING:
    from .peers import Peers

__all__ = ["ClientAccess"]

_OPTION_FIELDS = frozenset(f.name for f in fields(ClientOptions))


class ClientAccess:
    """Mixin of :class:`~flexemr.EmbeddingClient`: needs ``self._peers`` and ``self.options``."""

    _peers: Peers
    options: ClientOptions

    def replica_endpoint(self, server: str) -> rdmaio.Endpoint | None:
        """The live endpoint to ``server`` (``None`` while it is down)."""
        return self._peers.replica_endpoint(server)

    def replica_key(self, server: str, region: str) -> rdmaio.RemoteKey | None:
        """The key of ``region``'s own region on ``server`` (``None`` while it is down)."""
        return self._peers.replica_key(server, region)

    async def wait_connected(self, server: str, timeout: float) -> bool:
        """Hurry the reconnection of ``server`` and wait up to ``timeout`` s for it; True if connected."""
        return await self._peers.wait_connected(server, timeout)

    def __getattr__(self, name: str) -> Any:
        # only called for names not found otherwise: the options, read-only (client.cache_admit, ...)
        if name in _OPTION_FIELDS:
            return getattr(self.__dict__["options"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
