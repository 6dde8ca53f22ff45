"""flexemr.core.hitpool: cache hits pooled from the arena in one kernel call, against kernel.pool."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr.core import kernel
from flexemr.core.errors import InputError
from flexemr.core.hitpool import HitJob, pool_hits

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8]


@st.composite
def _jobs(draw: st.DrawFn) -> list[tuple[HitJob, np.ndarray]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        dim = draw(st.sampled_from([1, 2, 3, 16, 33]))
        cap = draw(st.integers(1, 12))
        pad = draw(st.integers(0, 3))  # the arena's slots are wider than the table's rows
        arena = np.frombuffer(np.random.default_rng(draw(st.integers(0, 99))).bytes(cap * (dim + pad) * 8),
                              np.uint8).reshape(cap, (dim + pad) * 8).copy()
        rows = arena[:, : dim * dtype.itemsize].view(dtype)
        if dtype.kind == "f":
            rows[~np.isfinite(rows)] = 1.0
        bags = draw(st.lists(st.lists(st.integers(0, cap - 1), max_size=5), max_size=6))
        slots = np.array([s for b in bags for s in b], dtype=np.int64)
        offs = np.cumsum([0] + [len(b) for b in bags]).astype(np.int64)
        mode = draw(st.sampled_from(["sum", "mean", "max"]))
        w = None if mode == "max" or not draw(st.booleans()) else \
            np.linspace(-1, 2, slots.size).astype(np.float32)
        fill = float("-inf") if mode == "max" else 0.0
        want = kernel.pool(rows, slots, offs, mode, w, fill=fill)  # type: ignore[arg-type]
        res = np.full_like(want, 7)
        out.append((HitJob(rows, slots, offs, w, mode, res, fill), want))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=_jobs(), threads=st.sampled_from([1, 2]))
def test_pool_hits_matches_kernel_pool(jobs: list[tuple[HitJob, np.ndarray]], threads: int) -> None:
    pool_hits([j for j, _ in jobs], threads=threads)
    for j, want in jobs:
        np.testing.assert_array_equal(j.out, want)


def test_pool_hits_refuses_what_could_write_out_of_bounds() -> None:
    rows = np.ones((4, 2), np.float32)
    slots, offs = np.array([0, 1]), np.array([0, 2])
    good = HitJob(rows, slots, offs, None, "sum", np.empty((1, 2), np.float32))
    bad = [good._replace(out=np.empty((2, 2), np.float32)), good._replace(out=np.empty((1, 3), np.float32)),
           good._replace(out=np.empty((1, 2), np.float64)), good._replace(slots=slots.astype(np.int32)),
           good._replace(offsets=np.array([0, 1, 2])[::2]), good._replace(weights=np.ones(3, np.float32)),
           good._replace(mode="max", weights=np.ones(2, np.float32)), good._replace(mode="median"),
           good._replace(rows=rows.astype(np.int64)), good._replace(offsets=np.zeros(0, np.int64))]
    for job in bad:
        with pytest.raises(InputError):
            pool_hits([job])


def test_pool_hits_raises_the_kernels_error_for_a_bad_slot() -> None:
    rows = np.ones((4, 2), np.float32)
    with pytest.raises(InputError, match="out of range"):
        pool_hits([HitJob(rows, np.array([0, 9]), np.array([0, 2]), None, "sum", np.empty((1, 2), np.float32))])
    with pytest.raises(InputError, match="offsets"):
        pool_hits([HitJob(rows, np.array([0, 1]), np.array([0, 3]), None, "sum", np.empty((1, 2), np.float32))])
