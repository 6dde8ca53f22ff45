"""``flexemr bench priority [--json]``: small latency-critical lookups under saturating bulk traffic,
without and with the priority class.

Set-up: ``--servers`` (2) embedding servers, each in its own network namespace
(the ranker, this process, in the root namespace, over tcp), one float32
table of ``--rows`` x ``--dim``, row-wise.  Every server's link is limited to
``--mbit`` Mbit/s with ``tc tbf``: the bandwidth bottleneck bulk traffic fills.
One client runs, for ``--seconds`` after ``--warmup`` seconds per mode:

* **bulk**: ``--bulk-workers`` closed-loop lookups of ``--bulk-samples`` x
  ``--pooling`` uniform ids (hundreds of KiB each: a ranker's large batches);
* **latency-critical**: one loop of lookups of ``--small-samples`` x
  ``--pooling`` ids, ``--think-ms`` apart.

Modes:

``idle``
    the latency-critical loop alone (no bulk traffic): the floor;
``without``
    bulk and latency-critical lookups share the client's batches, endpoints
    and sockets (the default client);
``with``
    ``ClientOptions(priority_lane=True, bulk_window_bytes=--window)``: the
    latency-critical lookups use ``lookup(..., priority=True)`` -- their own
    batches, endpoints and credits (:mod:`flexemr.client.lanes`) -- and bulk
    reads keep at most ``--window`` bytes in flight per server, so they cannot
    fill the path the priority lookups take.

Output (``--json``): ``{"idle": {...}, "without": {...}, "with": {...}}``; each
has ``samples_per_s``, ``p50_ms``, ``p99_ms`` of the latency-critical lookups,
``bulk_samples_per_s`` (0 for ``idle``) and ``load_average``; ``with`` adds
``p99_ratio`` (its p99 over ``without``'s) and ``bulk_ratio`` (its bulk
throughput over ``without``'s).  Needs root (namespaces, tc); without it one
line says so and the exit code is 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import rdmaio

from ..client.client import EmbeddingClient
from ..core.config import ClusterConfig
from ..core.errors import ConfigError
from ..core.init import build_model
from ..core.plan import ShardingPlan
from ..core.spec import TableSpec
from ._args import add_config_arguments, config_from_args
from ._netbench import Recorder, closed_loop, lab_cluster, load_average, require_lab

__all__ = ["HELP", "MODES", "PriorityConfig", "configure", "main", "run_priority"]

HELP = "latency-critical lookups under saturating bulk traffic, without and with the priority class (needs root)"

#: The modes, in the order they run.
MODES = ("idle", "without", "with")


@dataclass(frozen=True)
class PriorityConfig:
    """Parameters of the priority benchmark (module docstring)."""

    servers: int = 2
    rows: int = 200_000
    dim: int = 64
    pooling: int = 16
    mbit: float = 100.0
    bulk_workers: int = 4
    bulk_samples: int = 128
    small_samples: int = 1
    think_ms: float = 2.0
    window: int = 128 << 10
    seconds: float = 8.0
    warmup: float = 2.0
    seed: int = 11

    def __post_init__(self) -> None:
        for name in ("servers", "bulk_workers", "bulk_samples", "small_samples", "pooling"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.window < 4096:
            raise ConfigError(f"--window must be >= 4096 bytes, got {self.window}")


HELPS = {
    "servers": "embedding servers, each in its own namespace",
    "pooling": "ids per sample",
    "mbit": "rate limit of every server's link (Mbit/s, tc tbf)",
    "bulk_workers": "concurrent closed-loop bulk lookups",
    "bulk_samples": "samples per bulk lookup",
    "small_samples": "samples per latency-critical lookup",
    "think_ms": "pause between latency-critical lookups (ms)",
    "window": "with the priority class: bulk bytes in flight per server at most",
    "seconds": "timed seconds per mode",
    "warmup": "untimed seconds per mode first",
}


async def _mode(config: ClusterConfig, cfg: PriorityConfig, mode: str) -> dict[str, Any]:
    rows = cfg.rows
    model = build_model([config.plan.spec("emb")], cfg.seed)["emb"]
    rng_small = np.random.default_rng([cfg.seed, 0])
    rngs = [np.random.default_rng([cfg.seed, 1 + i]) for i in range(cfg.bulk_workers)]
    opts: dict[str, Any] = {"priority_lane": True, "bulk_window_bytes": cfg.window} if mode == "with" else {}
    prio = mode == "with"
    load = load_average()
    async with EmbeddingClient(config, transport="tcp", op_timeout=60.0, **opts) as client:
        check = rng_small.integers(0, rows, cfg.small_samples * cfg.pooling)
        if not (await client.lookup("emb", check, priority=prio) == model[check]).all():
            raise AssertionError("lookups differ from the model")

        async def small(_: int) -> int:
            await client.lookup("emb", rng_small.integers(0, rows, cfg.small_samples * cfg.pooling), priority=prio)
            return cfg.small_samples

        async def bulk(i: int) -> int:
            await client.lookup("emb", rngs[i].integers(0, rows, cfg.bulk_samples * cfg.pooling))
            return cfg.bulk_samples

        timed = closed_loop(small, workers=1, seconds=cfg.seconds, warmup=cfg.warmup, think=cfg.think_ms / 1e3)
        if mode == "idle":
            rec, brec = await timed, Recorder()
        else:
            rec, brec = await asyncio.gather(timed, closed_loop(bulk, workers=cfg.bulk_workers, seconds=cfg.seconds,
                                                                warmup=cfg.warmup))
        out = rec.summary()
        out["bulk_samples_per_s"] = brec.summary()["samples_per_s"] if mode != "idle" else 0.0
        m = client.metrics
        out.update(load_average=load, priority_lookups=m.priority_lookups, errors=m.errors)
    return out


async def run_priority(cfg: PriorityConfig) -> dict[str, dict[str, Any]]:
    """The three modes on one lab cluster (module docstring)."""
    servers = [f"s{i}" for i in range(cfg.servers)]
    plan = ShardingPlan.row_wise([TableSpec("emb", cfg.rows, cfg.dim)], servers)
    res: dict[str, dict[str, Any]] = {}
    async with lab_cluster(plan, cfg.seed, {s: cfg.mbit for s in servers}) as config:
        for mode in MODES:
            res[mode] = await _mode(config, cfg, mode)
    w, wo = res["with"], res["without"]
    w["p99_ratio"] = round(w["p99_ms"] / max(wo["p99_ms"], 1e-9), 3)
    w["bulk_ratio"] = round(w["bulk_samples_per_s"] / max(wo["bulk_samples_per_s"], 1e-9), 3)
    return res


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr bench priority``."""
    add_config_arguments(p, PriorityConfig(), HELPS)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run; exit code 2 when the lab cannot be made here (not root)."""
    cfg = config_from_args(PriorityConfig, args)
    if not require_lab("priority"):
        return 2
    res = rdmaio.run(run_priority(cfg))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{'mode':8s} {'p50 ms':>9s} {'p99 ms':>9s} {'bulk samples/s':>15s}  load")
        for mode, r in res.items():
            print(f"{mode:8s} {r['p50_ms']:9.2f} {r['p99_ms']:9.2f} {r['bulk_samples_per_s']:15,.0f}  "
                  f"{r['load_average']}")
        w = res["with"]
        print(f"with vs without: p99 x{w['p99_ratio']}, bulk samples/s x{w['bulk_ratio']}")
    return 0
