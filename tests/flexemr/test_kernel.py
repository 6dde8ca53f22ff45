"""The native embedding kernel (flexemr.core.kernel) against the numpy oracle flexemr.core.pooling.pool.

Property tests draw tables of every served dtype, dims around the vector
widths (1 .. 129, and 1000+ in a separate test), bags with empty bags and
duplicates, ids at the table bounds, int32/int64 ids, weights, strided input
and output views, on every code path this CPU has (baseline and AVX2).
Bad input must raise InputError without writing outside ``out``; ids just
outside the table are tried on a table fenced by PROT_NONE pages, so a read
out of bounds would crash the test run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.core.errors import InputError
from flexemr._native._flexemr_kernel import lib
from flexemr.core.pooling import accumulation_dtype
from flexemr.core.pooling import pool as oracle_pool
from flexemr.core import kernel
from flexemr.core.kernel import PoolJob, gather, pool, pool_many

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8]
# around the vector widths: 4 and 8 lanes, chunks of 1, 2, 4 and 8 vectors, scalar tails
DIMS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 40, 48, 63, 64, 65, 72, 100, 127, 128, 129]


def _available_isas() -> list[str]:
    out = []
    current = kernel.isa()
    for name in ("baseline", "avx2"):
        try:
            kernel.set_isa(name)
        except InputError:
            continue
        out.append(name)
    kernel.set_isa(current)
    return out


ISAS = _available_isas()


@pytest.fixture(autouse=True)
def _restore_kernel_state() -> Iterator[None]:
    isa, threads, inline = kernel.isa(), kernel.get_threads(), lib.fxk_inline_work()
    yield
    kernel.set_isa(isa)
    kernel.set_threads(threads)
    lib.fxk_set_inline_work(inline)


def random_table(rng: np.random.Generator, n: int, dim: int, dtype: Any) -> npt.NDArray[Any]:
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(int(info.min), int(info.max) + 1, size=(n, dim)).astype(dt)
    return rng.standard_normal((n, dim)).astype(dt)


def strided_view(rng: np.random.Generator, a: npt.NDArray[Any], how: str) -> npt.NDArray[Any]:
    """The same values as ``a``, laid out as a view: padded rows, every other row, or reversed rows."""
    n, dim = a.shape
    if how == "padded":  # rows inside wider records, at an odd element offset
        big = random_table(rng, n, dim + 5, a.dtype)
        big[:, 3:3 + dim] = a
        return big[:, 3:3 + dim]
    if how == "every_other":
        big = random_table(rng, 2 * n, dim, a.dtype)
        big[::2] = a
        return big[::2]
    if how == "reversed":
        return np.ascontiguousarray(a[::-1])[::-1]
    return a


def expected(rows: npt.NDArray[Any], ids: npt.NDArray[Any], offsets: npt.NDArray[Any], mode: str,
             weights: npt.NDArray[Any] | None, fill: float) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """(oracle result, per-element tolerance) for the kernel's pooling."""
    gathered = np.asarray(rows)[ids]
    want = oracle_pool(gathered, offsets, mode, weights)
    acc = accumulation_dtype(rows.dtype)
    if mode == "max":
        tol = np.zeros_like(want)
    else:  # both sum in id order; FMA (AVX2) rounds once where numpy rounds twice
        absw = None if weights is None else np.abs(np.asarray(weights, np.float32))
        mag = oracle_pool(np.abs(gathered.astype(acc)), offsets, mode, absw)
        counts = np.diff(offsets)[:, None]
        tol = 4 * np.finfo(acc).eps * mag * np.maximum(counts, 1) + np.finfo(acc).tiny
    empty = np.diff(offsets) == 0
    want[empty] = fill
    return want, tol


def assert_pooled(got: npt.NDArray[Any], want: npt.NDArray[Any], tol: npt.NDArray[Any]) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    with np.errstate(invalid="ignore"):  # inf - inf where both are -inf fills
        err = np.abs(got.astype(np.float64) - want)
    same = (got == want) | (err <= tol)
    assert same.all(), f"max error {np.nanmax(np.where(same, 0, err))}"


