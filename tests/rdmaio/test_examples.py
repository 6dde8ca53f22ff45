"""examples/rdmaio_read_write.py and examples/channel_rpc.py run and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
