"""``flexemr bench swapin [--json]``: the cache's hit rate over the batches after its capacity grew,
without and with swap-in.

Set-up: ``--servers`` (2) embedding servers, each in its own process on
loopback (tcp), one float32 table of ``--rows`` x ``--dim``, row-wise.  The
ids are Zipf-distributed (exponent ``--alpha``) over the table (ranks
scattered by a fixed permutation).  The client has a ``--cache-rows`` row
budget, ``adaptive=True`` and ``nn_sample_bytes = --nn-rows-per-sample x row
bytes``: the cache gets what the NN's activations leave
(:class:`~flexemr.core.capacity.ActivationCapacity`, window ``--window``).

Per mode, a fresh client runs

1. ``--before`` batches of ``--big-samples`` samples: the NN needs most of the
   budget, the cache is small (and the frequency sketch learns the hot rows);
2. ``--after`` batches of ``--small-samples`` samples: the NN needs little, the
   cache's capacity grows.  Every batch is ``lookup_jagged`` of
   ``samples x --pooling`` ids followed by ``--nn-ms`` of emulated NN work
   (a sleep: the background reads of swap-in run meanwhile).

Modes: ``without`` (``swapin=False``: the grown cache fills on misses only)
and ``with`` (``swapin=True``: the hottest uncached rows by the frequency
sketch are read in the background, :mod:`flexemr.client.swapin`).

Output (``--json``): ``{"without": {...}, "with": {...}}``; each has, over the
``--after`` batches, ``samples_per_s`` (samples over the time spent in
lookups), ``p50_ms`` / ``p99_ms`` (per lookup), ``hit_rate`` (all of them),
``hit_rates`` (per batch), ``capacity`` (rows, after the grow),
``swapin_rows`` and ``batches_to_steady``: the first batch (1-based) from which
the mean hit rate of ``--smooth`` consecutive batches reaches 95% of the
steady state, the better of the two modes' mean hit rate over their last
quarter (``reached`` says whether it did within ``--after`` batches; when not,
``batches_to_steady`` is ``--after``, a lower bound).  ``with`` adds
``steady_ratio``: its ``batches_to_steady`` over ``without``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..apps.cluster import LocalCluster
from ..core.errors import ConfigError
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec
from ._args import add_config_arguments, config_from_args

__all__ = ["HELP", "SwapinConfig", "batches_to_steady", "configure", "main", "run_swapin"]

HELP = "cache hit rate over the batches after a capacity grow, without and with swap-in"


@dataclass(frozen=True)
class SwapinConfig:
    """Parameters of the swap-in benchmark (module docstring)."""

    servers: int = 2
    rows: int = 200_000
    dim: int = 32
    alpha: float = 1.0
    pooling: int = 16
    cache_rows: int = 40_000
    nn_rows_per_sample: int = 30
    window: int = 4
    big_samples: int = 1024
    small_samples: int = 64
    before: int = 30
    after: int = 120
    nn_ms: float = 2.0
    smooth: int = 5
    seed: int = 5

    def __post_init__(self) -> None:
        for name in ("servers", "rows", "dim", "pooling", "cache_rows", "nn_rows_per_sample", "window",
                     "big_samples", "small_samples", "before", "after", "smooth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.after < 4 * self.smooth:
            raise ConfigError(f"--after must be >= 4 x --smooth, got {self.after}")


HELPS = {
    "servers": "embedding servers (processes on loopback)",
    "alpha": "Zipf exponent of the ids",
    "pooling": "ids per sample",
    "cache_rows": "memory budget of the cache and the NN, in rows",
    "nn_rows_per_sample": "the NN's activation memory per sample, in rows",
    "window": "batches in the NN-need window (cache_window)",
    "big_samples": "samples per batch before the grow",
    "small_samples": "samples per batch after the grow",
    "before": "batches before the grow",
    "after": "batches after the grow (measured)",
    "nn_ms": "emulated NN time after every batch (ms)",
    "smooth": "batches averaged when finding the steady state",
}


def batches_to_steady(rates: npt.NDArray[np.float64], target: float, smooth: int) -> tuple[int, bool]:
    """First batch (1-based) from which the mean of ``smooth`` consecutive ``rates`` is ``>= target``,
    and whether that happened (else ``len(rates)``).

    >>> batches_to_steady(np.array([0.1, 0.5, 0.9, 0.9, 0.9]), 0.85, 2)
    (3, True)
    """
    if rates.size < smooth:
        return int(rates.size), False
    means = np.convolve(rates, np.ones(smooth) / smooth, mode="valid")
    hit = np.nonzero(means >= target)[0]
    return (int(hit[0]) + 1, True) if hit.size else (int(rates.size), False)


def _zipf_ids(rng: np.random.Generator, n: int, p: npt.NDArray[np.floating[Any]],
              perm: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return perm[rng.choice(p.size, n, p=p)]


async def _mode(cluster: LocalCluster, cfg: SwapinConfig, swapin: bool) -> dict[str, Any]:
    row_bytes = cfg.dim * 4
    p = 1.0 / np.arange(1, cfg.rows + 1) ** cfg.alpha
    p /= p.sum()
    perm = np.random.default_rng(cfg.seed).permutation(cfg.rows).astype(np.int64)
    rng = np.random.default_rng([cfg.seed, 1])  # the same batches in both modes
    model = cluster.model()["emb"]
    client = await cluster.client(cache_bytes=cfg.cache_rows * row_bytes, adaptive=True,
                                  nn_sample_bytes=cfg.nn_rows_per_sample * row_bytes, cache_window=cfg.window,
                                  swapin=swapin)
    try:
        def batch(samples: int) -> JaggedBatch:
            return JaggedBatch(["emb"], _zipf_ids(rng, samples * cfg.pooling, p, perm),
                               lengths=np.full(samples, cfg.pooling))

        for _ in range(cfg.before):
            await client.lookup_jagged(batch(cfg.big_samples))
        m = client.metrics
        lat: list[float] = []
        rates: list[float] = []
        first = True
        for _ in range(cfg.after):
            b = batch(cfg.small_samples)
            h0, m0 = m.cache_hits, m.cache_misses
            t0 = time.perf_counter()
            got = await client.lookup_jagged(b)
            lat.append(time.perf_counter() - t0)
            hits, misses = m.cache_hits - h0, m.cache_misses - m0
            rates.append(hits / max(hits + misses, 1))
            if first and not (got["emb"] == model[b.ids("emb")]).all():
                raise AssertionError("lookups differ from the model")
            first = False
            await asyncio.sleep(cfg.nn_ms / 1e3)
        cache = client.cache
        arr = np.asarray(lat) * 1e3
        return {"samples_per_s": round(cfg.after * cfg.small_samples / max(sum(lat), 1e-9), 1),
                "p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
                "hit_rate": round(float(np.mean(rates)), 4), "hit_rates": [round(r, 4) for r in rates],
                "capacity": 0 if cache is None else int(cache.capacity), "swapin_rows": m.swapin_rows}
    finally:
        await client.aclose()


async def run_swapin(cfg: SwapinConfig) -> dict[str, dict[str, Any]]:
    """Both modes on one cluster (module docstring)."""
    specs = [TableSpec("emb", cfg.rows, cfg.dim)]
    async with LocalCluster(specs, servers=cfg.servers, seed=cfg.seed, transport="tcp") as cluster:
        res = {"without": await _mode(cluster, cfg, False), "with": await _mode(cluster, cfg, True)}
    tail = max(cfg.after // 4, 1)
    steady = max(float(np.mean(r["hit_rates"][-tail:])) for r in res.values())
    for r in res.values():
        n, reached = batches_to_steady(np.asarray(r["hit_rates"]), 0.95 * steady, cfg.smooth)
        r.update(batches_to_steady=n, reached=reached, steady_hit_rate=round(steady, 4))
    res["with"]["steady_ratio"] = round(res["with"]["batches_to_steady"]
                                        / max(res["without"]["batches_to_steady"], 1), 3)
    return res


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr bench swapin``."""
    add_config_arguments(p, SwapinConfig(), HELPS)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run and print."""
    cfg = config_from_args(SwapinConfig, args)
    res = rdmaio.run(run_swapin(cfg))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{'mode':8s} {'hit rate':>9s} {'to steady':>10s} {'samples/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s}"
              f" {'swapin rows':>11s}")
        for mode, r in res.items():
            steady = f"{r['batches_to_steady']}{'' if r['reached'] else '+'}"
            print(f"{mode:8s} {r['hit_rate']:9.3f} {steady:>10s} {r['samples_per_s']:10,.0f} {r['p50_ms']:8.2f} "
                  f"{r['p99_ms']:8.2f} {r['swapin_rows']:11,d}")
        print(f"steady hit rate {res['with']['steady_hit_rate']}; with vs without: "
              f"x{res['with']['steady_ratio']} batches to steady")
    return 0
