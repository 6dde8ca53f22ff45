"""examples/embedding_server.py + examples/ranker.py as subprocesses."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from flexemr import ShardingPlan, TableSpec

from ._procs import stop, wait_line, write_cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_server_and_ranker_examples(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    specs = [TableSpec("user", 5000, 16), TableSpec("item", 300, 8, "float16")]
    write_cluster(path, ShardingPlan.row_wise(specs, ["s0", "s1"]))
    servers = [
        subprocess.Popen([sys.executable, str(EXAMPLES / "embedding_server.py"), "--config", str(path),
                          "--server", name, "--seed", "3", "--transport", "tcp"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("s0", "s1")
    ]
    try:
        for proc in servers:
            wait_line(proc, "embedding server")
        ranker = subprocess.run([sys.executable, str(EXAMPLES / "ranker.py"), "--config", str(path),
                                 "--seed", "3", "--transport", "tcp"], capture_output=True, text=True, timeout=60)
        assert ranker.returncode == 0, ranker.stderr
        assert "all rows match" in ranker.stdout
        assert "subrequests" in ranker.stdout
        for proc in servers:
            proc.send_signal(signal.SIGINT)
        for proc in servers:
            assert proc.wait(10) == 0
    finally:
        for proc in servers:
            stop(proc)
