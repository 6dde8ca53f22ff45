"""Tests for the peer baselines printed by ``python -m rdmaio.bench``."""

from __future__ import annotations

import asyncio

import pytest

from rdmaio.bench import _peers
from rdmaio.bench._peers import (
    PeerResult,
    available_peers,
    bench_memcpy,
    bench_mooncake,
    bench_uvloop_streams,
)


def _assert_measured(result: PeerResult, name: str, size: int, depth: int) -> None:
    assert result.skipped is None, result.skipped
    assert result.name == name
    assert (result.size, result.depth) == (size, depth)
    assert result.ops_per_s is not None and result.ops_per_s > 0
    assert result.gb_per_s is not None and result.gb_per_s > 0
    assert result.gb_per_s == pytest.approx(result.ops_per_s * size / 1e9)
    assert result.verified


def test_pattern_is_shared_with_workers() -> None:
    from rdmaio.bench import _mooncake_worker, _stream_worker

    for module in (_stream_worker, _mooncake_worker):
        assert (module.pattern(1000) == _peers.pattern(1000)).all()


def test_available_peers_lists_all() -> None:
    peers = available_peers()
    assert set(peers) == {"uvloop-streams", "mooncake-te-tcp", "memcpy"}
    assert peers["memcpy"] is None
    assert peers["uvloop-streams"] is None  # uvloop is a dependency


@pytest.mark.parametrize("size", [64, 1 << 20])
def test_memcpy(size: int) -> None:
    _assert_measured(bench_memcpy(size, duration=0.05), "memcpy", size, 1)


@pytest.mark.parametrize(("size", "depth"), [(64, 1), (4096, 4)])
def test_uvloop_streams(size: int, depth: int) -> None:
    _assert_measured(bench_uvloop_streams(size, depth, duration=0.3), "uvloop-streams", size, depth)


def test_uvloop_streams_inside_running_loop() -> None:
    """Callable from a coroutine, and leaves no loop behind for the caller."""

    async def caller() -> PeerResult:
        return bench_uvloop_streams(64, 2, duration=0.1)

    _assert_measured(asyncio.run(caller()), "uvloop-streams", 64, 2)
    # The caller can still run its own loop afterwards.
    assert asyncio.run(asyncio.sleep(0, result=7)) == 7


@pytest.mark.parametrize(("size", "depth"), [(64, 1), (4096, 4)])
def test_mooncake(size: int, depth: int) -> None:
    result = bench_mooncake(size, depth, duration=0.3)
    if result.skipped is not None:
        assert "not installed" in result.skipped, result.skipped
        pytest.skip(result.skipped)
    _assert_measured(result, "mooncake-te-tcp", size, depth)


def test_mooncake_missing_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_peers, "_mooncake_missing", lambda: _peers.MOONCAKE_NOT_INSTALLED)
    result = bench_mooncake(64, 1, duration=0.1)
    assert result.ops_per_s is None and result.gb_per_s is None
    assert result.skipped is not None and "not installed" in result.skipped


def test_spin_sweep_runs_every_case_against_a_real_target() -> None:
    import json
    import subprocess
    import sys

    from rdmaio.bench.spin import CASES

    out = subprocess.run([sys.executable, "-m", "rdmaio.bench.spin", "--duration", "0.2", "--runs", "1", "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    cases = json.loads(out)["cases"]
    assert [(c["target_spin_us"], c["client_progress"], c["client_spin_us"]) for c in cases] == CASES
    assert all(len(c["ops_per_s"]) == 1 and c["ops_per_s"][0] > 100 for c in cases)
