"""Frequency-aware row placement: hot rows get contiguous low ids.

A profiling pass counts accesses per ``(table, row)`` over sample batches
(:func:`profile_accesses`); :func:`build_remap` orders every table's rows by
decreasing count (ties and unseen rows keep their logical order) and returns
a :class:`RowRemap`.  The servers store the tables reordered with
:meth:`RowRemap.apply_to_table`; the ranker translates ids with
:meth:`RowRemap.to_physical` before splitting a lookup.  Hot rows then sit
next to each other, so :func:`flexemr.core.split.split_lookup` coalesces them into
fewer, longer reads (:func:`count_reads` measures it).

>>> from flexemr.core.jagged import JaggedBatch
>>> jb = JaggedBatch.from_lists({"t": [[9, 2, 9], [9, 5, 2]]})
>>> rm = build_remap(profile_accesses([jb], {"t": 10}))
>>> rm.to_physical("t", [9, 2, 5, 0]).tolist()          # 9 is hottest, then 2, then 5
[0, 1, 2, 3]
>>> rm.to_logical("t", [0, 1, 2]).tolist()
[9, 2, 5]
>>> table = np.arange(10, dtype=np.float32)[:, None]
>>> phys = rm.apply_to_table("t", table)
>>> bool((phys[rm.to_physical("t", [9, 5])] == table[[9, 5]]).all())
True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ConfigError, InputError, UnknownTableError
from .jagged import JaggedBatch
from .plan import ShardingPlan, validate_ids
from .spec import TableSpec
from .split import split_lookup

__all__ = ["RowRemap", "build_remap", "count_reads", "profile_accesses", "remap_batch"]

IntArray = npt.NDArray[np.int64]


def _num_rows(tables: Mapping[str, int] | Iterable[TableSpec]) -> dict[str, int]:
    if isinstance(tables, Mapping):
        return {str(k): int(v) for k, v in tables.items()}
    return {s.name: s.num_rows for s in tables}


def profile_accesses(
    batches: Iterable[JaggedBatch], tables: Mapping[str, int] | Iterable[TableSpec]
) -> dict[str, IntArray]:
    """Access count of every row: ``{table: counts[num_rows]}`` (one ``bincount`` per table and batch).

    ``tables`` gives the row count of each table (``{name: num_rows}`` or
    table specs); keys of the batches that are not listed are ignored, ids
    out of range raise :class:`~flexemr.core.errors.LookupIdError`.
    """
    sizes = _num_rows(tables)
    counts = {t: np.zeros(n, dtype=np.int64) for t, n in sizes.items()}
    for batch in batches:
        for t, ids in batch.per_table().items():
            if t in counts:
                arr = validate_ids(TableSpec(t, sizes[t], 1), ids)
                counts[t] += np.bincount(arr, minlength=sizes[t])
    return counts


class RowRemap:
    """Per-table bijection between logical row ids and physical (stored) row ids.

    ``physical_to_logical[t][p]`` is the logical row stored at physical row
    ``p`` of table ``t``; its inverse gives :meth:`to_physical`.  Tables
    without an entry are identity-mapped only if you ask for them: unknown
    tables raise :class:`~flexemr.core.errors.UnknownTableError`.
    """

    def __init__(self, physical_to_logical: Mapping[str, object]) -> None:
        self._p2l: dict[str, IntArray] = {}
        self._l2p: dict[str, IntArray] = {}
        for t, perm in physical_to_logical.items():
            p = np.asarray(perm)
            if p.ndim != 1 or p.dtype.kind not in "iu":
                raise ConfigError(f"table {t!r}: permutation must be a 1-D integer array")
            p = p.astype(np.int64)
            n = p.size
            inv = np.full(n, -1, dtype=np.int64)
            if n and (p.min() < 0 or p.max() >= n):
                raise ConfigError(f"table {t!r}: permutation entries must be in [0, {n})")
            inv[p] = np.arange(n, dtype=np.int64)
            if (inv < 0).any():
                raise ConfigError(f"table {t!r}: not a permutation (repeated rows)")
            p.setflags(write=False)
            inv.setflags(write=False)
            self._p2l[str(t)] = p
            self._l2p[str(t)] = inv

    @classmethod
    def identity(cls, tables: Mapping[str, int] | Iterable[TableSpec]) -> RowRemap:
        """The remap that changes nothing."""
        return cls({t: np.arange(n, dtype=np.int64) for t, n in _num_rows(tables).items()})

    @property
    def tables(self) -> tuple[str, ...]:
        """Tables with a mapping."""
        return tuple(self._p2l)

    def physical_to_logical(self, table: str) -> IntArray:
        """The permutation of ``table`` (read-only)."""
        return self._get(self._p2l, table)

    def _get(self, d: dict[str, IntArray], table: str) -> IntArray:
        try:
            return d[table]
        except KeyError:
            raise UnknownTableError(f"remap has no table {table!r}; it has {list(d)}") from None

    def _map(self, d: dict[str, IntArray], table: str, ids: object) -> IntArray:
        m = self._get(d, table)
        arr = validate_ids(TableSpec(table, max(m.size, 1), 1), ids)
        out: IntArray = m[arr]
        return out

    def to_physical(self, table: str, ids: object) -> IntArray:
        """Physical row of every logical id (vectorised gather)."""
        return self._map(self._l2p, table, ids)

    def to_logical(self, table: str, ids: object) -> IntArray:
        """Logical row of every physical id."""
        return self._map(self._p2l, table, ids)

    def gather_arrays(self, plan: ShardingPlan) -> dict[str, IntArray]:
        """Per remapped table, the read-only logical -> physical array (``out[t][ids]`` translates ids).

        :class:`~flexemr.core.errors.ConfigError` unless every remapped table is
        in ``plan`` with as many rows.

        >>> plan = ShardingPlan.row_wise([TableSpec("t", 3, 2)], ["s0"])
        >>> RowRemap({"t": [2, 0, 1]}).gather_arrays(plan)["t"].tolist()
        [1, 2, 0]
        """
        for t, l2p in self._l2p.items():
            if t not in plan.tables:
                raise ConfigError(f"remap table {t!r} is not in the plan")
            if l2p.size != plan.spec(t).num_rows:
                raise ConfigError(f"remap of table {t!r} has {l2p.size} rows, the table {plan.spec(t).num_rows}")
        return dict(self._l2p)

    def apply_to_table(self, table: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``array`` (``[num_rows, ...]``, logical order) reordered for the servers: physical row ``p`` is logical row ``p2l[p]``."""
        p2l = self._get(self._p2l, table)
        if not isinstance(array, np.ndarray) or array.ndim < 1 or array.shape[0] != p2l.size:
            raise InputError(f"table {table!r}: expected an array with {p2l.size} rows")
        return np.ascontiguousarray(array[p2l])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` with one array per table (physical -> logical)."""
        # Any values: numpy's stub gives savez an ``allow_pickle: bool`` keyword that mypy assumes **arrays may fill
        arrays: dict[str, Any] = {f"t{i}": p for i, p in enumerate(self._p2l.values())}
        np.savez(path, **arrays, names=np.array(list(self._p2l), dtype=np.str_))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RowRemap:
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            return cls({n: z[f"t{i}"] for i, n in enumerate(names)})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RowRemap):
            return NotImplemented
        return self._p2l.keys() == other._p2l.keys() and all(
            np.array_equal(self._p2l[t], other._p2l[t]) for t in self._p2l
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RowRemap(tables={list(self._p2l)})"


def build_remap(counts: Mapping[str, object]) -> RowRemap:
    """Hottest rows first: ``p2l = argsort(-counts, stable)`` per table (deterministic)."""
    perms: dict[str, IntArray] = {}
    for t, c in counts.items():
        arr = np.asarray(c)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf"):
            raise InputError(f"table {t!r}: counts must be a 1-D numeric array")
        perms[t] = np.argsort(-arr, kind="stable").astype(np.int64)
    return RowRemap(perms)


def remap_batch(remap: RowRemap, batch: JaggedBatch) -> JaggedBatch:
    """``batch`` with every table's ids translated to physical ids (tables without a mapping are kept)."""
    vals = [remap.to_physical(t, ids) if t in remap.tables else ids for t, ids in batch.per_table().items()]
    return JaggedBatch(
        batch.keys,
        np.concatenate(vals) if vals else np.zeros(0, np.int64),
        lengths=batch.lengths,
        batch_size=batch.batch_size if batch.keys else None,
    )


def count_reads(plan: ShardingPlan, batch: JaggedBatch, remap: RowRemap | None = None) -> dict[str, int]:
    """Coalesced reads :func:`~flexemr.core.split.split_lookup` needs per table for ``batch``.

    With ``remap`` the batch's ids are first translated to physical ids (the
    servers then hold the remapped tables).  Also returns ``"total"``.
    """
    b = remap_batch(remap, batch) if remap is not None else batch
    out = {t: split_lookup(plan, t, ids).num_reads for t, ids in b.per_table().items()}
    out["total"] = sum(out.values())
    return out
