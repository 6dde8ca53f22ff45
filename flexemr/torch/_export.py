"""``export``: a trained model's embedding tables as files that ``flexemr serve`` loads as they are.

``export(ebc, "model-tables/")`` writes::

    model-tables/
        cluster.toml        servers s0..sN-1 (host, port + i), the tables, the sharding kind;
                            each [[tables]] entry names its file: npy = "<table>.npy"
        <table>.npy         [num_rows, dim] float32/float16, one per table

and every server is then started with the same one-line command,
``flexemr serve --config model-tables/cluster.toml --server s0`` (``s1``, ...):
the cluster file's ``npy`` entries (relative to the file) make the server
memory-map the tables instead of seeding them.  Rankers use the same file
(``ClusterConfig.from_toml``, or a ``RemoteEmbeddingBagCollection`` given
its path).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..core.config import ClusterConfig, ServerAddress
from ..core.errors import ConfigError
from ..core.plan import ShardingPlan
from ..core.spec import TableSpec

from ._convert import table_specs, weights

__all__ = ["Export", "export"]

PlanKind = Literal["row_wise", "table_wise", "column_wise"]

_BUILDERS: dict[str, Callable[..., ShardingPlan]] = {"row_wise": ShardingPlan.row_wise,
                                                     "table_wise": ShardingPlan.table_wise,
                                                     "column_wise": ShardingPlan.column_wise}
_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Export:
    """What :func:`export` wrote."""

    #: The directory holding everything.
    directory: Path
    #: The cluster file (``directory / "cluster.toml"``).
    config_path: Path
    #: The cluster it describes.
    config: ClusterConfig
    #: ``{table: .npy file}``.
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def commands(self) -> list[str]:
        """One ``flexemr serve`` command line per server (run each on its host)."""
        return [f"flexemr serve --config {self.config_path} --server {s}" for s in self.config.plan.servers]


def _toml_str(s: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _cluster_toml(specs: list[TableSpec], files: dict[str, str], addrs: dict[str, ServerAddress], kind: str,
                  secret: str | None) -> str:
    lines: list[str] = ["# written by flexemr.torch.export: start each server with", "#   flexemr serve --config "
                        "<this file> --server <name>", ""]
    if secret is not None:
        lines += ["[cluster]", f"secret = {_toml_str(secret)}", ""]
    for name, a in addrs.items():
        lines += [f"[servers.{_toml_str(name)}]", f"host = {_toml_str(a.host)}", f"port = {a.port}", ""]
    for s in specs:
        lines += ["[[tables]]", f"name = {_toml_str(s.name)}", f"num_rows = {s.num_rows}", f"dim = {s.dim}",
                  f"dtype = {_toml_str(s.dtype)}", f"npy = {_toml_str(files[s.name])}", ""]
    lines += ["[sharding]", f"kind = {_toml_str(kind)}", ""]
    return "\n".join(lines)


def export(ebc: Any, directory: str | os.PathLike[str], *, servers: int = 2, plan: PlanKind = "row_wise",
           host: str = "127.0.0.1", port: int = 7000, secret: str | None = None) -> Export:
    """Write the tables of ``ebc`` and a cluster file serving them to ``directory`` (module docstring).

    ``ebc``: an ``EmbeddingBagCollection``, a model holding one or more, or
    a state dict (``...embedding_bags.<table>.weight`` entries, see
    :func:`flexemr.torch.weights`).  ``servers`` servers named ``s0``,
    ``s1``, ... listen on ``host`` at ports ``port``, ``port + 1``, ...
    (edit the file for several hosts); ``plan``: how tables are cut
    (``"row_wise"``, ``"table_wise"``, ``"column_wise"``); ``secret``: the
    cluster's shared secret (``[cluster] secret``).  The directory is
    created; files of the same names are overwritten.  Returns an
    :class:`Export` (its ``commands`` are the ``flexemr serve`` lines).

    >>> # out = export(ebc, "model-tables", servers=2)
    >>> # out.commands  ->  ['flexemr serve --config model-tables/cluster.toml --server s0', ... 's1']
    """
    if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
        raise ConfigError(f"servers must be a positive int, got {servers!r}")
    if plan not in _BUILDERS:
        raise ConfigError(f"plan must be one of {sorted(_BUILDERS)}, got {plan!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65536 - servers:
        raise ConfigError(f"port must be an int in [1, {65536 - servers}] ({servers} servers listen on port, "
                          f"port + 1, ...), got {port!r}")
    tables = weights(ebc)
    if hasattr(ebc, "embedding_bag_configs") and callable(ebc.embedding_bag_configs):
        specs = table_specs(ebc)
        for s in specs:
            arr = tables.get(s.name)
            if arr is None or arr.shape != (s.num_rows, s.dim) or arr.dtype.name != s.dtype:
                raise ConfigError(f"table {s.name!r}: its weight does not match its config ({s.num_rows} x {s.dim} "
                                  f"{s.dtype})")
    else:
        specs = [TableSpec(t, a.shape[0], a.shape[1], a.dtype.name) for t, a in tables.items()]
    names = [f"s{i}" for i in range(servers)]
    addrs = {n: ServerAddress(host, port + i) for i, n in enumerate(names)}
    expected = ClusterConfig(_BUILDERS[plan](specs, names), addrs, secret)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rel: dict[str, str] = {}
    for i, s in enumerate(specs):
        rel[s.name] = f"{s.name}.npy" if _SAFE.match(s.name) and s.name not in (".", "..") else f"table-{i}.npy"
        np.save(out / rel[s.name], np.ascontiguousarray(tables[s.name]), allow_pickle=False)
    config_path = out / "cluster.toml"
    text = _cluster_toml(specs, rel, addrs, plan, secret)
    if secret is None:
        config_path.write_text(text, encoding="utf-8")
    else:
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    # the file must say exactly what was meant: read it back as flexemr serve will
    loaded = ClusterConfig.from_toml(config_path)
    if loaded != expected:
        raise ConfigError(f"{config_path} does not read back as the cluster it should describe")
    with open(config_path, "rb") as fh:
        entries = {t["name"]: t.get("npy") for t in tomllib.load(fh)["tables"]}
    if entries != rel:
        raise ConfigError(f"{config_path}: the tables' npy entries do not read back as written")
    return Export(out, config_path, loaded, {t: out / f for t, f in rel.items()})
