"""LocalCluster(weights=...): servers hold given tables (a trained model's) instead of seeded ones."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr import ConfigError, JaggedBatch, LocalCluster, TableSpec, build_model
from flexemr.core.remap import build_remap, profile_accesses
from flexemr.apps.workload import PROFILE_2022, generate

SPECS = [TableSpec("user", 300, 8), TableSpec("item", 100, 4, "float16")]


def _trained() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {"user": rng.standard_normal((300, 8)).astype(np.float32)}


@pytest.mark.parametrize("in_process", [True, False])
async def test_servers_hold_the_given_weights(in_process: bool) -> None:
    trained = _trained()
    seeded = build_model(SPECS, 5)
    async with LocalCluster(SPECS, servers=2, seed=5, weights=trained, in_process=in_process,
                            transport="tcp") as cluster:
        client = await cluster.client()
        ids = np.array([0, 299, 150, 7, 150])
        np.testing.assert_array_equal(await client.lookup("user", ids), trained["user"][ids])
        np.testing.assert_array_equal(await client.lookup("item", [3, 99]), seeded["item"][[3, 99]])
        assert cluster.model()["user"] is trained["user"]
        np.testing.assert_array_equal(cluster.model()["item"], seeded["item"])
        jb = JaggedBatch.from_lists({"user": [[1, 2, 2], []]})
        pooled = await client.lookup_pooled(jb, "sum")
        np.testing.assert_allclose(pooled["user"][0], trained["user"][[1, 2, 2]].sum(0), rtol=1e-6)
        assert not pooled["user"][1].any()


async def test_weights_with_a_remap_are_served_in_physical_order() -> None:
    trained = _trained()
    batches = [generate(SPECS[:1], 16, 4, PROFILE_2022, seed=s) for s in range(2)]
    remap = build_remap(profile_accesses(batches, SPECS[:1]))
    async with LocalCluster(SPECS[:1], servers=2, weights=trained, remap=remap, in_process=True,
                            transport="tcp") as cluster:
        client = await cluster.client()
        ids = np.arange(300)
        np.testing.assert_array_equal(await client.lookup("user", ids), trained["user"])


@pytest.mark.parametrize(("weights", "message"), [
    ({"nope": np.zeros((300, 8), np.float32)}, "not in the plan"),
    ({"user": np.zeros((299, 8), np.float32)}, r"shape \(299, 8\)"),
    ({"user": np.zeros((300, 8), np.float64)}, "are float64, the table is float32"),
    ([("user", np.zeros((300, 8)))], "must be a mapping"),
])
def test_bad_weights_are_refused_before_anything_starts(weights: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LocalCluster(SPECS, servers=2, weights=weights)  # type: ignore[arg-type]
