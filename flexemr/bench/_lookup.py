"""``python -m flexemr.bench lookup [--json]``: embedding lookup throughput, three ways.

Set-up: a :class:`~flexemr.LocalCluster` of ``--servers`` (2) embedding
servers, each in its own process on loopback, row-wise plan, ``--tables`` (26)
float32 tables of ``--rows`` (200,000) rows x ``--dim`` (64) — 51 MB per
table, 1.3 GB in all.  A batch is ``--batch`` (2048) samples x pooling factor
``--pooling`` (20) ids per table (1,064,960 ids), drawn per table from a Zipf
distribution (``--alpha`` 1.05) over ranks that a fixed random permutation
maps to rows (hot rows are scattered over the table, not packed at its
start).  Paths, all measured in one run on the same batches:

``naive``
    one rdmaio ``read`` per id, no dedup, no coalescing (64 concurrent
    readers); timed on ``--naive-ids`` ids of one batch and reported per id;
``flexemr``
    ``client.lookup_jagged(batch)``: dedup, coalesced reads, one request per
    server (per 16,384 reads), results materialised as ``[ids, dim]`` arrays;
``local``
    the same rows gathered from an in-memory copy of the model, twice:
    ``model[table][ids]`` (numpy) and :func:`flexemr.core.kernel.gather` (the
    native kernel, the local bound).  Both are warmed up on the same batch as
    flexemr (and checked) before they are timed.

``rows/s`` counts ids answered (duplicates included) per second.  Every path
gets one warm-up batch; the timed batches are the same for all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..apps.cluster import LocalCluster
from ..client.client import EmbeddingClient
from ..core import kernel
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec
from ._args import add_config_arguments, config_from_args

__all__ = ["HELP", "LookupConfig", "configure", "main", "measure"]

HELP = "lookup throughput: naive reads vs flexemr coalescing vs warm local gathers (numpy, kernel)"
TARGET_ROWS_PER_S = 5_000_000


@dataclass(frozen=True)
class LookupConfig:
    """Parameters of one run (see the module docstring)."""

    tables: int = 26
    rows: int = 200_000
    dim: int = 64
    batch: int = 2048
    pooling: int = 20
    alpha: float = 1.05
    batches: int = 5
    naive_ids: int = 20_000
    servers: int = 2
    transport: str = "auto"
    seed: int = 0


def _specs(cfg: LookupConfig) -> list[TableSpec]:
    return [TableSpec(f"t{i:02d}", cfg.rows, cfg.dim, "float32") for i in range(cfg.tables)]


class _ZipfBatches:
    """Jagged batches with per-table Zipf ids (inverse-CDF sampling, vectorised)."""

    def __init__(self, cfg: LookupConfig, specs: list[TableSpec]) -> None:
        self.cfg = cfg
        self.keys = [s.name for s in specs]
        self.rng = np.random.default_rng(cfg.seed + 1)
        weights = np.arange(1, cfg.rows + 1, dtype=np.float64) ** -cfg.alpha
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]
        self.perms = [self.rng.permutation(cfg.rows) for _ in specs]

    def next(self) -> JaggedBatch:
        n = self.cfg.batch * self.cfg.pooling
        vals = [perm[np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), self.cfg.rows - 1)]
                for perm in self.perms]
        lengths = np.full(len(self.keys) * self.cfg.batch, self.cfg.pooling, dtype=np.int64)
        return JaggedBatch(self.keys, np.concatenate(vals), lengths=lengths)


async def _naive(client: EmbeddingClient, batch: JaggedBatch, n: int, model: dict[str, npt.NDArray[Any]],
                 workers: int = 64) -> tuple[float, int]:
    """One rdmaio read per id (no dedup); returns (seconds, ids read)."""
    plan = client.plan
    per_table = max(1, n // len(batch.keys))
    jobs: list[tuple[rdmaio.Endpoint, rdmaio.RemoteKey, int, int]] = []  # (ep, key, remote offset, local row)
    expect: list[npt.NDArray[Any]] = []
    for table in batch.keys:
        spec = plan.spec(table)
        ids = batch.ids(table)[:per_table]
        shard_idx = plan.route(table, ids)
        for sid, rid in zip(shard_idx.tolist(), ids.tolist()):  # set-up only, not timed
            sh = plan.shards[table][sid]
            jobs.append((client.endpoint(sh.server), client.shard_key(sh.region_name),
                         (rid - sh.row_start) * spec.row_bytes, len(jobs)))
        expect.append(model[table][ids])
    row_bytes = plan.spec(batch.keys[0]).row_bytes
    out = np.zeros((len(jobs), row_bytes), dtype=np.uint8)
    mr = client.engine.register(out, access=rdmaio.Access.NONE)

    async def worker(w: int) -> None:
        for ep, key, remote, row in jobs[w::workers]:
            await ep.read(mr, row * row_bytes, key, remote, row_bytes)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    dt = time.perf_counter() - t0
    mr.close()
    got = out.view(np.float32).reshape(len(jobs), -1)
    if not np.array_equal(got, np.concatenate(expect)):
        raise AssertionError("naive reads returned wrong rows")
    return dt, len(jobs)


async def measure(cfg: LookupConfig) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able dict of results."""
    specs = _specs(cfg)
    gen = _ZipfBatches(cfg, specs)
    batches = [gen.next() for _ in range(cfg.batches + 1)]
    ids_per_batch = len(batches[0])
    t_start = time.perf_counter()
    async with LocalCluster(specs, servers=cfg.servers, seed=cfg.seed, transport=cfg.transport) as cluster:
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, cluster.model)
        client = await cluster.client()
        transport = client.engine.transport
        startup_s = time.perf_counter() - t_start

        # local gathers, warmed up on the same batch as flexemr (page faults, caches) and checked
        def numpy_gather(jb: JaggedBatch) -> dict[str, npt.NDArray[Any]]:
            return {t: model[t][jb.ids(t)] for t in jb.keys}

        def kernel_gather(jb: JaggedBatch) -> dict[str, npt.NDArray[Any]]:
            return {t: kernel.gather(model[t], jb.ids(t)) for t in jb.keys}

        local_s = {}
        for name, fn in (("numpy", numpy_gather), ("kernel", kernel_gather)):
            warm_local = fn(batches[0])
            for t in batches[0].keys:
                if not np.array_equal(warm_local[t], model[t][batches[0].ids(t)]):
                    raise AssertionError(f"local {name} gather returned wrong rows for table {t}")
            del warm_local
            t0 = time.perf_counter()
            for jb in batches[1:]:
                _ = fn(jb)
            local_s[name] = (time.perf_counter() - t0) / cfg.batches

        # flexemr with coalescing: one warm-up batch (checked), then timed batches
        warm = await client.lookup_jagged(batches[0])
        for t in batches[0].keys:
            if not np.array_equal(warm[t], model[t][batches[0].ids(t)]):
                raise AssertionError(f"flexemr returned wrong rows for table {t}")
        del warm
        before = client.metrics.snapshot()
        times = []
        for jb in batches[1:]:
            t0 = time.perf_counter()
            _ = await client.lookup_jagged(jb)
            times.append(time.perf_counter() - t0)
        after = client.metrics.snapshot()
        flex_s = float(np.mean(times))
        per = {k: (after[k] - before[k]) / cfg.batches for k in
               ("unique_ids", "rows_read", "reads", "bytes_read", "subrequests")}

        naive_s, naive_n = await _naive(client, batches[1], cfg.naive_ids, model)

    row_bytes = cfg.dim * 4
    unique = per["unique_ids"]
    rows = [
        {"path": "naive (1 read/id)", "rows_per_s": naive_n / naive_s, "batch_ms": naive_s / naive_n * ids_per_batch * 1e3,
         "bytes_per_batch": ids_per_batch * row_bytes, "subrequests_per_batch": ids_per_batch,
         "note": f"timed on {naive_n} ids"},
        {"path": "flexemr (coalesced)", "rows_per_s": ids_per_batch / flex_s, "batch_ms": flex_s * 1e3,
         "bytes_per_batch": per["bytes_read"], "subrequests_per_batch": per["subrequests"],
         "note": f"{unique:,.0f} unique rows, {per['reads']:,.0f} reads, best batch {min(times) * 1e3:.0f} ms"},
        {"path": "local numpy gather", "rows_per_s": ids_per_batch / local_s["numpy"],
         "batch_ms": local_s["numpy"] * 1e3, "bytes_per_batch": 0, "subrequests_per_batch": 0,
         "note": "in-memory model[t][ids], warmed up"},
        {"path": "local kernel gather", "rows_per_s": ids_per_batch / local_s["kernel"],
         "batch_ms": local_s["kernel"] * 1e3, "bytes_per_batch": 0, "subrequests_per_batch": 0,
         "note": f"in-memory kernel.gather, {kernel.get_threads()} threads, warmed up"},
    ]
    return {
        "config": asdict(cfg),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "transport": transport,
        "ids_per_batch": ids_per_batch,
        "table_mb": cfg.rows * row_bytes / 1e6,
        "startup_s": startup_s,
        "results": rows,
        "target_rows_per_s": TARGET_ROWS_PER_S,
        "target_met": rows[1]["rows_per_s"] >= TARGET_ROWS_PER_S,
        "vs_warm_local_numpy": rows[1]["rows_per_s"] / rows[2]["rows_per_s"],
        "vs_warm_local_kernel": rows[1]["rows_per_s"] / rows[3]["rows_per_s"],
    }


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def _print(res: dict[str, Any]) -> None:
    cfg = res["config"]
    print(f"flexemr lookup bench: {cfg['servers']} servers (own processes, {res['transport']}), "
          f"{cfg['tables']} tables x {cfg['rows']:,} rows x {cfg['dim']} float32 ({res['table_mb']:.0f} MB each)")
    print(f"batch: {cfg['batch']} samples x pooling {cfg['pooling']} x {cfg['tables']} tables = "
          f"{res['ids_per_batch']:,} ids, Zipf alpha {cfg['alpha']}; {cfg['batches']} timed batches; "
          f"start-up {res['startup_s']:.1f} s")
    print()
    print(f"{'path':<22}{'rows/s':>10}{'batch ms':>11}{'MB/batch':>11}{'sub-req/batch':>15}  note")
    for r in res["results"]:
        print(f"{r['path']:<22}{_fmt_rate(r['rows_per_s']):>10}{r['batch_ms']:>11.1f}"
              f"{r['bytes_per_batch'] / 1e6:>11.1f}{r['subrequests_per_batch']:>15,.0f}  {r['note']}")
    print()
    met = "met" if res["target_met"] else "NOT met"
    print(f"target: flexemr >= {_fmt_rate(res['target_rows_per_s'])} rows/s — {met}; flexemr / warm local gather: "
          f"{res['vs_warm_local_numpy']:.2f}x numpy, {res['vs_warm_local_kernel']:.2f}x kernel")


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m flexemr.bench lookup``."""
    d = LookupConfig()
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_arguments(p, d, {"pooling": "ids per sample and table", "alpha": "Zipf exponent",
                                "batches": "timed batches", "naive_ids": "ids timed on the naive path"})


def main(args: argparse.Namespace) -> int:
    """Run with parsed arguments; prints a table (or JSON)."""
    res = rdmaio.run(measure(config_from_args(LookupConfig, args)))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        _print(res)
    return 0
