"""``flexemr serve`` as a subprocess: serves lookups, exits 0 on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flexemr import EmbeddingClient, ShardingPlan, TableSpec, build_model
from flexemr.__main__ import COMMANDS, build_parser, main

from ._procs import stop, wait_line, write_cluster

SPECS = [TableSpec("user", 2000, 8), TableSpec("item", 10, 4, "float16")]


def _serve(cfg_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flexemr", "serve", "--config", str(cfg_path), "--server", "s0",
         "--transport", "tcp", "--seed", "4", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_serve_subprocess(tmp_path: Path, sig: signal.Signals) -> None:
    path = tmp_path / "cluster.toml"
    write_cluster(path, ShardingPlan.row_wise(SPECS, ["s0"]))
    proc = _serve(path)
    try:
        line = await asyncio.to_thread(wait_line, proc, "ready on")
        assert "server s0" in line
        model = build_model(SPECS, 4)
        async with EmbeddingClient.from_toml(path, transport="tcp") as client:
            ids = np.array([0, 1999, 7, 7])
            assert np.array_equal(await client.lookup("user", ids), model["user"][ids])
            assert np.array_equal(await client.lookup("item", [9]), model["item"][[9]])
        t0 = time.monotonic()
        proc.send_signal(sig)
        code = await asyncio.to_thread(proc.wait, 10)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() - t0 < 5
    finally:
        stop(proc)


def test_serve_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cluster.toml"
    write_cluster(path, ShardingPlan.row_wise(SPECS, ["s0"]))
    assert main(["serve", "--config", str(path), "--server", "nope", "--transport", "tcp"]) == 1
    assert "unknown server" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml"), "--server", "s0"]) == 1
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "serve" in COMMANDS and "serve" in build_parser().format_help()
