"""Lookup splitting, read coalescing and reassembly.

:func:`split_lookup` turns one table lookup (a batch of row ids) into one
:class:`SubRequest` per touched shard.  Each sub-request is exactly the
arguments of an RDMA batch read on the shard's region::

    await ep.read_batch(staging_mr, sub.local_offsets, key_of[sub.region_name],
                        sub.remote_offsets, sub.lengths)

Algorithm (all numpy, no per-id Python loop):

1. validate ids (:func:`flexemr.core.plan.validate_ids`), then
   ``uniq, inverse = np.unique(ids, return_inverse=True)`` -- both skipped
   with ``sorted_unique=True``, where the caller's ids already are ``uniq``;
2. route ``uniq`` to row bands (the range table) and cut it into *runs* of
   consecutive ids inside one band, in one native pass
   (:func:`flexemr.core.dedup.runs`); since ``uniq`` is sorted each band owns
   a contiguous slice of it, and each run is a single
   ``(remote_offset, length)`` read per column shard of the band.

Staging layout contract (``SplitLookup.staging_bytes`` bytes in total): one
block per (touched band, column shard), in band order then column order; the
block of shard ``s`` holding ``k`` unique ids is a row-major
``[k, s.num_cols]`` array of the table dtype.  Hence for tables without a
column split (row-wise, table-wise) the whole staging buffer *is* the
row-major ``[n_unique, dim]`` array of the sorted unique rows, and for a
column-wise table each shard has its own ``[n_unique, shard_cols]`` block.

>>> from flexemr.core.spec import TableSpec
>>> from flexemr.core.plan import ShardingPlan
>>> plan = ShardingPlan.row_wise([TableSpec("t", 10, 2)], ["s0", "s1"])
>>> split = split_lookup(plan, "t", np.array([7, 1, 2, 3, 7, 5]))
>>> [(s.server, s.remote_offsets.tolist(), s.lengths.tolist()) for s in split.subrequests]
[('s0', [8], [24]), ('s1', [0, 16], [8, 8])]
>>> split.num_ids, split.num_unique, split.num_reads, split.bytes
(6, 5, 3, 40)
>>> from flexemr.testing import execute_locally      # the reads, simulated
>>> model = {"t": np.arange(20, dtype=np.float32).reshape(10, 2)}
>>> split.assemble(execute_locally(plan, model, split))[:, 0].tolist()
[14.0, 2.0, 4.0, 6.0, 14.0, 10.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import dedup
from .errors import InputError, LookupIdError
from .plan import ShardingPlan, validate_ids
from .spec import TableSpec

__all__ = ["ShardBlock", "SplitLookup", "SubRequest", "split_lookup"]

IntArray = npt.NDArray[np.int64]
ByteBuffer = npt.NDArray[np.uint8] | memoryview | bytes | bytearray


def _i64(values: object, what: str) -> IntArray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InputError(f"{what} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class SubRequest:
    """The reads of one lookup on one shard region.

    ``local_offsets`` index the caller's staging buffer, ``remote_offsets`` the
    shard's registered region, ``lengths`` are byte counts; all ``int64`` and of
    equal length (one entry per coalesced read).
    """

    server: str
    shard_index: int
    region_name: str
    local_offsets: IntArray
    remote_offsets: IntArray
    lengths: IntArray

    def __post_init__(self) -> None:
        lo = _i64(self.local_offsets, "local_offsets")
        ro = _i64(self.remote_offsets, "remote_offsets")
        ln = _i64(self.lengths, "lengths")
        if not lo.size == ro.size == ln.size:
            raise InputError(
                f"region {self.region_name!r}: offset/length arrays differ in size "
                f"({lo.size}, {ro.size}, {ln.size})"
            )
        object.__setattr__(self, "local_offsets", lo)
        object.__setattr__(self, "remote_offsets", ro)
        object.__setattr__(self, "lengths", ln)

    @property
    def num_reads(self) -> int:
        """Number of (coalesced) reads."""
        return int(self.lengths.size)

    @property
    def bytes(self) -> int:
        """Total bytes read."""
        return int(self.lengths.sum())

    def __repr__(self) -> str:
        return (
            f"SubRequest(server={self.server!r}, region={self.region_name!r}, "
            f"reads={self.num_reads}, bytes={self.bytes})"
        )


@dataclass(frozen=True)
class ShardBlock:
    """Where one shard's rows land in the staging buffer.

    Bytes ``[local_base, local_base + count * (col_end - col_start) * itemsize)``
    hold the row-major ``[count, col_end - col_start]`` array of sorted unique
    rows ``first .. first + count - 1`` (positions in ``SplitLookup.unique_ids``),
    columns ``[col_start, col_end)``.
    """

    shard_index: int
    local_base: int
    first: int
    count: int
    col_start: int
    col_end: int


@dataclass(frozen=True, eq=False)
class SplitLookup:
    """A lookup split into per-shard sub-requests plus what reassembly needs.

    Build with :func:`split_lookup`; fill a staging buffer of at least
    :attr:`staging_bytes` bytes by executing :attr:`subrequests`, then call
    :meth:`assemble`.
    """

    table: str
    spec: TableSpec
    ids: IntArray
    unique_ids: IntArray
    inverse: IntArray
    subrequests: tuple[SubRequest, ...]
    blocks: tuple[ShardBlock, ...]
    staging_bytes: int
    full_width: bool

    @property
    def num_ids(self) -> int:
        """Ids in the lookup, duplicates included."""
        return int(self.ids.size)

    @property
    def num_unique(self) -> int:
        """Distinct ids."""
        return int(self.unique_ids.size)

    @property
    def num_reads(self) -> int:
        """Coalesced reads over all sub-requests."""
        return sum(s.num_reads for s in self.subrequests)

    @property
    def bytes(self) -> int:
        """Bytes read over all sub-requests (equals :attr:`staging_bytes`)."""
        return sum(s.bytes for s in self.subrequests)

    @property
    def servers(self) -> tuple[str, ...]:
        """Distinct servers touched, in sub-request order."""
        return tuple(dict.fromkeys(s.server for s in self.subrequests))

    def assemble(self, staging: ByteBuffer) -> npt.NDArray[Any]:
        """Rows ``[num_ids, dim]`` in the lookup's original order (duplicates repeated).

        ``staging`` is the filled staging buffer (any C-contiguous buffer; only
        its first :attr:`staging_bytes` bytes are read).  Returns a new array.

        >>> from flexemr.core.plan import ShardingPlan
        >>> from flexemr.testing import execute_locally
        >>> plan = ShardingPlan.column_wise([TableSpec("t", 3, 4)], ["a", "b"])
        >>> split = split_lookup(plan, "t", [2, 0, 2])
        >>> model = {"t": np.arange(12, dtype=np.float32).reshape(3, 4)}
        >>> split.assemble(execute_locally(plan, model, split)).tolist()
        [[8.0, 9.0, 10.0, 11.0], [0.0, 1.0, 2.0, 3.0], [8.0, 9.0, 10.0, 11.0]]
        """
        buf = _as_bytes(staging)
        if buf.size < self.staging_bytes:
            raise InputError(
                f"table {self.table!r}: staging buffer has {buf.size} bytes, lookup needs {self.staging_bytes}"
            )
        dtype = self.spec.np_dtype
        n, dim = self.num_unique, self.spec.dim
        if self.full_width:
            rows = buf[: self.staging_bytes].view(dtype).reshape(n, dim)
        else:
            rows = np.empty((n, dim), dtype=dtype)
            isz = dtype.itemsize
            for blk in self.blocks:
                cols = blk.col_end - blk.col_start
                end = blk.local_base + blk.count * cols * isz
                rows[blk.first : blk.first + blk.count, blk.col_start : blk.col_end] = (
                    buf[blk.local_base : end].view(dtype).reshape(blk.count, cols)
                )
        return rows[self.inverse]

    def __repr__(self) -> str:
        return (
            f"SplitLookup(table={self.table!r}, ids={self.num_ids}, unique={self.num_unique}, "
            f"subrequests={len(self.subrequests)}, reads={self.num_reads}, bytes={self.staging_bytes})"
        )


def _as_bytes(staging: ByteBuffer) -> npt.NDArray[np.uint8]:
    if isinstance(staging, np.ndarray):
        if not staging.flags.c_contiguous:
            raise InputError("staging buffer must be C-contiguous")
        return staging.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(staging, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise InputError(f"staging buffer is not a contiguous byte buffer: {exc}") from exc


def _chunk_runs(
    local: IntArray, remote: IntArray, rows: IntArray, row_bytes: int, max_rows: int
) -> tuple[IntArray, IntArray, IntArray]:
    """Split runs longer than ``max_rows`` rows into several reads."""
    nchunks = -(-rows // max_rows)
    run = np.repeat(np.arange(rows.size), nchunks)
    k = np.arange(run.size) - np.repeat(np.cumsum(nchunks) - nchunks, nchunks)
    skip = k * max_rows * row_bytes
    length = np.minimum(max_rows, rows[run] - k * max_rows) * row_bytes
    return local[run] + skip, remote[run] + skip, length


def _sorted_unique_ids(spec: TableSpec, ids: object) -> IntArray:
    """The O(1) checks of :func:`split_lookup`'s ``sorted_unique`` fast path."""
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1:
        what = f"{ids.dtype} array of shape {ids.shape}" if isinstance(ids, np.ndarray) else type(ids).__name__
        raise InputError(f"table {spec.name!r}: sorted_unique=True takes a 1-D int64 ndarray, got {what}")
    if ids.size and (int(ids[0]) < 0 or int(ids[-1]) >= spec.num_rows):
        raise LookupIdError(f"table {spec.name!r}: sorted ids [{int(ids[0])} .. {int(ids[-1])}] are not "
                            f"within [0, {spec.num_rows})")
    out: IntArray = ids
    return out


