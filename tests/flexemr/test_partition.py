"""The native partition (flexemr.core.kernel.partition) against a numpy oracle.

Property tests draw tables cut into bands (one to a dozen, some empty), band
-> slot maps with bands left to the rest (-1), bags with empty bags and
duplicates, int32/int64 ids, weights and skip masks, one or several jobs per
call and one or two threads.  Bad input must raise InputError.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexemr._native._flexemr_kernel import lib
from flexemr.core import kernel
from flexemr.core.errors import InputError
from flexemr.core.kernel import PartitionJob, partition, partition_many

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def oracle(ids: npt.NDArray[Any], offsets: npt.NDArray[Any], starts: npt.NDArray[Any], slots: npt.NDArray[Any],
           n_slots: int, weights: npt.NDArray[Any] | None, skip: npt.NDArray[Any] | None) -> dict[str, Any]:
    """What partition must return, computed occurrence by occurrence."""
    ids = np.asarray(ids, np.int64)
    band = np.searchsorted(starts, ids, side="right") - 1
    slot = slots[band]
    if skip is not None:
        slot = np.where(skip, -1, slot)
    bag = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    out: dict[str, Any] = {"ids": [], "offsets": [], "weights": []}
    for s in range(n_slots):
        sel = np.flatnonzero(slot == s)           # ascending = grouped by bag, in id order
        out["ids"].append(ids[sel] - starts[band[sel]])
        out["offsets"].append(np.concatenate(([0], np.cumsum(np.bincount(bag[sel], minlength=offsets.size - 1)))))
        out["weights"].append(None if weights is None else weights[sel])
    rest = np.flatnonzero(slot < 0)
    out["rest_pos"] = rest
    out["rest_offsets"] = np.concatenate(([0], np.cumsum(np.bincount(bag[rest], minlength=offsets.size - 1))))
    return out


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    num_rows = draw(st.integers(1, 60))
    cuts = sorted(set(draw(st.lists(st.integers(0, num_rows), max_size=11))) - {0})
    starts = np.array([0, *cuts], dtype=np.int64)
    # a band may be empty: repeat a start now and then
    if draw(st.booleans()) and starts.size > 1:
        starts = np.sort(np.append(starts, starts[-1]))
    n_slots = draw(st.integers(0, starts.size))
    slots = np.array([draw(st.integers(-1, n_slots - 1)) for _ in starts], dtype=np.int32)
    lengths = draw(st.lists(st.integers(0, 9), max_size=12))
    n = sum(lengths)
    ids = np.array(draw(st.lists(st.integers(0, num_rows - 1), min_size=n, max_size=n)),
                   dtype=draw(st.sampled_from([np.int32, np.int64])))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return {
        "ids": ids, "offsets": np.concatenate(([0], np.cumsum(lengths))).astype(np.int64), "num_rows": num_rows,
        "starts": starts, "slots": slots, "n_slots": n_slots,
        "weights": rng.standard_normal(n).astype(np.float32) if draw(st.booleans()) else None,
        "skip": rng.random(n) < 0.3 if draw(st.booleans()) else None,
    }


def check(got: kernel.Parted, want: dict[str, Any]) -> None:
    assert len(got.ids) == len(want["ids"]) == len(got.offsets)
    for s, ids in enumerate(want["ids"]):
        assert got.ids[s].dtype == np.int32 and got.ids[s].tolist() == ids.tolist()
        assert got.offsets[s].dtype == np.int64 and got.offsets[s].tolist() == want["offsets"][s].tolist()
        if want["weights"][s] is None:
            assert got.weights is None
        else:
            assert got.weights is not None and got.weights[s].tolist() == want["weights"][s].tolist()
    assert got.rest_pos is not None and got.rest_offsets is not None
    assert got.rest_pos.tolist() == want["rest_pos"].tolist()
    assert got.rest_offsets.tolist() == want["rest_offsets"].tolist()


@SETTINGS
@given(cases())
def test_partition_matches_oracle(case: dict[str, Any]) -> None:
    want = oracle(case["ids"], case["offsets"], case["starts"], case["slots"], case["n_slots"], case["weights"],
                  case["skip"])
    got = partition(case["ids"], case["offsets"], num_rows=case["num_rows"], band_start=case["starts"],
                    band_slot=case["slots"], n_slots=case["n_slots"], weights=case["weights"], skip=case["skip"])
    check(got, want)


@settings(max_examples=50, deadline=None)
@given(st.lists(cases(), min_size=1, max_size=6), st.sampled_from([1, 2, 4]))
def test_partition_many_equals_one_by_one(many: list[dict[str, Any]], threads: int) -> None:
    lib.fxk_set_inline_work(0)  # every call parallel, however small
    try:
        jobs = [PartitionJob(c["ids"], c["offsets"], c["num_rows"], c["starts"], c["slots"], c["n_slots"],
                             c["weights"], c["skip"]) for c in many]
        for c, got in zip(many, partition_many(jobs, threads=threads)):
            check(got, oracle(c["ids"], c["offsets"], c["starts"], c["slots"], c["n_slots"], c["weights"], c["skip"]))
    finally:
        lib.fxk_set_inline_work(1 << 21)


def test_big_table_two_servers_parallel() -> None:
    """The compare workload's shape: 8 tables x 65k ids over two bands, threads on."""
    rng = np.random.default_rng(0)
    jobs, wants = [], []
    for _ in range(8):
        lengths = rng.poisson(32, 2048)
        ids = rng.integers(0, 500_000, lengths.sum())
        offs = np.concatenate(([0], np.cumsum(lengths)))
        starts, slots = np.array([0, 250_000]), np.array([0, 1], np.int32)
        jobs.append(PartitionJob(ids, offs, 500_000, starts, slots, rest=False))
        wants.append(oracle(ids, offs, starts, slots, 2, None, None))
    for got, want in zip(partition_many(jobs, threads=2), wants):
        assert got.rest_pos is None and got.rest_offsets is None
        for s in range(2):
            assert np.array_equal(got.ids[s], want["ids"][s]) and np.array_equal(got.offsets[s], want["offsets"][s])


