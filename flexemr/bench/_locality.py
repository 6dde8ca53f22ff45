"""``python -m flexemr.bench locality [--json]``: bytes and samples/s of the locality techniques.

Workload: :func:`flexemr.apps.workload.generate` with :data:`~flexemr.apps.workload.PROFILE_2022`
(reuse calibrated to Meta's 2022 ``dlrm_datasets`` traces) — ``--tables`` (8)
float32 tables of ``--rows`` (1,000,000) rows x ``--dim`` (64), batches of
``--batch`` (2048) samples with Poisson bags of mean ``--pooling`` (32) ids
per table, ``sum`` pooling.  Consecutive batches use seeds 0, 1, 2, ... over the
same hot rows (a stream).  ``--servers`` (2) embedding servers, each in its
own process on loopback, row-wise plan.

Configurations, all measured in one run on the same batches (``--warmup`` (8)
warm-up batches first, so caches are warm, then ``--batches`` (8) timed ones;
every configuration is checked against the local reference on a timed batch):

``naive``
    one rdmaio ``read`` per id, no dedup, no coalescing (64 concurrent
    readers), pooled locally; timed on ``--naive-ids`` ids of one batch and
    **extrapolated** to a whole batch; bytes are exact (``ids * row_bytes``);
``coalesce``
    ``lookup_pooled`` with dedup + coalesced reads, pooled on the ranker;
``cache``
    + a ``--cache-mb`` (64 MiB) LRU row cache;
``pooling``
    coalescing + server-side hierarchical pooling (cost model per (server, bag));
``all``
    coalescing + adaptive cache + server pooling + prefetch (depth 1) + a
    frequency-aware remap profiled on ``--profile-batches`` (4) other batches
    (second cluster, servers store the remapped tables);
``local``
    everything in local memory, pooled by the native kernel
    (:func:`flexemr.core.kernel.pool_many`, every table in one call).

Bytes per sample: payload moved over the network — one-sided read payload
plus pooling channel messages (frames and channel headers included); READ
request/completion overhead is not counted (it would add most to ``naive``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..apps.cluster import LocalCluster
from ..apps.report import PLOT_HELP, check_plot_path, plot_locality
from ..apps.workload import PROFILE_2022, generate, reuse_stats
from ..client.client import EmbeddingClient
from ..core.jagged import JaggedBatch
from ..core import kernel
from ..core.remap import build_remap, profile_accesses
from ..core.spec import TableSpec
from ._args import add_config_arguments, config_from_args
from ._lookup import _naive

__all__ = ["CONFIGS", "HELP", "LocalityConfig", "configure", "main", "measure"]

HELP = "locality: bytes/sample and samples/s of naive, coalesce, cache, pooling, all, local"
#: Configurations, in report order.
CONFIGS = ("naive", "coalesce", "cache", "pooling", "all", "local")


@dataclass(frozen=True)
class LocalityConfig:
    """Parameters of one run (see the module docstring)."""

    tables: int = 8
    rows: int = 1_000_000
    dim: int = 64
    batch: int = 2048
    pooling: float = 32.0
    warmup: int = 8
    batches: int = 8
    profile_batches: int = 4
    naive_ids: int = 20_000
    cache_mb: int = 64
    servers: int = 2
    transport: str = "auto"
    seed: int = 0


Model = dict[str, npt.NDArray[Any]]


def _local(model: Model, jb: JaggedBatch) -> dict[str, npt.NDArray[Any]]:
    outs = kernel.pool_many([kernel.PoolJob(model[t], jb.ids(t), jb.bag_offsets(t)) for t in jb.keys])
    return dict(zip(jb.keys, outs))


def _check(name: str, got: dict[str, npt.NDArray[Any]], want: dict[str, npt.NDArray[Any]]) -> None:
    for t, w in want.items():
        if not np.allclose(got[t], w, rtol=1e-3, atol=1e-3):
            raise AssertionError(f"{name}: pooled rows of table {t} differ from the local reference")


async def _run_client(name: str, client: EmbeddingClient, warm: list[JaggedBatch], timed: list[JaggedBatch],
                      ref: dict[str, npt.NDArray[Any]], prefetch: bool = False) -> dict[str, Any]:
    for jb in warm:
        await client.lookup_pooled(jb, "sum")
    client.metrics.reset()
    if client.cache is not None:
        client.metrics.cache_capacity = client.cache.capacity
    first: dict[str, npt.NDArray[Any]] | None = None
    t0 = time.perf_counter()
    if prefetch:
        async with client.prefetch(timed, depth=1, pooled="sum") as stream:
            async for _, out in stream:
                if first is None:
                    first = out
    else:
        for jb in timed:
            out = await client.lookup_pooled(jb, "sum")
            if first is None:
                first = out
    dt = time.perf_counter() - t0
    assert first is not None
    _check(name, first, ref)
    m = client.metrics
    samples = sum(jb.batch_size for jb in timed)
    snap = m.snapshot()
    return {"bytes_per_sample": m.network_bytes / samples, "samples_per_s": samples / dt,
            "reads_per_sample": m.reads / samples,
            "batch_ms": dt / len(timed) * 1e3,
            "metrics": {k: snap[k] for k in ("rows_read", "reads", "bytes_read", "cache_hits", "cache_misses",
                                              "cache_capacity", "pooled_subrequests", "raw_subrequests",
                                              "pooled_rows", "local_pooled_rows", "pool_bytes_sent",
                                              "pool_bytes_received")}}


async def measure(cfg: LocalityConfig) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able dict (``results`` keyed by configuration)."""
    specs = [TableSpec(f"t{i:02d}", cfg.rows, cfg.dim, "float32") for i in range(cfg.tables)]
    loop = asyncio.get_running_loop()
    stream = [generate(specs, cfg.batch, cfg.pooling, PROFILE_2022, seed=s) for s in range(cfg.warmup + cfg.batches)]
    warm, timed = stream[: cfg.warmup], stream[cfg.warmup :]
    profiling = [generate(specs, cfg.batch, cfg.pooling, PROFILE_2022, seed=10_000 + s)
                 for s in range(cfg.profile_batches)]
    ids_per_sample = float(np.mean([len(jb) / jb.batch_size for jb in timed]))
    row_bytes = cfg.dim * 4
    cache_bytes = cfg.cache_mb << 20
    res: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    async with LocalCluster(specs, servers=cfg.servers, seed=cfg.seed, transport=cfg.transport) as cluster:
        model = await loop.run_in_executor(None, cluster.model)
        ref = _local(model, timed[0])
        # local: the native kernel on the in-memory model, warmed up like the clients
        for jb in warm:
            _local(model, jb)
        t0 = time.perf_counter()
        for jb in timed:
            _local(model, jb)
        dt = time.perf_counter() - t0
        res["local"] = {"bytes_per_sample": 0.0, "samples_per_s": sum(jb.batch_size for jb in timed) / dt,
                        "reads_per_sample": 0.0, "batch_ms": dt / len(timed) * 1e3}
        plain = await cluster.client()
        transport = plain.engine.transport
        # naive: one read per id, timed on a subset, extrapolated
        naive_s, naive_n = await _naive(plain, timed[0], cfg.naive_ids, model)
        res["naive"] = {"bytes_per_sample": ids_per_sample * row_bytes,
                        "samples_per_s": naive_n / naive_s / ids_per_sample, "reads_per_sample": ids_per_sample,
                        "batch_ms": naive_s / naive_n * ids_per_sample * cfg.batch * 1e3,
                        "note": f"timed on {naive_n} ids, extrapolated"}
        res["coalesce"] = await _run_client("coalesce", await cluster.client(server_pooling=False), warm, timed, ref)
        res["cache"] = await _run_client("cache", await cluster.client(server_pooling=False, cache_bytes=cache_bytes),
                                         warm, timed, ref)
        res["pooling"] = await _run_client("pooling", await cluster.client(server_pooling=True), warm, timed, ref)
    remap = await loop.run_in_executor(None, lambda: build_remap(profile_accesses(profiling, specs)))
    async with LocalCluster(specs, servers=cfg.servers, seed=cfg.seed, transport=cfg.transport,
                            remap=remap) as cluster:
        client = await cluster.client(server_pooling=True, cache_bytes=cache_bytes, adaptive=True)
        res["all"] = await _run_client("all", client, warm, timed, ref, prefetch=True)
    wall = time.perf_counter() - t_start
    naive_b = res["naive"]["bytes_per_sample"]
    local_r = res["local"]["samples_per_s"]
    for r in res.values():
        r["byte_reduction_vs_naive"] = naive_b / r["bytes_per_sample"] if r["bytes_per_sample"] else None
        r["fraction_of_local"] = r["samples_per_s"] / local_r
    return {
        "config": asdict(cfg),
        "profile": PROFILE_2022.to_dict(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "transport": transport,
        "ids_per_sample": ids_per_sample,
        "reuse_stats": reuse_stats(timed[0]),
        "wall_s": wall,
        "results": {k: res[k] for k in CONFIGS},
        "targets": {"bytes_reduction_all_vs_naive": 10.0, "fraction_of_local_all": 0.5},
        "targets_met": {"bytes": naive_b / res["all"]["bytes_per_sample"] >= 10.0,
                        "throughput": res["all"]["samples_per_s"] >= 0.5 * local_r},
    }


def _print(res: dict[str, Any]) -> None:
    cfg = res["config"]
    print(f"flexemr locality bench: {cfg['servers']} servers (own processes, {res['transport']}), "
          f"{cfg['tables']} tables x {cfg['rows']:,} rows x {cfg['dim']} float32")
    print(f"workload: PROFILE_2022, batch {cfg['batch']} x pooling {cfg['pooling']} "
          f"({res['ids_per_sample']:.1f} ids/sample), sum pooling; {cfg['warmup']} warm-up + "
          f"{cfg['batches']} timed batches; wall {res['wall_s']:.0f} s")
    print()
    print(f"{'config':<10}{'bytes/sample':>14}{'vs naive':>10}{'samples/s':>12}{'of local':>10}{'batch ms':>10}")
    for name, r in res["results"].items():
        red = r["byte_reduction_vs_naive"]
        print(f"{name:<10}{r['bytes_per_sample']:>14,.0f}{(f'{red:.1f}x' if red else '-'):>10}"
              f"{r['samples_per_s']:>12,.0f}{r['fraction_of_local'] * 100:>9.0f}%{r['batch_ms']:>10.1f}"
              f"  {r.get('note', '')}")
    print()
    met = res["targets_met"]
    print(f"targets: all >= 10x fewer bytes than naive: {'met' if met['bytes'] else 'NOT met'}; "
          f"all >= 50% of local samples/s: {'met' if met['throughput'] else 'NOT met'}")


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m flexemr.bench locality``."""
    d = LocalityConfig()
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by configuration")
    p.add_argument("--plot", metavar="PATH", help=PLOT_HELP)
    add_config_arguments(p, d, {"pooling": "mean ids per sample and table (Poisson)",
                                "warmup": "warm-up batches per configuration",
                                "batches": "timed batches per configuration",
                                "profile_batches": "batches profiled for the remap",
                                "naive_ids": "ids timed on the naive path", "cache_mb": "ranker cache budget (MiB)"})


def main(args: argparse.Namespace) -> int:
    """Run with parsed arguments; prints a table, or with ``--json`` one JSON object keyed by configuration."""
    plot = check_plot_path(args.plot) if args.plot else None
    res = rdmaio.run(measure(config_from_args(LocalityConfig, args)))
    if args.json:
        print(json.dumps(res["results"]))  # {config: {"bytes_per_sample", "samples_per_s", ...}}
    else:
        _print(res)
    if plot is not None:
        png, svg = plot_locality(plot, res)
        print(f"wrote {png} and {svg}", file=sys.stderr if args.json else sys.stdout)
    return 0
