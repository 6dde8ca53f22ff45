"""Helpers for tests that run servers as subprocesses."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from flexemr import ClusterConfig, ServerAddress, ShardingPlan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_cluster(path: Path, plan: ShardingPlan) -> ClusterConfig:
    cfg = ClusterConfig(plan, {name: ServerAddress("127.0.0.1", free_port()) for name in plan.servers})
    cfg.write_toml(path)
    return cfg


def wait_line(proc: subprocess.Popen[str], needle: str, timeout: float = 30.0) -> str:
    """Read the process's stdout until a line containing ``needle``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process exited ({proc.wait()}) before printing {needle!r}")
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {timeout} s")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if f is not None:
            f.close()
