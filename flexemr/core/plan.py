"""Sharding plans and range routing.

A :class:`ShardingPlan` places the embedding tables of a model onto embedding
servers.  Each table is cut into rectangular :class:`Shard` s (a row range times
a column range); each shard is one contiguous registered memory region on its
server, named by :attr:`Shard.region_name` (``"<table>/<index>"``).

Shard layout contract (checked on construction, :class:`ConfigError` otherwise):

* the shards of a table form *row bands*: shards whose row ranges intersect
  have identical row ranges; the bands tile ``[0, num_rows)`` with no gap or
  overlap;
* inside a band the column ranges tile ``[0, dim)`` with no gap or overlap;
* every shard lives on a server listed in ``servers``.

Row-wise, table-wise, column-wise and 2-D grid layouts all fit this model.
Shard indices are assigned in ``(row_start, col_start)`` order, whatever order
the shards were given in.

Routing is range based, as in FlexEMR: per table a sorted array of band start
rows and one :func:`numpy.searchsorted` per lookup batch (no per-row map)::

    >>> from flexemr.core.spec import TableSpec
    >>> plan = ShardingPlan.row_wise([TableSpec("user", 10, 4)], ["s0", "s1"])
    >>> [(s.server, s.row_start, s.row_end) for s in plan.shards["user"]]
    [('s0', 0, 5), ('s1', 5, 10)]
    >>> plan.route("user", np.array([0, 4, 5, 9])).tolist()
    [0, 0, 1, 1]
    >>> plan.shards["user"][1].region_name
    'user/1'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .errors import ConfigError, InputError, LookupIdError, UnknownTableError
from .spec import TableSpec, _is_int
from .toml import dumps_toml, load_toml

__all__ = ["SHARDING_KINDS", "RangeTable", "Shard", "ShardingPlan", "validate_ids", "without_npy"]

#: Values accepted for ``[sharding] kind`` in a cluster file.
SHARDING_KINDS: tuple[str, ...] = ("row_wise", "table_wise", "column_wise", "explicit")

IntArray = npt.NDArray[np.int64]


def _preview(values: npt.NDArray[Any], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...' if values.size > limit else ''}]"


# --------------------------------------------------------------------------- ids


def validate_ids(spec: TableSpec, ids: object) -> IntArray:
    """Check a lookup id batch against ``spec`` and return it as ``int64``.

    ``ids`` must be a 1-D array of integers in ``[0, spec.num_rows)``.  Python
    sequences are accepted (an empty list counts as an empty integer array).

    Raises :class:`InputError` for a non-integer dtype (including bool) or a
    shape other than 1-D, and :class:`LookupIdError` for negative ids or ids
    ``>= num_rows``; messages name the table and the offending values.

    >>> validate_ids(TableSpec("t", 4, 2), [3, 0, 3]).tolist()
    [3, 0, 3]
    """
    if isinstance(ids, np.ndarray):
        arr: npt.NDArray[Any] = ids
    else:
        try:
            arr = np.asarray(ids)
        except (TypeError, ValueError) as exc:
            raise InputError(f"table {spec.name!r}: ids are not an array: {exc}") from exc
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise InputError(f"table {spec.name!r}: ids must be a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputError(f"table {spec.name!r}: ids must have an integer dtype, got {arr.dtype}")
    if arr.size:
        bad_mask = arr >= spec.num_rows
        if arr.dtype.kind == "i":
            bad_mask |= arr < 0
        if bad_mask.any():
            bad = arr[bad_mask]
            raise LookupIdError(
                f"table {spec.name!r}: {bad.size} id(s) out of range [0, {spec.num_rows}): {_preview(bad)}"
            )
    return arr.astype(np.int64, copy=False)


# ------------------------------------------------------------------------- shard


@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_end)`` x columns ``[col_start, col_end)`` of a table on ``server``.

    ``index`` is the shard's position inside its table's plan entry; it is
    assigned by :class:`ShardingPlan` (``-1`` for a free-standing shard) and
    ignored by ``==``.  The server registers the shard's slice of the table as
    one C-contiguous region of ``num_rows * row_bytes(spec)`` bytes.

    >>> s = Shard("item", "s1", 100, 200, 0, 16)
    >>> s.num_rows, s.num_cols, s.row_bytes(TableSpec("item", 1000, 16))
    (100, 16, 64)
    """

    table: str
    server: str
    row_start: int
    row_end: int
    col_start: int
    col_end: int
    index: int = field(default=-1, compare=False)
    #: Further servers holding a full copy of the shard (replicas 1..r-1; ``server`` is replica 0).
    backups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.backups, tuple):
            object.__setattr__(self, "backups", tuple(self.backups))

    @property
    def replicas(self) -> tuple[str, ...]:
        """Every server holding the shard, replica 0 (``server``) first."""
        return (self.server, *self.backups)

    @property
    def num_rows(self) -> int:
        """Number of table rows held by the shard."""
        return self.row_end - self.row_start

    @property
    def num_cols(self) -> int:
        """Number of columns (embedding elements per row) held by the shard."""
        return self.col_end - self.col_start

    def row_bytes(self, spec: TableSpec) -> int:
        """Bytes of one shard row (``num_cols * itemsize``)."""
        return self.num_cols * spec.itemsize

    def nbytes(self, spec: TableSpec) -> int:
        """Bytes of the shard's registered region."""
        return self.num_rows * self.row_bytes(spec)

    @property
    def region_name(self) -> str:
        """Name of the shard's memory region on its server: ``"<table>/<index>"``."""
        if self.index < 0:
            raise ConfigError(f"shard {self!r} is not part of a ShardingPlan (no index yet)")
        return f"{self.table}/{self.index}"

    def to_dict(self) -> dict[str, Any]:
        """Cluster-file form (one ``[[shards]]`` entry; ``servers = [...]`` when replicated)."""
        where: dict[str, Any] = {"servers": list(self.replicas)} if self.backups else {"server": self.server}
        return {
            "table": self.table,
            **where,
            "rows": [self.row_start, self.row_end],
            "cols": [self.col_start, self.col_end],
        }


