"""The rdmaio examples run and print what they promise; without RDMA, --transport verbs fails in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import rdmaio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("script, lines", [
    ("rdmaio_read_write.py", ["read 4096 bytes at offset 1000: match", "read_batch of rows",
                              "compare_swap 100 -> 12345: exact", "out-of-bounds read refused: OutOfBoundsError"]),
    ("channel_rpc.py", ["get user:42 -> alice", "sum(1..100) -> 5050", "24 pipelined puts answered in order"]),
])
def test_example_runs(script: str, lines: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--transport", "tcp"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    for want in lines:
        assert any(want in line for line in out), f"{want!r} not in output:\n{proc.stdout}"
    assert out[-1] == "all checks passed"


NO_VERBS = rdmaio.available_transports()["verbs"]


@pytest.mark.skipif(NO_VERBS is None, reason="an active RDMA device exists here: --transport verbs works")
@pytest.mark.parametrize("script", ["rdmaio_read_write.py", "channel_rpc.py"])
def test_example_without_rdma_says_so_in_one_line(script: str) -> None:
    """--transport verbs on a host without RDMA: one line naming the problem and the fix, exit 1, no traceback."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--transport", "verbs"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
    assert NO_VERBS is not None and NO_VERBS in lines[0] and "--transport tcp" in lines[0], lines[0]