def split_lookup(
    plan: ShardingPlan,
    table: str,
    ids: object,
    *,
    max_read_bytes: int | None = None,
    sorted_unique: bool = False,
) -> SplitLookup:
    """Split a lookup of ``ids`` in ``table`` into coalesced per-shard reads.

    ``ids`` must be a 1-D integer array in ``[0, num_rows)``
    (:class:`~flexemr.core.errors.InputError` /
    :class:`~flexemr.core.errors.LookupIdError` otherwise; an unknown table raises
    :class:`~flexemr.core.errors.UnknownTableError`).  Runs of consecutive unique
    ids inside one shard become one read; with ``max_read_bytes`` longer runs
    are cut into reads of at most that many bytes (whole rows).

    ``sorted_unique=True`` is the fast path for callers that already hold
    validated, sorted, duplicate-free ids (``np.unique`` output, as
    :class:`~flexemr.EmbeddingClient` does): ``ids`` must then be a 1-D
    ``int64`` ndarray, used as it is (``unique_ids`` *is* ``ids``, no copy),
    without the O(n) validation and the O(n log n) deduplication; only O(1)
    checks run (type, dtype, shape, first and last id in range).  Unsorted or
    duplicate ids then give wrong reads: pass them only with the default.

    >>> from flexemr.core.plan import ShardingPlan
    >>> plan = ShardingPlan.row_wise([TableSpec("t", 8, 4)], ["s0"], rows_per_shard=4)
    >>> [s.lengths.tolist() for s in split_lookup(plan, "t", [0, 1, 2, 3, 4, 6]).subrequests]
    [[64], [16, 16]]
    >>> uniq = np.array([0, 1, 2, 3, 4, 6])
    >>> split_lookup(plan, "t", uniq, sorted_unique=True).unique_ids is uniq
    True
    """
    spec = plan.spec(table)
    if max_read_bytes is not None and (
        isinstance(max_read_bytes, bool) or not isinstance(max_read_bytes, (int, np.integer)) or max_read_bytes < 1
    ):
        raise InputError(f"max_read_bytes must be a positive integer, got {max_read_bytes!r}")
    if sorted_unique:
        arr = uniq = _sorted_unique_ids(spec, ids)
        inverse = np.arange(uniq.size, dtype=np.int64)
    else:
        arr = validate_ids(spec, ids)
        uniq, inverse = np.unique(arr, return_inverse=True)
        uniq = uniq.astype(np.int64, copy=False)
        inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    rt = plan.range_table(table)
    shards = plan.shards[table]
    n = int(uniq.size)
    full_width = plan.is_full_width(table)
    subs: list[SubRequest] = []
    blocks: list[ShardBlock] = []
    local = 0
    if n:
        # runs of consecutive ids inside one band, the runs and the slice of uniq of every band: one native pass
        run_start, run_bounds, bounds = dedup.runs(uniq, rt.starts)
        run_rows = np.diff(run_start)
        run_start = run_start[:-1]
        for b in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            u0, count = int(bounds[b]), int(bounds[b + 1] - bounds[b])
            r0, r1 = run_bounds[b], run_bounds[b + 1]
            rs = run_start[r0:r1]
            rows = run_rows[r0:r1]
            rel_row = uniq[rs] - rt.starts[b]
            rel_pos = rs - u0
            first = int(rt.first_shard[b])
            for j in range(first, first + int(rt.num_col_shards[b])):
                sh = shards[j]
                rb = sh.row_bytes(spec)
                lo, ro, ln = local + rel_pos * rb, rel_row * rb, rows * rb
                if max_read_bytes is not None:
                    max_rows = int(max_read_bytes) // rb
                    if max_rows < 1:
                        raise InputError(
                            f"table {table!r}: max_read_bytes={max_read_bytes} is below one shard row "
                            f"({rb} bytes)"
                        )
                    if (rows > max_rows).any():
                        lo, ro, ln = _chunk_runs(lo, ro, rows, rb, max_rows)
                subs.append(SubRequest(sh.server, j, sh.region_name, lo, ro, ln))
                blocks.append(ShardBlock(j, local, u0, count, sh.col_start, sh.col_end))
                local += count * rb
    return SplitLookup(
        table=table,
        spec=spec,
        ids=arr,
        unique_ids=uniq,
        inverse=inverse,
        subrequests=tuple(subs),
        blocks=tuple(blocks),
        staging_bytes=local,
        full_width=full_width,
    )
