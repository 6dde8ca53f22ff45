"""Frequency-aware row remapping: round trips, determinism, fewer coalesced reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.core.errors import ConfigError, LookupIdError, UnknownTableError
from flexemr.core.jagged import JaggedBatch
from flexemr.core.plan import ShardingPlan
from flexemr.core.spec import TableSpec
from flexemr.core.remap import RowRemap, build_remap, count_reads, profile_accesses, remap_batch
from flexemr.apps.workload import PROFILE_2022, generate
from flexemr.testing import lookup_locally


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=40), st.integers(31, 60))
def test_round_trip_and_table_reorder(ids: list[int], n: int) -> None:
    jb = JaggedBatch.from_lists({"t": [ids]})
    rm = build_remap(profile_accesses([jb], {"t": n}))
    logical = np.arange(n)
    assert np.array_equal(rm.to_logical("t", rm.to_physical("t", logical)), logical)
    assert np.array_equal(np.sort(rm.physical_to_logical("t")), logical)
    table = np.random.default_rng(0).standard_normal((n, 3))
    phys_table = rm.apply_to_table("t", table)
    assert np.array_equal(phys_table[rm.to_physical("t", ids)], table[ids])
    # hot rows first: physical id order == decreasing count
    counts = np.bincount(ids, minlength=n)
    assert (np.diff(counts[rm.physical_to_logical("t")]) <= 0).all()


def test_determinism_and_save_load(tmp_path: Path) -> None:
    specs = [TableSpec("a", 1000, 4), TableSpec("b x", 50, 4)]
    batches = [generate(specs, 32, 8, PROFILE_2022, seed=s) for s in range(3)]
    r1 = build_remap(profile_accesses(batches, specs))
    r2 = build_remap(profile_accesses(batches, specs))
    assert r1 == r2
    path = tmp_path / "remap.npz"
    r1.save(path)
    assert RowRemap.load(path) == r1
    assert RowRemap.identity(specs).to_physical("a", [5, 3]).tolist() == [5, 3]


def test_remapped_lookup_returns_same_rows() -> None:
    specs = [TableSpec("t", 500, 4)]
    plan = ShardingPlan.row_wise(specs, ["s0", "s1", "s2"])
    model = {"t": np.random.default_rng(1).standard_normal((500, 4)).astype(np.float32)}
    batch = generate(specs, 64, 8, PROFILE_2022, seed=0)
    rm = build_remap(profile_accesses([batch], specs))
    phys_model = {"t": rm.apply_to_table("t", model["t"])}
    phys_batch = remap_batch(rm, batch)
    got = lookup_locally(plan, phys_model, "t", phys_batch.ids("t"))
    np.testing.assert_array_equal(got, model["t"][batch.ids("t")])


def test_skewed_workload_needs_fewer_reads_after_remap() -> None:
    specs = [TableSpec(f"t{i}", 200_000, 16) for i in range(2)]
    plan = ShardingPlan.row_wise(specs, ["s0", "s1"])
    rm = build_remap(profile_accesses((generate(specs, 256, 16, PROFILE_2022, seed=s) for s in range(4)), specs))
    for seed in (100, 101):
        batch = generate(specs, 256, 16, PROFILE_2022, seed=seed)  # unseen batch, same hot rows
        before, after = count_reads(plan, batch), count_reads(plan, batch, rm)
        assert after["total"] < 0.75 * before["total"], (before, after)
        # same bytes, longer reads
        assert sum(np.unique(batch.ids(t)).size for t in batch.keys) == sum(
            np.unique(remap_batch(rm, batch).ids(t)).size for t in batch.keys
        )


def test_errors() -> None:
    rm = RowRemap({"t": [2, 0, 1]})
    with pytest.raises(UnknownTableError):
        rm.to_physical("u", [0])
    with pytest.raises(LookupIdError):
        rm.to_physical("t", [3])
    with pytest.raises(ConfigError):
        RowRemap({"t": [0, 0, 1]})
    with pytest.raises(ConfigError):
        RowRemap({"t": [0, 5]})
    assert rm.to_physical("t", [2, 0, 1]).tolist() == [0, 1, 2]
