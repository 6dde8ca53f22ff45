"""``flexemr ray bench``: the Ray Serve rankers against ``flexemr rank``, same servers, same requests, same run.

1. a local multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``:
   ``--nodes`` fake nodes, everything on 127.0.0.1);
2. :func:`flexemr.ray.up`: ``--servers`` embedding servers of a row-wise
   Criteo-shaped plan (one per node) and the HTTP rankers;
3. one trace of ``--batches`` requests of ``--batch-size`` samples
   (:func:`flexemr.apps.trace.generate_trace`), ranked ``--rounds`` times by
   each, alternating: ``flexemr rank --trace`` (a process of its own,
   sequential batches, against the servers' real addresses) and the HTTP
   rankers (``--concurrency`` requests in flight, :func:`~flexemr.ray._http.rank_over_http`);
   every answer's first CTRs are checked against the local model;
4. the report: samples/s of both (best round), the ratio, latencies and the load
   average before and after; the target is ratio >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..apps.cli_support import check_range
from ..core.config import ClusterConfig, ServerAddress
from ..core.errors import FlexEMRError
from ..core.plan import ShardingPlan

__all__ = ["HELP", "TARGET", "configure", "main", "run"]

HELP = "Ray Serve rankers vs flexemr rank on a local multi-node Ray cluster"
#: Serve samples/s over flexemr rank samples/s the issue asks for.
TARGET = 0.7


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help="fake Ray nodes (default 3)")
    p.add_argument("--servers", type=int, default=3, help="embedding servers (default 3, one per node)")
    p.add_argument("--scale", type=float, default=0.01, help="Criteo table scale (default 0.01: ~20 MiB)")
    p.add_argument("--dim", type=int, default=16, help="embedding dim (default 16)")
    p.add_argument("--batches", type=int, default=12, help="requests per round (default 12)")
    p.add_argument("--batch-size", type=int, default=512, help="samples per request (default 512)")
    p.add_argument("--pooling", type=float, default=8.0, help="mean ids per sample and table (default 8)")
    p.add_argument("--concurrency", type=int, default=2, help="HTTP requests in flight (default 2)")
    p.add_argument("--replicas", type=int, default=1, help="ranker replicas (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of each, alternating (default 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark (module docstring); returns the report."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node addresses: 127.0.0.1 only
    from ray.cluster_utils import Cluster

    from ..apps.dlrm import DLRM, ReferenceTables, criteo_specs
    from ..apps.trace import generate_trace, write_trace
    from ._cluster import up
    from ._deps import ray as _ray
    from ._http import check_result, rank_over_http
    from ._ranker import RankerOptions

    ray = _ray()
    specs = criteo_specs(args.scale, args.dim)
    names = [f"s{i}" for i in range(args.servers)]
    plan = ShardingPlan.row_wise(specs, names)
    config = ClusterConfig(plan, {s: ServerAddress("127.0.0.1", 0) for s in names})
    load0 = os.getloadavg()
    node: dict[str, Any] = {"num_cpus": 2, "object_store_memory": 100 << 20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    report: dict[str, Any] = {}
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        port = _free_port()
        rc = up(config, name="bench", ports="any", transport="tcp", http_port=port, metrics=False,
                ranker=RankerOptions(replicas=args.replicas, metrics=False))
        url = rc.url
        assert url is not None
        with tempfile.TemporaryDirectory(prefix="flexemr-ray-bench-") as tmp:
            cfg_path, trace_path = Path(tmp) / "cluster.toml", Path(tmp) / "trace.npz"
            rc.config().write_toml(cfg_path)
            batches = generate_trace(specs, args.batches + 1, args.batch_size, args.pooling, seed=0)
            write_trace(trace_path, batches, num_rows={s.name: s.num_rows for s in specs})
            model, reference = DLRM(specs, seed=0), ReferenceTables(specs, 0)
            cmd = [sys.executable, "-m", "flexemr", "rank", "--config", str(cfg_path), "--trace", str(trace_path),
                   "--transport", "tcp", "--json"]
            ranks, https = [], []
            for _ in range(args.rounds):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if proc.returncode != 0:
                    raise FlexEMRError(f"flexemr rank failed ({proc.returncode}): {proc.stderr[-2000:]}")
                ranks.append(json.loads(proc.stdout)["result"])
                res = rank_over_http(url, batches, concurrency=args.concurrency, model=model, reference=reference)
                check_result(res, 1e-4)
                https.append(res.to_dict())
        best_rank = max(ranks, key=lambda r: r["samples_per_s"])
        best_http = max(https, key=lambda r: r["samples_per_s"])
        ratio = best_http["samples_per_s"] / best_rank["samples_per_s"] if best_rank["samples_per_s"] else 0.0
        report = {
            "shape": {"ray_nodes": args.nodes, "servers": args.servers, "tables": len(specs), "dim": args.dim,
                      "table_mib": round(sum(s.nbytes for s in specs) / (1 << 20), 1),
                      "batch_size": args.batch_size, "batches": args.batches, "pooling": args.pooling,
                      "ranker_replicas": args.replicas, "concurrency": args.concurrency, "transport": "tcp"},
            "flexemr_rank": {"command": " ".join(cmd[2:]), "rounds": ranks},
            "ray_serve": {"url": url, "rounds": https},
            "flexemr_rank_samples_per_s": best_rank["samples_per_s"],
            "ray_serve_samples_per_s": best_http["samples_per_s"],
            "ratio": ratio, "target": TARGET, "meets_target": ratio >= TARGET,
            "loadavg_before": load0, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
        }
        rc.down(drain_timeout=2.0)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return report


def main(args: argparse.Namespace) -> int:
    check_range("--nodes", args.nodes, 1, 8)
    check_range("--servers", args.servers, 1, 16)
    check_range("--batches", args.batches, 1)
    check_range("--batch-size", args.batch_size, 1)
    check_range("--concurrency", args.concurrency, 1, 64)
    check_range("--rounds", args.rounds, 1, 10)
    check_range("--scale", args.scale, above=0)
    t0 = time.monotonic()
    rep = run(args)
    rep["seconds"] = time.monotonic() - t0
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    sh = rep["shape"]
    print(f"flexemr ray bench: {sh['servers']} servers on {sh['ray_nodes']} Ray nodes, {sh['tables']} tables "
          f"({sh['table_mib']} MiB), {sh['batches']} x {sh['batch_size']} samples, {sh['transport']}")
    for label, key, rounds in (("flexemr rank", "flexemr_rank_samples_per_s", rep["flexemr_rank"]["rounds"]),
                               ("Ray Serve (HTTP)", "ray_serve_samples_per_s", rep["ray_serve"]["rounds"])):
        runs = ", ".join(f"{r['samples_per_s']:,.0f}" for r in rounds)
        best = max(rounds, key=lambda r: r["samples_per_s"])
        print(f"  {label:<17} {rep[key]:>9,.0f} samples/s  (rounds: {runs}; p50 {best['p50_ms']:.1f} ms, "
              f"p99 {best['p99_ms']:.1f} ms)")
    print(f"  ratio {rep['ratio']:.2f} (target >= {TARGET}); load average {rep['loadavg_before'][0]:.2f} before, "
          f"{rep['loadavg_after'][0]:.2f} after, {rep['cpus']} CPUs; {rep['seconds']:.0f} s")
    return 0
