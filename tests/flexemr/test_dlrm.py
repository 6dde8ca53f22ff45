"""The DLRM: shapes, determinism, and disaggregated lookups == the local reference path."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr import LocalCluster, TableSpec, build_model
from flexemr.apps.dlrm import (
    CRITEO_KAGGLE_CARDINALITIES,
    DLRM,
    ReferenceTables,
    auto_scale,
    criteo_specs,
    head_of,
    scaled_rows,
)
from flexemr.core.errors import ConfigError, InputError
from flexemr.apps.rank import Ranker
from flexemr.apps.trace import generate_trace

SMALL = criteo_specs(scale=2e-4, dim=16)


def test_criteo_shapes_and_scale() -> None:
    assert len(CRITEO_KAGGLE_CARDINALITIES) == 26 and sum(CRITEO_KAGGLE_CARDINALITIES) == 33_762_577
    specs = criteo_specs(dim=16)
    total = sum(s.nbytes for s in specs)
    assert 100 << 20 < total <= 128 << 20                      # the default: a few hundred MB at most
    assert [s.name for s in specs] == [f"C{i}" for i in range(1, 27)]
    assert specs[8].num_rows == 3 and specs[2].num_rows == scaled_rows(10_131_227, auto_scale(16))
    assert sum(s.nbytes for s in criteo_specs(dim=64)) <= 128 << 20
    big = criteo_specs(scale=1.0, dim=16)
    assert [s.num_rows for s in big] == list(CRITEO_KAGGLE_CARDINALITIES)
    with pytest.raises(ConfigError):
        criteo_specs(scale=0.0)


def test_forward_shape_determinism_and_validation() -> None:
    model = DLRM(SMALL, seed=3)
    assert model.num_pairs == 27 * 26 // 2
    assert [w.shape for w, _ in model.top_layers][0] == (16 + 351, 512)
    rng = np.random.default_rng(0)
    dense = rng.random((64, 13), dtype=np.float32)
    pooled = rng.normal(size=(64, 26, 16)).astype(np.float32)
    ctr = model.forward(dense, pooled)
    assert ctr.shape == (64,) and ctr.dtype == np.float32 and ((ctr > 0) & (ctr < 1)).all()
    assert np.array_equal(ctr, DLRM(SMALL, seed=3).forward(dense, pooled))      # same seed, same weights
    assert not np.array_equal(ctr, DLRM(SMALL, seed=4).forward(dense, pooled))
    as_dict = {t: pooled[:, i] for i, t in enumerate(model.tables)}
    assert np.array_equal(model.forward(dense, as_dict), ctr)
    # row b of a batch does not depend on the other rows (up to BLAS blocking)
    np.testing.assert_allclose(model.forward(dense[:5], pooled[:5]), ctr[:5], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError):
        model.forward(dense[:, :12], pooled)
    with pytest.raises(InputError):
        model.forward(dense, pooled[:, :25])
    with pytest.raises(ConfigError):
        DLRM([TableSpec("a", 10, 8), TableSpec("b", 10, 16)])


def test_reference_tables_match_build_model() -> None:
    specs = [TableSpec("a", 30_000, 8), TableSpec("b", 7, 8)]
    ref = ReferenceTables(specs, seed=5)
    model = build_model(specs, 5)
    ids = np.array([9_999, 0, 4096, 4095, 17, 9_999])
    assert np.array_equal(ref.rows("a", ids), model["a"][ids])
    assert np.array_equal(ref.rows("b", [6, 0]), model["b"][[6, 0]])
    assert ref.cached_bytes < model["a"].nbytes + model["b"].nbytes
    with pytest.raises(InputError):
        ref.rows("a", [30_000])


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "processes"])
async def test_disaggregated_equals_local_reference(in_process: bool) -> None:
    specs = SMALL
    model = DLRM(specs, seed=1)
    batches = generate_trace(specs, 3, 64, 4.0, seed=2)
    local = build_model(specs, 9)
    async with LocalCluster(specs, servers=2, seed=9, in_process=in_process, transport="tcp") as cluster:
        client = await cluster.client()
        for b in batches:
            rows = await client.lookup_jagged(b.sparse, pooling="sum")
            pooled = model.stack_pooled(rows, b.batch_size)
            want = model.pool_local(b.sparse, local)
            np.testing.assert_allclose(pooled, want, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(model.forward(b.dense, pooled), model.reference_forward(b.dense, b.sparse, local),
                                       rtol=1e-6, atol=1e-6)
        # the Ranker's two paths agree with the reference too (naive: bit-exact pooling order)
        ref = ReferenceTables(specs, 9)
        for naive in (True, False):
            res = await Ranker(model, await cluster.client(), naive=naive, reference=ref, check_samples=64).run(batches)
            assert res.batches == 2 and res.samples == 128 and res.checked_samples == 3 * 64
            assert res.max_abs_err is not None and res.max_abs_err < 1e-5
            assert res.bytes_per_sample > 0 and res.p99_ms >= res.p50_ms > 0
        if not in_process:
            res = await Ranker(model, await cluster.client(), prefetch=1, reference=ref).run(batches)
            assert res.batches == 2 and res.max_abs_err is not None and res.max_abs_err < 1e-5


def test_head_of() -> None:
    b = generate_trace(SMALL, 1, 10, 3.0)[0].sparse
    h = head_of(b, 4)
    assert h.batch_size == 4 and h.keys == b.keys
    for t in b.keys:
        assert np.array_equal(h.ids(t), b.ids(t)[: b.bag_offsets(t)[4]])


async def test_rankers_sharing_reference_ctrs_compute_them_once_and_still_check() -> None:
    """The demo's rankers share the reference CTRs, computed before the timed loops: no ranker computes them while
    it runs, yet every ranker's CTRs are compared with them."""
    specs = SMALL
    model = DLRM(specs, seed=1)
    batches = generate_trace(specs, 3, 64, 4.0, seed=2)
    ref = ReferenceTables(specs, 9)
    calls = 0
    reference_forward = model.reference_forward

    def counted(*a: object, **k: object) -> np.ndarray:
        nonlocal calls
        calls += 1
        return reference_forward(*a, **k)  # type: ignore[arg-type]

    model.reference_forward = counted  # type: ignore[method-assign]
    shared: dict[int, np.ndarray] = {}
    async with LocalCluster(specs, servers=2, seed=9, in_process=True, transport="tcp") as cluster:
        ranker = Ranker(model, await cluster.client(), reference=ref, reference_ctrs=shared)
        ranker.prepare_reference(batches)        # before the timed loop
        assert calls == 3 and sorted(shared) == [0, 1, 2]
        res = await ranker.run(batches)
        assert calls == 3 and res.checked_samples == 3 * 32
        assert res.max_abs_err is not None and res.max_abs_err < 1e-5
        res = await Ranker(model, await cluster.client(), prefetch=1, reference=ref,
                           reference_ctrs=shared).run(batches)
        assert calls == 3 and res.checked_samples == 3 * 32 and res.max_abs_err is not None and res.max_abs_err < 1e-5
        # a ranker whose CTRs differ from the shared reference's is caught
        other = DLRM(specs, seed=5)
        res = await Ranker(other, await cluster.client(), reference=ref, reference_ctrs=shared).run(batches)
        assert calls == 3 and res.max_abs_err is not None and res.max_abs_err > 1e-3
