"""``[[tables]] npy = "path"`` in a cluster file: ``flexemr serve`` serves those tables from the files."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexemr import ClusterConfig, ConfigError, EmbeddingClient, ServerAddress, ShardingPlan, TableSpec, build_model
from flexemr.core.config import table_files
from flexemr.core.toml import dumps_toml

from ._procs import free_port, stop, wait_line

SPECS = [TableSpec("user", 500, 8), TableSpec("item", 10, 4, "float16")]


def _write(directory: Path, npy: dict[str, str]) -> Path:
    cfg = ClusterConfig(ShardingPlan.row_wise(SPECS, ["s0"]), {"s0": ServerAddress("127.0.0.1", free_port())})
    d = cfg.to_dict()
    for entry in d["tables"]:
        if entry["name"] in npy:
            entry["npy"] = npy[entry["name"]]
    path = directory / "cluster.toml"
    path.write_text(dumps_toml(d))
    return path


def test_paths_are_relative_to_the_file_and_the_plan_ignores_them(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = _write(tmp_path / "sub", {"user": "user.npy", "item": "/abs/item.npy"})
    assert table_files(path) == {"user": str(tmp_path / "sub" / "user.npy"), "item": "/abs/item.npy"}
    assert ClusterConfig.from_toml(path).plan == ShardingPlan.row_wise(SPECS, ["s0"])
    bad = _write(tmp_path, {"user": ""})
    with pytest.raises(ConfigError, match="npy must be a non-empty path"):
        ClusterConfig.from_toml(bad)


async def test_serve_loads_the_tables_the_file_names(tmp_path: Path) -> None:
    trained = np.random.default_rng(3).standard_normal((500, 8)).astype(np.float32)
    np.save(tmp_path / "user.npy", trained)
    path = _write(tmp_path, {"user": "user.npy"})
    proc = subprocess.Popen([sys.executable, "-m", "flexemr", "serve", "--config", str(path), "--server", "s0",
                             "--transport", "tcp", "--seed", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        await asyncio.to_thread(wait_line, proc, "ready on")
        async with EmbeddingClient.from_toml(path, transport="tcp") as client:
            ids = np.array([0, 499, 3, 3])
            np.testing.assert_array_equal(await client.lookup("user", ids), trained[ids])
            np.testing.assert_array_equal(await client.lookup("item", [9]), build_model(SPECS, 2)["item"][[9]])
    finally:
        stop(proc)