@st.composite
def pooling_cases(draw: st.DrawFn) -> dict[str, Any]:
    dtype = draw(st.sampled_from(DTYPES))
    dim = draw(st.sampled_from(DIMS))
    num_rows = draw(st.integers(1, 40))
    lengths = draw(st.lists(st.integers(0, 7), min_size=0, max_size=10))
    n = sum(lengths)
    # ids from the whole range, the bounds made likely; duplicates happen with few rows
    ids = draw(st.lists(st.one_of(st.integers(0, num_rows - 1), st.sampled_from([0, num_rows - 1])),
                        min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    weighted = mode != "max" and draw(st.booleans())
    return {
        "table": random_table(rng, num_rows, dim, dtype),
        "ids": np.array(ids, dtype=draw(st.sampled_from([np.int32, np.int64]))),
        "offsets": np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
        "mode": mode,
        "weights": rng.standard_normal(n).astype(np.float32) if weighted else None,
        "layout": draw(st.sampled_from(["plain", "padded", "every_other", "reversed"])),
        "out_layout": draw(st.sampled_from(["new", "slice", "every_other"])),
        "fill": draw(st.sampled_from([0.0, float("-inf"), 7.5])),
        "isa": draw(st.sampled_from(ISAS)),
        "rng": rng,
    }


def out_view(rng: np.random.Generator, shape: tuple[int, int], dtype: Any, how: str) -> tuple[
        npt.NDArray[Any] | None, npt.NDArray[Any] | None]:
    """(out argument, the whole buffer around it) for an output layout; the buffer starts as NaN sentinels."""
    b, dim = shape
    if how == "new":
        return None, None
    if how == "slice":  # the columns of one table in a [B, sum(dims)] array
        whole = np.full((b, dim + 7), np.nan, dtype)
        return whole[:, 4:4 + dim], whole
    whole = np.full((2 * b + 1, dim), np.nan, dtype)
    return whole[1::2], whole


@SETTINGS
@given(pooling_cases())
def test_pool_matches_oracle(case: dict[str, Any]) -> None:
    kernel.set_isa(case["isa"])
    rng = case["rng"]
    table = case["table"]
    rows = strided_view(rng, table, case["layout"])
    offsets = case["offsets"]
    acc = accumulation_dtype(table.dtype)
    out, whole = out_view(rng, (offsets.size - 1, table.shape[1]), acc, case["out_layout"])
    got = pool(rows, case["ids"], offsets, case["mode"], case["weights"], out=out, fill=case["fill"])
    want, tol = expected(table, case["ids"], offsets, case["mode"], case["weights"], case["fill"])
    assert_pooled(got, want, tol)
    if out is not None:
        assert got is out
        assert whole is not None
        mask = np.ones(whole.shape, bool)
        if case["out_layout"] == "slice":
            mask[:, 4:4 + table.shape[1]] = False
        else:
            mask[1::2] = False
        assert np.isnan(whole[mask]).all(), "the kernel wrote outside out"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1000, 1031])
def test_large_dims(isa: str, dtype: Any, dim: int) -> None:
    kernel.set_isa(isa)
    rng = np.random.default_rng(dim)
    table = random_table(rng, 50, dim, dtype)
    ids = rng.integers(0, 50, 60)
    offsets = np.array([0, 1, 1, 20, 60])
    for mode, w in (("sum", None), ("mean", rng.standard_normal(60).astype(np.float32)), ("max", None)):
        want, tol = expected(table, ids, offsets, mode, w, 0.0)
        assert_pooled(pool(table, ids, offsets, mode, w), want, tol)


