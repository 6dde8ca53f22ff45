"""rdmaio on verbs versus perftest on the same device: latency, bandwidth and small-read rate.

Run INSIDE the Soft-RoCE VM (or on a host with an RDMA NIC)::

    python -m rdmaio.testing.softroce -- python -m rdmaio.testing.verbs_ratio [--json]

Measures, with one target and one initiator engine in this process:

* latency: ``ep.read`` of 64 bytes, one at a time (depth 1), with the
  completion awaited through the worker thread, and again with the event loop
  busy-polling the completion queue (``--busy-poll-us``, 1000 by default;
  ``Engine(busy_poll_us=...)``), in alternating blocks of 100 reads so both see
  the same host load.  The average times whole blocks (no clock read per read:
  on the VM's emulated HPET one costs several µs, perftest reads the TSC); the
  median comes from a shorter run of the same alternation with every read timed;
* bandwidth: 64 KiB ``ep.read`` calls with ``--window`` (16) of them in flight,
  and again with 32 in flight;
* small reads: ``ep.read_batch`` of 256 x 64 B rows (one request, one doorbell
  per chunk), ``--batch-window`` (4) batches in flight, in rows/s;

then the perftest counterparts on the same device: ``ib_read_lat -s 64``,
``ib_read_bw -s 65536`` at tx depth 16 and 32 (the matching queue depths), and
``ib_read_bw -s 64`` at tx depths 16, 64 and 128, of which the best (in
messages/s) is the small-read reference.  Prints the ratios ours/perftest
(latency: lower is better, 2 means twice perftest's latency; the others: 1.0
means perftest's rate).  ``--json`` prints the same numbers as one JSON object.
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
BATCH_ROWS = 256
ROW_SIZE = 64
#: tx depths of ``ib_read_bw -s 64`` tried for the small-read reference (its best counts).
SMALL_DEPTHS = (16, 64, 128)


async def measure_rdmaio(lat_iters: int, bw_iters: int, window: int, progress: str, workers: int,
                         device: str | None, gid_index: int | None, batch_window: int = 4,
                         busy_poll_us: int = 1000) -> dict[str, float]:
    """rdmaio verbs numbers: latency in microseconds, bandwidth in MB/s (10**6 bytes/s), rows/s."""
    kw: dict[str, Any] = {"transport": "verbs", "workers": workers, "progress": progress,
                          "device": device, "gid_index": gid_index}
    async with rdmaio.Engine(**kw) as server, rdmaio.Engine(**kw) as client:
        table = np.arange(4 << 20, dtype=np.uint8)
        server.expose("t", server.register(table, access=rdmaio.Access.READ))
        listener = await server.listen("127.0.0.1", 0)
        async with await client.connect("127.0.0.1", listener.port) as ep:
            key = await ep.remote_key("t")
            depth = max(window, 32)
            out = np.zeros(max(BW_SIZE * depth, BATCH_ROWS * ROW_SIZE * batch_window, 1 << 20), dtype=np.uint8)
            mr = client.register(out)
            for _ in range(min(200, lat_iters)):  # warm up
                await ep.read(mr, 0, key, 0, LAT_SIZE)
            clock = time.perf_counter
            # averages: whole blocks of 100 reads timed, alternating the two modes (both see the same
            # host load) -- no clock read per read (clock_gettime on the emulated HPET costs several
            # us a call in the VM; perftest times with the TSC)
            spent = {0: 0.0, busy_poll_us: 0.0}
            count = {0: 0, busy_poll_us: 0}
            for block in range(0, 2 * lat_iters, 100):
                ep.busy_poll_us = busy_poll_us if block // 100 % 2 else 0
                t0 = clock()
                for i in range(block, block + 100):
                    await ep.read(mr, 0, key, (i * 4096) % (4 << 20), LAT_SIZE)
                spent[ep.busy_poll_us] += clock() - t0
                count[ep.busy_poll_us] += 100
            # medians: each read timed, fewer of them (the same alternation)
            samples: list[float] = []
            spun: list[float] = []
            for block in range(0, min(2 * lat_iters, 1000), 100):
                ep.busy_poll_us = busy_poll_us if block // 100 % 2 else 0
                into = spun if ep.busy_poll_us else samples
                for i in range(block, block + 100):
                    t0 = clock()
                    await ep.read(mr, 0, key, (i * 4096) % (4 << 20), LAT_SIZE)
                    into.append(clock() - t0)
            ep.busy_poll_us = 0

            async def bandwidth(inflight: int) -> float:
                async def stream(slot: int, n: int) -> None:
                    for j in range(n):
                        await ep.read(mr, slot * BW_SIZE, key, ((slot + j * inflight) * BW_SIZE) % (4 << 20),
                                      BW_SIZE)

                per = max(1, bw_iters // inflight)
                await asyncio.gather(*(stream(s, 2) for s in range(inflight)))  # warm up
                t0 = clock()
                await asyncio.gather(*(stream(s, per) for s in range(inflight)))
                return per * inflight * BW_SIZE / (clock() - t0) / 1e6

            bw = await bandwidth(window)
            bw32 = await bandwidth(32)
            rng = np.random.default_rng(0)
            lengths = np.full(BATCH_ROWS, ROW_SIZE, dtype=np.uint64)

            async def batches(slot: int, n: int) -> None:
                local = slot * BATCH_ROWS * ROW_SIZE + np.arange(BATCH_ROWS, dtype=np.uint64) * ROW_SIZE
                for _ in range(n):
                    remote = rng.integers(0, (4 << 20) // ROW_SIZE, BATCH_ROWS).astype(np.uint64) * ROW_SIZE
                    await ep.read_batch(mr, local, key, remote, lengths)

            per = max(1, bw_iters // (batch_window * 4))
            await asyncio.gather(*(batches(s, 2) for s in range(batch_window)))  # warm up
            t0 = clock()
            await asyncio.gather(*(batches(s, per) for s in range(batch_window)))
            rows_per_s = per * batch_window * BATCH_ROWS / (clock() - t0)
    return {
        "lat_avg_usec": spent[0] / count[0] * 1e6,
        "lat_median_usec": statistics.median(samples) * 1e6,
        "lat_busy_avg_usec": spent[busy_poll_us] / count[busy_poll_us] * 1e6 if busy_poll_us else float("nan"),
        "lat_busy_median_usec": statistics.median(spun) * 1e6 if spun else float("nan"),
        "bw_MBps": bw,
        "bw32_MBps": bw32,
        "small_rows_per_s": rows_per_s,
    }


def measure_perftest(lat_iters: int, bw_iters: int, device: str | None, gid_index: int | None,
                     window: int = 16) -> dict[str, float]:
    lat = run_perftest("ib_read_lat", LAT_SIZE, lat_iters, device=device, gid_index=gid_index)
    bw = run_perftest("ib_read_bw", BW_SIZE, bw_iters, device=device, gid_index=gid_index,
                      extra_args=("-t", str(window)))
    bw32 = run_perftest("ib_read_bw", BW_SIZE, bw_iters, device=device, gid_index=gid_index, extra_args=("-t", "32"))
    small: dict[int, float] = {}
    for depth in SMALL_DEPTHS:
        r = run_perftest("ib_read_bw", ROW_SIZE, max(bw_iters, 20_000), device=device, gid_index=gid_index,
                         extra_args=("-t", str(depth)))
        small[depth] = float(r["bw_avg_MBps"]) * 1e6 / ROW_SIZE
    best = max(small, key=lambda d: small[d])
    return {"lat_avg_usec": float(lat["t_avg_usec"]), "bw_MBps": float(bw["bw_avg_MBps"]),
            "bw32_MBps": float(bw32["bw_avg_MBps"]), "small_rows_per_s": small[best],
            "small_best_depth": float(best)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdmaio.testing.verbs_ratio", description=__doc__.split("\n")[0])
    p.add_argument("--lat-iters", type=int, default=2000)
    p.add_argument("--bw-iters", type=int, default=2000)
    p.add_argument("--window", type=int, default=16, help="64 KiB reads in flight for the bandwidth run")
    p.add_argument("--batch-window", type=int, default=4, help="read_batch requests in flight for the small-read run")
    p.add_argument("--busy-poll-us", type=int, default=1000,
                   help="busy-poll budget of the second latency run (Engine(busy_poll_us=...); 0 skips that run; "
                        "the default covers several emulated round trips, on hardware tens of us suffice)")
    p.add_argument("--progress", choices=("thread", "loop"), default="thread")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default=os.environ.get("RDMAIO_SOFTROCE_DEVICE"))
    p.add_argument("--gid-index", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if min(args.lat_iters, args.bw_iters, args.window, args.workers, args.batch_window) < 1:
        p.error("iteration counts, --window, --batch-window and --workers must be >= 1")
    reason = rdmaio.available_transports()["verbs"]
    if reason is not None:
        print(f"verbs unavailable: {reason}", file=sys.stderr)
        return 2
    ours = rdmaio.run(measure_rdmaio(args.lat_iters, args.bw_iters, args.window, args.progress, args.workers,
                                     args.device, args.gid_index, args.batch_window, args.busy_poll_us))
    try:
        ref = measure_perftest(args.lat_iters, args.bw_iters, args.device, args.gid_index, args.window)
    except PerftestError as exc:
        print(f"perftest failed: {exc}", file=sys.stderr)
        return 1
    result = {
        "rdmaio": ours,
        "perftest": ref,
        "ratio": {
            "lat_avg": ours["lat_avg_usec"] / ref["lat_avg_usec"],
            "lat_busy_avg": ours["lat_busy_avg_usec"] / ref["lat_avg_usec"],
            "bw": ours["bw_MBps"] / ref["bw_MBps"],
            "bw32": ours["bw32_MBps"] / ref["bw32_MBps"],
            "small_rows": ours["small_rows_per_s"] / ref["small_rows_per_s"],
        },
        "config": {"progress": args.progress, "workers": args.workers, "window": args.window,
                   "batch_window": args.batch_window, "batch_rows": BATCH_ROWS, "row_bytes": ROW_SIZE,
                   "busy_poll_us": args.busy_poll_us,
                   "lat_iters": args.lat_iters, "bw_iters": args.bw_iters},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'metric':<34}{'rdmaio':>12}{'perftest':>12}{'ours/perftest':>15}")
    print(f"{'64 B read latency (us)':<34}{ours['lat_avg_usec']:>12.1f}{ref['lat_avg_usec']:>12.1f}"
          f"{result['ratio']['lat_avg']:>15.2f}")
    if args.busy_poll_us:
        label = f"  busy poll {args.busy_poll_us} us"
        print(f"{label:<34}{ours['lat_busy_avg_usec']:>12.1f}{ref['lat_avg_usec']:>12.1f}"
              f"{result['ratio']['lat_busy_avg']:>15.2f}")
    print(f"{f'64 KiB read bw, depth {args.window} (MB/s)':<34}{ours['bw_MBps']:>12.1f}{ref['bw_MBps']:>12.1f}"
          f"{result['ratio']['bw']:>15.2f}")
    print(f"{'64 KiB read bw, depth 32 (MB/s)':<34}{ours['bw32_MBps']:>12.1f}{ref['bw32_MBps']:>12.1f}"
          f"{result['ratio']['bw32']:>15.2f}")
    print(f"{'64 B rows/s (read_batch)':<34}{ours['small_rows_per_s']:>12,.0f}{ref['small_rows_per_s']:>12,.0f}"
          f"{result['ratio']['small_rows']:>15.2f}")
    print(f"(rdmaio median latency {ours['lat_median_usec']:.1f} us, busy-polled "
          f"{ours['lat_busy_median_usec']:.1f} us; progress={args.progress}, "
          f"workers={args.workers}; read_batch of {BATCH_ROWS} x {ROW_SIZE} B, {args.batch_window} in flight; "
          f"perftest small reads: ib_read_bw -s {ROW_SIZE} at its best tx depth "
          f"{int(ref['small_best_depth'])} of {list(SMALL_DEPTHS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