class RangeTable(NamedTuple):
    """Per-table routing table: one entry per row band, sorted by ``starts``.

    Band ``b`` covers rows ``[starts[b], ends[b])`` and is served by the
    ``num_col_shards[b]`` shards with indices ``first_shard[b] + j`` (column order).
    """

    starts: IntArray
    ends: IntArray
    first_shard: IntArray
    num_col_shards: IntArray


def _ro(values: Sequence[int]) -> IntArray:
    arr = np.asarray(values, dtype=np.int64)
    arr.setflags(write=False)
    return arr


def _balanced_bounds(total: int, parts: int) -> list[int]:
    """``parts + 1`` boundaries splitting ``total`` into near-equal pieces."""
    base, rem = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < rem else 0))
    return bounds


def _least_loaded(load: dict[str, int]) -> str:
    return min(load, key=lambda s: load[s])  # first server wins ties


def _as_specs(specs: Iterable[TableSpec] | Mapping[str, TableSpec]) -> list[TableSpec]:
    items = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
    for spec in items:
        if not isinstance(spec, TableSpec):
            raise ConfigError(f"expected TableSpec, got {type(spec).__name__}")
    return items


def _specs_and_servers(specs: Iterable[TableSpec] | Mapping[str, TableSpec],
                       servers: Sequence[str]) -> tuple[list[TableSpec], tuple[str, ...]]:
    """The checked arguments every plan constructor starts from."""
    items = _as_specs(specs)
    servers_t = tuple(servers)
    if not servers_t:
        raise ConfigError("a plan needs at least one server")
    return items, servers_t


# -------------------------------------------------------------------------- plan


