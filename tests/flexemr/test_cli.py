"""``flexemr serve`` as a subprocess: serves lookups, exits 0 on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flexemr import ConfigError, EmbeddingClient, EmbeddingServer, ShardingPlan, TableSpec, build_model
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


# --------------------------------------------------------- filling the shards: progress

BIG = [TableSpec("big", 300_001, 32), TableSpec("small", 10, 4, "float16")]


def _fills() -> tuple[list[tuple[int, int]], Callable[[int, int], None]]:
    calls: list[tuple[int, int]] = []
    return calls, lambda done, total: calls.append((done, total))


def _check_calls(calls: list[tuple[int, int]], total: int) -> None:
    assert len(calls) >= 2 and calls[-1] == (total, total)            # a few MiB at a time, then all
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[0][0] < total


@pytest.mark.parametrize("versioned", [False, True])
async def test_fill_progress_and_the_values_of_chunked_filling(versioned: bool) -> None:
    """Shards filled in chunks (s1's rows start off a seeded block) hold the seeded model; the callback sees it."""
    plan = ShardingPlan.row_wise(BIG, ["s0", "s1"], versioned=versioned)
    model = build_model(plan, 3)
    calls, fill = _fills()
    async with EmbeddingServer(plan, "s1", transport="tcp", seed=3, fill_progress=fill) as server:
        for sh in server.shards:
            assert np.array_equal(server.shard_array(sh.region_name), model[sh.table][sh.row_start : sh.row_end])
        _check_calls(calls, server.arena_bytes if versioned else
                     sum(sh.nbytes(plan.spec(sh.table)) for sh in server.shards))


async def test_fill_progress_counts_rows_copied_from_npy(tmp_path: Path) -> None:
    values = np.random.default_rng(0).random((300_001, 32), dtype=np.float32)
    np.save(tmp_path / "big.npy", values)
    plan = ShardingPlan.column_wise(BIG[:1], ["s0", "s1"])          # half-width shards: copied, not mapped
    calls, fill = _fills()
    async with EmbeddingServer(plan, "s0", transport="tcp", npy={"big": tmp_path / "big.npy"},
                               fill_progress=fill) as server:
        (sh,) = server.shards
        assert np.array_equal(server.shard_array(sh.region_name), values[:, sh.col_start : sh.col_end])
        _check_calls(calls, sh.nbytes(plan.spec("big")))
    with pytest.raises(ConfigError, match="fill_progress must be callable, got int"):
        EmbeddingServer(plan, "s0", fill_progress=5)  # type: ignore[arg-type]


def test_serve_draws_the_fill_bar_when_asked_and_not_into_a_pipe(tmp_path: Path) -> None:
    pytest.importorskip("tqdm", reason="progress bars need tqdm, from the apps extra (make demo)")
    path = tmp_path / "cluster.toml"
    write_cluster(path, ShardingPlan.row_wise(BIG, ["s0"]))
    for extra, shown in ((["--progress"], True), ([], False)):
        proc = _serve(path, *extra)
        try:
            assert "ready on" in wait_line(proc, "ready on")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        finally:
            stop(proc)
        assert proc.returncode == 0, err
        assert ("filling the shards of s0" in err) is shown, err
