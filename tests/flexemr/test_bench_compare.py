"""``python -m flexemr.bench compare --json`` (and ``flexemr bench``) on a tiny workload.

The bench runs in a subprocess (it starts its own servers, a Redis server and
maybe torch); the test checks the JSON structure, that the local, naive and
flexemr paths produced positive numbers, and that each peer either ran with
verified rows or was skipped with the reason the environment explains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flexemr.bench import _peers
from flexemr.bench._compare import FLEXEMR_TORCH, PATHS, _torch_missing

TINY = ["--tables", "2", "--rows", "4000", "--dim", "16", "--batch", "64", "--pooling", "4", "--warmup", "1",
        "--batches", "2", "--naive-ids", "300", "--servers", "2", "--transport", "tcp"]
KEYS = {"path", "samples_per_s", "rows_per_s", "bytes_per_sample", "batch_ms", "verified", "skipped", "note",
        "vs_flexemr", "vs_local", "ranker_cpu_s_per_sample", "server_cpu_s_per_sample"}


def _run(*argv: str, timeout: float = 60.0) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, *argv], check=False, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _measured(row: dict[str, Any]) -> None:
    assert row["skipped"] is None, row
    assert row["verified"] is True, row
    for key in ("samples_per_s", "rows_per_s", "batch_ms", "vs_flexemr", "vs_local"):
        assert isinstance(row[key], float) and row[key] > 0, (key, row)
    assert row["rows_per_s"] > row["samples_per_s"]  # several ids per sample
    assert row["bytes_per_sample"] >= 0
    assert isinstance(row["ranker_cpu_s_per_sample"], float) and row["ranker_cpu_s_per_sample"] > 0, row
    assert isinstance(row["server_cpu_s_per_sample"], float) and row["server_cpu_s_per_sample"] >= 0, row


def test_compare_json() -> None:
    res = _run("-m", "flexemr.bench", "compare", "--json", *TINY)
    assert {"config", "workload", "machine", "transport", "results"} <= set(res)
    assert res["config"]["tables"] == 2 and res["workload"]["pooling_mode"] == "sum"
    assert res["workload"]["ids_per_sample"] > 0
    rows = {r["path"]: r for r in res["results"]}
    assert [r["path"] for r in res["results"]] == list(PATHS)
    for r in rows.values():
        assert set(r) == KEYS, r
    for name in ("local", "naive", "flexemr"):
        _measured(rows[name])
    assert rows["flexemr"]["vs_flexemr"] == pytest.approx(1.0)
    assert rows["local"]["vs_local"] == pytest.approx(1.0)
    assert rows["local"]["bytes_per_sample"] == 0
    assert rows["local"]["server_cpu_s_per_sample"] == 0
    assert rows["flexemr"]["server_cpu_s_per_sample"] > 0 and rows["naive"]["server_cpu_s_per_sample"] > 0
    assert 0 < rows["flexemr"]["bytes_per_sample"] < rows["naive"]["bytes_per_sample"]

    redis_reason = _peers.redis_missing()
    if os.environ.get("CI") == "true" and redis_reason == _peers.REDIS_SERVER_NOT_INSTALLED:
        pytest.fail(f"CI installs redis-server (scripts/system-deps.sh) but: {redis_reason}")
    if redis_reason is None:
        _measured(rows["redis"])
        assert rows["redis"]["bytes_per_sample"] > 0
        assert "MGET" in rows["redis"]["note"]
    else:
        assert rows["redis"]["skipped"] == redis_reason
    torch_reason = _torch_missing()
    if torch_reason is None:  # the remote TorchRec module in a torch ranker: same rows, same bytes as flexemr
        _measured(rows[FLEXEMR_TORCH])
        assert 0 < rows[FLEXEMR_TORCH]["bytes_per_sample"] < rows["naive"]["bytes_per_sample"]
    else:
        assert rows[FLEXEMR_TORCH]["skipped"] == torch_reason and "make torch" in torch_reason
    torchrec_reason = _peers.torchrec_missing()
    if torchrec_reason is None:
        _measured(rows["torchrec"])
        assert rows["torchrec"]["bytes_per_sample"] == 0 and rows["torchrec"]["server_cpu_s_per_sample"] == 0
    else:
        assert rows["torchrec"]["skipped"] == torchrec_reason
        assert "docs/performance.md" in torchrec_reason


def test_flexemr_bench_defaults_to_compare() -> None:
    res = _run("-m", "flexemr", "bench", "--json", "--no-redis", "--no-torchrec", "--no-torch", *TINY)
    rows = {r["path"]: r for r in res["results"]}
    _measured(rows["flexemr"])
    assert rows[FLEXEMR_TORCH]["skipped"] == "disabled (--no-torch)"
    assert rows["redis"]["skipped"] == "disabled (--no-redis)"
    assert rows["torchrec"]["skipped"] == "disabled (--no-torchrec)"


def test_compare_plot_and_progress(tmp_path: Path) -> None:
    """--plot draws the figure after the run; --progress shows how long it has been running, on stderr only."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib, from the apps extra (make demo)")
    pytest.importorskip("tqdm", reason="--progress needs tqdm, from the apps extra (make demo)")
    proc = subprocess.run([sys.executable, "-m", "flexemr", "bench", "compare", "--json", "--progress", "--plot",
                           str(tmp_path / "cmp.png"), "--no-redis", "--no-torchrec", "--no-torch", *TINY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)                         # stdout stays one JSON object
    assert "flexemr bench compare: running for 00:0" in proc.stderr
    assert f"wrote {tmp_path / 'cmp.png'} and {tmp_path / 'cmp.svg'}" in proc.stderr
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "cmp.svg").read_text()
    for r in res["results"]:
        assert r["path"] in svg
    assert "samples/s (log scale)" in svg and "KiB/sample" in svg and "redis: skipped (disabled" in svg


