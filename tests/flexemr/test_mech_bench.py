"""The skew / priority / swapin / predict benchmarks run end to end on tiny settings and report the
JSON shapes the closing figures are compared by (no speed is asserted: that is what the benchmarks print)."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.bench._predict import PredictConfig, run_predict
from flexemr.bench._priority import PriorityConfig, run_priority
from flexemr.bench._skew import SkewConfig, run_skew
from flexemr.bench._swapin import SwapinConfig, batches_to_steady, run_swapin

from . import netns

pytestmark = pytest.mark.timeout(240)
INNER = {"samples_per_s", "p50_ms", "p99_ms"}


def test_batches_to_steady() -> None:
    rates = np.array([0.0, 0.2, 0.6, 0.8, 0.8, 0.9])
    assert batches_to_steady(rates, 0.7, 2) == (3, True)
    assert batches_to_steady(rates, 0.95, 2) == (6, False)
    assert batches_to_steady(rates[:1], 0.0, 2) == (1, False)


async def test_swapin_bench_shape() -> None:
    res = await run_swapin(SwapinConfig(rows=20_000, cache_rows=4000, nn_rows_per_sample=30, big_samples=128,
                                        small_samples=16, before=6, after=20, smooth=2, nn_ms=1.0))
    assert set(res) == {"without", "with"}
    for r in res.values():
        assert INNER | {"batches_to_steady", "hit_rates"} <= set(r) and len(r["hit_rates"]) == 20
    assert res["without"]["swapin_rows"] == 0 and res["with"]["swapin_rows"] > 0


async def test_predict_bench_shape() -> None:
    res = await run_predict(PredictConfig(rows=20_000, cache_rows=500, predict_rows=128, batches=20, warmup=5,
                                          nn_ms=1.0))
    assert set(res) == {"lookahead", "predict"}
    assert all(INNER | {"hit_rate"} <= set(r) for r in res.values())
    assert res["lookahead"]["predicted_rows"] == 0 and res["predict"]["predicted_rows"] > 0


async def test_skew_bench_shape() -> None:
    netns.require_tc()
    res = await run_skew(SkewConfig(rows=12_000, workers=2, seconds=1.0, warmup=0.5))
    assert set(res) == {"static", "balanced"}
    assert all(INNER <= set(r) and r["errors"] == 0 and r["lookups"] > 0 for r in res.values())
    assert res["static"]["off_primary_reads"] == 0 and {"speedup", "p99_ratio"} <= set(res["balanced"])
    assert res["static"]["worker_moves"] == 0 and "worker_moves" in res["balanced"]   # static: no re-mapping


async def test_priority_bench_shape() -> None:
    netns.require_tc()
    res = await run_priority(PriorityConfig(rows=20_000, bulk_workers=2, bulk_samples=32, seconds=1.0, warmup=0.5))
    assert list(res) == ["idle", "without", "with"]
    assert all(INNER | {"bulk_samples_per_s"} <= set(r) and r["errors"] == 0 for r in res.values())
    assert res["with"]["priority_lookups"] > 0 and res["without"]["priority_lookups"] == 0
    assert res["without"]["bulk_samples_per_s"] > 0 and {"p99_ratio", "bulk_ratio"} <= set(res["with"])
