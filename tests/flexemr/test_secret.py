"""The cluster file's secret authenticates rankers to embedding servers."""

from __future__ import annotations

import numpy as np
import pytest

import rdmaio
from flexemr import ClusterConfig, EmbeddingClient, EmbeddingServer, ServerAddress, ShardingPlan, TableSpec
from flexemr._init import build_model


async def test_cluster_secret_is_required_and_sufficient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RDMAIO_SECRET", raising=False)
    plan = ShardingPlan.row_wise([TableSpec("t", 1000, 8)], ["s0"])
    server = EmbeddingServer(ClusterConfig(plan, {"s0": ServerAddress("127.0.0.1", 0)}, secret="sesame-123"), "s0",
                             transport="tcp", seed=3)
    async with server:
        addr = {"s0": server.address}
        async with EmbeddingClient(ClusterConfig(plan, addr, secret="sesame-123"), transport="tcp") as client:
            ids = np.array([0, 5, 999])
            assert np.array_equal(await client.lookup("t", ids), build_model(plan, seed=3)["t"][ids])
        with pytest.raises(Exception) as info:
            async with EmbeddingClient(ClusterConfig(plan, addr), transport="tcp"):
                pass
        err = info.value
        chain = [err, err.__cause__, err.__context__]
        assert any(isinstance(e, rdmaio.AuthenticationError) for e in chain) or "authentic" in str(err).lower()
