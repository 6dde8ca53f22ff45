"""``flexemr ray up | down | status | rank | bench``: FlexEMR on a running Ray cluster.

``up``
    ``flexemr ray up --config cluster.toml [--address auto] [--name flexemr]``
    places the file's embedding servers on the Ray cluster (one per node)
    and the HTTP rankers in front of them (:func:`flexemr.ray.up`), prints
    where everything is and exits; the deployment keeps running.
    ``--write-config FILE`` writes the cluster file with the servers' real
    addresses (for ``flexemr rank`` or your own clients).
``status``
    Servers (address, state, starts, metrics port), rankers' metrics
    endpoints and the rankers' URL; ``--json`` for the registry's record,
    ``--url`` for the URL alone (``flexemr ray rank --url "$(flexemr ray status --url)"``).
``down``
    Rankers removed, servers drained (``--drain-timeout``) and ended.
``rank``
    ``flexemr ray rank --url URL --config cluster.toml [--generate N]``: sends
    generated Criteo-shaped requests to the rankers and checks their CTRs
    against the local model (exit code 1 when one differs or fails).
``bench``
    Ray Serve rankers vs ``flexemr rank`` on a local multi-node Ray cluster
    (:mod:`flexemr.ray._bench`).

Building the parser imports no Ray; running a command does.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..apps.cli import Command
from ..apps.cli_support import check_range, parse_client_options, parse_pairs
from ..core.config import ClusterConfig

__all__ = ["CLI_COMMANDS", "configure", "main"]


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr ray``."""
    sub = p.add_subparsers(dest="ray_command", metavar="RAY_COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="the Ray cluster (default: auto, the one `ray start` started here)")
    common.add_argument("--name", default="flexemr", help="the deployment's name (default flexemr)")

    u = sub.add_parser("up", parents=[common], help="deploy servers and rankers on the Ray cluster")
    u.add_argument("--config", required=True, help="cluster TOML file")
    u.add_argument("--seed", type=int, default=0, help="seed of the tables (default 0)")
    u.add_argument("--npy", action="append", default=[], metavar="TABLE=PATH",
                   help="serve TABLE from a .npy file present on every node; repeatable")
    u.add_argument("--transport", default="auto", choices=["auto", "tcp", "verbs"], help="rdmaio transport")
    u.add_argument("--workers", type=int, default=1, help="rdmaio progress workers per server (default 1)")
    u.add_argument("--ports", default="file", choices=["file", "any"],
                   help="servers listen on the file's ports (default) or on free ports")
    u.add_argument("--server-cpus", type=float, default=0.5, help="Ray CPUs per server (default 0.5)")
    u.add_argument("--strategy", default="STRICT_SPREAD", choices=["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"],
                   help="placement-group strategy (default STRICT_SPREAD: one server per node)")
    u.add_argument("--no-metrics", action="store_true", help="no metrics endpoints on servers and rankers")
    u.add_argument("--no-ranker", action="store_true", help="servers only (no HTTP rankers)")
    u.add_argument("--replicas", type=int, default=1, help="ranker replicas (default 1)")
    u.add_argument("--max-replicas", type=int, help="autoscale the rankers up to this many replicas")
    u.add_argument("--min-replicas", type=int, default=1, help="with --max-replicas: at least this many")
    u.add_argument("--model", default="numpy", choices=["numpy", "torch"], help="the rankers' DLRM (default numpy)")
    u.add_argument("--model-seed", type=int, default=0, help="seed of the DLRM weights (default 0)")
    u.add_argument("--max-batch-size", type=int, default=8, help="requests batched into one lookup (default 8)")
    u.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a batch waits for more (default 2)")
    u.add_argument("--ranker-cpus", type=float, default=0.5, help="Ray CPUs per ranker replica (default 0.5)")
    u.add_argument("--client-option", action="append", default=[], metavar="KEY=VALUE",
                   help="EmbeddingClient keyword of the rankers (VALUE parsed as JSON when it can be)")
    u.add_argument("--http-host", default="127.0.0.1", help="Serve's HTTP host (default 127.0.0.1; 0.0.0.0: all)")
    u.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP port (default 8000)")
    u.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for everything (default 300)")
    u.add_argument("--write-config", metavar="FILE", help="write the cluster file with the real addresses")

    s = sub.add_parser("status", parents=[common], help="where the servers and rankers are")
    s.add_argument("--json", action="store_true", help="the registry's record as JSON")
    s.add_argument("--url", action="store_true", help="print only the rankers' URL (exit 1 without rankers)")

    d = sub.add_parser("down", parents=[common], help="remove the rankers, drain and end the servers")
    d.add_argument("--drain-timeout", type=float, default=10.0, help="per server (default 10)")

    r = sub.add_parser("rank", help="send generated requests to the rankers and check the CTRs")
    r.add_argument("--url", required=True, help="the rankers' URL (flexemr ray up prints it)")
    r.add_argument("--config", required=True, help="cluster TOML file (for the tables)")
    r.add_argument("--generate", type=int, default=10, metavar="N", help="requests to send (default 10)")
    r.add_argument("--batch-size", type=int, default=128, help="samples per request (default 128)")
    r.add_argument("--pooling", type=float, default=8.0, help="mean ids per sample and table (default 8)")
    r.add_argument("--seed", type=int, default=0, help="the servers' table seed (default 0)")
    r.add_argument("--model-seed", type=int, default=0, help="the rankers' --model-seed (default 0)")
    r.add_argument("--concurrency", type=int, default=2, help="requests in flight (default 2)")
    r.add_argument("--check-samples", type=int, default=32, help="samples per request checked (default 32)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")

    b = sub.add_parser("bench", help="Ray Serve rankers vs flexemr rank on a local multi-node Ray cluster")
    from ._bench import configure as configure_bench

    configure_bench(b)


#: Client keywords a ``--client-option`` cannot give: objects, not values (the ranker's transport is a value).
_RESERVED_OPTIONS = frozenset({"engine", "resync_progress"})


def _up(args: argparse.Namespace) -> int:
    from ._cluster import up
    from ._ranker import RankerOptions

    check_range("--workers", args.workers, 1, 64)
    check_range("--http-port", args.http_port, 1, 65535)
    check_range("--timeout", args.timeout, above=0)
    ranker = None
    if not args.no_ranker:
        ranker = RankerOptions(replicas=None if args.max_replicas else args.replicas, min_replicas=args.min_replicas,
                               max_replicas=args.max_replicas, model=args.model, model_seed=args.model_seed,
                               max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1e3,
                               cpus=args.ranker_cpus, client_options=parse_client_options(
                                   args.client_option, _RESERVED_OPTIONS),
                               metrics=not args.no_metrics)
    rc = up(args.config, name=args.name, address=args.address, seed=args.seed, npy=parse_pairs(args.npy, "--npy"),
            transport=args.transport, workers=args.workers, ports=args.ports, server_cpus=args.server_cpus,
            strategy=args.strategy, metrics=not args.no_metrics, ranker=ranker, http_host=args.http_host,
            http_port=args.http_port, timeout=args.timeout)
    servers = rc.servers()
    nodes = {r.get("node_id") for r in servers.values()}
    print(f"flexemr ray: {args.name} is up: {len(servers)} servers on {len(nodes)} Ray nodes")
    for name in sorted(servers):
        r = servers[name]
        metrics = f", metrics on http://{r['host']}:{r['metrics_port']}/metrics" if r.get("metrics_port") else ""
        print(f"  server {name} on {r['host']}:{r['port']} ({r['shards']} shards, {r['transport']}){metrics}")
    if rc.url:
        print(f"  rankers at {rc.url}")
    if args.write_config:
        rc.config().write_toml(args.write_config)
        print(f"  wrote {args.write_config} (the servers' real addresses)")
    return 0


def _status(args: argparse.Namespace) -> int:
    from ._cluster import RayCluster

    rc = RayCluster(args.name, address=args.address)
    if args.url:
        if rc.url is None:
            print(f"flexemr ray: {args.name} has no rankers (it was started with --no-ranker)", file=sys.stderr)
            return 1
        print(rc.url)
        return 0
    info = rc.info()
    if args.json:
        info["options"].pop("secret", None)
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"flexemr ray: {args.name}: {len(info['servers'])} of {len(info['plan_servers'])} servers registered")
    for name in info["plan_servers"]:
        r = info["servers"].get(name)
        if r is None:
            print(f"  server {name}: not registered")
            continue
        metrics = f", metrics on {r['host']}:{r['metrics_port']}" if r.get("metrics_port") else ""
        print(f"  server {name}: {r['state']} on {r['host']}:{r['port']}, started {r['starts']}x{metrics}")
    for key, r in sorted(info["rankers"].items()):
        print(f"  ranker replica {key}: metrics on {r['host']}:{r['metrics_port']}")
    url = rc.url
    if url:
        print(f"  rankers at {url}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from ._cluster import down

    check_range("--drain-timeout", args.drain_timeout, 0)
    if not down(args.name, address=args.address, drain_timeout=args.drain_timeout):
        print(f"flexemr ray: no deployment {args.name!r} is up", file=sys.stderr)
        return 1
    print(f"flexemr ray: {args.name} is down")
    return 0


def _rank(args: argparse.Namespace) -> int:
    from ..apps.dlrm import DLRM, ReferenceTables
    from ..apps.trace import generate_trace
    from ._http import check_result, rank_over_http, split_url

    split_url(args.url)  # a bad URL is refused before any work
    check_range("--generate", args.generate, 1)
    check_range("--batch-size", args.batch_size, 1)
    check_range("--concurrency", args.concurrency, 1, 256)
    check_range("--pooling", args.pooling, above=0)
    config = ClusterConfig.from_toml(args.config)
    specs = [config.plan.spec(t) for t in config.plan.tables]
    batches = generate_trace(specs, args.generate + 1, args.batch_size, args.pooling, seed=args.seed)
    model = DLRM(specs, seed=args.model_seed)
    res = rank_over_http(args.url, batches, concurrency=args.concurrency, model=model,
                         reference=ReferenceTables(specs, args.seed), check_samples=args.check_samples)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        err = "-" if res.max_abs_err is None else f"{res.max_abs_err:.1e}"
        print(f"flexemr ray rank: {res.requests} requests, {res.samples} samples in {res.seconds:.2f} s: "
              f"{res.samples_per_s:,.0f} samples/s, p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms, "
              f"{res.failed} failed, max |err| {err} over {res.checked_samples} checked samples")
    check_result(res, 1e-4)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run ``flexemr ray ...``."""
    if args.ray_command == "bench":
        from ._bench import main as bench

        return bench(args)
    return {"up": _up, "status": _status, "down": _down, "rank": _rank}[args.ray_command](args)


#: ``flexemr ray`` (``flexemr/__main__.py``).
CLI_COMMANDS: dict[str, Command] = {
    "ray": Command("FlexEMR on a Ray cluster: up, status, down, rank, bench (the ray extra)", configure, main),
}