@pytest.mark.parametrize("isa", ISAS)
def test_float16_specials_convert_exactly(isa: str) -> None:
    """Every float16 bit pattern (zeros, subnormals, inf, NaN) converts like numpy's astype."""
    kernel.set_isa(isa)
    allh = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(-1, 64)  # 1024 rows of 64
    n = allh.shape[0]
    got = pool(allh, np.arange(n), np.arange(n + 1), "max")  # one row per bag: the converted row itself
    want = allh.astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)]).all()
    tail = allh[:, :7]  # the scalar tail path
    got7 = pool(tail, np.arange(n), np.arange(n + 1), "max")
    np.testing.assert_array_equal(np.isnan(got7), np.isnan(tail.astype(np.float32)))
    ok = ~np.isnan(got7)
    np.testing.assert_array_equal(got7.view(np.uint32)[ok], tail.astype(np.float32).view(np.uint32)[ok])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [3, 16, 64])
def test_max_propagates_nan_like_numpy(isa: str, dim: int) -> None:
    kernel.set_isa(isa)
    t = np.zeros((3, dim), np.float32)
    t[1, 0] = np.nan
    t[2, :] = 5.0
    for ids in ([1, 2], [2, 1], [0, 1, 2]):
        got = pool(t, ids, [0, len(ids)], "max")
        np.testing.assert_array_equal(got, oracle_pool(t[ids], [0, len(ids)], "max"))


def test_empty_cases() -> None:
    t = np.ones((4, 3), np.float32)
    assert pool(t, [], [0]).shape == (0, 3)
    np.testing.assert_array_equal(pool(t, [], [0, 0, 0], "max", fill=-np.inf), np.full((2, 3), -np.inf))
    assert pool(np.ones((4, 0), np.float32), [1, 2], [0, 2]).shape == (1, 0)
    with pytest.raises(InputError, match="id 4 at position 1"):
        pool(np.ones((4, 0), np.float32), [1, 4], [0, 2])  # no columns: ids are still checked
    assert gather(t, []).shape == (0, 3)


def test_docstring_examples_run() -> None:
    import doctest

    result = doctest.testmod(kernel, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


def test_accumulation_dtype_is_the_oracles() -> None:
    for dt in DTYPES:
        got = pool(np.ones((2, 2), dt), [0, 1], [0, 2])
        assert got.dtype == accumulation_dtype(dt)


# ------------------------------------------------------------------ many tables, threads


def _jobs(rng: np.random.Generator, n_tables: int) -> list[PoolJob]:
    jobs = []
    for t in range(n_tables):
        dtype = DTYPES[t % len(DTYPES)]
        dim = [64, 17, 128, 8, 3][t % 5]
        table = random_table(rng, 300, dim, dtype)
        lengths = rng.poisson(20, 200)
        ids = rng.integers(0, 300, int(lengths.sum())).astype([np.int32, np.int64][t % 2])
        mode = ["sum", "mean", "max"][t % 3]
        w = rng.standard_normal(ids.size).astype(np.float32) if mode != "max" and t % 2 else None
        jobs.append(PoolJob(table, ids, np.concatenate(([0], np.cumsum(lengths))), mode, w))
    return jobs


@pytest.mark.parametrize("isa", ISAS)
def test_pool_many_threads_equal_single_thread(isa: str) -> None:
    kernel.set_isa(isa)
    jobs = _jobs(np.random.default_rng(1), 7)
    one = pool_many(jobs, threads=1)
    lib.fxk_set_inline_work(0)  # split even small calls over the threads
    for threads in (2, 3, 5):
        many = pool_many(jobs, threads=threads)
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)  # each bag is summed by one thread, in id order
    assert lib.fxk_pool_size() >= 4
    for job, got in zip(jobs, one):
        want, tol = expected(job.rows, np.asarray(job.ids), np.asarray(job.offsets), job.mode,
                             None if job.weights is None else np.asarray(job.weights), 0.0)
        assert_pooled(got, want, tol)


