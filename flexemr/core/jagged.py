"""Jagged (multi-hot) sparse feature batches.

:class:`JaggedBatch` follows the layout of TorchRec's ``KeyedJaggedTensor``:
``values`` holds every id, grouped by key (table) and, inside a key, by sample;
``lengths[k * batch_size + b]`` is the number of ids of sample ``b`` for key
``k``.  ``offsets`` is the exclusive prefix sum of ``lengths`` (one longer).

>>> jb = JaggedBatch.from_lists({"user": [[1, 2], [3]], "item": [[], [7, 7, 9]]})
>>> jb.batch_size, jb.lengths.tolist(), jb.values.tolist()
(2, [2, 1, 0, 3], [1, 2, 3, 7, 7, 9])
>>> jb.per_table()["item"].tolist(), jb.bag_offsets("item").tolist()
([7, 7, 9], [0, 0, 3])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import InputError, UnknownTableError

__all__ = ["JaggedBatch", "pool_bags"]

IntArray = npt.NDArray[np.int64]


def _int_1d(values: object, what: str) -> IntArray:
    arr = np.asarray(values)
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise InputError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputError(f"{what} must have an integer dtype, got {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InputError(f"{what} has values beyond int64")
    return arr.astype(np.int64, copy=False)


class JaggedBatch:
    """Ids of a batch of samples for several keys (tables), KeyedJaggedTensor style.

    Give exactly one of ``lengths`` (``len(keys) * batch_size`` non-negative
    counts, key-major) or ``offsets`` (``len(keys) * batch_size + 1``
    non-decreasing, starting at 0 and ending at ``len(values)``).
    ``batch_size`` is inferred unless ``keys`` is empty.  Invalid input raises
    :class:`~flexemr.core.errors.InputError`.  Ids are not range-checked here;
    :func:`flexemr.core.split.split_lookup` does that per table.
    """

    __slots__ = ("_keys", "_values", "_lengths", "_offsets", "_batch_size", "_index")

    def __init__(
        self,
        keys: Sequence[str],
        values: object,
        lengths: object | None = None,
        offsets: object | None = None,
        batch_size: int | None = None,
    ) -> None:
        keys_t = tuple(keys)
        for k in keys_t:
            if not isinstance(k, str) or not k:
                raise InputError(f"keys must be non-empty strings, got {k!r}")
        if len(set(keys_t)) != len(keys_t):
            raise InputError(f"duplicate keys in {list(keys_t)}")
        vals = _int_1d(values, "values")
        if (lengths is None) == (offsets is None):
            raise InputError("give exactly one of lengths or offsets")
        if lengths is not None:
            lens = _int_1d(lengths, "lengths")
            if lens.size and lens.min() < 0:
                raise InputError(f"lengths must be non-negative, got min {int(lens.min())}")
            offs = np.concatenate((np.zeros(1, np.int64), np.cumsum(lens, dtype=np.int64)))
        else:
            offs = _int_1d(offsets, "offsets")
            if offs.size == 0 or offs[0] != 0:
                raise InputError("offsets must start with 0")
            lens = np.diff(offs)
            if lens.size and lens.min() < 0:
                raise InputError("offsets must be non-decreasing")
        if int(offs[-1]) != vals.size:
            raise InputError(f"lengths sum to {int(offs[-1])} but there are {vals.size} values")
        nk = len(keys_t)
        if nk == 0:
            if lens.size:
                raise InputError("lengths given for zero keys")
            bs = 0 if batch_size is None else int(batch_size)
        else:
            if lens.size % nk:
                raise InputError(f"{lens.size} lengths is not a multiple of {nk} keys")
            bs = lens.size // nk
            if batch_size is not None and batch_size != bs:
                raise InputError(f"batch_size={batch_size} but lengths imply {bs}")
        if bs < 0:
            raise InputError(f"batch_size must be >= 0, got {bs}")
        for arr in (vals, lens, offs):
            arr.setflags(write=False)
        self._keys = keys_t
        self._values = vals
        self._lengths = lens
        self._offsets = offs
        self._batch_size = bs
        self._index = {k: i for i, k in enumerate(keys_t)}

    # ------------------------------------------------------------- builders

    @classmethod
    def from_lists(cls, per_key: Mapping[str, Sequence[Sequence[int]]]) -> JaggedBatch:
        """Build from ``{key: [ids of sample 0, ids of sample 1, ...]}`` (equal sample counts)."""
        keys = list(per_key)
        sizes = {len(v) for v in per_key.values()}
        if len(sizes) > 1:
            raise InputError(f"keys have different sample counts {sorted(sizes)}")
        lens = [len(sample) for k in keys for sample in per_key[k]]
        flat = [int(i) for k in keys for sample in per_key[k] for i in sample]
        return cls(keys, np.asarray(flat, dtype=np.int64), lengths=np.asarray(lens, dtype=np.int64),
                   batch_size=sizes.pop() if sizes else 0)

    @classmethod
    def from_per_table(cls, per_table: Mapping[str, tuple[object, object]]) -> JaggedBatch:
        """Build from ``{key: (ids, bag_offsets)}`` as returned by :meth:`per_table`/:meth:`bag_offsets`."""
        keys = list(per_table)
        vals: list[IntArray] = []
        lens: list[IntArray] = []
        for k in keys:
            ids, offs = per_table[k]
            ids_a = _int_1d(ids, f"{k} ids")
            offs_a = _int_1d(offs, f"{k} offsets")
            if offs_a.size == 0 or offs_a[0] != 0 or offs_a[-1] != ids_a.size:
                raise InputError(f"{k}: bag offsets must run from 0 to {ids_a.size}")
            vals.append(ids_a)
            lens.append(np.diff(offs_a))
        return cls(
            keys,
            np.concatenate(vals) if vals else np.zeros(0, np.int64),
            lengths=np.concatenate(lens) if lens else np.zeros(0, np.int64),
        )

    # ------------------------------------------------------------ accessors

    @property
    def keys(self) -> tuple[str, ...]:
        """Key (table) names, in value order."""
        return self._keys

    @property
    def values(self) -> IntArray:
        """All ids, grouped by key then sample (read-only)."""
        return self._values

    @property
    def lengths(self) -> IntArray:
        """Ids per (key, sample), key-major (read-only)."""
        return self._lengths

    @property
    def offsets(self) -> IntArray:
        """Exclusive prefix sum of :attr:`lengths` (read-only)."""
        return self._offsets

    @property
    def batch_size(self) -> int:
        """Samples in the batch."""
        return self._batch_size

    def _key_index(self, table: str) -> int:
        try:
            return self._index[table]
        except (KeyError, TypeError):
            raise UnknownTableError(f"unknown key {table!r}; batch has {list(self._keys)}") from None

    def _span(self, table: str) -> tuple[int, int]:
        k = self._key_index(table)
        b = self._batch_size
        return int(self._offsets[k * b]), int(self._offsets[(k + 1) * b])

    def ids(self, table: str) -> IntArray:
        """Ids of ``table`` for all samples (a view into :attr:`values`)."""
        lo, hi = self._span(table)
        return self._values[lo:hi]

    def lengths_of(self, table: str) -> IntArray:
        """``[batch_size]`` ids per sample for ``table``."""
        k = self._key_index(table)
        b = self._batch_size
        return self._lengths[k * b : (k + 1) * b]

    def per_table(self) -> dict[str, IntArray]:
        """``{table: ids}`` for every key (views into :attr:`values`)."""
        return {k: self.ids(k) for k in self._keys}

    def bag_offsets(self, table: str) -> IntArray:
        """``[batch_size + 1]`` offsets of each sample's bag into ``per_table()[table]``."""
        k = self._key_index(table)
        b = self._batch_size
        seg = self._offsets[k * b : (k + 1) * b + 1]
        out: IntArray = seg - seg[0]
        return out

    def __len__(self) -> int:
        return int(self._values.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JaggedBatch):
            return NotImplemented
        return (
            self._keys == other._keys
            and self._batch_size == other._batch_size
            and np.array_equal(self._values, other._values)
            and np.array_equal(self._lengths, other._lengths)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"JaggedBatch(keys={list(self._keys)}, batch_size={self._batch_size}, values={self._values.size})"


def pool_bags(
    rows: npt.NDArray[Any],
    offsets: object,
    mode: Literal["sum", "mean"] = "sum",
    dtype: npt.DTypeLike | None = None,
) -> npt.NDArray[Any]:
    """Reduce ``rows[offsets[b]:offsets[b+1]]`` per bag (embedding-bag pooling).

    Empty bags give zeros.  ``dtype`` is the accumulation/output dtype
    (default: ``float32`` for ``float16`` rows, else the rows' dtype).

    >>> rows = np.arange(8, dtype=np.float32).reshape(4, 2)
    >>> pool_bags(rows, [0, 3, 3, 4]).tolist()
    [[6.0, 9.0], [0.0, 0.0], [6.0, 7.0]]
    """
    offs = _int_1d(offsets, "offsets")
    if rows.ndim != 2:
        raise InputError(f"rows must be 2-D, got shape {rows.shape}")
    if offs.size == 0 or offs[0] != 0 or offs[-1] != rows.shape[0] or (np.diff(offs) < 0).any():
        raise InputError(f"offsets must be non-decreasing from 0 to {rows.shape[0]}")
    if mode not in ("sum", "mean"):
        raise InputError(f"mode must be 'sum' or 'mean', got {mode!r}")
    out_dtype = np.dtype(dtype) if dtype is not None else (
        np.dtype(np.float32) if rows.dtype == np.float16 else rows.dtype
    )
    counts = np.diff(offs)
    out = np.zeros((counts.size, rows.shape[1]), dtype=out_dtype)
    nonempty = np.flatnonzero(counts > 0)
    if nonempty.size:
        out[nonempty] = np.add.reduceat(rows.astype(out_dtype, copy=False), offs[nonempty], axis=0)
    if mode == "mean":
        out[nonempty] /= counts[nonempty, None].astype(out_dtype)
    return out
