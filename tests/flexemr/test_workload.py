"""Calibrated synthetic workloads reproduce the published dlrm_datasets reuse statistics."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.core.errors import InputError
from flexemr.core.jagged import JaggedBatch
from flexemr.core.spec import TableSpec
from flexemr.apps.workload import (
    PROFILE_2021,
    PROFILE_2022,
    TARGET_2021,
    TARGET_2022,
    Profile,
    calibrate,
    expected_reuse_stats,
    generate,
    hot_rows_of,
    reuse_stats,
)

SPECS = [TableSpec(f"t{i}", 1_000_000, 8) for i in range(4)]
TOLERANCE = 0.10  # relative, per statistic, for one reference batch (observed worst case ~4%)


@pytest.mark.parametrize("profile,target", [(PROFILE_2022, TARGET_2022), (PROFILE_2021, TARGET_2021)])
def test_profiles_reproduce_published_statistics(profile: Profile, target: dict[str, float]) -> None:
    for seed in (0, 1):
        batch = generate(SPECS, profile.ref_batch_size, profile.ref_pooling_factor, profile, seed=seed)
        stats = reuse_stats(batch)
        for key, want in target.items():
            assert abs(stats[key] / want - 1) < TOLERANCE, (key, stats[key], want)
    expected = expected_reuse_stats(profile)
    for key, want in target.items():
        assert abs(expected[key] / want - 1) < 0.01


def test_calibration_recovers_the_profile() -> None:
    prof, stats = calibrate(TARGET_2022, starts=[(0.8, 0.1, 2000.0, 0.05)], iters=250)
    for key, want in TARGET_2022.items():
        assert abs(stats[key] / want - 1) < 0.02
    assert abs(prof.alpha - PROFILE_2022.alpha) < 0.05
    with pytest.raises(InputError):
        calibrate({"unique_gt16": 0.1})


def test_deterministic_and_stream_shares_hot_rows() -> None:
    a = generate(SPECS, 64, 8, PROFILE_2021, seed=3)
    assert a == generate(SPECS, 64, 8, PROFILE_2021, seed=3)
    assert a != generate(SPECS, 64, 8, PROFILE_2021, seed=4)
    # a table's ids do not depend on which other tables are generated
    assert np.array_equal(generate(SPECS[1:2], 64, 8, PROFILE_2021, seed=3).ids("t1"), a.ids("t1"))
    hot = hot_rows_of(SPECS[0], PROFILE_2022)
    assert np.array_equal(hot, hot_rows_of(SPECS[0], PROFILE_2022))
    top = set(hot[:20].tolist())
    for seed in range(3):
        ids, counts = np.unique(generate(SPECS[:1], 512, 16, PROFILE_2022, seed=seed).ids("t0"), return_counts=True)
        assert set(ids[np.argsort(-counts)[:5]].tolist()) <= top


def test_shapes_and_pooling_modes() -> None:
    b = generate(SPECS, 10, {"t0": 0, "t1": 1, "t2": 5, "t3": 2}, pooling="fixed")
    assert b.keys == tuple(s.name for s in SPECS) and b.batch_size == 10
    assert [int(b.lengths_of(t).sum()) for t in b.keys] == [0, 10, 50, 20]
    for s in SPECS:
        ids = b.ids(s.name)
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < s.num_rows)
    small = [TableSpec("tiny", 5, 2)]
    assert generate(small, 100, 4, seed=1).ids("tiny").max() < 5
    with pytest.raises(InputError):
        generate(SPECS, -1, 4)
    with pytest.raises(InputError):
        generate(SPECS, 1, 4, pooling="zipf")  # type: ignore[arg-type]


def test_reuse_stats_by_hand() -> None:
    jb = JaggedBatch.from_lists({"a": [[7] * 70, [1]], "b": [[7] * 17, []]})
    s = reuse_stats(jb)
    assert s["accesses"] == 88 and s["unique_rows"] == 3
    assert s["unique_gt16"] == pytest.approx(2 / 3) and s["access_gt16"] == pytest.approx(87 / 88)
    assert s["unique_gt64"] == pytest.approx(1 / 3) and s["access_gt64"] == pytest.approx(70 / 88)
    empty = reuse_stats(JaggedBatch([], np.zeros(0, np.int64), lengths=np.zeros(0, np.int64)))
    assert empty["unique_gt16"] == 0.0 and empty["accesses"] == 0.0
