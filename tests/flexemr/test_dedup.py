"""The native dedup and runs (flexemr.core.dedup.unique_inverse, runs) against numpy oracles.

Property tests draw ids of int32/int64 over tables of one row to a million
(dense ids take the bitmap, sparse ones np.unique), with duplicates and ids at
the table bounds; runs draw sorted unique ids and bands (some empty).  Ids
out of range must raise InputError with their position, never read or write
outside the arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.core import dedup
from flexemr.core.errors import InputError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def id_cases(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    num_rows = draw(st.sampled_from([1, 2, 63, 64, 65, 1000, 4096, 1 << 20]))
    n = draw(st.integers(0, 300))
    edge = st.sampled_from([0, num_rows - 1])  # the table bounds, often
    ids = draw(st.lists(st.one_of(st.integers(0, num_rows - 1), edge), min_size=n, max_size=n))
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    return np.array(ids, dtype=dtype), num_rows


@SETTINGS
@given(id_cases())
def test_unique_inverse_matches_numpy(case: tuple[np.ndarray, int]) -> None:
    ids, num_rows = case
    uniq, inv = dedup.unique_inverse(ids, num_rows)
    want_u, want_i = np.unique(ids.astype(np.int64), return_inverse=True)
    assert uniq.dtype == np.int64 and inv.dtype == np.int64
    assert uniq.tolist() == want_u.tolist()
    assert inv.tolist() == want_i.reshape(-1).tolist()


def test_dense_ids_take_the_bitmap_and_match_numpy() -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 500_000, 65_536)
    uniq, inv = dedup.unique_inverse(ids, 500_000)
    want_u, want_i = np.unique(ids, return_inverse=True)
    assert np.array_equal(uniq, want_u) and np.array_equal(inv, want_i)
    assert np.array_equal(uniq[inv], ids)


@pytest.mark.parametrize(("num_rows", "bad"), [(10, -1), (10, 10), (10, 1 << 41),  # the bitmap
                                                (1 << 40, -1), (1 << 40, 1 << 41)])  # np.unique
def test_unique_inverse_rejects_ids_out_of_range(num_rows: int, bad: int) -> None:
    ids = np.array([3, 4, bad, 5], dtype=np.int64)
    with pytest.raises(InputError, match=f"id {bad}"):
        dedup.unique_inverse(ids, num_rows)


def test_unique_inverse_rejects_non_integer_ids() -> None:
    with pytest.raises(InputError, match="integer"):
        dedup.unique_inverse(np.array([1.5, 2.0]), 10)


@SETTINGS
@given(st.lists(id_cases(), min_size=0, max_size=6), st.sampled_from([1, 2, 4]))
def test_unique_inverse_many_matches_numpy_per_table(cases: list[tuple[np.ndarray, int]], threads: int) -> None:
    got = dedup.unique_inverse_many(cases, threads=threads)
    assert len(got) == len(cases)
    for (ids, _), (uniq, inv) in zip(cases, got):
        want_u, want_i = np.unique(ids.astype(np.int64), return_inverse=True)
        assert uniq.tolist() == want_u.tolist() and inv.tolist() == want_i.reshape(-1).tolist()


def test_unique_inverse_many_spreads_tables_over_threads_and_matches_numpy() -> None:
    """Enough ids that the tables are spread over the kernel's threads (each a task); dense and sparse tables
    mixed (the sparse one goes through np.unique), int32 and int64 ids."""
    rng = np.random.default_rng(2)
    cases = [(rng.integers(0, 500_000, 65_536, dtype=dt), 500_000) for dt in (np.int64, np.int32) * 4]
    cases.append((rng.integers(0, 1 << 40, 1000), 1 << 40))
    for (ids, _), (uniq, inv) in zip(cases, dedup.unique_inverse_many(cases, threads=2)):
        want_u, want_i = np.unique(ids, return_inverse=True)
        assert np.array_equal(uniq, want_u) and np.array_equal(inv, want_i)


@pytest.mark.parametrize("threads", [1, 2])
def test_unique_inverse_many_names_the_table_with_an_id_out_of_range(threads: int) -> None:
    good = np.arange(70_000, dtype=np.int64)
    with pytest.raises(InputError, match=r"tables\[2\]: id 100 at position 3 is out of range"):
        dedup.unique_inverse_many([(good, 70_000), (good, 70_000), (np.array([0, 1, 2, 100]), 100)],
                                  threads=threads)
    with pytest.raises(InputError, match=r"tables\[1\]: ids must be a 1-D integer array"):
        dedup.unique_inverse_many([(good, 70_000), (np.array([0.5]), 10)])


@st.composite
def run_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    num_rows = draw(st.integers(1, 200))
    ids = np.array(sorted(draw(st.sets(st.integers(0, num_rows - 1), max_size=num_rows))), dtype=np.int64)
    cuts = sorted(draw(st.sets(st.integers(1, num_rows), max_size=8)))  # a cut at num_rows: an empty last band
    return ids, np.array([0, *cuts], dtype=np.int64)


@SETTINGS
@given(run_cases())
def test_runs_match_oracle(case: tuple[np.ndarray, np.ndarray]) -> None:
    uniq, starts = case
    run_start, band_run, band_pos = dedup.runs(uniq, starts)
    n = uniq.size
    band = np.searchsorted(starts, uniq, side="right") - 1
    brk = np.flatnonzero((np.diff(uniq) != 1) | (np.diff(band) != 0)) + 1
    want_start = np.concatenate(([0], brk, [n])) if n else np.array([0])
    assert run_start.tolist() == want_start.tolist()
    assert band_pos.tolist() == [*np.searchsorted(uniq, starts).tolist(), n]
    firsts = band[want_start[:-1]]
    assert band_run.tolist() == np.searchsorted(firsts, np.arange(starts.size + 1)).tolist()


def test_ids_written_by_another_thread_meanwhile_raise_input_error_never_crash() -> None:
    """The dedup runs with the GIL released and reads the ids twice: ids another thread rewrites between the two
    passes (out of range, or in range but not seen by the first) give InputError or a correct answer for what
    the ids were, never a read outside the bitmap (before: a segmentation fault)."""
    import threading

    n = 1 << 18
    ids = np.arange(n, dtype=np.int64)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            ids[::1024] = 1 << 40
            ids[::1024] = np.arange(0, n, 1024)

    t = threading.Thread(target=flip)
    t.start()
    errors = calls = 0
    try:
        while calls < 50 or (errors == 0 and calls < 5000):  # until the race was exercised
            calls += 1
            try:
                uniq, inv = dedup.unique_inverse(ids, n)
            except InputError as exc:
                assert "out of range" in str(exc) or "changed" in str(exc)
                errors += 1
            else:
                assert inv.min() >= 0 and inv.max() < uniq.size
    finally:
        stop.set()
        t.join()
    assert errors > 0


def test_runs_reject_ids_not_sorted_and_unique() -> None:
    for bad in ([3, 2, 5], [1, 1, 2]):
        with pytest.raises(InputError, match="sorted unique"):
            dedup.runs(np.array(bad, dtype=np.int64), np.array([0], dtype=np.int64))
