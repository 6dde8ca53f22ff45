"""``python -m rdmaio.bench.spin [--duration S] [--runs N] [--json]``: what the bounded poll buys.

Measures 64 B reads at depth 1 (the latency-bound case) against a target
process with one progress-thread worker, sweeping the target's
``poll_spin_us`` and the client's progress mode.  On a VM, a depth-1 round
trip between two idle vCPUs pays a hypervisor wake-up on each side; a worker
that keeps polling briefly after it served a request is still awake when the
next one arrives.  See ``docs/performance.md``.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

import rdmaio

from ._suite import _drive, target

#: (target poll_spin_us, client progress, client poll_spin_us)
CASES = [(0, "loop", 0), (0, "thread", 0), (50, "loop", 0), (100, "loop", 0), (200, "loop", 0),
         (100, "thread", 100)]


async def depth1_reads(port: int, progress: str, spin_us: int, duration: float) -> float:
    """64 B depth-1 reads per second from one client engine."""
    async with rdmaio.Engine(transport="tcp", workers=1, progress=progress,  # type: ignore[arg-type]
                             poll_spin_us=spin_us) as engine:
        ep = await engine.connect("127.0.0.1", port)
        key = await ep.remote_key("bench")
        mr = engine.register(np.zeros(64, dtype=np.uint8), access=rdmaio.Access.NONE)

        async def op(_: int) -> None:
            await ep.read(mr, 0, key, 0, 64)

        return await _drive(1, duration, op)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rdmaio.bench.spin", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=1.5, help="seconds per measurement")
    ap.add_argument("--runs", type=int, default=2, help="measurements per case (each with a fresh target)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    results: list[dict[str, Any]] = []
    for t_spin, progress, c_spin in CASES:
        runs = []
        for _ in range(a.runs):
            with target(workers=1, spin_us=t_spin) as port:
                runs.append(rdmaio.run(depth1_reads(port, progress, c_spin, a.duration)))
        results.append({"target_spin_us": t_spin, "client_progress": progress, "client_spin_us": c_spin,
                        "ops_per_s": runs})
        if not a.json:
            print(f"target poll_spin_us {t_spin:4d} | client {progress:6s} poll_spin_us {c_spin:4d} | "
                  + "  ".join(f"{r / 1e3:6.1f}k" for r in runs) + " ops/s", flush=True)
    if a.json:
        print(json.dumps({"benchmark": "64 B read, depth 1", "cases": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
