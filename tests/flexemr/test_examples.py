"""examples/embedding_server.py + examples/ranker.py as subprocesses.

The pair runs end to end and the ranker checks every result it prints; on an
error (verbs without an RDMA device, no server running, servers with another
seed, a port in use) each script prints one line naming the problem and its
fix and exits with code 1, without a traceback.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import rdmaio
from flexemr import ShardingPlan, TableSpec

from ._procs import stop, wait_line, write_cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NO_VERBS = rdmaio.available_transports()["verbs"]


def _start_servers(path: Path, seed: int) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen([sys.executable, str(EXAMPLES / "embedding_server.py"), "--config", str(path),
                          "--server", name, "--seed", str(seed), "--transport", "tcp"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("s0", "s1")
    ]


def _ranker(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / "ranker.py"), "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60)


def _one_line_error(proc: subprocess.CompletedProcess[str], script: str) -> str:
    """The single stderr line of a failed example run (asserted: exit 1, no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
    return lines[0]


def _cluster(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.toml"
    specs = [TableSpec("user", 5000, 16), TableSpec("item", 300, 8, "float16")]
    write_cluster(path, ShardingPlan.row_wise(specs, ["s0", "s1"]))
    return path


def test_server_and_ranker_examples(tmp_path: Path) -> None:
    path = _cluster(tmp_path)
    servers = _start_servers(path, 3)
    try:
        for proc in servers:
            wait_line(proc, "embedding server")
        ranker = _ranker(path, "--seed", "3", "--transport", "tcp")
        assert ranker.returncode == 0, ranker.stderr
        out = ranker.stdout.splitlines()
        # every line that shows a result also says it was checked
        for prefix in ("lookup user", "lookup_many", "lookup_jagged (sum pooled)", "20 concurrent lookups"):
            line = next((x for x in out if x.startswith(prefix)), None)
            assert line is not None and "match" in line, (prefix, ranker.stdout)
        # 1 lookup + 2 tables of lookup_many + 2 tables pooled + 20 concurrent lookups
        assert out[-1] == "ranker done: all 25 results above match the local model", ranker.stdout
        assert "subrequests" in ranker.stdout

        # servers holding another seed's rows: the ranker names the problem and the fix
        wrong = _one_line_error(_ranker(path, "--seed", "4", "--transport", "tcp"), "ranker.py")
        assert "differs from the local model" in wrong and "--seed 4" in wrong, wrong

        # a second s0 on the same port
        again = subprocess.run([sys.executable, str(EXAMPLES / "embedding_server.py"), "--config", str(path),
                                "--server", "s0", "--transport", "tcp"], capture_output=True, text=True, timeout=60)
        line = _one_line_error(again, "embedding_server.py")
        assert "in use" in line and "port" in line, line

        for proc in servers:
            proc.send_signal(signal.SIGINT)
        for proc in servers:
            assert proc.wait(10) == 0
    finally:
        for proc in servers:
            stop(proc)


def test_ranker_without_servers_says_to_start_them(tmp_path: Path) -> None:
    line = _one_line_error(_ranker(_cluster(tmp_path), "--transport", "tcp"), "ranker.py")
    assert "cannot connect to server" in line and "examples/embedding_server.py" in line, line


@pytest.mark.skipif(NO_VERBS is None, reason="an active RDMA device exists here: --transport verbs works")
@pytest.mark.parametrize("script", ["embedding_server.py", "ranker.py"])
def test_examples_without_rdma_say_so_in_one_line(tmp_path: Path, script: str) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--config", str(_cluster(tmp_path)),
                           "--transport", "verbs"], capture_output=True, text=True, timeout=60)
    line = _one_line_error(proc, script)
    assert NO_VERBS is not None and NO_VERBS in line, line
    assert re.search(r"--transport tcp", line), line
