"""The registry of a Ray deployment: the shard map and addresses, published to rankers.

One named, detached actor per deployment (``"<name>/registry"`` in the Ray
namespace :data:`NAMESPACE`) holds a :class:`Registry`: the cluster file the
deployment was started from (plan, tables, secret), and what every server
actor reported when it became ready -- where it listens, its incarnation,
its metrics port, how often it started.  Rankers read the cluster with the
real addresses from it (:meth:`Registry.config`); a server actor that Ray
restarts reads its previous record (:meth:`Registry.previous`) and listens
on the same port again, so rankers reconnect to it where they lost it.

The class is plain Python (Ray wraps it), tested without Ray.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..core.config import ClusterConfig, ServerAddress
from ..core.errors import ConfigError

__all__ = ["NAMESPACE", "Registry", "ranker_actor_name", "registry_name", "server_actor_name"]

#: The Ray namespace of every actor a deployment creates.
NAMESPACE = "flexemr"


def registry_name(deployment: str) -> str:
    """The registry actor's name."""
    return f"{deployment}/registry"


def server_actor_name(deployment: str, server: str) -> str:
    """The name of server ``server``'s actor."""
    return f"{deployment}/server/{server}"


def ranker_actor_name(deployment: str) -> str:
    """The Serve application (and deployment) of the rankers."""
    return deployment


class Registry:
    """What a deployment publishes (module docstring).

    Parameters
    ----------
    name:
        The deployment's name.
    config:
        The cluster file as a dict (:meth:`ClusterConfig.to_dict`); its
        addresses are only where servers are placed first when ports are fixed.
    options:
        How the deployment was started (shown by ``flexemr ray status``).
    """

    def __init__(self, name: str, config: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self._config = ClusterConfig.from_dict(config)
        self._options = dict(options or {})
        self._servers: dict[str, dict[str, Any]] = {}
        self._rankers: dict[str, dict[str, Any]] = {}
        self._extra: dict[str, Any] = {}
        self._created = time.time()

    def ping(self) -> bool:
        return True

    def cluster_file(self) -> dict[str, Any]:
        """The cluster file the deployment was started from."""
        return self._config.to_dict()

    def previous(self, server: str) -> dict[str, Any] | None:
        """The last record server ``server`` registered (``None`` before its first start)."""
        self._check_server(server)
        rec = self._servers.get(server)
        return None if rec is None else dict(rec)

    def register_server(self, server: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """A server actor is ready: ``record`` holds ``host``, ``port`` and whatever else it reports."""
        self._check_server(server)
        if not isinstance(record.get("host"), str) or not isinstance(record.get("port"), int):
            raise ConfigError(f"server {server!r} registered without host and port: {dict(record)}")
        prev = self._servers.get(server)
        rec = {**record, "starts": (prev["starts"] + 1) if prev else 1, "registered_at": time.time()}
        self._servers[server] = rec
        return dict(rec)

    def set_state(self, server: str, state: str) -> None:
        """A server reports a state change (``"draining"``, ``"closed"``)."""
        self._check_server(server)
        if server in self._servers:
            self._servers[server]["state"] = state

    def servers(self) -> dict[str, dict[str, Any]]:
        """Every registered server's last record."""
        return {s: dict(r) for s, r in self._servers.items()}

    def config(self) -> dict[str, Any] | None:
        """The cluster file with the servers' real addresses, once every server registered (else ``None``)."""
        if set(self._servers) != set(self._config.plan.servers):
            return None
        addrs = {s: ServerAddress(r["host"], r["port"]) for s, r in self._servers.items()}
        return ClusterConfig(self._config.plan, addrs, self._config.secret).to_dict()

    def register_ranker(self, key: str, record: Mapping[str, Any]) -> None:
        """A ranker replica reports its metrics endpoint (``host``, ``metrics_port``)."""
        self._rankers[str(key)] = {**record, "registered_at": time.time()}

    def unregister_ranker(self, key: str) -> None:
        self._rankers.pop(str(key), None)

    def rankers(self) -> dict[str, dict[str, Any]]:
        return {k: dict(r) for k, r in self._rankers.items()}

    def update_options(self, options: Mapping[str, Any]) -> None:
        """Correct how the deployment runs (e.g. Serve's HTTP port when Serve was already running)."""
        self._options.update(options)

    def set_extra(self, key: str, value: Any) -> None:
        """Keep ``value`` for whoever takes the deployment down (e.g. its placement group)."""
        self._extra[key] = value

    def extra(self, key: str) -> Any:
        return self._extra.get(key)

    def info(self) -> dict[str, Any]:
        """Name, start time, options, servers and rankers (``flexemr ray status``)."""
        return {"name": self.name, "created": self._created, "options": dict(self._options),
                "servers": self.servers(), "rankers": self.rankers(),
                "plan_servers": list(self._config.plan.servers)}

    def _check_server(self, server: str) -> None:
        if server not in self._config.plan.servers:
            raise ConfigError(f"unknown server {server!r}; the plan has {list(self._config.plan.servers)}")
