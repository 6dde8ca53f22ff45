"""``flexemr demo --model torchrec``: TorchRec's DLRM on remote embeddings passes its CTR check (needs the torch extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed (make torch; docs/torch.md)")
pytest.importorskip("torchrec", reason="torchrec is not installed (make torch; docs/torch.md)")

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SMALL = ["--batches", "3", "--batch-size", "128", "--scale", "0.001", "--seconds", "3", "--transport", "tcp",
         "--no-progress"]


def test_torchrec_demo_passes_its_ctr_check(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "flexemr", "demo", "--model", "torchrec", *SMALL,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=180, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torchrec remote" in proc.stdout and "OK" in proc.stdout and "max abs error" in proc.stdout
    assert "is_fx_tracing" not in proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
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
    assert (tmp_path / "report.png").exists() and "torchrec remote" in (tmp_path / "report.svg").read_text()
    assert len(report["server_pids"]) == 2
    for pid in report["server_pids"].values():    # every server stopped when the demo ended
        assert not Path(f"/proc/{pid}").exists()


def test_torchrec_demo_without_torchrec_is_one_line_with_the_install_steps(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torchrec'] = None\n"
            "from flexemr.__main__ import main\n"
            f"sys.exit(main(['demo', '--model', 'torchrec', *{SMALL!r}, '--out', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flexemr demo: error: this needs torchrec"), proc.stderr
    assert "make torch" in lines[0] and "fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0" in lines[0]
    assert not (tmp_path / "report.json").exists()
