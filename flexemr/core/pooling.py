"""Embedding-bag pooling, hierarchical (server-side partial) pooling and its byte cost model.

:func:`pool` reduces the rows of every bag (sample) to one vector, like
``torch.nn.EmbeddingBag``; it supersedes :func:`flexemr.core.jagged.pool_bags`
(which only knows ``sum``/``mean`` without weights) and gives the same result
for the modes both support.

>>> rows = np.arange(8, dtype=np.float32).reshape(4, 2)
>>> pool(rows, [0, 3, 3, 4], "sum").tolist()
[[6.0, 9.0], [0.0, 0.0], [6.0, 7.0]]
>>> pool(rows, lengths=[3, 0, 1], mode="max").tolist()
[[4.0, 5.0], [0.0, 0.0], [6.0, 7.0]]

Hierarchical pooling: every embedding server reduces the rows of each bag
that it holds into a :class:`PartialPool` (:func:`server_partial_pool`); the
ranker adds the partials up (:func:`combine_partials`):

>>> bag = bag_ids_from_offsets([0, 3, 3, 4])       # bag of every row
>>> on_a = np.array([True, False, True, False])     # rows held by server "a"
>>> pa = server_partial_pool(rows[on_a], bag[on_a], 3)
>>> pb = server_partial_pool(rows[~on_a], bag[~on_a], 3)
>>> combine_partials([pa, pb], "mean").tolist() == pool(rows, [0, 3, 3, 4], "mean").tolist()
True

Whether asking a server to pool is cheaper than reading the raw rows is
decided by :class:`PoolingCost`: measured time per row of either way, with
the byte cost model of :func:`choose_pooling` as the prior until both are
measured (see their docstrings and ``docs/locality.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import InputError

__all__ = [
    "ID_BYTES",
    "PARTIAL_COUNT_BYTES",
    "PARTIAL_VALUE_BYTES",
    "READ_OVERHEAD_BYTES",
    "RPC_OVERHEAD_BYTES",
    "PartialPool",
    "PoolMode",
    "PoolingCost",
    "accumulation_dtype",
    "bag_ids_from_offsets",
    "choose_pooling",
    "combine_partials",
    "pool",
    "pooling_bytes",
    "raw_read_bytes",
    "server_partial_pool",
    "transfer_bytes",
]

PoolMode = Literal["sum", "mean", "max"]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.floating[Any]]

_MODES = ("sum", "mean", "max")

#: Per one-sided READ: work request + completion entry + transport headers, in bytes.
READ_OVERHEAD_BYTES: int = 64
#: Fixed cost of one pooling RPC (request and response framing, send/recv completions), in bytes.
RPC_OVERHEAD_BYTES: int = 256
#: Bytes per row id carried in a pooling request.
ID_BYTES: int = 8
#: Bytes per element of a partial sum in a pooling response (``float32``).
PARTIAL_VALUE_BYTES: int = 4
#: Bytes of the per-bag row count in a pooling response.
PARTIAL_COUNT_BYTES: int = 4


# ------------------------------------------------------------------ helpers


def accumulation_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    """Accumulation/output dtype for rows of ``dtype``.

    ``float16`` and integer rows (quantised tables) accumulate in ``float32``;
    ``float32``/``float64`` keep their own precision.

    >>> accumulation_dtype("float16"), accumulation_dtype("int8"), accumulation_dtype("float64")
    (dtype('float32'), dtype('float32'), dtype('float64'))
    """
    dt = np.dtype(dtype)
    if dt.kind == "f" and dt.itemsize >= 4:
        return dt
    return np.dtype(np.float32)


def _rows_2d(rows: object) -> npt.NDArray[Any]:
    arr = np.asarray(rows)
    if arr.ndim != 2:
        raise InputError(f"rows must be a 2-D [n, dim] array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"rows must be numeric, got dtype {arr.dtype}")
    return arr


def _int_1d(values: object, what: str) -> IntArray:
    arr = np.asarray(values)
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InputError(f"{what} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _offsets(n_rows: int, offsets: object | None, lengths: object | None) -> IntArray:
    if (offsets is None) == (lengths is None):
        raise InputError("give exactly one of offsets or lengths")
    if lengths is not None:
        lens = _int_1d(lengths, "lengths")
        if lens.size and lens.min() < 0:
            raise InputError("lengths must be non-negative")
        offs = np.concatenate((np.zeros(1, np.int64), np.cumsum(lens, dtype=np.int64)))
    else:
        offs = _int_1d(offsets, "offsets")
        if offs.size == 0 or offs[0] != 0 or (np.diff(offs) < 0).any():
            raise InputError("offsets must be non-decreasing and start with 0")
    if int(offs[-1]) != n_rows:
        raise InputError(f"offsets/lengths cover {int(offs[-1])} rows but there are {n_rows}")
    return offs


def _weights(per_sample_weights: object | None, n: int, mode: str) -> FloatArray | None:
    if per_sample_weights is None:
        return None
    if mode == "max":
        raise InputError("per_sample_weights are only supported with mode 'sum' or 'mean'")
    w = np.asarray(per_sample_weights)
    if w.ndim != 1 or w.size != n or (w.size and w.dtype.kind not in "fiu"):
        raise InputError(f"per_sample_weights must be a 1-D numeric array of {n} weights, got shape {w.shape}")
    return w


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise InputError(f"mode must be one of {list(_MODES)}, got {mode!r}")


def bag_ids_from_offsets(offsets: object) -> IntArray:
    """Bag index of every row for bag ``offsets`` (``[B+1]``): ``np.repeat(arange(B), lengths)``.

    >>> bag_ids_from_offsets([0, 2, 2, 3]).tolist()
    [0, 0, 2]
    """
    offs = _int_1d(offsets, "offsets")
    if offs.size == 0 or offs[0] != 0 or (np.diff(offs) < 0).any():
        raise InputError("offsets must be non-decreasing and start with 0")
    out: IntArray = np.repeat(np.arange(offs.size - 1, dtype=np.int64), np.diff(offs))
    return out


def _segment_reduce(
    ufunc: np.ufunc, values: npt.NDArray[Any], offs: IntArray, fill: float, dtype: np.dtype[Any]
) -> npt.NDArray[Any]:
    """``ufunc.reduceat`` over the segments ``offs`` with empty segments set to ``fill``.

    ``np.ufunc.reduceat`` returns ``values[i]`` (not the identity) for an empty
    segment ``[i, i)``, so only the starts of non-empty segments are passed:
    consecutive non-empty starts are strictly increasing and the rows between
    them belong to the first one (the empty bags in between hold no rows).
    """
    counts = np.diff(offs)
    out = np.full((counts.size, values.shape[1]), fill, dtype=dtype)
    nonempty = np.flatnonzero(counts > 0)
    if nonempty.size:
        out[nonempty] = ufunc.reduceat(values, offs[nonempty], axis=0)
    return out


# ------------------------------------------------------------------ pooling


def pool(
    rows: object,
    offsets: object | None = None,
    mode: PoolMode = "sum",
    per_sample_weights: object | None = None,
    *,
    lengths: object | None = None,
    dtype: npt.DTypeLike | None = None,
) -> FloatArray:
    """Pool ``rows[offsets[b]:offsets[b+1]]`` of every bag ``b`` into one ``[dim]`` vector.

    Give exactly one of ``offsets`` (``[B+1]``, non-decreasing, from 0 to
    ``len(rows)``) or ``lengths`` (``[B]`` rows per bag).  Returns ``[B, dim]``
    in ``dtype`` (default :func:`accumulation_dtype` of the rows, e.g.
    ``float32`` for ``float16`` rows; accumulation happens in that dtype).

    * ``"sum"``: ``sum_i w_i * r_i`` (``w_i = 1`` without weights);
    * ``"mean"``: the same sum divided by the **number of rows** of the bag
      (weights are not renormalised, as in FBGEMM's weighted mean pooling);
    * ``"max"``: element-wise maximum; weights are rejected.

    Empty bags give zeros in every mode.  Bad shapes, modes or offsets raise
    :class:`~flexemr.core.errors.InputError`.

    >>> r = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float16)
    >>> pool(r, lengths=[2, 1], mode="mean", per_sample_weights=[1.0, 3.0, 0.5]).tolist()
    [[5.0, 7.0], [2.5, 3.0]]
    """
    _check_mode(mode)
    arr = _rows_2d(rows)
    offs = _offsets(arr.shape[0], offsets, lengths)
    w = _weights(per_sample_weights, arr.shape[0], mode)
    acc = np.dtype(dtype) if dtype is not None else accumulation_dtype(arr.dtype)
    vals = arr.astype(acc, copy=False)
    if mode == "max":
        return _segment_reduce(np.maximum, vals, offs, 0.0, acc)
    if w is not None:
        vals = vals * w.astype(acc, copy=False)[:, None]
    out = _segment_reduce(np.add, vals, offs, 0.0, acc)
    if mode == "mean":
        counts = np.diff(offs)
        nz = counts > 0
        out[nz] /= counts[nz, None].astype(acc)
    return out


@dataclass(frozen=True, eq=False)
class PartialPool:
    """What one server returns for hierarchical pooling of ``B`` bags.

    ``sum`` is ``[B, dim]`` (weighted) partial sums, ``count`` ``[B]`` rows of
    each bag the server reduced, ``max`` ``[B, dim]`` partial maxima (``-inf``
    where ``count == 0``) or ``None`` when the max was not requested.  Only
    the :attr:`touched` bags are non-trivial: on the wire a server sends their
    indices, sums and counts (:attr:`wire_bytes`).
    """

    sum: FloatArray
    count: IntArray
    max: FloatArray | None = None

    def __post_init__(self) -> None:
        if self.sum.ndim != 2 or self.count.shape != (self.sum.shape[0],):
            raise InputError(f"partial sum {self.sum.shape} and count {self.count.shape} do not match")
        if self.max is not None and self.max.shape != self.sum.shape:
            raise InputError(f"partial max {self.max.shape} and sum {self.sum.shape} do not match")

    @property
    def num_bags(self) -> int:
        """``B``."""
        return int(self.count.size)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.sum.shape[1])

    @property
    def touched(self) -> IntArray:
        """Indices of bags with at least one row on this server."""
        out: IntArray = np.flatnonzero(self.count > 0).astype(np.int64)
        return out

    @property
    def wire_bytes(self) -> int:
        """Response size: per touched bag ``dim * 4 + 4`` bytes (+ ``dim * 4`` with ``max``)."""
        per_bag = self.dim * PARTIAL_VALUE_BYTES + PARTIAL_COUNT_BYTES
        if self.max is not None:
            per_bag += self.dim * PARTIAL_VALUE_BYTES
        return int(self.touched.size) * per_bag


def server_partial_pool(
    rows_local: object,
    bag_ids_of_rows: object,
    num_bags: int,
    weights: object | None = None,
    *,
    with_max: bool = False,
    dtype: npt.DTypeLike | None = None,
) -> PartialPool:
    """Partial pooling a server computes over the rows of a batch that it holds.

    ``rows_local[i]`` belongs to bag ``bag_ids_of_rows[i]`` (any order, bags in
    ``[0, num_bags)``); ``weights`` are the per-row weights (sum/mean only).
    Vectorised: one stable sort by bag, then ``reduceat``.  ``with_max`` also
    computes partial maxima (required to :func:`combine_partials` with ``"max"``).

    >>> r = np.array([[1.0, 1.0], [2.0, 0.0], [4.0, 4.0]], dtype=np.float32)
    >>> p = server_partial_pool(r, [2, 0, 2], 3, with_max=True)
    >>> p.sum.tolist(), p.count.tolist(), p.touched.tolist()
    ([[2.0, 0.0], [0.0, 0.0], [5.0, 5.0]], [1, 0, 2], [0, 2])
    """
    arr = _rows_2d(rows_local)
    bags = _int_1d(bag_ids_of_rows, "bag_ids_of_rows")
    if isinstance(num_bags, bool) or not isinstance(num_bags, (int, np.integer)) or num_bags < 0:
        raise InputError(f"num_bags must be a non-negative integer, got {num_bags!r}")
    nb = int(num_bags)
    if bags.size != arr.shape[0]:
        raise InputError(f"{bags.size} bag ids for {arr.shape[0]} rows")
    if bags.size and (bags.min() < 0 or bags.max() >= nb):
        raise InputError(f"bag ids must be in [0, {nb})")
    if weights is not None and with_max:
        raise InputError("weights cannot be combined with max pooling")
    w = _weights(weights, arr.shape[0], "sum")
    acc = np.dtype(dtype) if dtype is not None else accumulation_dtype(arr.dtype)
    order = np.argsort(bags, kind="stable")
    sorted_bags = bags[order]
    count = np.bincount(sorted_bags, minlength=nb).astype(np.int64)
    offs = np.concatenate((np.zeros(1, np.int64), np.cumsum(count)))
    vals = arr[order].astype(acc, copy=False)
    wvals = vals if w is None else vals * w[order].astype(acc, copy=False)[:, None]
    psum = _segment_reduce(np.add, wvals, offs, 0.0, acc)
    pmax = _segment_reduce(np.maximum, vals, offs, -np.inf, acc) if with_max else None
    return PartialPool(psum, count, pmax)


def combine_partials(partials: Sequence[PartialPool], mode: PoolMode = "sum") -> FloatArray:
    """Ranker side of hierarchical pooling: merge server partials into ``[B, dim]``.

    Sums and counts add up; ``mean`` divides by the total count; ``max`` takes
    the element-wise maximum (every partial needs ``max``).  Bags no server
    touched give zeros, as in :func:`pool`.
    """
    _check_mode(mode)
    if len(partials) == 0:
        raise InputError("combine_partials needs at least one partial")
    shape = partials[0].sum.shape
    for p in partials[1:]:
        if p.sum.shape != shape:
            raise InputError(f"partials disagree on shape: {p.sum.shape} vs {shape}")
    count = np.sum([p.count for p in partials], axis=0)
    if mode == "max":
        maxes = [p.max for p in partials]
        if any(m is None for m in maxes):
            raise InputError("max pooling needs partials computed with with_max=True")
        out = np.maximum.reduce([m for m in maxes if m is not None])
        out[count == 0] = 0.0
        return out
    out = np.sum([p.sum for p in partials], axis=0).astype(partials[0].sum.dtype, copy=False)
    if mode == "mean":
        nz = count > 0
        out[nz] /= count[nz, None].astype(out.dtype)
    return out


# --------------------------------------------------------------- cost model


def _counts(rows_per_bag_on_server: object) -> IntArray:
    c = np.asarray(rows_per_bag_on_server)
    if c.ndim not in (1, 2) or (c.size and c.dtype.kind not in "iu"):
        raise InputError(f"rows_per_bag_on_server must be a 1-D or 2-D integer array, got shape {c.shape}")
    c = c.astype(np.int64, copy=False)
    if c.size and c.min() < 0:
        raise InputError("rows_per_bag_on_server must be non-negative")
    return c


def raw_read_bytes(rows: object, dim: int, itemsize: int, *, read_overhead: int = READ_OVERHEAD_BYTES) -> IntArray:
    """Bytes moved reading ``rows`` raw rows with one-sided READs: ``rows * (dim * itemsize + read_overhead)``.

    Conservative: every row is its own READ (no coalescing, no de-duplication).
    """
    r = _counts(rows)
    out: IntArray = r * (int(dim) * int(itemsize) + int(read_overhead))
    return out


def pooling_bytes(rows: object, dim: int) -> IntArray:
    """Marginal bytes of pooling a bag of ``rows`` rows on a server (excluding the RPC overhead).

    ``rows * 8`` (ids in the request) ``+ dim * 4 + 4`` (float32 partial sum
    and count in the response) for bags with ``rows > 0``, else 0.
    """
    r = _counts(rows)
    out: IntArray = np.where(
        r > 0, r * ID_BYTES + int(dim) * PARTIAL_VALUE_BYTES + PARTIAL_COUNT_BYTES, 0
    ).astype(np.int64)
    return out


def choose_pooling(
    rows_per_bag_on_server: object,
    dim: int,
    itemsize: int,
    *,
    read_overhead: int = READ_OVERHEAD_BYTES,
    rpc_overhead: int = RPC_OVERHEAD_BYTES,
) -> npt.NDArray[np.bool_]:
    """Decide, per (server, bag), whether the server pools the bag or the ranker reads raw rows.

    ``rows_per_bag_on_server`` is ``[S, B]`` (or ``[B]`` for one server): how
    many rows of bag ``b`` server ``s`` holds.  Byte cost model (``r`` rows):

    * raw one-sided reads: ``raw(r) = r * (dim * itemsize + read_overhead)``;
    * server pooling: ``pooled(r) = r * 8 + dim * 4 + 4`` per bag, plus
      ``rpc_overhead`` once per server that gets a pooling request.

    A bag with a single row on a server is never pooled: there is nothing
    to reduce, and routing one row through the RPC only trades READ overhead
    for server CPU, which this byte model does not price.  The returned mask
    is otherwise the **byte-optimal** choice: with ``saving(r) = raw(r) -
    pooled(r)``, server ``s`` pools exactly its bags with ``r >= 2`` and
    ``saving > 0`` if their total saving exceeds ``rpc_overhead``, and none
    otherwise (the RPC overhead is a fixed cost, so no other subset is
    better).  With the default constants ``saving(2) = 2 * dim * itemsize -
    4 * dim + 108 > 0`` for every float table, so a server pools every bag
    of which it holds more than one row, as soon as the request's total
    saving covers the 256-byte RPC overhead.

    >>> choose_pooling(np.array([[0, 1, 2, 9], [3, 1, 0, 0]]), dim=64, itemsize=4).tolist()
    [[False, False, True, True], [True, False, False, False]]
    >>> choose_pooling(np.array([2, 0]), dim=4, itemsize=4).tolist()  # saving below the RPC cost
    [False, False]
    """
    c = _counts(rows_per_bag_on_server)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InputError(f"dim must be a positive integer, got {dim!r}")
    if isinstance(itemsize, bool) or not isinstance(itemsize, (int, np.integer)) or itemsize < 1:
        raise InputError(f"itemsize must be a positive integer, got {itemsize!r}")
    c2 = c.reshape(1, -1) if c.ndim == 1 else c
    saving = raw_read_bytes(c2, dim, itemsize, read_overhead=read_overhead) - pooling_bytes(c2, dim)
    bag_pays = (c2 >= 2) & (saving > 0)
    server_pays = np.where(bag_pays, saving, 0).sum(axis=1) > int(rpc_overhead)
    mask: npt.NDArray[np.bool_] = bag_pays & server_pays[:, None]
    return mask.reshape(c.shape)


def transfer_bytes(
    rows_per_bag_on_server: object,
    pooled: object,
    dim: int,
    itemsize: int,
    *,
    read_overhead: int = READ_OVERHEAD_BYTES,
    rpc_overhead: int = RPC_OVERHEAD_BYTES,
) -> int:
    """Total bytes moved under the cost model when bags ``pooled`` (a mask like :func:`choose_pooling`'s) are pooled.

    >>> c = np.array([[3, 1]])
    >>> transfer_bytes(c, choose_pooling(c, 64, 4), 64, 4) <= transfer_bytes(c, np.zeros_like(c, bool), 64, 4)
    True
    """
    c = _counts(rows_per_bag_on_server)
    m = np.asarray(pooled, dtype=bool)
    if m.shape != c.shape:
        raise InputError(f"pooled mask shape {m.shape} does not match counts {c.shape}")
    c2, m2 = (c.reshape(1, -1), m.reshape(1, -1)) if c.ndim == 1 else (c, m)
    m2 = m2 & (c2 > 0)
    raw = raw_read_bytes(np.where(m2, 0, c2), dim, itemsize, read_overhead=read_overhead).sum()
    pooled_b = pooling_bytes(np.where(m2, c2, 0), dim).sum()
    rpcs = int(m2.any(axis=1).sum())
    return int(raw + pooled_b + rpcs * int(rpc_overhead))



# ---------------------------------------------------------- time cost model


@dataclass
class _Samples:
    """The last few measurements (seconds per id) of one way, and how many lookups ago it was last fed."""

    window: int = 5
    values: list[float] = field(default_factory=list)
    age: int = 0

    def add(self, seconds_per_id: float) -> None:
        self.values.append(seconds_per_id)
        del self.values[: -self.window]
        self.age = 0

    @property
    def value(self) -> float | None:
        """The median of the samples kept (robust to the odd lookup slowed by something else)."""
        return float(np.median(self.values)) if self.values else None

    @property
    def least(self) -> float | None:
        """The fastest sample kept (what the way costs when nothing else slows it down)."""
        return min(self.values) if self.values else None


def _min_paying_rows(dim: int, itemsize: int) -> int:
    """The fewest rows of a bag that :func:`choose_pooling` pools (at least 2; the byte saving grows with rows)."""
    for r in range(2, 1 << 16):
        if int(raw_read_bytes([r], dim, itemsize)[0]) > int(pooling_bytes([r], dim)[0]):
            return r
    return 1 << 16


@dataclass
class PoolingCost:
    """Whether a pooled lookup asks servers to pool, or reads every row raw and pools on the ranker.

    Two ways to serve a pooled lookup, and what each was measured to cost on
    this client (:meth:`observe`): seconds per id of whole lookups (wall
    time from the call to the result); each way keeps its last ``window``
    measurements and is judged by their median, so the odd lookup slowed by
    something else does not decide.  A lookup takes the cheaper way
    (:meth:`choose`).  The first ``first_explore`` lookups ask servers to
    pool; then the two ways take turns until each has ``min_samples``
    measurements; afterwards the other way is tried again, for one lookup,
    once its last measurement is ``explore_every`` lookups old, so a change
    of load or workload is noticed at the price of one lookup in
    ``explore_every``.  Whole lookups are measured because their parts
    overlap (requests to every server, raw reads): the time of a part says
    little about the lookup's.

    Inside a lookup that asks servers to pool, the byte model is the rule
    per shard (:meth:`prior`): its server pools its rows of a table when at
    least half of them lie in bags that :func:`choose_pooling` would have it
    pool, i.e. bags of at least 2 rows (for every float table: one row per
    bag moves as many bytes either way, and costs the server's CPU); the
    other shards' rows are read raw.

    ``judge="least"`` judges each way by its fastest kept sample instead of
    the median: on a machine shared with other work, load only ever adds
    time, so the fastest sample is the best estimate of what a way costs, and
    a burst of load during the consecutive lookups of one way (or while the
    other way is explored) does not decide for many lookups afterwards.

    >>> cost = PoolingCost(first_explore=1, min_samples=1)
    >>> cost.choose()                          # nothing measured: servers pool
    True
    >>> cost.observe(True, 1000, 0.004)
    >>> cost.choose()                          # raw reads not measured yet: tried
    False
    >>> cost.observe(False, 1000, 0.001)
    >>> cost.choose()                          # measured: raw reads 4x faster per id
    False
    """

    window: int = 5
    min_samples: int = 3
    explore_every: int = 16
    first_explore: int = 4
    judge: str = "median"
    pooled: _Samples = field(default_factory=_Samples)
    raw: _Samples = field(default_factory=_Samples)
    _min_rows: dict[tuple[int, int], int] = field(default_factory=dict)
    _lookups: int = 0

    def __post_init__(self) -> None:
        if self.judge not in ("median", "least"):
            raise InputError(f"judge must be 'median' or 'least', got {self.judge!r}")
        self.pooled.window = self.raw.window = self.window

    def prior(self, dim: int, itemsize: int, offsets: IntArray, rows: int) -> bool:
        """The byte model's choice for one shard's ``rows`` rows of a table (``offsets``: their bags, dense)."""
        key = (dim, itemsize)
        least = self._min_rows.get(key)
        if least is None:
            least = self._min_rows[key] = _min_paying_rows(dim, itemsize)
        counts = np.diff(offsets)
        if least == 2:
            small = int(np.count_nonzero(counts == 1))
        else:
            small = int(counts[counts < least].sum())
        return 2 * (rows - small) >= rows

    def choose(self) -> bool:
        """Whether the next lookup asks servers to pool (``False``: raw reads only)."""
        p, r = self.pooled, self.raw
        self._lookups += 1
        p.age += 1
        r.age += 1
        if self._lookups <= self.first_explore:
            return True
        if len(p.values) < self.min_samples or len(r.values) < self.min_samples:  # take turns
            return len(r.values) >= len(p.values)
        pv, rv = (p.value, r.value) if self.judge == "median" else (p.least, r.least)
        assert pv is not None and rv is not None
        choice = pv <= rv
        other = r if choice else p
        if other.age >= self.explore_every:  # try the other way once
            return not choice
        return choice

    def observe(self, pooled: bool, ids: int, seconds: float) -> None:
        """A lookup of ``ids`` ids took ``seconds``; ``pooled``: servers were asked to pool."""
        if ids > 0:
            (self.pooled if pooled else self.raw).add(seconds / ids)
