"""Deterministic table initialisation.

Embedding values are a pure function of ``(seed, table name, row block)``:
row block ``b`` of a table (rows ``[b * BLOCK_ROWS, (b + 1) * BLOCK_ROWS)``,
all columns) is drawn from a PCG64 generator seeded with
``SeedSequence([seed, crc32(table name), b])``.  Any shard — whatever its row
and column range, whatever the sharding plan — is therefore the matching
slice of one well-defined table, and a ranker can rebuild the whole model
locally (:func:`build_model`) without transferring a byte::

    >>> from flexemr.core.spec import TableSpec
    >>> spec = TableSpec("user", num_rows=10_000, dim=8)
    >>> full = init_table(spec, seed=7)
    >>> part = init_rows(spec, seed=7, row_start=4000, row_end=9000, col_start=2, col_end=6)
    >>> bool((part == full[4000:9000, 2:6]).all())
    True

Floating tables hold uniform values in ``[-0.1, 0.1)`` (drawn as float32 and
cast); ``int8``/``uint8`` tables hold uniform integers over the type's range.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ConfigError
from .plan import Shard, ShardingPlan
from .spec import TableSpec

__all__ = ["BLOCK_ROWS", "build_model", "check_seed", "init_rows", "init_shard", "init_table"]

#: Rows per independently seeded block.
BLOCK_ROWS = 4096

_SCALE = np.float32(0.2)
_SHIFT = np.float32(0.5)


def check_seed(seed: object) -> int:
    """``seed`` as an int; :class:`ConfigError` unless it is an integer in ``[0, 2**63)``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 1 << 63:
        raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def _block(spec: TableSpec, seed: int, block: int) -> npt.NDArray[Any]:
    """All columns of row block ``block`` of ``spec``'s table."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(spec.name.encode()), block])))
    rows = min(BLOCK_ROWS, spec.num_rows - block * BLOCK_ROWS)
    dtype = spec.np_dtype
    if dtype.kind == "f":
        if dtype == np.float64:
            return (rng.random((rows, spec.dim)) - 0.5) * 0.2
        vals = rng.random((rows, spec.dim), dtype=np.float32)
        vals -= _SHIFT
        vals *= _SCALE
        return vals if dtype == np.float32 else vals.astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(int(info.min), int(info.max) + 1, size=(rows, spec.dim), dtype=dtype)


def init_rows(
    spec: TableSpec,
    seed: int,
    row_start: int = 0,
    row_end: int | None = None,
    col_start: int = 0,
    col_end: int | None = None,
    out: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any]:
    """Rows ``[row_start, row_end)`` x columns ``[col_start, col_end)`` of the seeded table.

    Written into ``out`` (a C-contiguous ``[rows, cols]`` array of the table
    dtype) when given, else into a new array.  A Python loop runs over
    ``BLOCK_ROWS``-row blocks only.
    """
    seed = check_seed(seed)
    row_end = spec.num_rows if row_end is None else row_end
    col_end = spec.dim if col_end is None else col_end
    if not (0 <= row_start <= row_end <= spec.num_rows and 0 <= col_start <= col_end <= spec.dim):
        raise ConfigError(
            f"table {spec.name!r}: rows [{row_start}, {row_end}) x cols [{col_start}, {col_end}) "
            f"outside {spec.num_rows} x {spec.dim}"
        )
    shape = (row_end - row_start, col_end - col_start)
    if out is None:
        out = np.empty(shape, dtype=spec.np_dtype)
    elif out.shape != shape or out.dtype != spec.np_dtype:
        raise ConfigError(f"table {spec.name!r}: out must be {shape} {spec.dtype}, got {out.shape} {out.dtype}")
    if row_end == row_start:
        return out
    for b in range(row_start // BLOCK_ROWS, (row_end - 1) // BLOCK_ROWS + 1):
        lo = max(row_start, b * BLOCK_ROWS)
        hi = min(row_end, (b + 1) * BLOCK_ROWS)
        block = _block(spec, seed, b)
        out[lo - row_start : hi - row_start] = block[lo - b * BLOCK_ROWS : hi - b * BLOCK_ROWS, col_start:col_end]
    return out


def init_shard(spec: TableSpec, shard: Shard, seed: int, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
    """The contiguous ``[shard.num_rows, shard.num_cols]`` array a server registers for ``shard``."""
    return init_rows(spec, seed, shard.row_start, shard.row_end, shard.col_start, shard.col_end, out)


def init_table(spec: TableSpec, seed: int) -> npt.NDArray[Any]:
    """The whole seeded ``[num_rows, dim]`` table."""
    return init_rows(spec, seed)


def build_model(
    tables: ShardingPlan | Mapping[str, TableSpec] | Iterable[TableSpec], seed: int
) -> dict[str, npt.NDArray[Any]]:
    """``{name: table}`` for every table of a plan (or specs), exactly as seeded servers hold it.

    >>> m = build_model([TableSpec("a", 3, 2, "float16")], seed=1)
    >>> m["a"].shape, m["a"].dtype.name
    ((3, 2), 'float16')
    """
    if isinstance(tables, ShardingPlan):
        specs: Iterable[TableSpec] = tables.tables.values()
    elif isinstance(tables, Mapping):
        specs = tables.values()
    else:
        specs = tables
    return {spec.name: init_table(spec, seed) for spec in specs}
