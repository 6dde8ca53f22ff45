"""What the network benchmarks (``skew``, ``priority``) share: a lab of server namespaces with a
rate-limited link, closed-loop load, latency percentiles.

:func:`lab_cluster` puts each server of a plan in its own network namespace
(:class:`~flexemr.bench._netlab.NetnsLab`), limits the links of the servers
named in ``limits`` with ``tc tbf`` (Mbit/s), starts them
(:class:`~flexemr.bench._netlab.NetCluster`) and yields the cluster file; the
ranker (this process) stays in the root namespace and reaches them over tcp.
It needs root: :func:`require_lab` prints one line saying why it cannot run
and returns ``False`` (the benchmark then exits non-zero).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import ClusterConfig, ServerAddress
from ..core.plan import ShardingPlan
from ._netlab import NetCluster, NetnsLab, shape_link, tc_unavailable

__all__ = ["PORT", "Recorder", "closed_loop", "lab_cluster", "load_average", "require_lab"]

PORT = 7000  # each namespace is a host of its own: the port is free there


def require_lab(command: str) -> bool:
    """True when namespaces and ``tc tbf`` work here; else print one line saying why not (stderr)."""
    reason = tc_unavailable()
    if reason is None:
        return True
    print(f"flexemr bench {command}: needs network namespaces and tc (run as root): {reason}", file=sys.stderr)
    return False


def load_average() -> float:
    """The 1-minute load average (this machine's other work: the benchmarks share its cores)."""
    return round(os.getloadavg()[0], 2)


@asynccontextmanager
async def lab_cluster(plan: ShardingPlan, seed: int, limits: Mapping[str, float]) -> AsyncIterator[ClusterConfig]:
    """The servers of ``plan`` in namespaces, ``limits`` (server -> Mbit/s) on their links (module docstring)."""
    servers = list(plan.servers)
    with tempfile.TemporaryDirectory(prefix="flexemr-net-") as tmp, NetnsLab(len(servers)) as lab:
        placement = dict(zip(servers, lab.namespaces))
        config = ClusterConfig(plan, {s: ServerAddress(ns.address, PORT) for s, ns in placement.items()})
        path = Path(tmp) / "cluster.toml"
        config.write_toml(path)
        for server, mbit in limits.items():
            shape_link(lab, placement[server], mbit)
        async with NetCluster(lab, path, placement, seed=seed, workdir=Path(tmp)):
            yield ClusterConfig.from_toml(path)


class Recorder:
    """Latencies (seconds) and samples of one measured phase."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.samples = 0
        self.started = time.perf_counter()
        self.elapsed = 0.0

    def stop(self) -> None:
        self.elapsed = time.perf_counter() - self.started

    def summary(self) -> dict[str, Any]:
        """``samples_per_s``, ``p50_ms``, ``p99_ms`` (and the number of lookups timed)."""
        lat = np.asarray(self.latencies) * 1e3
        return {"samples_per_s": round(self.samples / self.elapsed, 1) if self.elapsed else 0.0,
                "p50_ms": round(float(np.percentile(lat, 50)), 3) if lat.size else 0.0,
                "p99_ms": round(float(np.percentile(lat, 99)), 3) if lat.size else 0.0,
                "lookups": int(lat.size)}


async def closed_loop(step: Callable[[int], Awaitable[int]], *, workers: int, seconds: float,
                      warmup: float, think: float = 0.0) -> Recorder:
    """``workers`` tasks each calling ``step(worker)`` back to back (it returns the samples it served):
    ``warmup`` seconds untimed, then ``seconds`` timed (every call's latency recorded); ``think``: seconds
    each task pauses after a call (not part of its latency)."""
    rec = Recorder()
    timing = False
    deadline = time.monotonic() + warmup + seconds

    async def worker(i: int) -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            n = await step(i)
            if timing:
                rec.latencies.append(time.perf_counter() - t0)
                rec.samples += n
            if think:
                await asyncio.sleep(think)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(workers)]
    try:
        await asyncio.sleep(warmup)
        timing = True
        rec.latencies.clear()
        rec.samples = 0
        rec.started = time.perf_counter()
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    rec.stop()
    return rec