def test_redis_server_is_stopped_on_error() -> None:
    if _peers.redis_missing():
        pytest.skip(_peers.redis_missing() or "")
    with pytest.raises(KeyError, match="boom"), _peers.redis_server() as (client, pid):
        assert _peers.process_cpu_s(pid) > 0  # the OS's accounting of another process
        assert client.ping()
        raise KeyError("boom")
    assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped


def test_bench_options_come_from_the_config_dataclasses() -> None:
    import argparse
    import doctest

    from flexemr.bench import _args
    from flexemr.bench._compare import CompareConfig, configure

    result = doctest.testmod(_args)
    assert result.attempted > 0 and result.failed == 0
    p = argparse.ArgumentParser()
    configure(p)
    cfg = _args.config_from_args(CompareConfig, p.parse_args(["--pooling", "8.5", "--no-torchrec"]))
    assert cfg == CompareConfig(pooling=8.5, torchrec=False)


def test_every_bench_option_has_help_with_its_default_and_is_checked() -> None:
    import argparse

    import pytest

    from flexemr import ConfigError
    from flexemr.bench.__main__ import COMMANDS

    for name, cmd in COMMANDS.items():
        p = argparse.ArgumentParser()
        cmd.configure(p)
        for action in p._actions:
            if action.option_strings and action.dest not in ("help", "json"):
                assert action.help, f"{name} {action.option_strings[0]} has no help"
                if action.default not in (None, True, False):
                    assert "(default " in action.help, f"{name} {action.option_strings[0]}: {action.help}"
    from flexemr.bench import _args
    from flexemr.bench._compare import CompareConfig, configure

    p = argparse.ArgumentParser()
    configure(p)
    for bad in (["--tables", "0"], ["--warmup", "-1"], ["--pooling", "0"], ["--servers", "-2"]):
        with pytest.raises(ConfigError, match=bad[0]):
            _args.config_from_args(CompareConfig, p.parse_args(bad))
    assert _args.config_from_args(CompareConfig, p.parse_args(["--warmup", "0"])).warmup == 0


def test_cpu_clock_counts_only_inside_its_blocks() -> None:
    import time

    clock = _peers.CpuClock([os.getpid()])   # this process as a "server" too: both clocks see the same work
    end = time.process_time() + 0.05
    while time.process_time() < end:          # outside: not counted
        pass
    with clock:
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass
    assert 0.04 < clock.ranker_s < 0.045 + 0.05
    assert 0.03 < clock.server_s < 0.045 + 0.05
