"""The cluster: a sharding plan plus every server's address (:class:`ClusterConfig`, a TOML cluster file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .errors import ConfigError
from .plan import ShardingPlan, without_npy
from .spec import _is_int
from .toml import dumps_toml, load_toml

__all__ = ["ClusterConfig", "ServerAddress", "table_files"]


@dataclass(frozen=True)
class ServerAddress:
    """Where an embedding server listens.

    >>> str(ServerAddress("10.0.0.2", 7000))
    '10.0.0.2:7000'
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"server host must be a non-empty string, got {self.host!r}")
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ConfigError(f"server port must be an integer in [0, 65535], got {self.port!r}")
        object.__setattr__(self, "port", int(self.port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, eq=True)
class ClusterConfig:
    """A sharding plan plus every server's address and an optional shared secret.

    This is what a TOML cluster file describes (format in ``docs/sharding.md``)::

        [cluster]
        secret = "change-me"        # optional

        [servers.s0]
        host = "127.0.0.1"
        port = 7000

        [[tables]]
        name = "user"
        num_rows = 1000
        dim = 64
        dtype = "float32"

        [sharding]
        kind = "row_wise"           # or table_wise / column_wise / explicit + [[shards]]

    >>> cfg = ClusterConfig.from_dict({
    ...     "servers": {"s0": {"host": "127.0.0.1", "port": 7000}},
    ...     "tables": [{"name": "t", "num_rows": 8, "dim": 4}]})
    >>> cfg.addresses["s0"].port, ClusterConfig.from_dict(cfg.to_dict()) == cfg
    (7000, True)
    """

    plan: ShardingPlan
    addresses: Mapping[str, ServerAddress]
    secret: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.plan, ShardingPlan):
            raise ConfigError(f"plan must be a ShardingPlan, got {type(self.plan).__name__}")
        addrs = dict(self.addresses)
        missing = [s for s in self.plan.servers if s not in addrs]
        extra = [s for s in addrs if s not in self.plan.servers]
        if missing or extra:
            raise ConfigError(f"addresses do not match plan servers: missing {missing}, unknown {extra}")
        for name, addr in addrs.items():
            if not isinstance(addr, ServerAddress):
                raise ConfigError(f"server {name!r}: expected ServerAddress, got {type(addr).__name__}")
        if self.secret is not None and (not isinstance(self.secret, str) or len(self.secret) < 4):
            raise ConfigError(f"[cluster] secret must be a string of at least 4 characters, "
                              f"got {type(self.secret).__name__} {self.secret!r:.12}")
        ordered = {s: addrs[s] for s in self.plan.servers}
        object.__setattr__(self, "addresses", MappingProxyType(ordered))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterConfig):
            return NotImplemented
        return (
            self.plan == other.plan
            and dict(self.addresses) == dict(other.addresses)
            and self.secret == other.secret
        )

    def __hash__(self) -> int:
        return hash((self.plan, tuple(self.addresses.items()), self.secret))

    def address(self, server: str) -> ServerAddress:
        """Address of ``server``."""
        try:
            return self.addresses[server]
        except KeyError:
            raise ConfigError(f"unknown server {server!r}; known {list(self.addresses)}") from None

    def to_dict(self) -> dict[str, Any]:
        """Cluster-file dict (explicit shards, servers with host/port)."""
        d = self.plan.to_dict()
        d["servers"] = {s: {"host": a.host, "port": a.port} for s, a in self.addresses.items()}
        if self.secret is not None:
            d = {"cluster": {"secret": self.secret}, **d}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterConfig:
        """Parse a cluster-file dict; every server needs ``host`` and ``port``."""
        plan = ShardingPlan.from_dict(d)
        raw_servers = d["servers"]
        if not isinstance(raw_servers, Mapping):
            raise ConfigError("'servers' must be a table of [servers.<name>] tables with host and port")
        addrs: dict[str, ServerAddress] = {}
        for name, entry in raw_servers.items():
            if not isinstance(entry, Mapping):
                raise ConfigError(f"[servers.{name}] must be a table")
            unknown = set(entry) - {"host", "port"}
            if unknown or "host" not in entry or "port" not in entry:
                raise ConfigError(f"[servers.{name}] needs exactly host and port, got keys {sorted(entry)}")
            addrs[name] = ServerAddress(entry["host"], entry["port"])
        cluster = d.get("cluster", {})
        if not isinstance(cluster, Mapping) or set(cluster) - {"secret"}:
            raise ConfigError("[cluster] accepts only 'secret'")
        return cls(plan, addrs, cluster.get("secret"))

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> ClusterConfig:
        """Load a TOML cluster file; a :class:`ConfigError` names the file."""
        d = load_toml(path)
        try:
            return cls.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"{os.fspath(path)}: {exc}") from exc
        except KeyError as exc:
            raise ConfigError(f"{os.fspath(path)}: missing {exc.args[0]!r}") from exc

    def to_toml(self) -> str:
        """TOML text that :meth:`from_toml` reads back to an equal config."""
        return dumps_toml(self.to_dict())

    def write_toml(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_toml` to ``path`` (UTF-8); a file holding a secret is readable by its owner only."""
        text = self.to_toml()
        if self.secret is None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when the file existed with wider permissions
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)


def table_files(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{table: .npy path}`` of the cluster file's ``[[tables]]`` entries that name one (``npy = "..."``).

    A relative path is taken relative to the cluster file's directory, so a
    directory holding the file and its tables can move as a whole.
    ``flexemr serve`` serves those tables from these files (``--npy`` flags
    override them).

    A cluster file written by ``flexemr.torch.export`` looks like::

        [[tables]]
        name = "t_user"
        num_rows = 1000
        dim = 64
        npy = "t_user.npy"      # -> {"t_user": "<the file's directory>/t_user.npy"}
    """
    d = load_toml(path)
    raw = d.get("tables")
    out: dict[str, str] = {}
    base = os.path.dirname(os.path.abspath(os.fspath(path)))
    for entry in raw if isinstance(raw, list) else []:
        if isinstance(entry, Mapping) and "npy" in entry:
            without_npy(entry)  # validates the value
            out[str(entry.get("name"))] = os.path.join(base, os.path.expanduser(entry["npy"]))
    return out