@pytest.mark.parametrize("kwargs, match", [
    ({"ids": [0, 10]}, "id 10 at position 1 is out of range"),
    ({"ids": [-1, 0]}, "id -1 at position 0"),
    ({"offsets": [0, 1]}, "offsets"),
    ({"offsets": [0, 2, 1, 2]}, "offsets"),
    ({"band_start": [1, 5]}, "band_start must start at 0"),
    ({"band_start": [0, 6, 5]}, "band_start"),
    ({"band_start": [0, 11]}, "band_start"),
    ({"band_start": []}, "at least one band"),
    ({"band_slot": [0]}, "one slot per band"),
    ({"band_slot": [0, 2], "n_slots": 2}, "slots lie in"),
    ({"band_slot": [-1, 0], "rest": False}, "rest=True"),
    ({"skip": [True, False], "rest": False}, "rest=True"),
    ({"skip": [True]}, "skip must be"),
    ({"weights": [1.0]}, "weights"),
    ({"num_rows": -1}, "num_rows"),
    ({"n_slots": -2}, "n_slots"),
])
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"ids": [0, 7], "offsets": [0, 2], "num_rows": 10, "band_start": [0, 5]}
    args.update(kwargs)
    ids, offsets = args.pop("ids"), args.pop("offsets")
    with pytest.raises(InputError, match=match):
        partition(ids, offsets, **args)


def test_bad_job_is_named() -> None:
    ok = PartitionJob([1], [0, 1], 4, [0])
    with pytest.raises(InputError, match="job 1: id 9"):
        partition_many([ok, PartitionJob([9], [0, 1], 4, [0])])
    with pytest.raises(InputError, match="job 0 must be a PartitionJob"):
        partition_many([([1], [0, 1])])  # type: ignore[list-item]


def test_band_too_large_for_int32() -> None:
    with pytest.raises(InputError, match="2\\*\\*31"):
        partition([0], [0, 1], num_rows=1 << 32, band_start=[0])
    # two bands of 2^31 - 1 rows at most are fine
    top = (1 << 31) - 1
    got = partition([(1 << 31) + 5], [0, 1], num_rows=1 << 32, band_start=[0, top, 2 * top])
    assert got.ids[1].tolist() == [6]
