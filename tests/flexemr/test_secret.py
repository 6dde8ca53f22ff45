"""The cluster file's secret authenticates rankers to embedding servers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rdmaio
from flexemr import (
    ClusterConfig,
    EmbeddingClient,
    EmbeddingServer,
    ServerAddress,
    ShardingPlan,
    TableSpec,
    TransportError,
)
from flexemr.__main__ import main
from flexemr.core.init import build_model


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
        assert isinstance(err, TransportError) and isinstance(err.__cause__, rdmaio.AuthenticationError)
        # the message tells a CLI user where the secret goes, not only Python's Engine(secret=...)
        assert "[cluster] secret" in str(err) and "flexemr gen cluster" in str(err)
        with pytest.raises(TransportError, match="differs from the server's") as info:
            async with EmbeddingClient(ClusterConfig(plan, addr, secret="other-secret"), transport="tcp"):
                pass
        assert isinstance(info.value.__cause__, rdmaio.AuthenticationError)


def test_gen_cluster_writes_a_secret(tmp_path: Path) -> None:
    out = tmp_path / "c.toml"
    assert main(["gen", "cluster", "--servers", "h:1,h:2", "--scale", "0.001", "--secret", "sesame-123",
                 "-o", str(out)]) == 0
    assert ClusterConfig.from_toml(out).secret == "sesame-123"
    assert out.stat().st_mode & 0o777 == 0o600                 # the secret is the owner's only
    assert main(["gen", "cluster", "--servers", "h:1,h:2", "--scale", "0.001", "--random-secret",
                 "-o", str(out)]) == 0
    first = ClusterConfig.from_toml(out).secret
    assert main(["gen", "cluster", "--servers", "h:1,h:2", "--scale", "0.001", "--random-secret",
                 "-o", str(out)]) == 0
    second = ClusterConfig.from_toml(out).secret
    assert first and second and len(first) == 32 and first != second
