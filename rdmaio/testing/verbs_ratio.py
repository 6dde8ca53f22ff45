"""rdmaio on verbs versus perftest on the same device: 64 B read latency and 64 KiB read bandwidth.

Run INSIDE the Soft-RoCE VM (or on a host with an RDMA NIC)::

    python -m rdmaio.testing.softroce -- python -m rdmaio.testing.verbs_ratio [--json]

Measures, with one target and one initiator engine in this process:

* latency: ``ep.read`` of 64 bytes, one at a time (depth 1), average and median;
* bandwidth: 64 KiB ``ep.read`` calls with ``--window`` of them in flight;

then runs ``ib_read_lat -s 64`` and ``ib_read_bw -s 65536`` (perftest) on the same
device and prints a table of the ratios ours/perftest (latency: lower is better, so
a ratio of 2 means twice perftest's latency; bandwidth: 1.0 means line rate of
perftest).  ``--json`` prints the same numbers as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import rdmaio
from rdmaio.testing._perftest import PerftestError, run_perftest

LAT_SIZE = 64
BW_SIZE = 64 * 1024


async def measure_rdmaio(lat_iters: int, bw_iters: int, window: int, progress: str, workers: int,
                         device: str | None, gid_index: int | None) -> dict[str, float]:
    """rdmaio verbs numbers: latency in microseconds, bandwidth in MB/s (10**6 bytes/s)."""
    kw: dict[str, Any] = {"transport": "verbs", "workers": workers, "progress": progress,
                          "device": device, "gid_index": gid_index}
    async with rdmaio.Engine(**kw) as server, rdmaio.Engine(**kw) as client:
        table = np.arange(4 << 20, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.READ))
        listener = await server.listen("127.0.0.1", 0)
        async with await client.connect("127.0.0.1", listener.port) as ep:
            key = await ep.remote_key("t")
            out = np.zeros(max(BW_SIZE * window, 1 << 20), dtype=np.uint8)
            mr = client.register(out)
            for _ in range(min(200, lat_iters)):  # warm up
                await ep.read(mr, 0, key, 0, LAT_SIZE)
            samples = []
            clock = time.perf_counter
            for i in range(lat_iters):
                t0 = clock()
                await ep.read(mr, 0, key, (i * 4096) % (4 << 20), LAT_SIZE)
                samples.append(clock() - t0)

            async def stream(slot: int, n: int) -> None:
                for j in range(n):
                    await ep.read(mr, slot * BW_SIZE, key, ((slot + j * window) * BW_SIZE) % (4 << 20), BW_SIZE)

            per = max(1, bw_iters // window)
            await asyncio.gather(*(stream(s, 2) for s in range(window)))  # warm up
            t0 = clock()
            await asyncio.gather(*(stream(s, per) for s in range(window)))
            elapsed = clock() - t0
            moved = per * window * BW_SIZE
    return {
        "lat_avg_usec": statistics.fmean(samples) * 1e6,
        "lat_median_usec": statistics.median(samples) * 1e6,
        "bw_MBps": moved / elapsed / 1e6,
    }


def measure_perftest(lat_iters: int, bw_iters: int, device: str | None, gid_index: int | None) -> dict[str, float]:
    lat = run_perftest("ib_read_lat", LAT_SIZE, lat_iters, device=device, gid_index=gid_index)
    bw = run_perftest("ib_read_bw", BW_SIZE, bw_iters, device=device, gid_index=gid_index)
    return {"lat_avg_usec": float(lat["t_avg_usec"]), "bw_MBps": float(bw["bw_avg_MBps"])}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdmaio.testing.verbs_ratio", description=__doc__.split("\n")[0])
    p.add_argument("--lat-iters", type=int, default=2000)
    p.add_argument("--bw-iters", type=int, default=2000)
    p.add_argument("--window", type=int, default=16, help="64 KiB reads in flight for the bandwidth run")
    p.add_argument("--progress", choices=("thread", "loop"), default="thread")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default=os.environ.get("RDMAIO_SOFTROCE_DEVICE"))
    p.add_argument("--gid-index", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if min(args.lat_iters, args.bw_iters, args.window, args.workers) < 1:
        p.error("iteration counts, --window and --workers must be >= 1")
    reason = rdmaio.available_transports()["verbs"]
    if reason is not None:
        print(f"verbs unavailable: {reason}", file=sys.stderr)
        return 2
    ours = rdmaio.run(measure_rdmaio(args.lat_iters, args.bw_iters, args.window, args.progress, args.workers,
                                     args.device, args.gid_index))
    try:
        ref = measure_perftest(args.lat_iters, args.bw_iters, args.device, args.gid_index)
    except PerftestError as exc:
        print(f"perftest failed: {exc}", file=sys.stderr)
        return 1
    result = {
        "rdmaio": ours,
        "perftest": ref,
        "ratio": {
            "lat_avg": ours["lat_avg_usec"] / ref["lat_avg_usec"],
            "bw": ours["bw_MBps"] / ref["bw_MBps"],
        },
        "config": {"progress": args.progress, "workers": args.workers, "window": args.window,
                   "lat_iters": args.lat_iters, "bw_iters": args.bw_iters},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'metric':<28}{'rdmaio':>12}{'perftest':>12}{'ours/perftest':>15}")
    print(f"{'64 B read latency (us)':<28}{ours['lat_avg_usec']:>12.1f}{ref['lat_avg_usec']:>12.1f}"
          f"{result['ratio']['lat_avg']:>15.2f}")
    print(f"{'64 KiB read bw (MB/s)':<28}{ours['bw_MBps']:>12.1f}{ref['bw_MBps']:>12.1f}"
          f"{result['ratio']['bw']:>15.2f}")
    print(f"(rdmaio median latency {ours['lat_median_usec']:.1f} us; progress={args.progress}, "
          f"workers={args.workers}, window={args.window})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
