"""Native embedding kernel: fused gather + pooling over rows read in place.

:func:`pool` computes what :func:`flexemr.core.pooling.pool` computes for
``rows[ids]``, bag by bag (``EmbeddingBag``: ``sum``, ``mean``, ``max``,
optional per-sample weights), without materialising ``rows[ids]``: every row
is read where it lies and added into vector registers.  ``rows`` may be any
2-D view whose rows are contiguous (``rows.strides[1] == rows.itemsize``), so
the kernel reads a plain ``[num_rows, dim]`` table, the rows of a bigger
record (e.g. versioned slots: ``np.ndarray((n, dim), "f4", buffer=buf,
offset=8, strides=(slot_bytes, 4))``), a staging buffer or a cache's slots.
The result lands in ``out`` when given, which may itself be a strided view
(e.g. the columns of one table in a ``[B, sum(dims)]`` array).

>>> rows = np.arange(12, dtype=np.float32).reshape(6, 2)
>>> pool(rows, ids=[5, 0, 0, 3], offsets=[0, 3, 3, 4]).tolist()
[[10.0, 13.0], [0.0, 0.0], [6.0, 7.0]]
>>> pool(rows, [5, 0, 3], [0, 2, 3], "max", fill=float("-inf")).tolist()
[[10.0, 11.0], [6.0, 7.0]]
>>> pool(rows, [1, 2], [0, 2], "mean", weights=[1.0, 0.5]).tolist()
[[2.0, 2.75]]

Several tables go through one native call with :func:`pool_many` (the GIL
is released; bags of every table are spread over :func:`get_threads`
threads of a small persistent pool):

>>> t2 = np.ones((3, 4), dtype=np.float16)
>>> a, b = pool_many([PoolJob(rows, [1], [0, 1]), PoolJob(t2, [2, 2], [0, 1, 2])])
>>> a.tolist(), b.dtype.name, b.tolist()
([[2.0, 3.0]], 'float32', [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])

:func:`gather` copies rows (any dtype, strided on both sides) in one pass:

>>> gather(rows, [4, 1]).tolist()
[[8.0, 9.0], [2.0, 3.0]]

:func:`partition` splits a table's occurrences by the row band (shard) of
their ids, keeping the bags, in one pass: what hierarchical pooling sends to
each server (ids relative to the band, as int32) and what stays (positions):

>>> p = partition([5, 0, 9, 3], [0, 3, 4], num_rows=10, band_start=[0, 5], band_slot=[-1, 0])
>>> p.ids[0].tolist(), p.offsets[0].tolist(), p.rest_pos.tolist(), p.rest_offsets.tolist()
([0, 4], [0, 2, 2], [1, 3], [0, 1, 2])

Accumulation and output dtype follow :func:`flexemr.core.pooling.accumulation_dtype`
(``float32``; ``float64`` for ``float64`` tables); sums run in id order.
Every id is checked against ``len(rows)`` before its row is read, and
offsets are checked before any bag is reduced: bad input raises
:class:`~flexemr.core.errors.InputError` and never touches memory outside the
arrays given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InputError
from .._native._flexemr_kernel import ffi, lib
from .pooling import PoolMode, accumulation_dtype

__all__ = [
    "ALLOCATOR_SETTINGS",
    "MAX_DEFAULT_THREADS",
    "Parted",
    "PartitionJob",
    "PoolJob",
    "gather",
    "get_threads",
    "isa",
    "partition",
    "partition_many",
    "pool",
    "pool_each",
    "pool_many",
    "set_isa",
    "set_threads",
    "tune_allocator",
]

#: Cap of the default thread count (the CPUs this process may run on, at most this many).
MAX_DEFAULT_THREADS: int = 8

_DTYPES: dict[np.dtype[Any], int] = {
    np.dtype(np.float16): lib.FXK_F16,
    np.dtype(np.float32): lib.FXK_F32,
    np.dtype(np.float64): lib.FXK_F64,
    np.dtype(np.int8): lib.FXK_I8,
    np.dtype(np.uint8): lib.FXK_U8,
}
_MODES: dict[str, int] = {"sum": lib.FXK_SUM, "mean": lib.FXK_MEAN, "max": lib.FXK_MAX}
_ACC: dict[np.dtype[Any], np.dtype[Any]] = {dt: accumulation_dtype(dt) for dt in _DTYPES}
_INT32 = np.dtype(np.int32)
_INT64 = np.dtype(np.int64)
_ID_DTYPES = (_INT32, _INT64)
_F32 = np.dtype(np.float32)


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_THREADS))


_threads = _default_threads()


def set_threads(n: int | None) -> None:
    """Threads (the caller's included) that :func:`pool`, :func:`pool_many` and :func:`gather` use by default.

    ``None`` restores the default: the CPUs this process may run on
    (``os.sched_getaffinity``), at most :data:`MAX_DEFAULT_THREADS`.

    >>> set_threads(1); get_threads()
    1
    >>> set_threads(None)
    """
    global _threads
    _threads = _default_threads() if n is None else _check_threads(n)


def get_threads() -> int:
    """The default thread count (see :func:`set_threads`)."""
    return _threads


#: glibc malloc settings :func:`tune_allocator` applies: (mmap threshold, trim threshold), bytes.
ALLOCATOR_SETTINGS: tuple[int, int] = (64 << 20, 512 << 20)
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep the process's freed memory for reuse instead of returning it to the OS (glibc; once per process).

    A lookup allocates and frees megabytes per batch (requests, responses,
    outputs).  With glibc's defaults, blocks above a (dynamic) mmap threshold
    are unmapped when freed and the heap top is trimmed above twice that, so
    each batch faults the same memory in again; on a virtual machine a page
    fault costs microseconds, which adds up to milliseconds per batch.  This
    sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to
    :data:`ALLOCATOR_SETTINGS`: blocks up to 64 MiB come from the heap and up
    to 512 MiB of free heap is kept.  The embedding servers and clients call
    it; the environment variable ``FLEXEMR_TUNE_MALLOC=0`` turns it off.
    Returns whether the settings are in effect.
    """
    global _tuned
    if _tuned is None:
        _tuned = os.environ.get("FLEXEMR_TUNE_MALLOC", "1") != "0" and lib.fxk_tune_malloc(*ALLOCATOR_SETTINGS) == 0
    return _tuned


def isa() -> str:
    """Code path of the pooling loops: ``"avx2"`` (x86-64 with AVX2, FMA, F16C) or ``"baseline"`` (portable).

    Chosen from the CPU; :func:`set_isa` overrides it (for tests and benchmarks).
    """
    return str(ffi.string(lib.fxk_isa()).decode())


def set_isa(name: str) -> None:
    """Use code path ``name`` (process-wide); :class:`InputError` when this build or CPU lacks it."""
    if not isinstance(name, str) or lib.fxk_use_isa(name.encode()) != 0:
        raise InputError(f"code path {name!r} is not available here (this CPU runs {isa()!r})")


def _check_threads(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"threads must be a positive integer, got {n!r}")
    return int(n)


# ------------------------------------------------------------------ arguments


def _ptr(a: npt.NDArray[Any], ctype: str = "char[]") -> Any:
    """A cdata pointing at ``a``'s first element (keeps ``a`` alive when it is contiguous)."""
    if a.flags.c_contiguous:
        return ffi.from_buffer(ctype, a)  # about 0.3 us; the array interface costs 1.5 us
    return ffi.cast("void *", a.__array_interface__["data"][0])


def _rows(rows: object, what: str = "rows", *, any_dtype: bool = False) -> npt.NDArray[Any]:
    arr = rows if type(rows) is np.ndarray else np.asarray(rows)
    if arr.ndim != 2:
        raise InputError(f"{what} must be a 2-D [num_rows, dim] array, got shape {arr.shape}")
    if not any_dtype and arr.dtype not in _DTYPES:
        raise InputError(f"{what} dtype must be one of float16, float32, float64, int8, uint8 (native byte "
                         f"order), got {arr.dtype}")
    if arr.shape[0] > 0 and arr.shape[1] > 1 and arr.strides[1] != arr.itemsize:
        raise InputError(f"{what} must have contiguous rows (strides[1] == itemsize), got strides {arr.strides}")
    return arr


def _ids(ids: object, what: str = "ids") -> npt.NDArray[Any]:
    if type(ids) is np.ndarray and ids.ndim == 1 and ids.dtype in _ID_DTYPES and ids.flags.c_contiguous:
        return ids
    arr = np.asarray(ids)
    if arr.size == 0 and arr.dtype.kind == "f":  # [] -> float64
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InputError(f"{what} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.dtype != _INT32 and arr.dtype != _INT64:
        if arr.dtype.kind == "u" and arr.itemsize == 8 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            pos = int(np.argmax(arr > np.iinfo(np.int64).max))
            raise InputError(f"{what}[{pos}] = {int(arr[pos])} is out of range")
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


def _offsets(offsets: object) -> npt.NDArray[np.int64]:
    if type(offsets) is np.ndarray and offsets.ndim == 1 and offsets.dtype == _INT64 and offsets.size and \
            offsets.flags.c_contiguous:
        return offsets
    arr = np.asarray(offsets)
    if arr.ndim != 1 or arr.size == 0 or (arr.dtype.kind not in "iu"):
        raise InputError(f"offsets must be a 1-D integer array of B + 1 >= 1 entries, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    out: npt.NDArray[np.int64] = np.ascontiguousarray(arr, dtype=np.int64)
    return out


def _weights(weights: object | None, n_ids: int, mode: str) -> npt.NDArray[np.float32] | None:
    if weights is None:
        return None
    if mode == "max":
        raise InputError("weights are only supported with mode 'sum' or 'mean'")
    w = np.asarray(weights)
    if w.ndim != 1 or w.size != n_ids or (w.size and w.dtype.kind not in "fiu"):
        raise InputError(f"weights must be a 1-D numeric array of {n_ids} weights (one per id), got shape "
                         f"{w.shape} dtype {w.dtype}")
    out: npt.NDArray[np.float32] = np.ascontiguousarray(w, dtype=_F32)
    return out


def _out(out: object | None, shape: tuple[int, int], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise InputError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype:
        raise InputError(f"out must be a {shape} array of {dtype}, got {out.shape} {out.dtype}")
    if not out.flags.writeable:
        raise InputError("out is read-only")
    n, dim = shape
    if n > 0 and dim > 1 and out.strides[1] != out.itemsize:
        raise InputError(f"out must have contiguous rows (strides[1] == itemsize), got strides {out.strides}")
    if n > 1 and abs(out.strides[0]) < dim * out.itemsize:
        raise InputError(f"rows of out overlap (strides {out.strides} for {dim} elements per row)")
    return out


def _blocked_out(out: object, blocks: object, n: int, row_bytes: int, align: int) -> npt.NDArray[np.uint8]:
    """``out`` checked as the bytes of ``n`` rows of ``row_bytes`` in ``blocks`` (:class:`PoolJob`'s ``out_blocks``)."""
    if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 1 and out.flags.c_contiguous):
        raise InputError("with out_blocks, out must be a contiguous 1-D uint8 array")
    if not out.flags.writeable:
        raise InputError("out is read-only")
    if not (isinstance(blocks, tuple) and len(blocks) == 3
            and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in blocks)):
        raise InputError(f"out_blocks must be (rows, gap, phase) integers, got {blocks!r}")
    rows, gap, phase = (int(x) for x in blocks)
    if rows < 1 or gap < 0 or not 0 <= phase < rows or gap % align or out.ctypes.data % align:
        raise InputError(f"out_blocks {blocks!r}: need rows >= 1, gap >= 0, 0 <= phase < rows, and gap and out "
                         f"aligned to {align} bytes")
    end = (n - 1) * row_bytes + ((n - 1 + phase) // rows) * gap + row_bytes if n > 0 else 0
    if end > out.nbytes:
        raise InputError(f"out of {out.nbytes} bytes is too small for {n} rows of {row_bytes} bytes in blocks of "
                         f"{rows} rows {gap} bytes apart (needs {end})")
    return out


def _mode(mode: object) -> int:
    code = _MODES.get(mode) if isinstance(mode, str) else None
    if code is None:
        raise InputError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    return code


# ------------------------------------------------------------------ jobs


@dataclass(frozen=True, eq=False)
class PoolJob:
    """One table's pooling for :func:`pool_many`: the arguments of :func:`pool`.

    ``out_blocks=(rows, gap, phase)`` writes the ``[B, dim]`` result in
    blocks into ``out``, a 1-D ``uint8`` array (e.g. the frames of a message,
    each after its header): rows follow one another, and after every
    ``rows`` rows (counting ``phase`` < ``rows`` rows before row 0) ``gap``
    bytes are skipped; row ``b`` starts at byte ``b * row_bytes + ((b +
    phase) // rows) * gap``.  The result is then ``out`` itself.

    >>> t = np.arange(6, dtype=np.float32).reshape(3, 2)
    >>> buf = np.zeros(40, np.uint8)
    >>> r = pool_many([PoolJob(t, [0, 1, 2], [0, 1, 2, 3], out=buf, out_blocks=(2, 8, 1))])[0]
    >>> buf[:8].view(np.float32).tolist(), buf[16:32].view(np.float32).tolist()
    ([0.0, 1.0], [2.0, 3.0, 4.0, 5.0])
    """

    rows: npt.NDArray[Any]
    ids: object
    offsets: object
    mode: PoolMode = "sum"
    weights: object | None = None
    out: npt.NDArray[Any] | None = None
    fill: float = 0.0
    out_blocks: tuple[int, int, int] | None = None


class _Call:
    """The native job array of one call and the arrays it points into (kept alive until the call returns)."""

    def __init__(self, n: int) -> None:
        self.jobs = ffi.new("fxk_job[]", n)
        self.keep: list[Any] = []
        self.ids: list[npt.NDArray[Any]] = []
        self.outs: list[npt.NDArray[Any]] = []

    def add_pool(self, i: int, job: PoolJob) -> None:
        mode = _mode(job.mode)
        rows = _rows(job.rows)
        ids = _ids(job.ids)
        offs = _offsets(job.offsets)
        w = _weights(job.weights, ids.size, str(job.mode))
        if job.out_blocks is None:
            out = _out(job.out, (offs.size - 1, rows.shape[1]), _ACC[rows.dtype])
        else:
            out = _blocked_out(job.out, job.out_blocks, offs.size - 1, rows.shape[1] * _ACC[rows.dtype].itemsize,
                               _ACC[rows.dtype].itemsize)
        try:
            fill = float(job.fill)
        except (TypeError, ValueError):
            raise InputError(f"fill must be a number, got {job.fill!r}") from None
        j = self.jobs[i]
        self._table(j, rows, _DTYPES[rows.dtype], rows.shape[1], ids)
        j.mode = mode
        j.offsets = _ptr(offs, "int64_t[]")
        j.num_bags = offs.size - 1
        if w is not None:
            j.weights = _ptr(w, "float[]")
        if fill:
            j.fill = fill
        j.out = _ptr(out)
        if job.out_blocks is None:
            j.out_stride = out.strides[0]
        else:
            j.out_stride = rows.shape[1] * _ACC[rows.dtype].itemsize
            j.out_block, j.out_gap, j.out_phase = job.out_blocks
        self.keep += (rows, offs, w)
        self.ids.append(ids)
        self.outs.append(out)

    def add_gather(self, i: int, rows_in: object, idx: object, out_in: object | None) -> None:
        rows = _rows(rows_in, any_dtype=True)
        ids = _ids(idx, "idx")
        out = _out(out_in, (ids.size, rows.shape[1]), rows.dtype)
        j = self.jobs[i]
        self._table(j, rows, lib.FXK_U8, rows.shape[1] * rows.itemsize, ids)
        j.mode = lib.FXK_GATHER
        j.out = _ptr(out)
        j.out_stride = out.strides[0]
        self.keep.append(rows)
        self.ids.append(ids)
        self.outs.append(out)

    @staticmethod
    def _table(j: Any, rows: npt.NDArray[Any], dtype: int, dim: int, ids: npt.NDArray[Any]) -> None:
        # the job array comes zeroed from ffi.new: zero fields (row_offset, weights, fill) stay unset
        j.rows = _ptr(rows)
        j.row_stride = rows.strides[0]
        j.num_rows = rows.shape[0]
        j.dim = dim
        j.dtype = dtype
        j.ids = _ptr(ids)
        j.id_bytes = ids.itemsize
        j.n_ids = ids.size

    def run(self, threads: int | None, what: str = "job") -> list[npt.NDArray[Any]]:
        n = len(self.outs)
        rc = lib.fxk_run(self.jobs, n, _threads if threads is None else _check_threads(threads))
        if rc != lib.FXK_OK:
            for i in range(n):
                self._raise(i, what if n > 1 else "")
        return self.outs

    def run_each(self, threads: int | None) -> list[npt.NDArray[Any] | InputError]:
        """Like :meth:`run`, but a failed job's entry is its error (the others' results are valid)."""
        n = len(self.outs)
        rc = lib.fxk_run(self.jobs, n, _threads if threads is None else _check_threads(threads))
        if rc == lib.FXK_OK:
            return list(self.outs)
        out: list[npt.NDArray[Any] | InputError] = []
        for i in range(n):
            try:
                self._raise(i, "job")
                out.append(self.outs[i])
            except InputError as exc:
                out.append(exc)
        return out

    def _raise(self, i: int, what: str) -> None:
        exc = _job_error(self.jobs[i], f"{what} {i}: " if what else "")
        if exc is not None:
            raise exc


def _job_error(j: Any, where: str = "") -> InputError | MemoryError | None:
    """The error of native job ``j`` after ``fxk_run`` (``None``: it succeeded), its message prefixed by ``where``;
    the bad id is read where the job read it."""
    if j.status == lib.FXK_OK:
        return None
    if j.status == lib.FXK_EBADID:
        pos = int(j.bad_pos)
        bad = int(ffi.cast("int32_t *" if j.id_bytes == 4 else "int64_t *", j.ids)[pos])
        return InputError(f"{where}id {bad} at position {pos} is out of range for a table of {int(j.num_rows)} rows")
    if j.status == lib.FXK_EOFFSETS:
        return InputError(f"{where}offsets must start at 0, be non-decreasing and end at len(ids) = {int(j.n_ids)}")
    if j.status == lib.FXK_ENOMEM:
        return MemoryError("the embedding kernel could not allocate its task list")
    return InputError(f"{where}invalid arguments (kernel status {int(j.status)})")


# ------------------------------------------------------------------ API


def pool(
    rows: npt.NDArray[Any],
    ids: object,
    offsets: object,
    mode: PoolMode = "sum",
    weights: object | None = None,
    *,
    out: npt.NDArray[Any] | None = None,
    fill: float = 0.0,
    threads: int | None = None,
) -> npt.NDArray[Any]:
    """Pool ``rows[ids[offsets[b]:offsets[b+1]]]`` of every bag ``b`` into row ``b`` of a ``[B, dim]`` result.

    ``rows``: ``[num_rows, dim]`` of ``float16``, ``float32``, ``float64``,
    ``int8`` or ``uint8`` with contiguous rows (any row stride, read in
    place).  ``ids``: int32 or int64 (other integer arrays are converted),
    each in ``[0, num_rows)``.  ``offsets``: ``[B + 1]``, from 0,
    non-decreasing, to ``len(ids)``.  ``mode``: ``"sum"``, ``"mean"`` (the sum
    divided by the number of ids of the bag; weights are not renormalised) or
    ``"max"``.  ``weights``: one per id (``sum``/``mean`` only), used as
    ``float32``.  Empty bags get ``fill`` in every element (e.g. ``-inf`` for
    partial maxima).  ``out``: where to write, a ``[B, dim]`` array of the
    accumulation dtype with contiguous rows (any row stride); allocated when
    ``None``.  Returns ``out``.  ``threads``: default :func:`get_threads`.

    Raises :class:`~flexemr.core.errors.InputError` for a wrong dtype, shape or
    mode, bad offsets, or an id out of range (naming the first one).

    >>> t = np.array([[1, 2], [3, 4]], dtype=np.int8)
    >>> pool(t, np.array([1, 1, 0], dtype=np.int32), [0, 2, 3], "mean").tolist()
    [[3.0, 4.0], [1.0, 2.0]]
    >>> pool(t, [2], [0, 1])
    Traceback (most recent call last):
    ...
    flexemr.core.errors.InputError: id 2 at position 0 is out of range for a table of 2 rows
    """
    call = _Call(1)
    call.add_pool(0, PoolJob(rows, ids, offsets, mode, weights, out, fill))
    return call.run(threads)[0]


def pool_many(jobs: Sequence[PoolJob], threads: int | None = None) -> list[npt.NDArray[Any]]:
    """Run every :class:`PoolJob` (one per table) in one native call; returns their results in order.

    The bags of all jobs are spread over ``threads`` threads (default
    :func:`get_threads`; small calls run on the calling thread); the GIL is
    released meanwhile.  The result is the same whatever the thread count.
    An invalid job raises :class:`~flexemr.core.errors.InputError` naming it
    (``job 3: ...``); the outputs of the other jobs are then unspecified
    (:func:`pool_each` keeps them).

    >>> t = np.eye(3, dtype=np.float32)
    >>> [r.tolist() for r in pool_many([PoolJob(t, [0, 2], [0, 2]), PoolJob(t, [1], [0, 1], "max")], threads=2)]
    [[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]]
    """
    return _call(jobs).run(threads)


def pool_each(jobs: Sequence[PoolJob], threads: int | None = None) -> list[npt.NDArray[Any] | InputError]:
    """:func:`pool_many`, but an invalid job gives its :class:`~flexemr.core.errors.InputError` in its place.

    The other jobs' results are valid (the jobs of several independent
    requests in one native call: a bad one fails alone).  A job that is not
    even well formed (wrong types, shapes) still raises.

    >>> t = np.eye(2, dtype=np.float32)
    >>> [r if isinstance(r, InputError) else r.tolist() for r in pool_each([PoolJob(t, [5], [0, 1]),
    ...                                                                       PoolJob(t, [1], [0, 1])])]
    [InputError('job 0: id 5 at position 0 is out of range for a table of 2 rows'), [[0.0, 1.0]]]
    """
    return _call(jobs).run_each(threads)


def _call(jobs: Sequence[PoolJob]) -> _Call:
    call = _Call(len(jobs))
    for i, job in enumerate(jobs):
        if not isinstance(job, PoolJob):
            raise InputError(f"job {i} must be a PoolJob, got {type(job).__name__}")
        try:
            call.add_pool(i, job)
        except InputError as exc:
            raise InputError(f"job {i}: {exc}") from None
    return call


def gather(
    rows: npt.NDArray[Any], idx: object, out: npt.NDArray[Any] | None = None, *, threads: int | None = None
) -> npt.NDArray[Any]:
    """``out[k] = rows[idx[k]]``: copy rows byte for byte, any dtype, strided on both sides.

    ``rows`` is a 2-D array with contiguous rows (any row stride); ``out``
    a ``[len(idx), dim]`` array of the same dtype with contiguous rows
    (allocated when ``None``).  Ids are checked like :func:`pool`'s.  Returns
    ``out``.

    >>> r = np.arange(6, dtype=np.uint8).reshape(3, 2)
    >>> o = np.zeros((2, 4), dtype=np.uint8)
    >>> gather(r, [2, 0], out=o[:, 1:3]) is not None, o.tolist()
    (True, [[0, 4, 5, 0], [0, 0, 1, 0]])
    """
    call = _Call(1)
    call.add_gather(0, rows, idx, out)
    return call.run(threads)[0]


# ------------------------------------------------------------------ partition


@dataclass(frozen=True, eq=False)
class PartitionJob:
    """One table's occurrences for :func:`partition_many`: the arguments of :func:`partition`."""

    ids: object
    offsets: object
    num_rows: int
    band_start: object
    band_slot: object | None = None
    n_slots: int | None = None
    weights: object | None = None
    skip: object | None = None
    rest: bool = True


@dataclass(frozen=True, eq=False)
class Parted:
    """A partitioned table (see :func:`partition`).

    ``offsets[s]`` (``[B + 1]`` int64), ``ids[s]`` (int32, relative to the
    band) and ``weights[s]`` (float32, or ``None`` without weights) per slot
    ``s``; ``rest_offsets`` (``[B + 1]``) and ``rest_pos`` (int64 positions of
    the occurrences left, by bag) or ``None`` without ``rest``.
    """

    offsets: list[npt.NDArray[np.int64]]
    ids: list[npt.NDArray[np.int32]]
    weights: list[npt.NDArray[np.float32]] | None
    rest_offsets: npt.NDArray[np.int64] | None
    rest_pos: npt.NDArray[np.int64] | None


_I32 = np.dtype(np.int32)


class _Parts:
    """The native part array of one :func:`partition_many` call and what it points into."""

    def __init__(self, n: int) -> None:
        self.parts = ffi.new("fxk_part[]", n)
        self.keep: list[Any] = []
        self.out: list[tuple[Any, ...]] = []

    def add(self, i: int, job: PartitionJob) -> None:
        ids = _ids(job.ids)
        offs = _offsets(job.offsets)
        n, nb = ids.size, offs.size - 1
        num_rows = job.num_rows
        if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 0:
            raise InputError(f"num_rows must be a non-negative integer, got {num_rows!r}")
        start = np.ascontiguousarray(np.asarray(job.band_start), dtype=np.int64)
        if start.ndim != 1 or start.size == 0:
            raise InputError(f"band_start must be a 1-D array of at least one band start, got shape {start.shape}")
        if job.band_slot is None:
            slot = np.arange(start.size, dtype=np.int32)
        else:
            slot = np.ascontiguousarray(np.asarray(job.band_slot), dtype=np.int32)
            if slot.shape != start.shape:
                raise InputError(f"band_slot must have one slot per band ({start.size}), got shape {slot.shape}")
        ns = int(slot.max()) + 1 if job.n_slots is None else job.n_slots
        if isinstance(ns, bool) or not isinstance(ns, (int, np.integer)) or ns < 0:
            raise InputError(f"n_slots must be a non-negative integer, got {ns!r}")
        ns = int(ns)
        w = _weights(job.weights, n, "sum")
        skip = None
        if job.skip is not None:
            skip = np.ascontiguousarray(np.asarray(job.skip), dtype=np.bool_)
            if skip.shape != (n,):
                raise InputError(f"skip must be a 1-D mask of {n} entries (one per id), got shape {skip.shape}")
        slot_offs = np.empty((ns, nb + 1), dtype=np.int64)
        slot_ids = np.empty((ns, n), dtype=_I32)
        slot_w = np.empty((ns, n), dtype=_F32) if w is not None else None
        ids_p = ffi.new("int32_t *[]", max(ns, 1))
        w_p = ffi.new("float *[]", max(ns, 1)) if slot_w is not None else ffi.NULL
        base = ffi.cast("int32_t *", slot_ids.ctypes.data)
        wbase = ffi.cast("float *", slot_w.ctypes.data) if slot_w is not None else None
        for s in range(ns):
            ids_p[s] = base + s * n
            if wbase is not None:
                w_p[s] = wbase + s * n
        rest_offs = np.empty(nb + 1, dtype=np.int64) if job.rest else None
        rest_pos = np.empty(n, dtype=np.int64) if job.rest else None
        p = self.parts[i]
        p.ids = _ptr(ids)
        p.id_bytes = ids.itemsize
        p.n_ids = n
        p.offsets = _ptr(offs, "int64_t[]")
        p.num_bags = nb
        p.num_rows = int(num_rows)
        if w is not None:
            p.weights = _ptr(w, "float[]")
        if skip is not None:
            p.skip = _ptr(skip, "uint8_t[]")
        p.band_start = _ptr(start, "int64_t[]")
        p.band_slot = _ptr(slot, "int32_t[]")
        p.n_bands = start.size
        p.n_slots = ns
        p.slot_offsets = _ptr(slot_offs, "int64_t[]")
        p.slot_ids = ids_p
        p.slot_weights = w_p
        if rest_offs is not None and rest_pos is not None:
            p.rest_offsets = _ptr(rest_offs, "int64_t[]")
            p.rest_pos = _ptr(rest_pos, "int64_t[]")
        self.keep += (ids, offs, start, slot, w, skip, ids_p, w_p, slot_ids, slot_w)
        self.out.append((ids, slot_offs, slot_ids, slot_w, rest_offs, rest_pos))

    def run(self, threads: int | None) -> list[Parted]:
        n = len(self.out)
        rc = lib.fxk_partition(self.parts, n, _threads if threads is None else _check_threads(threads))
        if rc != lib.FXK_OK:
            for i in range(n):
                self._raise(i, n > 1)
        res = []
        for ids, slot_offs, slot_ids, slot_w, rest_offs, rest_pos in self.out:
            counts = slot_offs[:, -1].tolist()
            res.append(Parted(list(slot_offs), [slot_ids[s, :c] for s, c in enumerate(counts)],
                              None if slot_w is None else [slot_w[s, :c] for s, c in enumerate(counts)],
                              rest_offs, None if rest_pos is None else rest_pos[: int(rest_offs[-1])]))
        return res

    def _raise(self, i: int, many: bool) -> None:
        p = self.parts[i]
        where = f"job {i}: " if many else ""
        if p.status == lib.FXK_OK:
            return
        if p.status == lib.FXK_EBADID:
            pos = int(p.bad_pos)
            raise InputError(f"{where}id {int(self.out[i][0][pos])} at position {pos} is out of range for a table "
                             f"of {int(p.num_rows)} rows")
        if p.status == lib.FXK_EOFFSETS:
            raise InputError(f"{where}offsets must start at 0, be non-decreasing and end at len(ids) = {int(p.n_ids)}")
        if p.status == lib.FXK_ENOMEM:
            raise MemoryError("the partition could not allocate its cursors")
        raise InputError(f"{where}invalid partition: band_start must start at 0 and increase up to num_rows, bands "
                         f"hold fewer than 2**31 rows, slots lie in [-1, n_slots), and occurrences left over need "
                         f"rest=True")


def partition(
    ids: object,
    offsets: object,
    *,
    num_rows: int,
    band_start: object,
    band_slot: object | None = None,
    n_slots: int | None = None,
    weights: object | None = None,
    skip: object | None = None,
    rest: bool = True,
    threads: int | None = None,
) -> Parted:
    """Split the occurrences ``ids`` (bags by ``offsets``) of one table by the band of their rows, in one pass.

    Band ``i`` holds rows ``[band_start[i], band_start[i+1])`` (the last up to
    ``num_rows``; ``band_start[0] == 0``).  An occurrence whose row lies in
    band ``i`` goes to slot ``band_slot[i]`` (default: slot ``i``) as
    ``id - band_start[i]`` (int32), with its weight; a band of slot ``-1``, and
    every occurrence with ``skip[k]`` true, go to the *rest* (their positions
    ``k``; with ``rest=False`` that is an error).  Every output keeps the bags:
    ``ids[s][offsets[s][b]:offsets[s][b+1]]`` are slot ``s``'s occurrences of
    bag ``b``, in the order of ``ids``.  Returns a :class:`Parted`.

    Ids are checked against ``num_rows`` and offsets like :func:`pool`'s
    (:class:`~flexemr.core.errors.InputError`).

    >>> p = partition([7, 1, 8], [0, 2, 3], num_rows=9, band_start=[0, 4], weights=[0.5, 1, 2], rest=False)
    >>> [x.tolist() for x in p.ids], [o.tolist() for o in p.offsets], p.weights[1].tolist()
    ([[1], [3, 4]], [[0, 1, 1], [0, 1, 2]], [0.5, 2.0])
    """
    parts = _Parts(1)
    parts.add(0, PartitionJob(ids, offsets, num_rows, band_start, band_slot, n_slots, weights, skip, rest))
    return parts.run(threads)[0]


def partition_many(jobs: Sequence[PartitionJob], threads: int | None = None) -> list[Parted]:
    """:func:`partition` of every job (one per table) in one native call (spread over ``threads`` threads)."""
    parts = _Parts(len(jobs))
    for i, job in enumerate(jobs):
        if not isinstance(job, PartitionJob):
            raise InputError(f"job {i} must be a PartitionJob, got {type(job).__name__}")
        try:
            parts.add(i, job)
        except InputError as exc:
            raise InputError(f"job {i}: {exc}") from None
    return parts.run(threads)
