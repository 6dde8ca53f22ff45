"""The torch applications: ``flexemr demo --model torchrec`` passes its CTR check; examples/torchrec_ranker.py runs.

Needs the torch extra (``make torch``); skipped with the reason without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed (make torch; docs/torch.md)")
pytest.importorskip("torchrec", reason="torchrec is not installed (make torch; docs/torch.md)")

from flexemr.apps.demo import configure, print_report, run_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SMALL = ["--batches", "3", "--batch-size", "128", "--scale", "0.001", "--seconds", "3", "--transport", "tcp",
         "--no-progress"]


async def test_torchrec_demo_passes_its_ctr_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    configure(p)
    args = p.parse_args(["--model", "torchrec", *SMALL, "--out", str(tmp_path)])
    report = await run_demo(args)
    print_report(report)
    out = capsys.readouterr()
    assert "torchrec remote" in out.out and "max abs error" in out.out and "- OK" in out.out
    assert "is_fx_tracing" not in out.err
    rows = {r["name"]: r for r in report["configurations"]}
    assert list(rows) == ["torchrec local", "torchrec remote"]
    numpy_fields = {"batches", "samples_per_s", "p50_ms", "p99_ms", "bytes_per_sample", "reads_per_sample",
                    "cache_hit_rate", "max_abs_err", "checked_samples", "techniques"}
    for r in rows.values():
        assert numpy_fields <= set(r) and r["batches"] == 3 and r["samples_per_s"] > 0
    remote = rows["torchrec remote"]
    assert remote["checked_samples"] == 4 * 32                  # warm-up + 3 timed batches, 32 samples each
    assert remote["max_abs_err"] is not None and remote["max_abs_err"] <= 1e-4
    assert remote["bytes_per_sample"] > 0 and rows["torchrec local"]["bytes_per_sample"] == 0
    assert report["check"]["passed"] and report["model"]["repr"].startswith("torchrec.models.dlrm.DLRM(tables=26")
    assert json.loads((tmp_path / "report.json").read_text())["check"]["passed"]
    assert (tmp_path / "report.png").exists() and "torchrec remote" in (tmp_path / "report.svg").read_text()
    assert len(report["server_pids"]) == 2
    for pid in report["server_pids"].values():    # every server stopped when the demo ended
        assert not Path(f"/proc/{pid}").exists()


EXAMPLE = ROOT / "examples" / "torchrec_ranker.py"


def test_torchrec_ranker_example(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--users", "2", "--candidates", "40", "--out",
                           str(tmp_path / "tables")], capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("top ads") == 2 and "every CTR matches the local model" in proc.stdout
    assert proc.stdout.count("ready on") == 2 and "RemoteEmbeddingBagCollection(tables=[t_user" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "cluster.toml", "t_ad.npy", "t_site.npy", "t_topic.npy", "t_user.npy"]
    assert proc.stderr == ""


def test_without_torchrec_module_demo_and_example_each_fail_in_one_line(tmp_path: Path) -> None:
    """One process without torchrec (torch alone): every entry point names the install steps in one line."""
    code = f"""
import runpy, sys
sys.modules["torchrec"] = None
import flexemr.torch as ft
try:
    ft.RemoteEmbeddingBagCollection([], "cluster.toml")
except ft.DependencyError as exc:
    print("module:", exc)
from flexemr.__main__ import main
print("demo exit", main(["demo", "--model", "torchrec", *{SMALL!r}, "--out", {str(tmp_path)!r}]))
sys.argv = ["torchrec_ranker.py"]
try:
    runpy.run_path({str(EXAMPLE)!r}, run_name="__main__")
except SystemExit as exc:
    print("example exit", exc.code)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 3 and out[1:] == ["demo exit 1", "example exit 1"], proc.stdout
    module = out[0]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 2, proc.stderr
    assert err[0].startswith("flexemr demo: error: this needs torchrec")
    assert err[1].startswith("torchrec_ranker.py: error: this needs torchrec")
    for line in (module, *err):
        assert "make torch" in line and "--no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0" in line, line
        assert "torch==2.13.0" in line and "docs/torch.md" in line
    assert not (tmp_path / "report.json").exists()
