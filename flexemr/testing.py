"""Test oracles: what the servers' reads would put into a staging buffer, computed locally.

Nothing of the serving path uses these; they let tests (and the docs' examples)
check :func:`~flexemr.split_lookup` and everything built on it against plain
numpy indexing, without servers::

    split = split_lookup(plan, "t", ids)
    rows = split.assemble(execute_locally(plan, model, split))
    assert (rows == model["t"][ids]).all()

>>> from flexemr import ShardingPlan, TableSpec
>>> plan = ShardingPlan.column_wise([TableSpec("t", 3, 4)], ["a", "b"])
>>> model = {"t": np.arange(12, dtype=np.float32).reshape(3, 4)}
>>> lookup_locally(plan, model, "t", [2, 0, 2]).tolist()
[[8.0, 9.0, 10.0, 11.0], [0.0, 1.0, 2.0, 3.0], [8.0, 9.0, 10.0, 11.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .core.errors import FlexEMRError, InputError
from .core.plan import Shard, ShardingPlan
from .core.split import SplitLookup, SubRequest, split_lookup

__all__ = ["execute_locally", "execute_subrequests", "lookup_locally", "shard_region_array"]


def shard_region_array(model_table: npt.NDArray[Any], shard: Shard) -> npt.NDArray[Any]:
    """The shard's slice of a table as the C-contiguous array its server registers.

    >>> t = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> shard_region_array(t, Shard("t", "s0", 1, 3, 2, 4)).tolist()
    [[6.0, 7.0], [10.0, 11.0]]
    """
    if not isinstance(model_table, np.ndarray) or model_table.ndim != 2:
        raise InputError(f"table {shard.table!r}: model table must be a 2-D numpy array")
    rows, cols = model_table.shape
    if shard.row_end > rows or shard.col_end > cols:
        raise InputError(
            f"table {shard.table!r}: model table of shape {model_table.shape} does not contain shard "
            f"rows [{shard.row_start}, {shard.row_end}) cols [{shard.col_start}, {shard.col_end})"
        )
    return np.ascontiguousarray(model_table[shard.row_start : shard.row_end, shard.col_start : shard.col_end])


def execute_subrequests(
    plan: ShardingPlan,
    model: Mapping[str, npt.NDArray[Any]],
    subs: Sequence[SubRequest],
    staging: npt.NDArray[np.uint8],
) -> None:
    """Simulate the RDMA reads of ``subs`` against ``model`` into ``staging`` (in place).

    Every read is bounds-checked against its region and the staging buffer
    (:class:`~flexemr.core.errors.FlexEMRError` on violation).
    """
    if not isinstance(staging, np.ndarray) or staging.dtype != np.uint8 or staging.ndim != 1:
        raise InputError("staging must be a 1-D uint8 numpy array")
    regions: dict[str, npt.NDArray[np.uint8]] = {}
    for sub in subs:
        region = regions.get(sub.region_name)
        if region is None:
            shard = plan.region(sub.region_name)
            spec = plan.spec(shard.table)
            try:
                table = model[shard.table]
            except KeyError:
                raise InputError(f"model has no table {shard.table!r}") from None
            if not isinstance(table, np.ndarray) or table.shape != (spec.num_rows, spec.dim) or table.dtype != spec.np_dtype:
                raise InputError(
                    f"table {shard.table!r}: model array must have shape {(spec.num_rows, spec.dim)} "
                    f"and dtype {spec.dtype}"
                )
            region = shard_region_array(table, shard).reshape(-1).view(np.uint8)
            regions[sub.region_name] = region
        lengths = sub.lengths
        if lengths.size == 0:
            continue
        if (
            (lengths < 0).any()
            or (sub.remote_offsets < 0).any()
            or (sub.local_offsets < 0).any()
            or (sub.remote_offsets + lengths > region.size).any()
            or (sub.local_offsets + lengths > staging.size).any()
        ):
            raise FlexEMRError(f"sub-request on {sub.region_name!r} reads outside its region or staging buffer")
        total = int(lengths.sum())
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        staging[np.repeat(sub.local_offsets, lengths) + within] = region[np.repeat(sub.remote_offsets, lengths) + within]


def execute_locally(
    plan: ShardingPlan, model: Mapping[str, npt.NDArray[Any]], split: SplitLookup
) -> npt.NDArray[np.uint8]:
    """A staging buffer filled by simulating ``split``'s reads against ``model``.

    ``model`` maps table name to its full ``[num_rows, dim]`` array.
    """
    staging = np.zeros(split.staging_bytes, dtype=np.uint8)
    execute_subrequests(plan, model, split.subrequests, staging)
    return staging


def lookup_locally(
    plan: ShardingPlan, model: Mapping[str, npt.NDArray[Any]], table: str, ids: object
) -> npt.NDArray[Any]:
    """split -> simulated reads -> assemble; equals ``model[table][ids]`` for valid ids."""
    split = split_lookup(plan, table, ids)
    return split.assemble(execute_locally(plan, model, split))
