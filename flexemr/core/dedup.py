"""Native deduplication of a table's ids, and the runs of sorted unique ids (``dedup.h``).

:func:`unique_inverse` is ``np.unique(ids, return_inverse=True)`` for the ids
of one table, checked against its rows: ids dense enough in the table
(``num_rows`` at most 256 per id) go through a bitmap of the table's rows in
two passes, no sort.  :func:`unique_inverse_many` does the same for several
tables in one call, the tables spread over the kernel's threads
(:func:`~flexemr.core.kernel.get_threads`) with the GIL released, as a
ranker's lookup deduplicates every table it reads:

>>> [(u.tolist(), i.tolist()) for u, i in unique_inverse_many([([7, 3, 7], 10), ([0, 0], 2)])]
[([3, 7], [1, 0, 1]), ([0], [0, 0])]

:func:`runs` cuts sorted unique ids into runs of consecutive ids inside each
band (shard) of a table: the coalesced reads of a lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._native._flexemr_kernel import ffi, lib
from .errors import InputError
from .kernel import _check_threads, _ids, _ptr, get_threads

__all__ = ["runs", "unique_inverse", "unique_inverse_many"]

#: Dense ids: at most this many table rows per id take the bitmap (else ``np.unique``).
_ROWS_PER_ID = 256

_Uniq = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def unique_inverse(ids: object, num_rows: int) -> _Uniq:
    """``np.unique(ids, return_inverse=True)`` (int64 results) for ids of a table of ``num_rows`` rows, checked.

    Dense ids (``num_rows`` at most 256 per id) are deduplicated natively, in
    two passes over ``ids`` with a bitmap of the table's rows (no sort);
    others by ``np.unique``.  An id outside ``[0, num_rows)`` raises
    :class:`~flexemr.core.errors.InputError`.

    >>> [a.tolist() for a in unique_inverse([7, 3, 7], 10)]
    [[3, 7], [1, 0, 1]]
    """
    return _dedup([(ids, num_rows)], 1, "")[0]


def unique_inverse_many(tables: Sequence[tuple[object, int]], threads: int | None = None) -> list[_Uniq]:
    """:func:`unique_inverse` of each ``(ids, num_rows)`` of ``tables``, in one native call over up to ``threads``
    threads (default :func:`~flexemr.core.kernel.get_threads`; a table per task, the GIL released).

    Raises :class:`~flexemr.core.errors.InputError` naming the first table (``tables[i]``) with an id out of range.
    """
    return _dedup(tables, get_threads() if threads is None else _check_threads(threads), "tables[{i}]: ")


def _sparse(arr: npt.NDArray[np.integer], num_rows: int, where: str) -> _Uniq:
    uniq, inv = np.unique(arr, return_inverse=True)
    if int(uniq[0]) < 0 or int(uniq[-1]) >= num_rows:
        bad = int(uniq[0]) if int(uniq[0]) < 0 else int(uniq[-1])
        raise InputError(f"{where}id {bad} is out of range for a table of {num_rows} rows")
    return uniq.astype(np.int64, copy=False), inv.reshape(-1).astype(np.int64, copy=False)


def _dedup(tables: Sequence[tuple[object, int]], threads: int, prefix: str) -> list[_Uniq]:
    out: list[_Uniq | None] = [None] * len(tables)
    dense: list[tuple[int, npt.NDArray[np.integer], int, npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
    for i, (ids, num_rows) in enumerate(tables):
        arr = _ids(ids, prefix.format(i=i) + "ids" if prefix else "ids")
        n, rows = int(arr.size), int(num_rows)
        if n and rows > _ROWS_PER_ID * n:
            out[i] = _sparse(arr, rows, prefix.format(i=i))
        else:
            dense.append((i, arr, rows, np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)))
    if dense:
        jobs = ffi.new("fxk_uniq[]", len(dense))
        keep = []  # the from_buffer pointers: they keep the arrays alive until the call returns
        for j, (_, arr, rows, uniq, inverse) in zip(jobs, dense):
            ptrs = (_ptr(arr), _ptr(uniq, "int64_t[]"), _ptr(inverse, "int64_t[]"))
            keep.append(ptrs)
            j.ids, j.id_bytes, j.n, j.num_rows, j.uniq, j.inverse = ptrs[0], arr.itemsize, arr.size, rows, *ptrs[1:]
        if lib.fxk_unique_many(jobs, len(dense), threads) != lib.FXK_OK:
            raise InputError("invalid arguments to unique_inverse")
        for j, (i, arr, rows, uniq, inverse) in zip(jobs, dense):
            c = int(j.count)
            if c < 0:
                raise _error(-c, arr, int(j.bad_pos), rows, prefix.format(i=i))
            out[i] = (uniq[:c], inverse)
    return [o for o in out if o is not None]


def _error(code: int, arr: npt.NDArray[np.integer], pos: int, num_rows: int, where: str) -> Exception:
    if code == lib.FXK_EBADID:
        return InputError(f"{where}id {int(arr[pos])} at position {pos} is out of range for a table of {num_rows} "
                          "rows")
    if code == lib.FXK_ECHANGED:
        return InputError(f"{where}the ids changed while unique_inverse ran (position {pos}): another thread wrote "
                          "to the array")
    if code == lib.FXK_ENOMEM:
        return MemoryError("unique_inverse could not allocate its bitmap")
    return InputError(f"{where}invalid arguments to unique_inverse (num_rows={num_rows})")


def runs(uniq: npt.NDArray[np.int64], band_start: npt.NDArray[np.int64]) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Runs of consecutive ids inside one band of sorted unique int64 ``uniq``, in one native pass.

    Returns ``(run_start, band_run, band_pos)``: run ``r`` is
    ``uniq[run_start[r]:run_start[r+1]]`` (``run_start`` ends with
    ``len(uniq)``), band ``b`` (rows from ``band_start[b]``) holds runs
    ``band_run[b]:band_run[b+1]`` and ids ``uniq[band_pos[b]:band_pos[b+1]]``.

    >>> [a.tolist() for a in runs(np.array([1, 2, 3, 5, 6]), np.array([0, 3]))]
    [[0, 2, 3, 5], [0, 1, 3], [0, 2, 5]]
    """
    u = np.ascontiguousarray(uniq, dtype=np.int64)
    st = np.ascontiguousarray(band_start, dtype=np.int64)
    n, nb = int(u.size), int(st.size)
    run_start = np.empty(n + 1, dtype=np.int64)
    band_run = np.empty(nb + 1, dtype=np.int64)
    band_pos = np.empty(nb + 1, dtype=np.int64)
    c = lib.fxk_runs(_ptr(u, "int64_t[]"), n, _ptr(st, "int64_t[]"), nb, _ptr(run_start, "int64_t[]"),
                     _ptr(band_run, "int64_t[]"), _ptr(band_pos, "int64_t[]"))
    if c < 0:
        raise InputError("runs needs sorted unique ids and at least one band")
    return run_start[: c + 1], band_run, band_pos
