"""``python -m rdmaio.bench [--quick] [--json] [--duration S] [--no-peers]``

Prints, in one run on this machine:

1. one-sided reads of 64 B, 4 KiB, 64 KiB and 1 MiB at depth 1 and 32, for
   rdmaio (client progress on the loop and on threads) next to a plain uvloop
   streams request/response server, Mooncake Transfer Engine over TCP (when
   ``mooncake-transfer-engine-non-cuda`` is installed) and local memcpy;
2. ``read_batch`` rows/s for 256-row batches of 64 B and 256 B rows;
3. ``fetch_add`` ops/s;
4. ops/s with 1, 2 and 4 workers, one queue pair per worker against all
   workers sharing one queue pair;
5. the targets from the project's issue, met or not.

``--json`` prints one JSON object instead of tables.  Nothing here is a test:
numbers vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from typing import Any

from .. import run
from . import _peers
from ._suite import Row, measure_atomics, measure_batches, measure_reads, measure_workers, target

SIZES = [64, 4096, 65536, 1 << 20]
DEPTHS = [1, 32]
TARGETS = {
    "64 B read, depth 1 (ops/s)": 40_000,
    "read_batch 64 B rows (rows/s)": 1_000_000,
    "1 MiB read (GB/s)": 2.5,
}


def human(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def fmt_ops(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def collect(duration: float, peers: bool, quick: bool) -> dict[str, Any]:
    sizes = SIZES
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "affinity": sorted(os.sched_getaffinity(0))},
        "duration_s": duration,
    }
    with target(workers=4) as port:
        reads: list[Row] = []
        for progress in ("loop", "thread"):
            reads += run(measure_reads(port, sizes, DEPTHS, progress, 2, duration))
        out["reads"] = [asdict(r) for r in reads]
        # the peers move their data over loopback TCP: rdmaio without its same-host fast path, too
        tcp_only = run(measure_reads(port, sizes, DEPTHS, "loop", 2, duration, fast_path=False))
        out["reads_loopback_tcp"] = [asdict(r) for r in tcp_only]
        batches = run(measure_batches(port, [64, 256], 256, "loop", 8, duration))
        batches += run(measure_batches(port, [64, 256], 256, "thread", 8, duration))
        out["batches"] = [asdict(r) for r in batches]
        atomics = run(measure_atomics(port, [1, 32], "loop", duration))
        out["atomics"] = [asdict(r) for r in atomics]
        workers = run(measure_workers(port, [1, 2, 4], 64, 64, duration))
        out["workers"] = [asdict(r) for r in workers]
    peer_rows: list[dict[str, Any]] = []
    if peers:
        for size in sizes:
            peer_rows.append(asdict(_peers.bench_memcpy(size, duration=min(duration, 0.5))))
            for depth in DEPTHS:
                peer_rows.append(asdict(_peers.bench_uvloop_streams(size, depth, duration)))
                peer_rows.append(asdict(_peers.bench_mooncake(size, depth, duration)))
    else:
        peer_rows.append({"name": "peers", "skipped": "--no-peers given"})
    out["peers"] = peer_rows
    out["targets"] = check_targets(out)
    return out


def _best(rows: list[dict[str, Any]], size: int, depth: int, key: str = "ops_per_s") -> float:
    vals = [r[key] for r in rows if r["size"] == size and r["depth"] == depth and r.get(key)]
    return max(vals) if vals else 0.0


def check_targets(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    reads = out["reads"]
    got = {
        "64 B read, depth 1 (ops/s)": _best(reads, 64, 1),
        "read_batch 64 B rows (rows/s)": max((r["rows_per_s"] or 0) for r in out["batches"] if r["size"] == 64),
        "1 MiB read (GB/s)": max(_best(reads, 1 << 20, d, "gb_per_s") for d in DEPTHS),
    }
    res = {name: {"target": TARGETS[name], "measured": got[name], "met": got[name] >= TARGETS[name]}
           for name in TARGETS}
    tcp = out.get("reads_loopback_tcp", [])
    if tcp:  # the same targets with the data over loopback TCP, for comparison with the peers
        for name, size, key in (("64 B read, depth 1 (ops/s)", 64, "ops_per_s"), ("1 MiB read (GB/s)", 1 << 20, "gb_per_s")):
            val = _best(tcp, size, 1) if key == "ops_per_s" else max(_best(tcp, size, d, key) for d in DEPTHS)
            res[name + " over TCP"] = {"target": TARGETS[name], "measured": val, "met": val >= TARGETS[name]}
    return res


def print_tables(out: dict[str, Any]) -> None:
    m = out["machine"]
    pinned = f", all processes pinned to CPU {m['affinity'][0]}" if len(m["affinity"]) == 1 else ""
    print(f"rdmaio benchmark: tcp transport over loopback, target in a separate process "
          f"({m['cpus']} CPUs{pinned}, Python {m['python']}, {out['duration_s']} s per cell)\n")
    reads = out["reads"]
    peers = out["peers"]

    def peer(name: str, size: int, depth: int) -> dict[str, Any] | None:
        for p in peers:
            if p.get("name") == name and p.get("size") == size and p.get("depth") == depth:
                return p
        return None

    hdr = (f"{'size':>7} {'depth':>5} | {'rdmaio loop':>11} {'rdmaio thr':>10} {'GB/s':>6} | "
           f"{'over TCP':>8} | {'uvloop-streams':>14} {'x':>5} | {'mooncake-tcp':>12} {'x':>5}")
    print("One-sided READ, ops/s.  rdmaio loop/thr: default engine (same-host peers use a UNIX socket);")
    print("'over TCP': rdmaio loop progress with same_host_fast_path=False, data over loopback TCP like the")
    print("peers; x = that TCP-only rdmaio figure / peer.")
    print(hdr)
    print("-" * len(hdr))
    for size in SIZES:
        for depth in DEPTHS:
            lo = next((r for r in reads if r["size"] == size and r["depth"] == depth and "loop" in r["name"]), None)
            th = next((r for r in reads if r["size"] == size and r["depth"] == depth and "thread" in r["name"]), None)
            tcp = next((r for r in out["reads_loopback_tcp"] if r["size"] == size and r["depth"] == depth), None)
            best = max((r["ops_per_s"] for r in (lo, th) if r), default=0.0)
            tcp_ops = tcp["ops_per_s"] if tcp else 0.0
            cells = []
            for name in (_peers.STREAMS, _peers.MOONCAKE):
                p = peer(name, size, depth)
                if p is None or p.get("skipped") or not p.get("ops_per_s"):
                    cells.append((p.get("skipped", "not run") if p else "not run", None))
                else:
                    cells.append((fmt_ops(p["ops_per_s"]), tcp_ops / p["ops_per_s"]))
            gbs = best * size / 1e9
            line = (f"{human(size):>7} {depth:>5} | {fmt_ops(lo['ops_per_s'] if lo else None):>11} "
                    f"{fmt_ops(th['ops_per_s'] if th else None):>10} {gbs:>6.2f} | {fmt_ops(tcp_ops):>8} |")
            for text, ratio in cells:
                if ratio is None:
                    line += f" {'skipped':>14} {'':>5} |" if len(text) > 14 else f" {text:>14} {'':>5} |"
                else:
                    line += f" {text:>14} {ratio:>4.1f}x |"
            print(line.rstrip("|").rstrip())
    skipped = {p["name"]: p["skipped"] for p in peers if p.get("skipped")}
    for name, why in skipped.items():
        print(f"  {name}: skipped ({why})")
    mem = [p for p in peers if p.get("name") == _peers.MEMCPY and p.get("gb_per_s")]
    if mem:
        print("  local memcpy (the limit): " + ", ".join(f"{human(p['size'])} {p['gb_per_s']:.1f} GB/s" for p in mem))

    print("\nread_batch (256 rows per batch, 8 batches in flight)")
    for r in out["batches"]:
        print(f"  {r['name']:<28} {human(r['size']):>6} rows: {fmt_ops(r['rows_per_s']):>7} rows/s "
              f"({r['gb_per_s']:.2f} GB/s)")
    print("\nfetch_add (8-byte atomics)")
    for r in out["atomics"]:
        print(f"  {r['name']:<28} depth {r['depth']:>2}: {fmt_ops(r['ops_per_s']):>7} ops/s")
    print("\nQueue pair per worker vs one shared queue pair (64 B reads, depth 64, progress threads)")
    for r in out["workers"]:
        print(f"  {r['name']:<40} {fmt_ops(r['ops_per_s']):>7} ops/s  ({r['note']})")
    print("\nTargets")
    for name, t in out["targets"].items():
        mark = "met" if t["met"] else "NOT met"
        meas = f"{t['measured']:.2f}" if t["measured"] < 100 else fmt_ops(t["measured"])
        print(f"  {name:<41} target {fmt_ops(t['target']) if t['target'] >= 100 else t['target']:>6}  "
              f"measured {meas:>7}  {mark}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rdmaio.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per measurement (default 1.0)")
    ap.add_argument("--quick", action="store_true", help="0.3 s per measurement")
    ap.add_argument("--no-peers", action="store_true", help="skip the peer baselines")
    ap.add_argument("--pin", type=int, metavar="CPU", default=None,
                    help="pin this process and every process it starts (target, peers) to one CPU")
    a = ap.parse_args(argv)
    if a.pin is not None:
        os.sched_setaffinity(0, {a.pin})
    duration = 0.3 if a.quick else a.duration
    out = collect(duration, not a.no_peers, a.quick)
    if a.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print_tables(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
