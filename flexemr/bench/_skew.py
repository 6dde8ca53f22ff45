"""``flexemr bench skew [--json]``: Zipf-skewed lookups concentrated on one server, static primary reads vs
load-aware reads with migration.

Set-up: ``--servers`` (3) embedding servers, each in its own network namespace
(the ranker, this process, in the root namespace, over tcp), one float32
table of ``--rows`` x ``--dim``, row-wise with ``replicas=2`` (shard ``i`` on
server ``i`` and ``i + 1``).  ``--hot-share`` (0.9) of the ids fall on shard 0,
Zipf-distributed (exponent ``--alpha``) over its rows; the rest are uniform
over the table.  Server ``s0`` (shard 0's primary) is the hot server: its link
is limited to ``--hot-mbit`` Mbit/s with ``tc tbf`` (a bandwidth bottleneck;
the other links are not limited).  ``--workers`` closed-loop lookups of
``--batch`` samples x ``--pooling`` ids run for ``--seconds`` per mode after
``--warmup`` seconds:

``static``
    ``balanced_reads=False, remap_workers=False``: every shard is read from
    its primary while it is up (replicas only for failover), every endpoint
    posts on its home worker's queue pair;
``balanced``
    load-aware reads (:mod:`flexemr.client.load`): each batch reads a shard
    from the replica predicted to answer first, large ones cut over both;
    traffic moves live as the measured load changes; endpoints of hot servers
    sharing an engine worker are moved to another worker's queue pair
    (:mod:`flexemr.client.workers`).

Output (``--json``): ``{"static": {...}, "balanced": {...}}``, each with
``samples_per_s``, ``p50_ms``, ``p99_ms`` (per lookup), ``lookups``,
``load_average`` (1 min, when the mode started) and the client's
``replica_moves`` / ``off_primary_reads`` / ``split_reads`` / ``worker_moves``; ``balanced`` adds
``speedup`` and ``p99_ratio`` against ``static``.  Needs root (namespaces,
tc); without it one line says so and the exit code is 2.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..client.client import EmbeddingClient
from ..core.config import ClusterConfig
from ..core.errors import ConfigError
from ..core.init import build_model
from ..core.plan import ShardingPlan
from ..core.spec import TableSpec
from ._args import add_config_arguments, config_from_args
from ._netbench import closed_loop, lab_cluster, load_average, require_lab

__all__ = ["HELP", "SkewConfig", "configure", "main", "run_skew", "skewed_ids"]

HELP = "Zipf-skewed lookups on a rate-limited hot server: static primary reads vs load-aware reads (needs root)"


@dataclass(frozen=True)
class SkewConfig:
    """Parameters of the skew benchmark (module docstring)."""

    servers: int = 3
    rows: int = 120_000
    dim: int = 64
    batch: int = 64
    pooling: int = 16
    alpha: float = 0.8
    hot_share: float = 0.9
    hot_mbit: float = 40.0
    workers: int = 4
    seconds: float = 12.0
    warmup: float = 2.0
    seed: int = 7

    def __post_init__(self) -> None:
        if self.servers < 2:
            raise ConfigError(f"--servers must be >= 2 (replicas=2), got {self.servers}")
        if not 0 < self.hot_share <= 1:
            raise ConfigError(f"--hot-share must be in (0, 1], got {self.hot_share}")


HELPS = {
    "servers": "embedding servers, each in its own namespace",
    "batch": "samples per lookup",
    "pooling": "ids per sample",
    "alpha": "Zipf exponent over the hot shard's rows",
    "hot_share": "share of ids on the hot shard (shard 0, primary s0)",
    "hot_mbit": "rate limit of the hot server's link (Mbit/s, tc tbf)",
    "workers": "concurrent closed-loop lookups",
    "seconds": "timed seconds per mode",
    "warmup": "untimed seconds per mode first",
}


def skewed_ids(rng: np.random.Generator, n: int, shard_rows: int, rows: int, alpha: float,
               hot_share: float, perm: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``n`` ids: ``hot_share`` Zipf(``alpha``) over the first shard's rows (ranks scattered by
    ``perm``), the rest uniform over all ``rows``.

    >>> rng = np.random.default_rng(0)
    >>> ids = skewed_ids(rng, 1000, 100, 1000, 1.0, 0.9, rng.permutation(100))
    >>> 850 < int((ids < 100).sum()) <= 1000
    True
    """
    hot = rng.random(n) < hot_share
    k = int(hot.sum())
    p = 1.0 / np.arange(1, shard_rows + 1) ** alpha
    ranks = rng.choice(shard_rows, k, p=p / p.sum())
    out = rng.integers(0, rows, n).astype(np.int64)
    out[hot] = perm[ranks]
    return out