class ShardingPlan:
    """Placement of tables onto servers as row/column shards (immutable).

    ``tables`` maps table name to :class:`TableSpec`; ``shards`` maps table name
    to its shards (any order; they are stored sorted by ``(row_start,
    col_start)`` with ``index`` set); ``servers`` lists the server names.
    Invalid plans raise :class:`ConfigError`.

    >>> specs = [TableSpec("a", 6, 4), TableSpec("b", 3, 8, "float16")]
    >>> ShardingPlan.table_wise(specs, ["s0", "s1"]).servers_of("b")
    ('s1',)
    """

    __slots__ = ("_tables", "_shards", "_servers", "_ranges", "_regions", "_versioned")

    def __init__(
        self,
        tables: Mapping[str, TableSpec],
        shards: Mapping[str, Sequence[Shard]],
        servers: Sequence[str],
        *,
        versioned: bool = False,
    ) -> None:
        servers_t = tuple(servers)
        if not servers_t:
            raise ConfigError("a plan needs at least one server")
        for s in servers_t:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"server names must be non-empty strings, got {s!r}")
        if len(set(servers_t)) != len(servers_t):
            raise ConfigError(f"duplicate server names in {list(servers_t)}")
        known = set(servers_t)

        tables_d: dict[str, TableSpec] = {}
        for name, spec in tables.items():
            if not isinstance(spec, TableSpec):
                raise ConfigError(f"table {name!r}: expected TableSpec, got {type(spec).__name__}")
            if spec.name != name:
                raise ConfigError(f"table key {name!r} does not match spec name {spec.name!r}")
            tables_d[name] = spec
        if not tables_d:
            raise ConfigError("a plan needs at least one table")
        extra = set(shards) - set(tables_d)
        if extra:
            raise ConfigError(f"shards given for unknown table(s) {sorted(extra)}")

        shards_d: dict[str, tuple[Shard, ...]] = {}
        ranges: dict[str, RangeTable] = {}
        regions: dict[str, Shard] = {}
        for name, spec in tables_d.items():
            given = shards.get(name)
            if not given:
                raise ConfigError(f"table {name!r} has no shards")
            for sh in given:
                self._check_shard(spec, sh, known)
            ordered = sorted(given, key=lambda s: (s.row_start, s.col_start))
            placed = tuple(
                Shard(s.table, s.server, s.row_start, s.row_end, s.col_start, s.col_end, i, s.backups)
                for i, s in enumerate(ordered)
            )
            if versioned and any(s.col_start != 0 or s.col_end != spec.dim for s in placed):
                raise ConfigError(f"table {name!r}: versioned (updatable) tables need full-width shards; "
                                  f"use row_wise or table_wise sharding")
            ranges[name] = self._build_ranges(spec, placed)
            shards_d[name] = placed
            for sh in placed:
                regions[sh.region_name] = sh

        self._tables: Mapping[str, TableSpec] = MappingProxyType(tables_d)
        self._shards: Mapping[str, tuple[Shard, ...]] = MappingProxyType(shards_d)
        self._servers: tuple[str, ...] = servers_t
        self._ranges: Mapping[str, RangeTable] = MappingProxyType(ranges)
        self._regions: Mapping[str, Shard] = MappingProxyType(regions)
        if not isinstance(versioned, (bool, np.bool_)):
            raise ConfigError(f"versioned must be a bool, got {versioned!r}")
        self._versioned = bool(versioned)

    # ---------------------------------------------------------------- checks

    @staticmethod
    def _check_shard(spec: TableSpec, sh: Shard, known: set[str]) -> None:
        if not isinstance(sh, Shard):
            raise ConfigError(f"table {spec.name!r}: expected Shard, got {type(sh).__name__}")
        if sh.table != spec.name:
            raise ConfigError(f"shard {sh!r} listed under table {spec.name!r}")
        for srv in sh.replicas:
            if not isinstance(srv, str) or srv not in known:
                raise ConfigError(f"table {spec.name!r}: shard on unknown server {srv!r}; known {sorted(known)}")
        if len(set(sh.replicas)) != len(sh.replicas):
            raise ConfigError(f"table {spec.name!r}: the replicas of a shard need distinct servers, "
                              f"got {list(sh.replicas)}")
        for attr in ("row_start", "row_end", "col_start", "col_end"):
            if not _is_int(getattr(sh, attr)):
                raise ConfigError(f"table {spec.name!r}: shard {attr} must be an integer, got {getattr(sh, attr)!r}")
        if not 0 <= sh.row_start < sh.row_end <= spec.num_rows:
            raise ConfigError(
                f"table {spec.name!r}: shard rows [{sh.row_start}, {sh.row_end}) not a non-empty "
                f"range inside [0, {spec.num_rows})"
            )
        if not 0 <= sh.col_start < sh.col_end <= spec.dim:
            raise ConfigError(
                f"table {spec.name!r}: shard cols [{sh.col_start}, {sh.col_end}) not a non-empty "
                f"range inside [0, {spec.dim})"
            )

    @staticmethod
    def _build_ranges(spec: TableSpec, placed: tuple[Shard, ...]) -> RangeTable:
        starts: list[int] = []
        ends: list[int] = []
        first: list[int] = []
        count: list[int] = []
        i = 0
        while i < len(placed):
            band = placed[i]
            j = i
            while j < len(placed) and placed[j].row_start == band.row_start:
                j += 1
            members = placed[i:j]
            for m in members:
                if m.row_end != band.row_end:
                    raise ConfigError(
                        f"table {spec.name!r}: shards starting at row {band.row_start} have different "
                        f"row ends ({band.row_end} vs {m.row_end}); shards must form row bands"
                    )
            expected_row = ends[-1] if ends else 0
            if band.row_start > expected_row:
                raise ConfigError(f"table {spec.name!r}: gap in rows [{expected_row}, {band.row_start})")
            if band.row_start < expected_row:
                raise ConfigError(
                    f"table {spec.name!r}: overlapping shards at rows [{band.row_start}, {expected_row})"
                )
            col = 0
            for m in members:
                if m.col_start > col:
                    raise ConfigError(
                        f"table {spec.name!r}: rows [{band.row_start}, {band.row_end}) have a gap in "
                        f"columns [{col}, {m.col_start})"
                    )
                if m.col_start < col:
                    raise ConfigError(
                        f"table {spec.name!r}: overlapping shards at rows [{band.row_start}, "
                        f"{band.row_end}) columns [{m.col_start}, {col})"
                    )
                col = m.col_end
            if col != spec.dim:
                raise ConfigError(
                    f"table {spec.name!r}: rows [{band.row_start}, {band.row_end}) have a gap in "
                    f"columns [{col}, {spec.dim})"
                )
            starts.append(band.row_start)
            ends.append(band.row_end)
            first.append(i)
            count.append(j - i)
            i = j
        if ends[-1] != spec.num_rows:
            raise ConfigError(f"table {spec.name!r}: gap in rows [{ends[-1]}, {spec.num_rows})")
        return RangeTable(_ro(starts), _ro(ends), _ro(first), _ro(count))

    # ------------------------------------------------------------ accessors

    @property
    def tables(self) -> Mapping[str, TableSpec]:
        """Table name -> spec (read-only)."""
        return self._tables

    @property
    def shards(self) -> Mapping[str, tuple[Shard, ...]]:
        """Table name -> shards sorted by ``(row_start, col_start)`` (read-only)."""
        return self._shards

    @property
    def servers(self) -> tuple[str, ...]:
        """Server names, in declaration order."""
        return self._servers

    @property
    def versioned(self) -> bool:
        """True if rows carry a version header and may be updated online (``docs/reliability.md``)."""
        return self._versioned

    @property
    def replicas(self) -> int:
        """Largest number of replicas of any shard (1: no replication)."""
        return max(len(s.replicas) for shards in self._shards.values() for s in shards)

    def spec(self, table: str) -> TableSpec:
        """Spec of ``table``; :class:`UnknownTableError` if the plan lacks it."""
        try:
            return self._tables[table]
        except (KeyError, TypeError):
            raise UnknownTableError(
                f"unknown table {table!r}; plan has {sorted(self._tables)}"
            ) from None

    def shard(self, table: str, index: int) -> Shard:
        """Shard ``index`` of ``table``."""
        self.spec(table)
        return self._shards[table][index]

    def region(self, region_name: str) -> Shard:
        """The shard registered under ``region_name`` (``"<table>/<index>"``)."""
        try:
            return self._regions[region_name]
        except KeyError:
            raise UnknownTableError(f"unknown region {region_name!r}") from None

    def regions_on(self, server: str) -> tuple[Shard, ...]:
        """All shards a server must register, in table then index order."""
        if server not in self._servers:
            raise ConfigError(f"unknown server {server!r}; known {list(self._servers)}")
        return tuple(s for shards in self._shards.values() for s in shards if server in s.replicas)

    def servers_of(self, table: str) -> tuple[str, ...]:
        """Distinct servers holding part of ``table`` (replicas included), in shard order."""
        self.spec(table)
        return tuple(dict.fromkeys(srv for s in self._shards[table] for srv in s.replicas))

    def server_bytes(self) -> dict[str, int]:
        """Bytes of shard data per server (every replica counted)."""
        load = dict.fromkeys(self._servers, 0)
        for name, shards in self._shards.items():
            for s in shards:
                for srv in s.replicas:
                    load[srv] += s.nbytes(self._tables[name])
        return load

    def range_table(self, table: str) -> RangeTable:
        """The sorted band table used by :meth:`route`."""
        self.spec(table)
        return self._ranges[table]

    def is_full_width(self, table: str) -> bool:
        """True if every shard of ``table`` holds whole rows (no column split)."""
        return bool((self.range_table(table).num_col_shards == 1).all())

    # --------------------------------------------------------------- routing

    def route_bands(self, table: str, ids: object) -> IntArray:
        """Row-band index of every id (ids are validated as in :func:`validate_ids`)."""
        spec = self.spec(table)
        arr = validate_ids(spec, ids)
        starts = self._ranges[table].starts
        return np.searchsorted(starts, arr, side="right").astype(np.int64) - 1

    def route(self, table: str, ids: object) -> IntArray:
        """Shard index serving each id.

        For tables split by columns a row lives in every column shard of its
        band; the index returned is the band's first (``col_start == 0``)
        shard, the others being ``first + 1 ... first + num_col_shards - 1``.
        """
        return self.range_table(table).first_shard[self.route_bands(table, ids)]

    # --------------------------------------------------------- constructors

    @classmethod
    def row_wise(
        cls,
        specs: Iterable[TableSpec] | Mapping[str, TableSpec],
        servers: Sequence[str],
        rows_per_shard: int | None = None,
        shards_per_server: int | None = None,
        *,
        replicas: int = 1,
        versioned: bool = False,
    ) -> ShardingPlan:
        """Cut every table into contiguous row ranges spread over ``servers``.

        Either ``rows_per_shard`` rows per shard (last shard may be shorter), or
        ``shards_per_server * len(servers)`` near-equal shards per table (default
        one per server, capped at ``num_rows``).  Each shard goes to the server
        with the fewest bytes so far (ties: declaration order), which gives a
        round-robin placement for equal shards.

        ``replicas=r`` puts copies 1..r-1 of a shard on the next ``r - 1``
        servers after its primary (cyclically; :func:`_replicate`);
        ``versioned=True`` makes the tables updatable (``docs/reliability.md``).
        """
        items, servers_t = _specs_and_servers(specs, servers)
        if rows_per_shard is not None and shards_per_server is not None:
            raise ConfigError("give rows_per_shard or shards_per_server, not both")
        if rows_per_shard is not None and (not _is_int(rows_per_shard) or rows_per_shard < 1):
            raise ConfigError(f"rows_per_shard must be an integer >= 1, got {rows_per_shard!r}")
        if shards_per_server is not None and (not _is_int(shards_per_server) or shards_per_server < 1):
            raise ConfigError(f"shards_per_server must be an integer >= 1, got {shards_per_server!r}")
        load = dict.fromkeys(servers_t, 0)
        out: dict[str, list[Shard]] = {}
        for spec in items:
            if rows_per_shard is not None:
                bounds = list(range(0, spec.num_rows, rows_per_shard)) + [spec.num_rows]
            else:
                parts = min(spec.num_rows, len(servers_t) * (shards_per_server or 1))
                bounds = _balanced_bounds(spec.num_rows, parts)
            lst = out.setdefault(spec.name, [])
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                server = _least_loaded(load)
                load[server] += (hi - lo) * spec.row_bytes
                lst.append(Shard(spec.name, server, lo, hi, 0, spec.dim))
        return cls({s.name: s for s in items}, _replicate(out, servers_t, replicas), servers_t, versioned=versioned)

    @classmethod
    def table_wise(
        cls,
        specs: Iterable[TableSpec] | Mapping[str, TableSpec],
        servers: Sequence[str],
        *,
        replicas: int = 1,
        versioned: bool = False,
    ) -> ShardingPlan:
        """Put each whole table on one server, balancing bytes (largest table first).

        ``replicas`` and ``versioned`` as in :meth:`row_wise`.
        """
        items, servers_t = _specs_and_servers(specs, servers)
        load = dict.fromkeys(servers_t, 0)
        out: dict[str, list[Shard]] = {}
        for spec in sorted(items, key=lambda s: -s.nbytes):
            server = _least_loaded(load)
            load[server] += spec.nbytes
            out[spec.name] = [Shard(spec.name, server, 0, spec.num_rows, 0, spec.dim)]
        return cls({s.name: s for s in items}, _replicate(out, servers_t, replicas), servers_t, versioned=versioned)

    @classmethod
    def column_wise(
        cls,
        specs: Iterable[TableSpec] | Mapping[str, TableSpec],
        servers: Sequence[str],
        shards_per_table: int | None = None,
        *,
        replicas: int = 1,
    ) -> ShardingPlan:
        """Cut every table into near-equal column ranges (all rows each).

        ``shards_per_table`` defaults to ``len(servers)`` and is capped at
        ``dim``; shards go to the least-loaded server.  ``replicas`` as in
        :meth:`row_wise` (column shards cannot be versioned).
        """
        items, servers_t = _specs_and_servers(specs, servers)
        if shards_per_table is not None and (not _is_int(shards_per_table) or shards_per_table < 1):
            raise ConfigError(f"shards_per_table must be an integer >= 1, got {shards_per_table!r}")
        load = dict.fromkeys(servers_t, 0)
        out: dict[str, list[Shard]] = {}
        for spec in items:
            parts = min(spec.dim, shards_per_table or len(servers_t))
            bounds = _balanced_bounds(spec.dim, parts)
            lst = out.setdefault(spec.name, [])
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                server = _least_loaded(load)
                load[server] += spec.num_rows * (hi - lo) * spec.itemsize
                lst.append(Shard(spec.name, server, 0, spec.num_rows, lo, hi))
        return cls({s.name: s for s in items}, _replicate(out, servers_t, replicas), servers_t)

    # ---------------------------------------------------------- (de)serialise

    def to_dict(self) -> dict[str, Any]:
        """Cluster-file dict with explicit shards (``servers`` entries are empty)."""
        sharding: dict[str, Any] = {"kind": "explicit"}
        if self._versioned:
            sharding["versioned"] = True
        return {
            "servers": {s: {} for s in self._servers},
            "tables": [spec.to_dict() for spec in self._tables.values()],
            "sharding": sharding,
            "shards": [sh.to_dict() for shards in self._shards.values() for sh in shards],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardingPlan:
        """Build a plan from a cluster-file dict (see ``docs/sharding.md``).

        ``servers`` may be a list of names or a table of server tables (whose
        ``host``/``port`` are ignored here; see :class:`ClusterConfig`).
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"cluster description must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"cluster", "servers", "tables", "sharding", "shards"}
        if unknown:
            raise ConfigError(f"unknown top-level keys {sorted(unknown)}")
        raw_servers = d.get("servers")
        if isinstance(raw_servers, Mapping):
            servers = list(raw_servers)
        elif isinstance(raw_servers, list):
            servers = raw_servers
        else:
            raise ConfigError("cluster description needs 'servers' (a table of servers or a list of names)")
        raw_tables = d.get("tables")
        if not isinstance(raw_tables, list) or not raw_tables:
            raise ConfigError("cluster description needs a non-empty 'tables' array")
        specs = [TableSpec.from_dict(without_npy(t)) for t in raw_tables]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate table names in {names}")

        raw_shards = d.get("shards")
        sharding = d.get("sharding", {"kind": "explicit" if raw_shards is not None else "row_wise"})
        if not isinstance(sharding, Mapping):
            raise ConfigError("'sharding' must be a table")
        opts = dict(sharding)
        kind = opts.pop("kind", "explicit" if raw_shards is not None else "row_wise")
        versioned = opts.pop("versioned", False)
        if not isinstance(versioned, bool):
            raise ConfigError(f"[sharding] versioned must be true or false, got {versioned!r}")
        replicas = opts.pop("replicas", 1)
        if kind == "explicit" and replicas != 1:
            raise ConfigError("[sharding] replicas applies to generated plans; with kind 'explicit' list "
                              "each shard's servers (servers = [...]) instead")
        if kind not in SHARDING_KINDS:
            raise ConfigError(f"unknown sharding kind {kind!r}; expected one of {list(SHARDING_KINDS)}")
        allowed = {
            "row_wise": {"rows_per_shard", "shards_per_server"},
            "column_wise": {"shards_per_table"},
            "table_wise": set(),
            "explicit": set(),
        }[kind]
        bad = set(opts) - allowed
        if bad:
            raise ConfigError(f"sharding kind {kind!r} does not accept {sorted(bad)}")
        if kind != "explicit" and raw_shards is not None:
            raise ConfigError(f"[[shards]] given but sharding kind is {kind!r}; use kind = 'explicit'")
        if kind == "row_wise":
            return cls.row_wise(specs, servers, **opts, replicas=replicas, versioned=versioned)
        if kind == "column_wise":
            if versioned:
                raise ConfigError("column_wise tables cannot be versioned (updates need full-width shards)")
            return cls.column_wise(specs, servers, **opts, replicas=replicas)
        if kind == "table_wise":
            return cls.table_wise(specs, servers, replicas=replicas, versioned=versioned)
        if not isinstance(raw_shards, list) or not raw_shards:
            raise ConfigError("sharding kind 'explicit' needs a non-empty [[shards]] array")
        by_name = {s.name: s for s in specs}
        shards: dict[str, list[Shard]] = {}
        for entry in raw_shards:
            sh = _shard_from_dict(entry, by_name)
            shards.setdefault(sh.table, []).append(sh)
        return cls(by_name, shards, servers, versioned=versioned)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> ShardingPlan:
        """Load the plan part of a TOML cluster file."""
        return cls.from_dict(load_toml(path))

    def to_toml(self) -> str:
        """TOML text of :meth:`to_dict`."""
        return dumps_toml(self.to_dict())

    # --------------------------------------------------------------- dunder

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardingPlan):
            return NotImplemented
        return (
            self._servers == other._servers
            and self._versioned == other._versioned
            and dict(self._tables) == dict(other._tables)
            and dict(self._shards) == dict(other._shards)
        )

    def __hash__(self) -> int:
        return hash((self._servers, self._versioned, tuple(self._tables.items()), tuple(self._shards.items())))

    def difference(self, other: ShardingPlan) -> str | None:
        """What differs between two plans, in one phrase (``None`` when they are equal).

        >>> a = ShardingPlan.row_wise([TableSpec("t", 10, 4)], ["s0"])
        >>> a.difference(ShardingPlan.row_wise([TableSpec("t", 10, 4, "float16")], ["s0"]))
        "table 't': dtype float32 vs float16"
        """
        if self == other:
            return None
        if self._servers != other._servers:
            return f"servers {list(self._servers)} vs {list(other._servers)}"
        if self._versioned != other._versioned:
            return f"versioned={self._versioned} vs versioned={other._versioned}"
        if set(self._tables) != set(other._tables):
            here, there = set(self._tables), set(other._tables)
            return f"tables only here: {sorted(here - there)}, only there: {sorted(there - here)}"
        for name, spec in self._tables.items():
            o = other._tables[name]
            for attr in ("num_rows", "dim", "dtype"):
                if getattr(spec, attr) != getattr(o, attr):
                    return f"table {name!r}: {attr} {getattr(spec, attr)} vs {getattr(o, attr)}"
        for name, shards in self._shards.items():
            others = other._shards[name]
            if len(shards) != len(others):
                return f"table {name!r}: {len(shards)} shards vs {len(others)}"
            for a, b in zip(shards, others):
                if a != b:
                    return (f"table {name!r} shard {a.index}: {a.server} rows [{a.row_start}, {a.row_end}) "
                            f"cols [{a.col_start}, {a.col_end}) replicas {list(a.replicas)} vs {b.server} "
                            f"rows [{b.row_start}, {b.row_end}) cols [{b.col_start}, {b.col_end}) "
                            f"replicas {list(b.replicas)}")
        return "the plans differ"

    def __repr__(self) -> str:
        n = sum(len(s) for s in self._shards.values())
        extra = (f", replicas={self.replicas}" if self.replicas > 1 else "") + (", versioned" if self._versioned else "")
        return f"ShardingPlan(tables={list(self._tables)}, shards={n}, servers={list(self._servers)}{extra})"


def _replicate(shards: dict[str, list[Shard]], servers: tuple[str, ...], replicas: int) -> dict[str, list[Shard]]:
    """Give every shard ``replicas - 1`` backups: the servers following its primary, cyclically.

    >>> sh = {"t": [Shard("t", "b", 0, 4, 0, 2)]}
    >>> _replicate(sh, ("a", "b", "c"), 2)["t"][0].replicas
    ('b', 'c')
    """
    if not _is_int(replicas) or not 1 <= replicas <= len(servers):
        raise ConfigError(f"replicas must be an integer in [1, {len(servers)}] (the number of servers), "
                          f"got {replicas!r}")
    if replicas == 1:
        return shards
    pos = {s: i for i, s in enumerate(servers)}
    n = len(servers)
    return {t: [Shard(s.table, s.server, s.row_start, s.row_end, s.col_start, s.col_end, s.index,
                      tuple(servers[(pos[s.server] + k) % n] for k in range(1, replicas))) for s in lst]
            for t, lst in shards.items()}


def without_npy(entry: Any) -> Any:
    """A ``[[tables]]`` entry without its optional ``npy`` key (checked here; :func:`~flexemr.core.config.table_files` reads it)."""
    if not isinstance(entry, Mapping) or "npy" not in entry:
        return entry
    path = entry["npy"]
    if not isinstance(path, str) or not path:
        raise ConfigError(f"table {entry.get('name')!r}: npy must be a non-empty path string, got {path!r}")
    return {k: v for k, v in entry.items() if k != "npy"}


def _shard_from_dict(entry: object, specs: Mapping[str, TableSpec]) -> Shard:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"[[shards]] entry must be a table, got {entry!r}")
    unknown = set(entry) - {"table", "server", "servers", "rows", "cols"}
    if unknown:
        raise ConfigError(f"[[shards]] entry has unknown keys {sorted(unknown)}")
    table = entry.get("table")
    if not isinstance(table, str) or table not in specs:
        raise ConfigError(f"[[shards]] entry names unknown table {table!r}")
    spec = specs[table]
    if "servers" in entry:
        names = entry["servers"]
        if "server" in entry or not isinstance(names, list) or not names or \
                not all(isinstance(n, str) for n in names):
            raise ConfigError(f"[[shards]] entry for table {table!r}: give server = NAME or servers = [NAMES] "
                              f"(a non-empty list), not both")
        server, backups = names[0], tuple(names[1:])
    else:
        server, backups = entry.get("server"), ()
    if not isinstance(server, str):
        raise ConfigError(f"[[shards]] entry for table {table!r} needs a server name")
    rows = entry.get("rows", [0, spec.num_rows])
    cols = entry.get("cols", [0, spec.dim])
    for key, val in (("rows", rows), ("cols", cols)):
        if not (isinstance(val, list) and len(val) == 2 and all(_is_int(v) for v in val)):
            raise ConfigError(f"[[shards]] entry for table {table!r}: {key} must be [start, end], got {val!r}")
    return Shard(table, server, rows[0], rows[1], cols[0], cols[1], -1, backups)
