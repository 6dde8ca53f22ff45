"""Row-wise, table-wise, column-wise and explicit 2-D plans end to end (in-process servers)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from flexemr import LocalCluster, Shard, ShardingPlan, TableSpec

SPECS = [
    TableSpec("a", 1000, 12, "float32"),
    TableSpec("b", 257, 5, "float16"),
    TableSpec("c", 64, 33, "float64"),
    TableSpec("d", 100, 7, "int8"),
]


def _grid_plan() -> ShardingPlan:
    shards = {
        "a": [Shard("a", "s0", 0, 400, 0, 5), Shard("a", "s1", 0, 400, 5, 12),
              Shard("a", "s2", 400, 1000, 0, 12)],
        "b": [Shard("b", "s2", 0, 257, 0, 5)],
        "c": [Shard("c", "s1", 0, 10, 0, 33), Shard("c", "s0", 10, 64, 0, 1), Shard("c", "s1", 10, 64, 1, 33)],
        "d": [Shard("d", "s0", 0, 50, 0, 7), Shard("d", "s0", 50, 100, 0, 7)],
    }
    return ShardingPlan({s.name: s for s in SPECS}, shards, ["s0", "s1", "s2"])


@pytest.mark.parametrize("plan", ["row_wise", "table_wise", "column_wise", "grid"])
async def test_plan_end_to_end(plan: str) -> None:
    p = _grid_plan() if plan == "grid" else plan
    async with LocalCluster(SPECS, servers=3, seed=5, plan=p, in_process=True, transport="tcp") as cluster:
        client = await cluster.client()
        model = cluster.model()
        rng = np.random.default_rng(2)
        for spec in SPECS:
            n = spec.num_rows
            for ids in (rng.integers(0, n, 300), np.array([n - 1, 0, 0]), np.arange(n), np.zeros(0, np.int64)):
                rows = await client.lookup(spec.name, ids)
                assert np.array_equal(rows, model[spec.name][ids])
        # concurrent mixed lookups share batches
        reqs = [{s.name: rng.integers(0, s.num_rows, 50) for s in SPECS} for _ in range(10)]
        outs = await asyncio.gather(*(client.lookup_many(r) for r in reqs))
        for req, out in zip(reqs, outs):
            for t, ids in req.items():
                assert np.array_equal(out[t], model[t][ids])


async def test_model_is_plan_independent() -> None:
    models = []
    for plan in ("row_wise", "column_wise"):
        async with LocalCluster(SPECS[:2], servers=2, seed=9, plan=plan, in_process=True, transport="tcp") as c:
            models.append(c.model())
            server = c.server("s1")
            shard = c.plan.regions_on("s1")[0]
            expect = c.model()[shard.table][shard.row_start:shard.row_end, shard.col_start:shard.col_end]
            assert np.array_equal(server.shard_array(shard.region_name), expect)
    for t in models[0]:
        assert np.array_equal(models[0][t], models[1][t])
