"""A peer engine in its own process, for tests that kill or freeze it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).parent


@contextlib.contextmanager
def peer_process(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run ``tests/rdmaio/<script> args...``; yields the process and the port it printed.

    The process is killed (also when stopped) and reaped on exit.
    """
    proc = subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)})
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
