"""The benchmarks' figures (flexemr.apps.report: plot_compare, plot_locality, check_plot_path) and the progress
bars (flexemr.apps.progress: on a terminal or when asked, after their delay, out of the way of results)."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from flexemr.apps.progress import Bars, as_callback
from flexemr.apps.report import check_plot_path, plot_compare, plot_locality
from flexemr.core.errors import ConfigError

matplotlib_missing = pytest.mark.skipif(__import__("importlib").util.find_spec("matplotlib") is None,
                                        reason="figures need matplotlib, from the apps extra (make demo)")
tqdm_missing = pytest.mark.skipif(__import__("importlib").util.find_spec("tqdm") is None,
                                  reason="progress bars need tqdm, from the apps extra (make demo)")


def _png_size(path: Path) -> tuple[int, int]:
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    w, h = struct.unpack(">II", png[16:24])
    return w, h


def _compare_result(cpu: bool) -> dict[str, Any]:
    def row(path: str, rate: float | None, nbytes: float | None, ms: float | None, skipped: str | None = None,
            note: str = "") -> dict[str, Any]:
        r: dict[str, Any] = {"path": path, "samples_per_s": rate, "rows_per_s": None if rate is None else rate * 30,
                             "bytes_per_sample": nbytes, "batch_ms": ms, "verified": skipped is None,
                             "skipped": skipped, "note": note, "vs_flexemr": None if rate is None else rate / 2e4,
                             "vs_local": None}
        if cpu and rate is not None:
            r["cpu_ms_per_batch"] = ms and ms * 0.7
        return r

    return {"config": {"tables": 8, "rows": 500_000, "dim": 64, "batch": 2048, "warmup": 2, "batches": 5,
                       "servers": 2, "seed": 0},
            "workload": {"ids_per_sample": 230.0}, "transport": "tcp",
            "results": [row("local", 1.5e6, 0.0, 1.4, note="numpy gather + pool, in memory"),
                        row("naive", 900.0, 58_000.0, 2200.0, note="1 read/id, extrapolated"),
                        row("flexemr", 2e4, 21_000.0, 100.0, note="coalesced reads"),
                        row("redis", None, None, None, skipped="redis-server not installed")]}


@matplotlib_missing
@pytest.mark.parametrize("cpu", [False, True])
def test_compare_figure_has_every_path_panel_and_reason(tmp_path: Path, cpu: bool) -> None:
    png, svg = plot_compare(tmp_path / "c.png", _compare_result(cpu))
    w, h = _png_size(png)
    assert 1500 < w < 4000 and 400 < h < 2000
    text = svg.read_text()
    for expected in ("flexemr bench compare: 8 tables x 500,000 rows", "samples/s (log scale)", "KiB/sample",
                     "ms per batch (log scale)", "throughput (higher is better)", "local", "naive", "flexemr",
                     "(75.00x flexemr)", "redis: skipped (redis-server not installed)", "n/a", "1,500,000", "56.6"):
        assert expected in text, expected
    assert ("CPU ms per batch" in text) is cpu          # a CPU panel only where CPU was measured


@matplotlib_missing
def test_locality_figure_says_how_far_from_naive_and_local(tmp_path: Path) -> None:
    results = {name: {"bytes_per_sample": b, "samples_per_s": s, "batch_ms": ms, "reads_per_sample": 1.0,
                      "byte_reduction_vs_naive": 60_000 / b if b else None, "fraction_of_local": s / 1e6}
               for name, b, s, ms in (("naive", 60_000.0, 500.0, 4000.0), ("coalesce", 20_000.0, 3e4, 70.0),
                                      ("all", 5_000.0, 6e5, 3.4), ("local", 0.0, 1e6, 2.0))}
    results["naive"]["note"] = "timed on 20000 ids, extrapolated"
    res = {"config": {"tables": 8, "rows": 1_000_000, "dim": 64, "batch": 2048, "servers": 2, "cache_mb": 64},
           "transport": "tcp", "results": results, "targets_met": {"bytes": True, "throughput": True}}
    png, svg = plot_locality(tmp_path / "l", res)
    assert png.name == "l.png" and png.exists() and svg.name == "l.svg"
    text = svg.read_text()
    for expected in ("flexemr bench locality", "(60% of local, 12.0x fewer B)", "(0.05% of local)",
                     "all: coalescing + adaptive cache", "naive: one rdmaio read per id, no dedup; timed on 20000 ids",
                     "targets: all &gt;= 10x fewer bytes than naive: met", "KiB/sample", "ms per batch"):
        assert expected in text, expected


def test_plot_path_is_checked_before_a_run(tmp_path: Path) -> None:
    if __import__("importlib").util.find_spec("matplotlib") is None:
        with pytest.raises(ConfigError, match="--plot \\(the figure\\) needs matplotlib, from the 'apps' extra"):
            check_plot_path(tmp_path / "x.png")
        return
    assert check_plot_path(tmp_path / "x.png") == tmp_path / "x.png"
    assert check_plot_path(tmp_path / "x") == tmp_path / "x.png"
    assert check_plot_path(tmp_path / "x.svg") == tmp_path / "x.png"
    with pytest.raises(ConfigError, match="give a file name ending in .png"):
        check_plot_path(tmp_path / "x.pdf")
    with pytest.raises(ConfigError, match=f"directory {tmp_path}/no does not exist"):
        check_plot_path(tmp_path / "no" / "x.png")


# ------------------------------------------------------------------- progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_follow_the_flag_and_the_terminal() -> None:
    assert Bars.from_flag(None, io.StringIO()).enabled is False          # a pipe or file: off unless asked
    tty = Bars.from_flag(None, _Tty())
    assert tty.enabled and tty.delay == 1.0                               # a terminal: on, after a second
    forced = Bars.from_flag(True, io.StringIO())
    assert forced.enabled and forced.delay == 0.0                         # --progress: at once, anywhere
    assert Bars.from_flag(False, _Tty()).enabled is False                 # --no-progress: never
    closed = io.StringIO()
    closed.close()
    assert Bars.from_flag(None, closed).enabled is False
    off = Bars(False).bar(total=5)
    as_callback(off)(3, 5)
    assert off.n == 3                                                     # the stand-in takes every call


@tqdm_missing
def test_a_bar_draws_after_its_delay_and_clears_its_line() -> None:
    out = _Tty()
    with Bars(True, 0.0, out).bar(total=4, desc="ranking", unit="batch") as bar:
        callback = as_callback(bar)
        for i in range(1, 5):
            time.sleep(0.25)                                              # tqdm redraws at most every 0.2 s
            callback(i, 4)
    text = out.getvalue()
    assert "ranking" in text and "4/4" in text and "batch" in text and text.endswith("\r")
    quiet = _Tty()
    with Bars(True, 5.0, quiet).bar(total=2, desc="short") as bar:       # done before its delay: never drawn
        bar.update(2)
    assert quiet.getvalue() == ""


@tqdm_missing
def test_the_ticker_runs_until_the_first_result_line(capsys: pytest.CaptureFixture[str]) -> None:
    err = io.StringIO()
    with Bars(True, 0.0, err).ticker("flexemr bench x", interval=0.05):
        time.sleep(0.3)
        drawn = err.getvalue()
        print("result")
        after = err.getvalue()
        time.sleep(0.2)
    assert "flexemr bench x: running for 00:00" in drawn
    assert after.endswith("\r") and err.getvalue() == after              # cleared before the result, then quiet
    assert capsys.readouterr().out == "result\n"


@tqdm_missing
def test_gen_trace_shows_its_batches_and_the_write_only_when_asked(tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "flexemr", "gen", "trace", "--batches", "3", "--batch-size", "64"]
    quiet = subprocess.run([*argv, "-o", str(tmp_path / "a.npz")], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == ""                  # a pipe: no bars unless asked
    shown = subprocess.run([*argv, "-o", str(tmp_path / "b.npz"), "--progress"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "generating batches:   0%" in shown.stderr and "/3 " in shown.stderr and "writing b.npz" in shown.stderr
    assert shown.stdout.startswith(f"flexemr gen: wrote {tmp_path / 'b.npz'}: 3 batches x 64 samples")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_bars_not_asked_for_are_off_without_tqdm_and_asked_for_say_which_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """flexemr serve needs no apps extra: on a terminal without tqdm it draws no bar; --progress says what is missing."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))
    assert Bars.from_flag(None, _Tty()).enabled is False
    with Bars.from_flag(None, _Tty()).bar(total=3) as bar:
        bar.update(3)
    with pytest.raises(ConfigError, match="^progress bars \\(--progress\\) needs tqdm, from the 'apps' extra"):
        Bars.from_flag(True, io.StringIO()).bar(total=3)
