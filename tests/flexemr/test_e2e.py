"""End to end over rdmaio (tcp, and verbs where a device is active) with two embedding-server processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio

from flexemr import JaggedBatch, LocalCluster, TableSpec, pool_bags
from tests.flexemr.transports import TRANSPORTS

SPECS = [
    TableSpec("user", 5000, 16, "float32"),
    TableSpec("item", 3001, 8, "float16"),
    TableSpec("tiny", 3, 4, "float32"),
]


@pytest_asyncio.fixture(params=TRANSPORTS)
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[LocalCluster]:
    async with LocalCluster(SPECS, servers=2, seed=11, transport=request.param) as c:
        yield c


async def test_servers_are_separate_processes(cluster: LocalCluster) -> None:
    import os

    pids = cluster.pids
    assert len(pids) == 2 and os.getpid() not in pids.values()
    assert cluster.config_path.exists()


async def test_lookup_matches_local_model(cluster: LocalCluster) -> None:
    client = await cluster.client()
    model = cluster.model()
    rng = np.random.default_rng(0)
    for spec in SPECS:
        n = spec.num_rows
        cases = [
            rng.integers(0, n, 500),                          # random, with duplicates
            np.array([0, n - 1, 0, n - 1]),                   # first / last rows
            np.array([n // 2] * 7),                           # one row many times
            np.arange(n),                                     # whole table
            np.zeros(0, dtype=np.int64),                      # empty
            rng.integers(0, n, 64).astype(np.uint32),         # other integer dtype
            list(rng.integers(0, n, 5).tolist()),             # a plain list
        ]
        for ids in cases:
            rows = await client.lookup(spec.name, ids)
            expect = model[spec.name][np.asarray(ids, dtype=np.int64)]
            assert rows.dtype == spec.np_dtype and rows.shape == (len(ids), spec.dim)
            assert np.array_equal(rows, expect)


async def test_ids_are_validated_once_and_reach_the_splitter_sorted_unique(
        cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup validates its ids once; the batch hands the splitter sorted unique ids (its fast path)."""
    import flexemr.client.batcher
    import flexemr.client.client
    import flexemr.core.split

    client = await cluster.client()
    validated: list[str] = []
    splits: list[bool] = []
    validate, split = flexemr.client.client.validate_ids, flexemr.client.batcher.split_lookup

    def counting_validate(spec: TableSpec, ids: object) -> npt.NDArray[np.int64]:
        validated.append(spec.name)
        return validate(spec, ids)

    def recording_split(*args: Any, **kwargs: Any) -> Any:
        splits.append(kwargs.get("sorted_unique", False))
        return split(*args, **kwargs)

    def boom(*args: object) -> None:
        raise AssertionError("the splitter validated ids again")

    monkeypatch.setattr(flexemr.client.client, "validate_ids", counting_validate)
    monkeypatch.setattr(flexemr.client.batcher, "split_lookup", recording_split)
    monkeypatch.setattr(flexemr.core.split, "validate_ids", boom)
    model = cluster.model()
    ids = np.array([4999, 1, 1, 77, 3000, 1])
    got = await client.lookup_many({"user": ids, "item": ids[ids < 3001]})
    assert np.array_equal(got["user"], model["user"][ids])
    assert np.array_equal(got["item"], model["item"][ids[ids < 3001]])
    assert sorted(validated) == ["item", "user"]
    assert splits and all(splits)


async def test_lookup_many_and_jagged(cluster: LocalCluster) -> None:
    client = await cluster.client()
    model = cluster.model()
    got = await client.lookup_many({"user": [4999, 1, 1], "item": np.array([7, 3000]), "tiny": []})
    assert np.array_equal(got["user"], model["user"][[4999, 1, 1]])
    assert np.array_equal(got["item"], model["item"][[7, 3000]])
    assert got["tiny"].shape == (0, 4)

    jb = JaggedBatch.from_lists({"user": [[1, 2, 2], [], [4999]], "item": [[0], [5, 5], [3000, 1]]})
    rows = await client.lookup_jagged(jb)
    for t in jb.keys:
        assert np.array_equal(rows[t], model[t][jb.ids(t)])
    pooled = await client.lookup_jagged(jb, pooling="sum")
    assert pooled["user"].shape == (3, 16)
    assert np.allclose(pooled["user"], pool_bags(model["user"][jb.ids("user")], jb.bag_offsets("user")))


async def test_concurrent_callers_coalesce_and_dedup(cluster: LocalCluster) -> None:
    client = await cluster.client()
    model = cluster.model()
    rng = np.random.default_rng(1)
    callers = 50
    # overlapping id sets: every caller draws from the same 300 hot rows of user
    hot = rng.choice(5000, 300, replace=False)
    id_sets = [hot[rng.integers(0, 300, 40)] for _ in range(callers)]
    outs = await asyncio.gather(*(client.lookup("user", ids) for ids in id_sets))
    for ids, rows in zip(id_sets, outs):
        assert np.array_equal(rows, model["user"][ids])
    m = client.metrics.snapshot()
    total_unique = sum(np.unique(ids).size for ids in id_sets)
    assert m["lookups"] == callers
    assert m["unique_ids"] == total_unique
    assert m["subrequests"] < callers * 2                 # merged per endpoint, not per caller
    assert m["rows_read"] < total_unique                  # shared rows were fetched once
    assert m["rows_read"] + m["rows_shared"] == m["unique_ids"]
    assert m["rows_read"] == np.unique(np.concatenate(id_sets)).size


async def test_inflight_dedup_across_batches(cluster: LocalCluster) -> None:
    client = await cluster.client()
    model = cluster.model()
    ids = np.arange(1000, 1400)
    first = asyncio.ensure_future(client.lookup("user", ids))
    await asyncio.sleep(0)          # the first batch is launched and in flight ...
    await asyncio.sleep(0)
    second = await asyncio.gather(*(client.lookup("user", ids[::3]) for _ in range(5)))
    rows = await first
    assert np.array_equal(rows, model["user"][ids])
    for r in second:
        assert np.array_equal(r, model["user"][ids[::3]])
    m = client.metrics.snapshot()
    assert m["rows_read"] == 400                      # ... so later callers read nothing themselves
    assert m["inflight_hits"] > 0


async def test_coalesce_window(cluster: LocalCluster) -> None:
    client = await cluster.client(coalesce_window_us=2000)
    model = cluster.model()

    async def late(i: int) -> np.ndarray:
        await asyncio.sleep(0.0002 * (i % 3))      # spread over several loop iterations
        return await client.lookup("item", [i, i + 1])

    outs = await asyncio.gather(*(late(i) for i in range(30)))
    for i, r in enumerate(outs):
        assert np.array_equal(r, model["item"][[i, i + 1]])
    assert client.metrics.batches < 30
    assert "ids_requested" in str(client.metrics)


async def test_many_rankers_at_once(cluster: LocalCluster) -> None:
    clients = await asyncio.gather(*(cluster.client() for _ in range(4)))
    model = cluster.model()
    rng = np.random.default_rng(3)
    reqs = [rng.integers(0, 5000, 256) for _ in clients]
    outs = await asyncio.gather(*(c.lookup("user", ids) for c, ids in zip(clients, reqs)))
    for ids, rows in zip(reqs, outs):
        assert np.array_equal(rows, model["user"][ids])
