"""What :class:`~flexemr.EmbeddingClient` offers besides lookups and updates: its servers' state
(endpoints, keys, metadata, replica status, health, measured load), the replica plumbing that tools
and the update protocol use (:class:`~flexemr.client.replica.ReplicaHost`), and each
:class:`~flexemr.ClientOptions` field read as an attribute (``client.server_pooling``)."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

import rdmaio

from ..core.meta import ServerMeta
from .options import ClientOptions

if TYPE_CHECKING:
    from .lanes import Lanes
    from .peers import Peers

__all__ = ["ClientAccess"]

_OPTION_FIELDS = frozenset(f.name for f in fields(ClientOptions))


class ClientAccess:
    """Mixin of :class:`~flexemr.EmbeddingClient`: needs ``self._peers`` and ``self.options``."""

    _peers: Peers
    _lanes: Lanes
    options: ClientOptions

    def _check_open(self) -> None:
        raise NotImplementedError

    def endpoint(self, server: str) -> rdmaio.Endpoint:
        """The rdmaio endpoint to ``server`` (for tools that issue their own reads).

        :class:`TransportError` while the server is down (reconnecting).
        """
        self._check_open()
        return self._peers.endpoint(server)

    def shard_key(self, region_name: str, server: str | None = None) -> rdmaio.RemoteKey:
        """The remote key of a shard's own region (offsets relative to the shard).

        ``server``: which replica (default: the shard's primary ``Shard.server``).
        """
        self._check_open()
        return self._peers.shard_key(region_name, server)

    def server_meta(self, server: str) -> ServerMeta:
        """The metadata ``server`` published."""
        self._check_open()
        return self._peers.meta[server]

    def replica_status(self) -> dict[str, list[str]]:
        """Region -> replicas lookups currently read from (in-sync, connected)."""
        return self._peers.replica_status()

    def healthy(self) -> bool:
        """True when every server is connected and every replica of every shard serves reads."""
        return self._peers.healthy()

    async def wait_healthy(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until :meth:`healthy`; returns whether it is."""
        return await self._peers.wait_healthy(timeout)

    def peer_failed(self, server: str, exc: BaseException, ep: rdmaio.Endpoint | None = None) -> None:
        """Treat ``server`` as failed (``exc`` says why): drop its endpoint, reroute, reconnect in the background.

        ``ep``: the endpoint a failed operation used; nothing happens if the
        server was already reconnected through another one.
        """
        self._peers.peer_failed(server, exc, ep)


    def server_load(self) -> dict[str, dict[str, float]]:
        """What this client measured of every server (:mod:`flexemr.client.load`): outstanding work units
        and requests, seconds per work unit (``spu``), latency EWMA (s), requests completed."""
        return self._lanes.tracker.snapshot()

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
