"""Cache hits pooled by the embedding kernel in place, from a :class:`~flexemr.core.cache.RowCache`'s arena.

A pooled lookup that probes the cache (:mod:`flexemr.client.pooled`) pools
every table's hits before it reads anything.  :func:`pool_hits` does all the
tables of a lookup in one native call (``fxk_run``: bags and tables spread
over the kernel's threads, the GIL released), its jobs set up directly
rather than through :func:`~flexemr.core.kernel.pool_many`'s argument
conversions: the slots and bag offsets are
:meth:`RowCache.probe_split <flexemr.core.cache.RowCache.probe_split>`'s,
the outputs the lookup's own.  What could make the kernel write out of
bounds (shapes, dtypes, sizes) is still checked here, and the kernel checks
every slot against the arena's rows and the offsets itself; a job it refuses
(not expected) is pooled again by :func:`~flexemr.core.kernel.pool`, which
raises its error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from . import kernel
from .errors import InputError

__all__ = ["HitJob", "pool_hits"]

_I64 = np.dtype(np.int64)
_F32 = np.dtype(np.float32)


class HitJob(NamedTuple):
    """One table's hits: ``out[b] = pool(rows[slots[offsets[b]:offsets[b+1]]])`` (``fill`` for empty bags)."""

    rows: npt.NDArray[Any]                 #: the arena as the table's rows (``RowCache.rows_view``)
    slots: npt.NDArray[np.int64]           #: the hits' slots, by bag (contiguous int64)
    offsets: npt.NDArray[np.int64]         #: their bag offsets (contiguous int64)
    weights: npt.NDArray[np.float32] | None  #: one per hit (contiguous float32), or ``None``
    mode: str                              #: ``"sum"``, ``"mean"`` or ``"max"``
    out: npt.NDArray[Any]                  #: ``[bags, dim]`` of the accumulation dtype, contiguous rows
    fill: float = 0.0                      #: every element of an empty bag


def _contiguous(a: object, dtype: np.dtype[Any]) -> bool:
    return type(a) is np.ndarray and a.dtype == dtype and a.ndim == 1 and a.flags.c_contiguous


def _check(h: HitJob) -> None:
    rows, out = h.rows, h.out
    if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.dtype not in kernel._DTYPES or \
            (rows.shape[0] > 0 and rows.shape[1] > 1 and rows.strides[1] != rows.itemsize):
        raise InputError("rows must be a 2-D array of a kernel dtype with contiguous rows")
    if not (_contiguous(h.slots, _I64) and _contiguous(h.offsets, _I64) and h.offsets.size >= 1):
        raise InputError("slots and offsets must be 1-D contiguous int64 arrays (offsets not empty)")
    if h.weights is not None and not (_contiguous(h.weights, _F32) and h.weights.size == h.slots.size):
        raise InputError("weights must be contiguous float32, one per slot")
    if h.mode not in kernel._MODES or (h.mode == "max" and h.weights is not None):
        raise InputError(f"mode must be 'sum', 'mean' or 'max' (weights not with 'max'), got {h.mode!r}")
    if not isinstance(out, np.ndarray) or out.shape != (h.offsets.size - 1, rows.shape[1]) or \
            out.dtype != kernel._ACC[rows.dtype] or not out.flags.writeable or \
            (out.shape[0] > 0 and out.shape[1] > 1 and out.strides[1] != out.itemsize) or \
            (out.shape[0] > 1 and abs(out.strides[0]) < out.shape[1] * out.itemsize):
        raise InputError("out must be a writeable [bags, dim] array of the accumulation dtype, contiguous rows")


def pool_hits(jobs: Sequence[HitJob], threads: int | None = None) -> None:
    """Pool every job into its ``out`` in one native call (``threads``: default
    :func:`~flexemr.core.kernel.get_threads`).  The results are :func:`~flexemr.core.kernel.pool`'s.

    >>> rows = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    >>> out = np.empty((2, 2), np.float32)
    >>> pool_hits([HitJob(rows, np.array([1, 0, 1]), np.array([0, 2, 3]), None, "sum", out)])
    >>> out.tolist()
    [[4.0, 6.0], [3.0, 4.0]]
    """
    n = len(jobs)
    if n == 0:
        return
    arr = kernel.ffi.new("fxk_job[]", n)
    ptr = kernel._ptr
    for i, h in enumerate(jobs):  # the arrays stay alive in ``jobs`` until the call returns
        _check(h)
        rows, out = h.rows, h.out
        j = arr[i]
        kernel._Call._table(j, rows, kernel._DTYPES[rows.dtype], rows.shape[1], h.slots)
        j.mode = kernel._MODES[h.mode]
        j.offsets = ptr(h.offsets, "int64_t[]")
        j.num_bags = h.offsets.size - 1
        if h.weights is not None:
            j.weights = ptr(h.weights, "float[]")
        if h.fill:
            j.fill = float(h.fill)
        j.out = ptr(out)
        j.out_stride = out.strides[0]
    rc = kernel.lib.fxk_run(arr, n, kernel.get_threads() if threads is None else kernel._check_threads(threads))
    if rc != kernel.lib.FXK_OK:
        for i, h in enumerate(jobs):
            if arr[i].status != kernel.lib.FXK_OK:  # pooled again to raise the kernel's error for it
                kernel.pool(h.rows, h.slots, h.offsets, h.mode, h.weights,  # type: ignore[arg-type]
                            out=h.out, fill=h.fill)
        raise InputError("the kernel refused a job of cache hits that it then pooled")  # not reached: pool raised
