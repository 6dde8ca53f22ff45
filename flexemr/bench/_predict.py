"""``flexemr bench predict [--json]``: cache hit rate of lookahead prefetch alone vs lookahead plus
predictive prefetch.

Set-up: ``--servers`` (2) embedding servers, each in its own process on
loopback (tcp), one float32 table of ``--rows`` x ``--dim``, row-wise; a
``--cache-rows`` LRU row cache (fixed size).  A stream of ``--batches``
batches of ``--samples`` samples (the same in both modes): with
``--workload profile`` (default) :func:`flexemr.apps.workload.generate` with
:data:`~flexemr.apps.workload.PROFILE_2022` (reuse calibrated to Meta's 2022
traces; Poisson bags of mean ``--pooling`` ids, consecutive seeds over the
same hot rows), with ``--workload zipf`` ``--pooling`` i.i.d. Zipf(``--alpha``)
ids per sample.  The stream goes through ``client.prefetch(batches,
depth=1)`` (lookahead: the next batch's lookup runs while the consumer holds
the current one), and the consumer spends ``--nn-ms`` on each batch
(emulated NN: a sleep).

Modes: ``lookahead`` (``predict_rows=0``) and ``predict``
(``predict_rows=--predict-rows``: after every lookup the client reads the
rows its frequency-and-recency sketch expects next into the cache,
:mod:`flexemr.client.swapin`).

Output (``--json``): ``{"lookahead": {...}, "predict": {...}}``; each has, over
the batches after the first ``--warmup``, ``hit_rate`` (cache hits over unique
ids looked up), ``samples_per_s`` (samples over the wall time, NN time
included), ``p50_ms`` / ``p99_ms`` (time the consumer waited for each batch)
and ``predicted_rows``; ``predict`` adds ``hit_rate_gain`` (its hit rate minus
``lookahead``'s, in points).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import rdmaio

from ..apps.cluster import LocalCluster
from ..apps.workload import PROFILE_2022, generate
from ..core.errors import ConfigError
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec
from ._args import add_config_arguments, config_from_args
from ._swapin import _zipf_ids

__all__ = ["HELP", "PredictConfig", "configure", "main", "run_predict"]

HELP = "cache hit rate: lookahead prefetch alone vs with predictive prefetch (frequency x recency)"


@dataclass(frozen=True)
class PredictConfig:
    """Parameters of the predictive-prefetch benchmark (module docstring)."""

    servers: int = 2
    rows: int = 200_000
    dim: int = 32
    workload: str = "profile"
    alpha: float = 1.0
    pooling: int = 16
    samples: int = 64
    cache_rows: int = 2_000
    predict_rows: int = 512
    batches: int = 150
    warmup: int = 30
    nn_ms: float = 5.0
    seed: int = 9

    def __post_init__(self) -> None:
        for name in ("servers", "rows", "dim", "pooling", "samples", "cache_rows", "predict_rows", "batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workload not in ("profile", "zipf"):
            raise ConfigError(f"--workload must be 'profile' or 'zipf', got {self.workload!r}")
        if not 0 <= self.warmup < self.batches:
            raise ConfigError(f"--warmup must be in [0, --batches), got {self.warmup}")


HELPS = {
    "servers": "embedding servers (processes on loopback)",
    "workload": "'profile' (PROFILE_2022 stream) or 'zipf' (i.i.d. Zipf ids)",
    "alpha": "Zipf exponent of the ids (--workload zipf)",
    "pooling": "ids per sample",
    "samples": "samples per batch",
    "cache_rows": "row cache size (rows)",
    "predict_rows": "rows read ahead after every lookup in the predict mode",
    "batches": "batches in the stream",
    "warmup": "first batches not measured",
    "nn_ms": "emulated NN time per batch (ms)",
}


def _stream(spec: TableSpec, cfg: PredictConfig) -> list[JaggedBatch]:
    if cfg.workload == "profile":
        return [generate([spec], cfg.samples, float(cfg.pooling), PROFILE_2022, seed=i, layout_seed=cfg.seed)
                for i in range(cfg.batches)]
    p = 1.0 / np.arange(1, cfg.rows + 1) ** cfg.alpha
    p /= p.sum()
    perm = np.random.default_rng(cfg.seed).permutation(cfg.rows).astype(np.int64)
    rng = np.random.default_rng([cfg.seed, 1])
    return [JaggedBatch(["emb"], _zipf_ids(rng, cfg.samples * cfg.pooling, p, perm),
                        lengths=np.full(cfg.samples, cfg.pooling)) for _ in range(cfg.batches)]


async def _mode(cluster: LocalCluster, cfg: PredictConfig, predict: bool) -> dict[str, Any]:
    stream = _stream(cluster.plan.spec("emb"), cfg)
    model = cluster.model()["emb"]
    client = await cluster.client(cache_bytes=cfg.cache_rows * cfg.dim * 4,
                                  predict_rows=cfg.predict_rows if predict else 0)
    m = client.metrics
    waits: list[float] = []
    try:
        i = 0
        h0 = m0 = 0
        t_start = 0.0
        t_wait = time.perf_counter()
        async with client.prefetch(stream, depth=1) as batches:
            async for batch, rows in batches:
                if i == cfg.warmup:
                    h0, m0, t_start = m.cache_hits, m.cache_misses, time.perf_counter()
                elif i > cfg.warmup:
                    waits.append(time.perf_counter() - t_wait)
                if i == 0 and not (rows["emb"] == model[batch.ids("emb")]).all():
                    raise AssertionError("lookups differ from the model")
                i += 1
                await asyncio.sleep(cfg.nn_ms / 1e3)
                t_wait = time.perf_counter()
        elapsed = time.perf_counter() - t_start
        hits, misses = m.cache_hits - h0, m.cache_misses - m0
        arr = np.asarray(waits) * 1e3
        return {"hit_rate": round(hits / max(hits + misses, 1), 4),
                "samples_per_s": round((cfg.batches - cfg.warmup) * cfg.samples / max(elapsed, 1e-9), 1),
                "p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
                "predicted_rows": m.predicted_rows}
    finally:
        await client.aclose()


async def run_predict(cfg: PredictConfig) -> dict[str, dict[str, Any]]:
    """Both modes on one cluster (module docstring)."""
    async with LocalCluster([TableSpec("emb", cfg.rows, cfg.dim)], servers=cfg.servers, seed=cfg.seed,
                            transport="tcp") as cluster:
        res = {"lookahead": await _mode(cluster, cfg, False), "predict": await _mode(cluster, cfg, True)}
    res["predict"]["hit_rate_gain"] = round(100 * (res["predict"]["hit_rate"] - res["lookahead"]["hit_rate"]), 2)
    return res


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr bench predict``."""
    add_config_arguments(p, PredictConfig(), HELPS)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run and print."""
    res = rdmaio.run(run_predict(config_from_args(PredictConfig, args)))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{'mode':10s} {'hit rate':>9s} {'samples/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'predicted':>10s}")
        for mode, r in res.items():
            print(f"{mode:10s} {r['hit_rate']:9.3f} {r['samples_per_s']:10,.0f} {r['p50_ms']:8.2f} "
                  f"{r['p99_ms']:8.2f} {r['predicted_rows']:10,d}")
        print(f"predictive prefetch: {res['predict']['hit_rate_gain']:+.2f} points of hit rate over lookahead")
    return 0