def test_pool_many_into_one_keyed_output() -> None:
    """Results of several tables land side by side in one [B, sum(dims)] array, like a KeyedTensor."""
    rng = np.random.default_rng(2)
    dims = [4, 9, 16]
    tables = [random_table(rng, 50, d, np.float32) for d in dims]
    offsets = np.arange(0, 33, 4)
    idss = [rng.integers(0, 50, 32) for _ in dims]
    kt = np.zeros((8, sum(dims)), np.float32)
    cols = np.concatenate(([0], np.cumsum(dims)))
    outs = pool_many([PoolJob(t, i, offsets, out=kt[:, a:b]) for t, i, a, b in zip(tables, idss, cols, cols[1:])],
                     threads=2)
    for t, i, o, a, b in zip(tables, idss, outs, cols, cols[1:]):
        assert np.shares_memory(o, kt)
        np.testing.assert_allclose(kt[:, a:b], oracle_pool(t[i], offsets), rtol=1e-5, atol=1e-5)


def test_pool_each_isolates_bad_jobs() -> None:
    """Several requests' jobs in one call: a bad job gives its error in its place, the others are exact."""
    rng = np.random.default_rng(5)
    t = random_table(rng, 20, 8, np.float32)
    offs = np.array([0, 2, 3])
    good = [rng.integers(0, 20, 3) for _ in range(3)]
    jobs = [PoolJob(t, good[0], offs), PoolJob(t, [1, 20, 2], offs), PoolJob(t, good[1], offs, "max"),
            PoolJob(t, [0, 1], [0, 3, 2]), PoolJob(t, good[2], offs, weights=[0.5, 2.0, -1.0])]
    lib.fxk_set_inline_work(0)  # spread over workers, however small
    try:
        got = kernel.pool_each(jobs, threads=2)
    finally:
        lib.fxk_set_inline_work(1 << 21)
    assert isinstance(got[1], InputError) and "job 1: id 20 at position 1" in str(got[1])
    assert isinstance(got[3], InputError) and "offsets" in str(got[3])
    for i, mode, w in ((0, "sum", None), (2, "max", None), (4, "sum", np.array([0.5, 2.0, -1.0], np.float32))):
        r = got[i]
        assert isinstance(r, np.ndarray)
        np.testing.assert_allclose(r, oracle_pool(t[jobs[i].ids], offs, mode, w), rtol=1e-5, atol=1e-5)


def test_tune_allocator_is_idempotent() -> None:
    first = kernel.tune_allocator()
    assert kernel.tune_allocator() is first
    assert lib.fxk_tune_malloc(-1, 0) == -1  # refused values


