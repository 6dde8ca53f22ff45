"""``flexemr bench serverpool`` end to end at a tiny size: a real server answers, the report is complete.

Speeds are not asserted (they live in the benchmark's own output); what is checked is that the run
pools on a server process, that the server's answers equal the local kernel's (the benchmark raises
otherwise) and that every figure the report and the JSON promise is there and consistent.
"""

from __future__ import annotations

import json

import pytest

from flexemr.bench._serverpool import SHAPES, ServerPoolConfig, format_table, measure


def test_serverpool_reports_both_shapes_per_request_and_their_ratios() -> None:
    cfg = ServerPoolConfig(tables=2, rows=2_000, dim=8, batch=64, pooling=4.0, criteo_tables=3, criteo_rows=1_000,
                           criteo_dim=4, warmup=1, batches=3)
    res = measure(cfg)
    json.dumps(res)  # JSON-able as printed by --json
    assert [r["shape"] for r in res["results"]] == list(SHAPES)
    for r in res["results"]:
        assert r["requests"] == 3 and r["ids_per_request"] > 0
        assert len(r["server_cpu_ms_per_request"]) == len(r["local_cpu_ms_per_request"]) == 3
        assert r["server_cpu_ns_per_row"] > 0 and r["local_cpu_ns_per_row"] > 0
        assert r["ratio"] > 0 and r["median_ratio"] > 0
        pairs = sorted(s / loc for s, loc in zip(r["server_cpu_ms_per_request"], r["local_cpu_ms_per_request"]))
        assert r["paired_median_ratio"] == pytest.approx(pairs[1])  # the median of the 3 pairs' ratios
    table = format_table(res)
    assert "median" in table and "paired" in table and all(f"\n{s} " in table for s in SHAPES)