async def _mode(config: ClusterConfig, cfg: SkewConfig, balanced: bool) -> dict[str, Any]:
    plan = config.plan
    shard_rows = plan.shards["emb"][0].num_rows
    perm = np.random.default_rng(cfg.seed).permutation(shard_rows).astype(np.int64)
    model = build_model([plan.spec("emb")], cfg.seed)["emb"]
    rngs = [np.random.default_rng([cfg.seed, i]) for i in range(cfg.workers)]
    n = cfg.batch * cfg.pooling
    load = load_average()
    async with EmbeddingClient(config, transport="tcp", balanced_reads=balanced,
                               remap_workers=balanced, op_timeout=30.0) as client:
        check = skewed_ids(rngs[0], n, shard_rows, cfg.rows, cfg.alpha, cfg.hot_share, perm)
        if not (await client.lookup("emb", check) == model[check]).all():
            raise AssertionError("lookups differ from the model")

        async def step(i: int) -> int:
            ids = skewed_ids(rngs[i], n, shard_rows, cfg.rows, cfg.alpha, cfg.hot_share, perm)
            await client.lookup("emb", ids)
            return cfg.batch

        rec = await closed_loop(step, workers=cfg.workers, seconds=cfg.seconds, warmup=cfg.warmup)
        m = client.metrics
        out = rec.summary()
        out.update(load_average=load, replica_moves=m.replica_moves, off_primary_reads=m.off_primary_reads,
                   split_reads=m.split_reads, worker_moves=m.worker_moves, errors=m.errors,
                   server_requests={s: v["requests"] for s, v in client.server_load().items()})
    return out


async def run_skew(cfg: SkewConfig) -> dict[str, dict[str, Any]]:
    """Both modes on one lab cluster: ``{"static": {...}, "balanced": {...}}``."""
    servers = [f"s{i}" for i in range(cfg.servers)]
    plan = ShardingPlan.row_wise([TableSpec("emb", cfg.rows, cfg.dim)], servers, replicas=2)
    async with lab_cluster(plan, cfg.seed, {"s0": cfg.hot_mbit}) as config:
        static = await _mode(config, cfg, balanced=False)
        balanced = await _mode(config, cfg, balanced=True)
    balanced["speedup"] = round(balanced["samples_per_s"] / max(static["samples_per_s"], 1e-9), 2)
    balanced["p99_ratio"] = round(balanced["p99_ms"] / max(static["p99_ms"], 1e-9), 3)
    return {"static": static, "balanced": balanced}


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr bench skew``."""
    add_config_arguments(p, SkewConfig(), HELPS)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run; exit code 2 when the lab cannot be made here (not root)."""
    cfg = config_from_args(SkewConfig, args)
    if not require_lab("skew"):
        return 2
    res = rdmaio.run(run_skew(cfg))
    if args.json:
        print(json.dumps(res))
    else:
        for mode, r in res.items():
            print(f"{mode:9s} {r['samples_per_s']:>10,.0f} samples/s  p50 {r['p50_ms']:8.2f} ms  "
                  f"p99 {r['p99_ms']:8.2f} ms  (load {r['load_average']})")
        b = res["balanced"]
        print(f"balanced vs static: {b['speedup']}x samples/s, p99 x{b['p99_ratio']}; "
              f"replica moves {b['replica_moves']}, split reads {b['split_reads']}, "
              f"worker moves {b['worker_moves']}")
    return 0