def test_concurrent_callers() -> None:
    """Two Python threads calling at once (the GIL is released): one owns the pool, the other runs inline."""
    lib.fxk_set_inline_work(0)
    jobs = _jobs(np.random.default_rng(3), 5)
    ref = pool_many(jobs, threads=1)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                for a, b in zip(ref, pool_many(jobs, threads=2)):
                    np.testing.assert_array_equal(a, b)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    ts = [threading.Thread(target=worker) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors[0]


def test_fork_child_gets_a_working_pool() -> None:
    """After fork() the child has none of the parent's workers: its first parallel call starts new ones."""
    script = textwrap.dedent("""
        import os, sys
        import numpy as np
        from flexemr._native._flexemr_kernel import lib
        from flexemr.core.kernel import pool_many, PoolJob
        lib.fxk_set_inline_work(0)
        t = np.arange(4000, dtype=np.float32).reshape(1000, 4)
        job = PoolJob(t, np.arange(1000), np.arange(0, 1001, 10))
        ref = pool_many([job], threads=1)[0]
        assert (pool_many([job], threads=2)[0] == ref).all() and lib.fxk_pool_size() >= 1
        pid = os.fork()
        if pid == 0:
            ok = lib.fxk_pool_size() == 0 and all((pool_many([job], threads=2)[0] == ref).all() for _ in range(50))
            os._exit(0 if ok and lib.fxk_pool_size() >= 1 else 3)
        _, status = os.waitpid(pid, 0)
        assert (pool_many([job], threads=2)[0] == ref).all()
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ gather


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8, np.complex128])
def test_gather_strided_both_sides(dtype: Any) -> None:
    rng = np.random.default_rng(4)
    big = (rng.standard_normal((40, 11)) * 100).astype(dtype)
    rows = big[::2, 2:9]  # strided rows, odd element offset
    idx = np.array([19, 0, 0, 7, 19], np.int32)
    whole = np.zeros((5, 12), dtype)
    got = gather(rows, idx, out=whole[:, 3:10], threads=2)
    np.testing.assert_array_equal(got, rows[idx])
    assert (whole[:, :3] == 0).all() and (whole[:, 10:] == 0).all()
    np.testing.assert_array_equal(gather(rows, idx.astype(np.int64)), rows[idx])


def test_gather_parallel_matches() -> None:
    lib.fxk_set_inline_work(0)
    rng = np.random.default_rng(5)
    t = rng.standard_normal((1000, 33)).astype(np.float32)
    idx = rng.integers(0, 1000, 5000)
    np.testing.assert_array_equal(gather(t, idx, threads=3), t[idx])


# ------------------------------------------------------------------ bad input


def test_bad_ids_raise_without_writing_outside_out() -> None:
    t = np.ones((10, 8), np.float32)
    whole = np.full((4, 12), 9.0, np.float32)
    out = whole[:, 2:10]
    for ids, pos, bad in (([1, 2, -1], 2, -1), ([10, 0, 0], 0, 10), ([0, 2**40, 3], 1, 2**40)):
        with pytest.raises(InputError, match=f"id {bad} at position {pos} is out of range for a table of 10 rows"):
            pool(t, np.array(ids, np.int64), [0, 1, 1, 3, 3], out=out)
        assert (whole[:, :2] == 9).all() and (whole[:, 10:] == 9).all()
    with pytest.raises(InputError, match="id -5 at position 0"):
        pool(t, np.array([-5], np.int32), [0, 1])
    with pytest.raises(InputError, match="out of range"):
        pool(t, np.array([2**64 - 1], np.uint64), [0, 1])
    with pytest.raises(InputError, match="id 10 at position 1"):
        gather(t, [3, 10])
    lib.fxk_set_inline_work(0)
    with pytest.raises(InputError, match="job 1: id 300 at position 3"):
        jobs = _jobs(np.random.default_rng(6), 3)
        bad = np.array(jobs[1].ids, copy=True)
        bad[3] = 300
        pool_many([jobs[0], PoolJob(jobs[1].rows, bad, jobs[1].offsets, jobs[1].mode, jobs[1].weights), jobs[2]],
                  threads=2)


def _fenced(n_rows: int, dim: int) -> tuple[mmap.mmap, npt.NDArray[np.float32]]:
    """A float32 [n_rows, dim] table filling one page exactly, with PROT_NONE pages before and after."""
    page = mmap.PAGESIZE
    assert n_rows * dim * 4 == page
    m = mmap.mmap(-1, 3 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start in (base, base + 2 * page):
        assert libc.mprotect(start, page, 0) == 0, os.strerror(ctypes.get_errno())
    table = np.frombuffer(m, np.float32, count=n_rows * dim, offset=page).reshape(n_rows, dim)
    return m, table


@pytest.mark.parametrize("isa", ISAS)
def test_ids_just_outside_a_fenced_table(isa: str) -> None:
    """A read of row -1 or row n would hit a PROT_NONE page and crash the process."""
    kernel.set_isa(isa)
    n, dim = mmap.PAGESIZE // 256, 64
    _mapping, table = _fenced(n, dim)  # unmapped when garbage-collected
    ref = pool(table, [0, n - 1, n - 1, 0], [0, 2, 4], "max")
    np.testing.assert_array_equal(ref, np.zeros((2, dim), np.float32))
    for bad in (-1, n, -n, 2 * n):
        ids = np.array([0] * 20 + [bad] + [n - 1] * 20)  # the bad id also sits in the prefetch window
        for mode in ("sum", "max"):
            with pytest.raises(InputError, match=f"id {bad} at position 20"):
                pool(table, ids, [0, 10, ids.size], mode)
        with pytest.raises(InputError, match=f"id {bad} at position 20"):
            gather(table, ids)


@pytest.mark.parametrize("offsets", [[1, 3], [0, 2], [0, 4], [0, 3, 1, 3], [], [[0, 3]], [0.0, 3.0]])
def test_bad_offsets(offsets: Any) -> None:
    t = np.ones((5, 4), np.float32)
    whole = np.full((6, 4), 9.0, np.float32)
    with pytest.raises(InputError, match="offsets"):
        pool(t, [0, 1, 2], offsets, out=whole[1:1 + max(len(offsets) - 1, 0)] if len(offsets) > 1 else None)
    assert (whole[0] == 9).all() and (whole[4:] == 9).all()


@pytest.mark.parametrize("call, match", [
    (lambda t: pool(t.astype(np.int32), [0], [0, 1]), "dtype must be one of"),
    (lambda t: pool(t.astype(">f4"), [0], [0, 1]), "dtype must be one of"),
    (lambda t: pool(t.astype(bool), [0], [0, 1]), "dtype must be one of"),
    (lambda t: pool(t[0], [0], [0, 1]), "2-D"),
    (lambda t: pool(t[:, ::2], [0], [0, 1]), "contiguous rows"),
    (lambda t: pool(t, [0.5], [0, 1]), "integer"),
    (lambda t: pool(t, [[0]], [0, 1]), "integer"),
    (lambda t: pool(t, [0], [0, 1], "median"), "mode"),
    (lambda t: pool(t, [0], [0, 1], "max", [1.0]), "weights"),
    (lambda t: pool(t, [0], [0, 1], "sum", [1.0, 2.0]), "weights"),
    (lambda t: pool(t, [0], [0, 1], out=np.zeros((1, 4), np.float64)), "out must be"),
    (lambda t: pool(t, [0], [0, 1], out=np.zeros((2, 4), np.float32)), "out must be"),
    (lambda t: pool(t, [0], [0, 1], out=np.zeros((1, 8), np.float32)[:, ::2]), "contiguous rows"),
    (lambda t: pool(t, [0, 1], [0, 1, 2], out=np.broadcast_to(np.zeros(4, np.float32), (2, 4))), "read-only"),
    (lambda t: pool(t, [0, 1], [0, 1, 2], out=np.lib.stride_tricks.as_strided(
        np.zeros(8, np.float32), (2, 4), (8, 4))), "overlap"),
    (lambda t: pool(t, [0], [0, 1], fill="x"), "fill"),
    (lambda t: pool(t, [0], [0, 1], threads=0), "threads"),
    (lambda t: pool_many([(t, [0], [0, 1])]), "PoolJob"),
    (lambda t: kernel.set_threads(-1), "threads"),
    (lambda t: kernel.set_isa("avx512-dreams"), "not available"),
    (lambda t: gather(t, [0], out=np.zeros((1, 4), np.float64)), "out must be"),
])
def test_bad_arguments(call: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        call(np.ones((3, 4), np.float32))


def test_zero_bags_into_any_view() -> None:
    """A [0, dim] out may have any strides (numpy gives zero-size views odd ones)."""
    t = np.ones((3, 4), np.float32)
    out = np.full((0, 11), np.nan, np.float32)[:, 4:8]
    assert pool(t, [], [0], out=out).shape == (0, 4)
    assert pool(np.ones((0, 4), np.float32)[:, ::2], [], [0, 0]).tolist() == [[0.0, 0.0]]


# ------------------------------------------------------------------ benchmark


def test_bench_kernel_runs_and_reports() -> None:
    from flexemr.bench import _kernel

    cfg = _kernel.KernelConfig(tables=2, rows=3000, dim=16, batch=64, pooling=4.0, warmup=1, batches=2, repeats=1,
                               threads=2, torchrec=False)
    res = _kernel.measure(cfg)
    rows = {(r["path"], r["threads"]): r for r in res["results"]}
    assert set(rows) == {(p, t) for p in _kernel.PATHS for t in (2, 1)}
    for t in (2, 1):
        for p in ("numpy", "native"):
            r = rows[(p, t)]
            assert r["verified"] and r["skipped"] is None and r["samples_per_s"] > 0 and r["timed_batches"] == 2
            assert r["rows_per_s"] > r["samples_per_s"] and r["vs_torchrec"] is None
        assert rows[("torchrec", t)]["skipped"] == "disabled (--no-torchrec)"
    assert set(res["overhead_us"]) >= {"pool_1", "pool_many_8", "native_8", "parallel", "inline_work"}
    text = _kernel.format_table(res)
    assert "native" in text and "skipped: disabled (--no-torchrec)" in text


def test_bench_kernel_callgrind_parsing(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from flexemr.bench import _kernel

    prefix = str(tmp_path / "cg.out")
    for name, total in (("cg.out.1", 0), ("cg.out.2", 500), ("cg.out.10", 7), ("cg.out", 9)):
        (tmp_path / name).write_text(f"events: Ir\nsummary: {total}\ntotals: {total}\n")
    assert _kernel._dump_counts(prefix) == [0, 500, 7, 9]  # parts in numeric order, the final file last
    monkeypatch.setattr(_kernel.shutil, "which", lambda name: None)
    res = _kernel.callgrind(_kernel.KernelConfig())
    assert res["skipped"].startswith("valgrind not installed")
    assert "skipped: valgrind not installed" in _kernel.format_callgrind(res)


def test_bench_kernel_is_registered() -> None:
    from flexemr.bench.__main__ import COMMANDS

    assert "kernel" in COMMANDS and "torchrec" in COMMANDS["kernel"].help.lower()


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_out_blocks_put_each_row_at_its_place_and_leave_the_gaps(data: st.DataObject) -> None:
    """With out_blocks the kernel writes row b at b * row_bytes + ((b + phase) // rows) * gap, exactly the plain
    result's row, and touches no byte between the rows; an out too small, or bad blocks, is an InputError."""
    dtype = data.draw(st.sampled_from([np.float32, np.float64, np.float16]))
    dim = data.draw(st.integers(1, 20))
    nb = data.draw(st.integers(0, 30))
    table = np.random.default_rng(dim).standard_normal((50, dim)).astype(dtype)
    lens = data.draw(st.lists(st.integers(0, 4), min_size=nb, max_size=nb))
    offsets = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int64)
    ids = np.array(data.draw(st.lists(st.integers(0, 49), min_size=int(offsets[-1]), max_size=int(offsets[-1]))),
                   dtype=np.int64)
    mode = data.draw(st.sampled_from(["sum", "max", "mean"]))
    acc = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    rows = data.draw(st.integers(1, 8))
    gap = data.draw(st.integers(0, 5)) * 8
    phase = data.draw(st.integers(0, rows - 1))
    rb = dim * acc.itemsize
    need = (nb - 1) * rb + ((nb - 1 + phase) // rows) * gap + rb if nb else 0
    buf = np.full(need + 16, 0x5A, np.uint8)
    want = kernel.pool(table, ids, offsets, mode, fill=-1.0)
    kernel.pool_many([kernel.PoolJob(table, ids, offsets, mode, out=buf, fill=-1.0, out_blocks=(rows, gap, phase))],
                     threads=data.draw(st.sampled_from([1, 2])))
    touched = np.zeros(buf.size, bool)
    for b in range(nb):
        at = b * rb + ((b + phase) // rows) * gap
        np.testing.assert_array_equal(buf[at: at + rb].view(acc), want[b])
        touched[at: at + rb] = True
    assert (buf[~touched] == 0x5A).all()
    if nb:
        with pytest.raises(InputError, match="too small"):
            kernel.pool_many([kernel.PoolJob(table, ids, offsets, mode, out=buf[: need - 1],
                                             out_blocks=(rows, gap, phase))])
    with pytest.raises(InputError):
        kernel.pool_many([kernel.PoolJob(table, ids, offsets, mode, out=buf, out_blocks=(rows, gap, rows))])
