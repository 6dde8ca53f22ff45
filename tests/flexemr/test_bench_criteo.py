"""``python -m flexemr.bench criteo``: the reader's lines/s beside plain pyarrow, on small files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyarrow", reason="the Criteo benchmark needs pyarrow, from the apps extra (make demo)")

from flexemr.apps.criteo import write_sample  # noqa: E402
from flexemr.bench._criteo import PLAIN, TARGET_LINES_PER_S, format_table  # noqa: E402

TSV_PATHS = ["pyarrow.csv.open_csv", "pyarrow.csv.read_csv", "read_criteo", "read_criteo + jagged"]
PARQUET_PATHS = ["pyarrow.parquet", "read_criteo", "read_criteo + jagged"]


def _bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flexemr.bench", "criteo", *argv], capture_output=True, text=True,
                          timeout=300)


def _check(res: dict[str, Any], lines: int, formats: list[str]) -> None:
    got = [(r["format"], r["path"]) for r in res["results"]]
    want = [(f, p) for f in formats for p in (TSV_PATHS if f == "tsv" else PARQUET_PATHS)]
    assert got == want
    for r in res["results"]:
        assert r["lines"] == lines, r                      # every path read every line
        assert r["lines_per_s"] > 0 and r["lines_per_cpu_s"] > 0 and r["seconds"] > 0, r
    m = res["machine"]
    assert len(m["loadavg_before"]) == 3 and len(m["loadavg_after"]) == 3 and m["pyarrow"]
    assert res["target"]["lines_per_s"] == TARGET_LINES_PER_S
    jagged = [r["lines_per_s"] for r in res["results"] if (r["format"], r["path"]) == ("tsv", "read_criteo + jagged")]
    assert res["target"]["met"] is (bool(jagged) and max(jagged) >= TARGET_LINES_PER_S)
    rate = {(r["format"], r["path"]): r["lines_per_s"] for r in res["results"]}
    for r in res["results"]:                   # each path over plain pyarrow's lines/s, in the same run
        assert r["vs_plain"] == pytest.approx(r["lines_per_s"] / rate[(r["format"], PLAIN[r["format"]])])
    if "tsv" in formats:
        assert res["target"]["measured_lines_per_s"] == max(jagged)
        assert res["target"]["vs_plain_read_csv"] == pytest.approx(max(jagged) / rate[("tsv", "pyarrow.csv.read_csv")])
        assert f"{res['target']['vs_plain_read_csv']:.2f}x the lines/s of pyarrow.csv.read_csv" in format_table(res)


def test_bench_criteo_synthetic_files() -> None:
    r = _bench("--lines", "4000", "--repeat", "2", "--batch-size", "1000", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["config"] == {"lines": 4000, "batch_size": 1000, "repeat": 2, "file": None, "seed": 0,
                             "baseline": None}
    _check(res, 4000, ["tsv", "parquet"])
    table = format_table(res)
    assert "vs plain" in table and "1.00x" in table and "load average" in table and "target: read_criteo" in table
    assert r.stderr == ""                                  # no bars into a pipe unless asked


def test_bench_criteo_on_a_given_file_with_progress(tmp_path: Path) -> None:
    path = write_sample(tmp_path / "day.tsv.gz", 3000, seed=5)
    r = _bench("--file", str(path), "--repeat", "1", "--progress")
    assert r.returncode == 0, r.stderr
    assert "flexemr bench criteo: " + str(path) in r.stdout and "read_criteo + jagged" in r.stdout
    assert "tsv: read_criteo + jagged" in r.stderr and "run" in r.stderr     # the bars, asked for
    par = write_sample(tmp_path / "day.parquet", 3000, seed=5)
    r = _bench("--file", str(par), "--repeat", "1", "--json")
    assert r.returncode == 0, r.stderr
    _check(json.loads(r.stdout), 3000, ["parquet"])


def test_bench_criteo_times_a_baseline_parser_on_the_same_tsv(tmp_path: Path) -> None:
    """--baseline FILE: the numpy parser used before pyarrow (the tests' oracle), on the same file, every line."""
    oracle = Path(__file__).with_name("_criteo_oracle.py")
    path = write_sample(tmp_path / "day.tsv.gz", 2500, seed=3)
    r = _bench("--file", str(path), "--repeat", "1", "--baseline", str(oracle), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [x["path"] for x in res["results"]] == [*TSV_PATHS, "baseline: _criteo_oracle.py"]
    assert all(x["lines"] == 2500 for x in res["results"])
    assert "tsv: read_criteo " in format_table(res) and "the lines/s of baseline: _criteo_oracle.py" in format_table(res)
    (tmp_path / "noparse.py").write_text("x = 1\n")
    r = _bench("--lines", "10", "--baseline", str(tmp_path / "noparse.py"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"flexemr bench: error: --baseline {tmp_path / 'noparse.py'}: defines no parse(data: bytes, first_line=...) "
        "function"]
