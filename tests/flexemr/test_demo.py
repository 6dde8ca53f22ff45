"""`flexemr demo`: a small run end to end, the n/a path, the report figure, and cleanup on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest

from flexemr import ClusterConfig, EmbeddingClient
from flexemr.core.errors import ConfigError
from flexemr.apps.demo import CONFIGURATIONS, TECHNIQUES, configure, detect_support, run_demo, usage_note
from flexemr.apps.report import cost_notes, plot_configurations

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _png_size(path: Path) -> tuple[int, int]:
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    w, h = struct.unpack(">II", png[16:24])
    return w, h


def test_report_figure_has_every_panel_caption_and_note(tmp_path: Path) -> None:
    rows = [{"name": "a", "batches": 9, "samples_per_s": 100.0, "bytes_per_sample": 4096.0, "p50_ms": 5.0,
             "p99_ms": 7.0},
            {"name": "a+b", "batches": 3, "samples_per_s": 50.0, "bytes_per_sample": 1024.0, "p50_ms": 9.0,
             "p99_ms": 12.5},
            {"name": "c", "available": False, "note": "n/a (c not available in this build)"}]
    notes = cost_notes(rows, {"a": frozenset("a"), "a+b": frozenset("ab"), "c": frozenset("c")})
    assert set(notes) == {"a+b"} and "slower than a (50 vs 100 samples/s)" in notes["a+b"]
    png, svg = plot_configurations(tmp_path / "r.png", "a title", rows, {"a": "just a"}, notes,
                                   footer=["b: what b does"])
    w, h = _png_size(png)
    assert 800 < w < 4000 and 200 < h < 4000
    text = svg.read_text()
    for expected in ("a title", "samples/s", "KiB/sample", "ms", "p50", "p99", "(9 batches)", "(3 batches)",
                     "a: just a", "slower than a", "not available in this build", "b: what b does"):
        assert expected in text, expected


def test_detect_support_follows_the_client_options() -> None:
    @dataclasses.dataclass(frozen=True)
    class Old:
        transport: str = "auto"
        coalesce_window_us: int = 0

    @dataclasses.dataclass(frozen=True)
    class New:
        cache_bytes: int = 0
        server_pooling: bool = True
        prefetch: Literal["off", "on"] = "off"

    class NoPrefetchMethod:
        prefetch = None

    old = detect_support(Old, NoPrefetchMethod)
    assert old["coalescing"].available and not any(old[k].available for k in ("cache", "pooling", "prefetch"))
    new = detect_support(New, NoPrefetchMethod, cache_bytes=1234)
    assert new["cache"].on == {"cache_bytes": 1234} and new["cache"].off == {"cache_bytes": 0}
    assert new["pooling"].on == {"server_pooling": True} and new["pooling"].off == {"server_pooling": False}
    assert new["prefetch"].on == {"prefetch": "on"} and new["prefetch"].off == {"prefetch": "off"}
    this = detect_support()  # this build: ClientOptions' fields and EmbeddingClient.prefetch
    assert all(this[k].available for k in ("coalescing", "cache", "pooling", "prefetch"))
    assert this["cache"].on == {"cache_bytes": 32 << 20} and this["pooling"].off == {"server_pooling": False}
    assert this["prefetch"].how == "EmbeddingClient.prefetch()"
    assert {c.name for c in CONFIGURATIONS} >= {"baseline (all off)", "all on"}
    assert [t.key for t in TECHNIQUES] == ["coalescing", "cache", "pooling", "prefetch"]


@dataclasses.dataclass(frozen=True)
class _CoalescingOnlyOptions:
    """The options of a build that has only coalescing (no cache/pooling options)."""

    transport: str = "auto"
    coalesce_window_us: int = 0


class _CoalescingOnlyClient(EmbeddingClient):
    """A client as in a build that has only coalescing (no cache/pooling/prefetch)."""

    prefetch = None  # type: ignore[assignment]

    def __init__(self, config: ClusterConfig, *, transport: str = "auto", coalesce_window_us: int = 0) -> None:
        super().__init__(config, transport=transport, coalesce_window_us=coalesce_window_us, cache_bytes=0,
                         server_pooling=False)


async def test_missing_techniques_show_as_not_available(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    configure(p)
    args = p.parse_args(["--batches", "2", "--batch-size", "32", "--scale", "0.001", "--out", str(tmp_path),
                         "--transport", "tcp", "--no-progress", "--only", "coalescing", "--only", "all on",
                         "--only", "coalescing+cache"])
    report = await run_demo(args, client_cls=_CoalescingOnlyClient, options_cls=_CoalescingOnlyOptions)
    rows = {r["name"]: r for r in report["configurations"]}
    assert rows["coalescing"]["batches"] == 2 and rows["coalescing"]["max_abs_err"] < 1e-5
    for name in ("all on", "coalescing+cache"):
        assert rows[name]["available"] is False and "not available in this build" in rows[name]["note"]
        assert rows[name]["techniques"]["cache"] == "n/a"
    assert report["check"]["passed"] and (tmp_path / "report.png").exists() and (tmp_path / "report.svg").exists()


async def test_rounds_report_each_configurations_median_run(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    configure(p)
    args = p.parse_args(["--batches", "2", "--batch-size", "32", "--scale", "0.001", "--out", str(tmp_path),
                         "--transport", "tcp", "--no-progress", "--only", "coalescing", "--only", "all on",
                         "--rounds", "3"])
    report = await run_demo(args, client_cls=_CoalescingOnlyClient, options_cls=_CoalescingOnlyOptions)
    rows = {r["name"]: r for r in report["configurations"]}
    runs = rows["coalescing"]["rounds_samples_per_s"]
    assert len(runs) == 3 and rows["coalescing"]["samples_per_s"] == sorted(runs)[1]
    assert rows["all on"]["available"] is False and "rounds_samples_per_s" not in rows["all on"]
    assert report["workload"]["rounds"] == 3 and report["check"]["passed"]
    with pytest.raises(ConfigError):
        await run_demo(p.parse_args(["--rounds", "0", "--out", str(tmp_path)]))


def test_demo_command_small(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "flexemr", "demo", "--batches", "3", "--batch-size", "256",
                           "--scale", "0.01", "--seconds", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max abs error" in proc.stdout and "samples/s" in proc.stdout and "OK" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"transport", "servers", "tables", "model", "workload", "techniques", "configurations", "check",
            "elapsed_s"} <= set(report)
    assert set(report["techniques"]) == {"coalescing", "cache", "pooling", "prefetch"}
    assert [r["name"] for r in report["configurations"]] == [c.name for c in CONFIGURATIONS]
    for row in report["configurations"]:
        if row["available"]:
            assert {"samples_per_s", "p50_ms", "p99_ms", "bytes_per_sample", "cache_hit_rate",
                    "max_abs_err"} <= set(row)
            assert row["batches"] >= 1 and row["samples_per_s"] > 0 and row["max_abs_err"] < 1e-4
            # what the client did with its techniques: the cache's lookups, probed or bypassed (the baseline
            # reads with rdmaio directly, not through the client's lookups)
            assert row["usage"]["lookups"] >= (row["batches"] if row["techniques"]["coalescing"] == "on" else 0)
            assert ("cache_bypassed_lookups" in row["usage"]) == (row["techniques"]["cache"] == "on")
        else:
            assert row["note"].startswith("n/a")
    assert report["check"]["passed"] and report["tables"]["count"] == 26
    base = next(r for r in report["configurations"] if r["name"] == "baseline (all off)")
    coal = next(r for r in report["configurations"] if r["name"] == "coalescing")
    assert coal["bytes_per_sample"] < base["bytes_per_sample"]            # dedup moves fewer bytes
    w, h = _png_size(tmp_path / "report.png")
    assert 800 < w < 4000 and 300 < h < 4000
    svg = (tmp_path / "report.svg").read_text()
    assert all(f"({r['batches']} batches)" in svg for r in report["configurations"] if r["available"])
    assert "KiB/sample" in proc.stdout and "KiB/sample" in svg and "p99" in svg
    assert "client used its techniques" in proc.stdout and "cache probed in" in proc.stdout


def test_usage_note_says_how_the_client_used_its_techniques() -> None:
    stepped = {"lookups": 60, "cache_bypassed_lookups": 20, "cache_trials": 2, "cache_switches": 1,
               "pooled_rows": 0, "local_pooled_rows": 500}
    note = usage_note(stepped, frozenset({"coalescing", "cache", "pooling"}))
    assert note == ("cache probed in 40 of 60 lookups (20 bypassed it: 2 trials, measured faster: the client "
                    "stepped aside from the cache); servers pooled 0% of rows")
    assert usage_note({"lookups": 5, "cache_bypassed_lookups": 0}, frozenset({"cache"})) == \
        "cache probed in 5 of 5 lookups"
    assert usage_note(stepped, frozenset({"coalescing"})) == ""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"   # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_every_server_and_removes_the_cluster_files(tmp_path: Path, sig: int) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "flexemr", "demo", "--batches", "500", "--seconds", "60",
                             "--scale", "0.01", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "TMPDIR": str(tmp)}, cwd=tmp_path)
    pids: list[int] = []
    try:
        assert proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"demo exited early: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
            m = re.search(r"servers ready \(pids ([\d ]+)\)", line)
            if m:
                pids = [int(x) for x in m.group(1).split()]
                break
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
        assert [p.name for p in tmp.glob("flexemr-cluster-*")]       # the cluster's configs and logs
        time.sleep(1.0)                                   # mid-run: the baseline configuration is going
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(30) == 128 + sig
        assert time.monotonic() - t0 < 10
        err = proc.stderr.read()
        assert err.strip().splitlines()[-1] == (f"flexemr demo: stopped by {signal.Signals(sig).name}; "
                                                f"what it started was shut down"), err
        assert "Traceback" not in err
        assert all(_gone(p) for p in pids), f"servers still alive: {pids}"   # stopped before the demo exited
        assert not list(tmp.glob("flexemr-cluster-*"))
        assert not (tmp_path / "report.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)


def test_gen_serve_rank(tmp_path: Path) -> None:
    """`flexemr gen` a cluster file, trace and Criteo sample; two `flexemr serve`; `flexemr rank` on each input."""
    from ._procs import free_port, stop, wait_line

    def flexemr(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flexemr", *argv], capture_output=True, text=True,
                              timeout=timeout, env=ENV, cwd=tmp_path)

    servers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    for argv in (["cluster", "--servers", servers, "--scale", "0.002", "-o", "c.toml"],
                 ["trace", "--config", "c.toml", "--batches", "3", "--batch-size", "64", "-o", "t.npz"],
                 ["criteo", "--samples", "300", "-o", "s.tsv"], ["criteo", "--samples", "300", "-o", "s.tsv.gz"],
                 ["criteo", "--samples", "300", "-o", "s.parquet"]):
        r = flexemr("gen", *argv)
        assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    procs = [subprocess.Popen([sys.executable, "-m", "flexemr", "serve", "--config", "c.toml", "--server", name,
                               "--seed", "3", "--transport", "tcp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV, cwd=tmp_path) for name in ("s0", "s1")]
    try:
        for p in procs:
            wait_line(p, "ready on")
        for source in (["--trace", "t.npz"], ["--criteo", "s.tsv", "--batch-size", "100"],
                       ["--criteo", "s.tsv.gz", "--batch-size", "100", "--prefetch", "1"],
                       ["--criteo", "s.parquet", "--batch-size", "128"],
                       ["--generate", "2", "--naive"], ["--generate", "2", "--prefetch", "1"]):
            r = flexemr("rank", "--config", "c.toml", "--seed", "3", "--transport", "tcp", "--json", *source)
            assert r.returncode == 0, r.stdout + r.stderr
            res = json.loads(r.stdout)["result"]
            assert res["batches"] >= 1 and res["max_abs_err"] < 1e-5 and res["samples_per_s"] > 0
            if source[0] == "--criteo":       # streamed: the first batch warms up, every other one is timed
                assert (res["batches"], res["samples"]) == ((2, 200) if source[3] == "100" else (2, 172)), res
        r = flexemr("rank", "--config", "c.toml", "--seed", "4", "--transport", "tcp", "--generate", "2")
        assert r.returncode == 1 and "same --seed" in r.stderr and "samples/s" in r.stdout
        # SIGTERM while requests are generated (the event loop is blocked), then while ranking: one line, 143
        _rank_stopped_by_sigterm(tmp_path, ["--generate", "3000", "--batch-size", "64"], 1.5)
        r = flexemr("gen", "trace", "--config", "c.toml", "--batches", "100", "--batch-size", "64", "-o", "big.npz")
        assert r.returncode == 0, r.stderr
        _rank_stopped_by_sigterm(tmp_path, ["--trace", "big.npz", "--naive"], 4.0)   # naive: slow, still going
    finally:
        for p in procs:
            stop(p)


def _rank_stopped_by_sigterm(tmp_path: Path, source: list[str], delay: float) -> None:
    from ._procs import stop

    rank = subprocess.Popen([sys.executable, "-m", "flexemr", "rank", "--config", "c.toml", "--seed", "3",
                             "--transport", "tcp", *source],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    try:
        time.sleep(delay)
        assert rank.poll() is None, rank.communicate()
        t0 = time.monotonic()
        rank.send_signal(signal.SIGTERM)
        out, err = rank.communicate(timeout=30)
        assert rank.returncode == 143, err
        assert time.monotonic() - t0 < 5
        assert err.strip().splitlines() == ["flexemr rank: stopped by SIGTERM; what it started was shut down"]
    finally:
        stop(rank)
