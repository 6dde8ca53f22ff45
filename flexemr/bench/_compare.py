"""``python -m flexemr.bench compare [--json]`` (also plain ``flexemr bench``): one workload, side by side.

Workload: :func:`flexemr.apps.workload.generate` with
:data:`~flexemr.apps.workload.PROFILE_2022` (reuse calibrated to Meta's 2022
``dlrm_datasets`` traces): ``--tables`` (8) float32 tables of ``--rows``
(500,000) rows x ``--dim`` (64); batches of ``--batch`` (2048) samples with
Poisson bags of mean ``--pooling`` (32) ids per table; ``sum`` pooling.
``--warmup`` (2) warm-up batches, then ``--batches`` (20) timed ones (seeds
0, 1, ...: a stream over the same hot rows).  Every path answers the same
batches and is checked against ``local`` before it is timed.  The
``flexemr`` and ``flexemr-torch`` clients cycle through the warm-up batches
until their cost model has tried both server pooling and raw reads (10
lookups): the timed batches then see the choice a running ranker makes, not
its start-up's exploration.

Paths, in report order:

``local``
    the embedding library a ranker would otherwise keep: every table pooled
    by flexemr's native kernel (:func:`flexemr.core.kernel.pool_many`, one
    call, :func:`~flexemr.core.kernel.get_threads` threads) from an
    in-memory copy;
``naive``
    the naive disaggregated path: one rdmaio ``read`` per id (no dedup, no
    coalescing, 64 concurrent readers) against the same servers, pooled
    locally; timed on ``--naive-ids`` ids of a batch and extrapolated;
``flexemr``
    ``EmbeddingClient.lookup_pooled(batch, "sum")`` with the default client
    (dedup, coalesced reads, server-side pooling by the cost model; no cache)
    against ``--servers`` (2) embedding servers, each in its own process;
``flexemr-torch``
    the same lookups through :class:`flexemr.torch.RemoteEmbeddingBagCollection`
    inside a torch ranker (the module plus a linear head, called with a
    ``KeyedJaggedTensor`` from a plain thread, as a torch model is): the
    same cluster, batches and client options as ``flexemr``, so its ratio to
    ``flexemr`` is what the torch layer costs (KJT conversion, the hop to
    the client thread, the ``KeyedTensor``).  The two take turns batch by
    batch, so that whatever else loads the machine weighs on both alike.
    Skipped with a reason when torch or torchrec is missing (``make torch``);
``redis``
    a private ``redis-server`` holding the rows, one pipelined ``MGET`` per
    table and batch, pooled in numpy (:mod:`flexemr.bench._peers`); skipped
    with a reason when ``redis-server`` or the ``redis`` client is missing;
``torchrec``
    TorchRec's FBGEMM table-batched embedding on the local CPU
    (:class:`flexemr.bench._peers.TorchRecPeer`), in this process while the
    cluster runs: it takes turns with ``flexemr`` batch by batch, as
    ``flexemr-torch`` does, so the ratio of the two is measured over the same
    stretch of time (timed apart, load that came and went between the two
    windows moved it by a third); skipped with a reason when torchrec is not
    installed.

Every path is checked against the numpy reference on one batch, then runs
the ``--warmup`` batches, then the timed ones (naive reuses the warm
cluster).  Columns: samples/s (pooled lookups of whole batches), rows/s (ids
answered, duplicates included), bytes over the network per sample (one-sided
read payload plus pooling messages for flexemr; RESP request and reply bytes
for Redis; ``ids x row_bytes`` for naive), CPU microseconds per sample of the
ranker (this process, all threads) and of the servers (the embedding server
processes, or ``redis-server``), from the OS's accounting over the timed
batches only (:class:`~flexemr.bench._peers.CpuClock`), and ratios of
samples/s to flexemr and to local.  JSON: ``ranker_cpu_s_per_sample`` and
``server_cpu_s_per_sample`` per entry.  ``--no-redis`` / ``--no-torchrec`` / ``--no-torch`` skip a path on purpose.
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
import rdmaio

from ..apps.cluster import LocalCluster
from ..apps.report import PLOT_HELP, check_plot_path, plot_compare
from ..apps.workload import PROFILE_2022, generate, reuse_stats
from ..core.config import ClusterConfig
from ..core import kernel
from ..core.init import build_model
from ..core.jagged import JaggedBatch
from ..core.pooling import PoolingCost, pool
from ..core.spec import TableSpec
from . import _peers
from ._args import add_config_arguments, config_from_args
from ._lookup import _naive
from ._peers import CpuClock, Model, PathResult, Pooled, check_pooled, measured, settle, skipped

__all__ = ["HELP", "PATHS", "CompareConfig", "configure", "main", "measure"]

HELP = ("one workload side by side: local, naive, flexemr, flexemr-torch, redis and torchrec "
        "(samples/s, bytes/sample, ratios)")
#: The remote TorchRec module inside a torch ranker (flexemr.torch).
FLEXEMR_TORCH = "flexemr-torch"
#: Paths, in report order.
PATHS = ("local", "naive", "flexemr", FLEXEMR_TORCH, _peers.REDIS, _peers.TORCHREC)


@dataclass(frozen=True)
class CompareConfig:
    """Parameters of one run (see the module docstring)."""

    tables: int = 8
    rows: int = 500_000
    dim: int = 64
    batch: int = 2048
    pooling: float = 32.0
    warmup: int = 2
    batches: int = 20
    naive_ids: int = 20_000
    servers: int = 2
    transport: str = "auto"
    seed: int = 0
    redis: bool = True
    torchrec: bool = True
    torch: bool = True


def _reference(model: Model, jb: JaggedBatch) -> Pooled:
    """The numpy oracle every path is checked against."""
    return {t: pool(model[t][jb.ids(t)], jb.bag_offsets(t), "sum") for t in jb.keys}


def _local(model: Model, jb: JaggedBatch) -> Pooled:
    """The ``local`` path: every table pooled by the native kernel in one call."""
    outs = kernel.pool_many([kernel.PoolJob(model[t], jb.ids(t), jb.bag_offsets(t)) for t in jb.keys])
    return dict(zip(jb.keys, outs))


async def _cluster_paths(cfg: CompareConfig, specs: list[TableSpec], model: Model, warm: list[JaggedBatch],
                         timed: list[JaggedBatch], ref: Pooled,
                         tr: _peers.TorchRecPeer | PathResult) -> tuple[dict[str, PathResult], str, float]:
    """``naive``, ``flexemr``, ``flexemr-torch`` and ``torchrec`` (``tr``, built and warmed) against a
    :class:`LocalCluster`; returns (results, transport, start-up s).  ``flexemr``, ``flexemr-torch`` and
    ``torchrec`` take turns batch by batch, so that whatever else loads the machine meanwhile weighs on them
    alike."""
    t0 = time.perf_counter()
    async with LocalCluster(specs, servers=cfg.servers, seed=cfg.seed, transport=cfg.transport) as cluster:
        startup_s = time.perf_counter() - t0
        client = await cluster.client()
        transport = client.engine.transport
        pids = list(cluster.pids.values())
        check_pooled("flexemr", await client.lookup_pooled(timed[0], "sum"), ref)
        for jb in _client_warmup(warm):
            await client.lookup_pooled(jb, "sum")
        # set up, checked and warmed up in a worker thread (importing torch takes seconds: this loop keeps going)
        tp = (await asyncio.to_thread(_TorchPath.start, cfg, cluster.config, warm, timed, ref) if cfg.torch
              else skipped(FLEXEMR_TORCH, "disabled (--no-torch)"))
        try:
            client.metrics.reset()
            settle()
            dt = torch_dt = tr_dt = 0.0
            cpu, torch_cpu, tr_cpu = CpuClock(pids), CpuClock(pids), CpuClock()
            for i, jb in enumerate(timed):
                with cpu:
                    t0 = time.perf_counter()
                    await client.lookup_pooled(jb, "sum")
                    dt += time.perf_counter() - t0
                if isinstance(tp, _TorchPath):
                    with torch_cpu:
                        torch_dt += await asyncio.to_thread(tp.batch, i)
                if isinstance(tr, _peers.TorchRecPeer):  # on this thread: the servers have nothing to do meanwhile
                    with tr_cpu:
                        tr_dt += tr.batch(i)
            m = client.metrics
            samples = sum(jb.batch_size for jb in timed)
            flex = measured("flexemr", timed, dt, m.network_bytes / samples,
                            f"{m.reads / len(timed):,.0f} reads + {m.pooled_subrequests / len(timed):,.0f} shards "
                            f"pooled by servers per batch, {cfg.servers} servers", cpu=cpu)
            flex_torch = (await asyncio.to_thread(tp.result, torch_dt, torch_cpu) if isinstance(tp, _TorchPath)
                          else tp)
        finally:
            if isinstance(tp, _TorchPath):
                tp.close()
        settle()
        with CpuClock(pids) as naive_cpu:
            naive_s, naive_n = await _naive(client, timed[0], cfg.naive_ids, model)  # checks the rows it read
    ids_per_sample = float(np.mean([len(jb) / jb.batch_size for jb in timed]))
    per_id = naive_s / naive_n
    row_bytes = cfg.dim * 4
    naive = PathResult("naive", 1.0 / per_id / ids_per_sample, 1.0 / per_id, ids_per_sample * row_bytes,
                       per_id * ids_per_sample * cfg.batch * 1e3, True, None,
                       f"1 read/id, timed on {naive_n:,} ids, extrapolated",
                       naive_cpu.ranker_s / naive_n * ids_per_sample, naive_cpu.server_s / naive_n * ids_per_sample)
    torchrec = tr.result(tr_dt, tr_cpu) if isinstance(tr, _peers.TorchRecPeer) else tr
    paths = {"naive": naive, "flexemr": flex, FLEXEMR_TORCH: flex_torch, _peers.TORCHREC: torchrec}
    return paths, transport, startup_s


#: Lookups a client's cost model (:class:`~flexemr.core.pooling.PoolingCost`) makes before it chooses between
#: server pooling and raw reads by measured time: its first ``first_explore`` lookups ask servers to pool, then the
#: two ways take turns until each has ``min_samples`` measurements.
_COST_MODEL_LOOKUPS = PoolingCost.first_explore + 2 * PoolingCost.min_samples


def _client_warmup(warm: list[JaggedBatch]) -> list[JaggedBatch]:
    """The warm-up lookups of the ``flexemr`` and ``flexemr-torch`` clients: the ``warm`` batches, cycled until, with
    the check of one batch before them, the cost model has explored both ways (:data:`_COST_MODEL_LOOKUPS`), so that
    the timed batches see the choice a running ranker makes (and its steady exploration, 1 lookup in
    ``explore_every``), not the start-up's; nothing without warm-up batches.

    >>> len(_client_warmup([1, 2])), _client_warmup([])
    (9, [])
    """
    n = max(len(warm), _COST_MODEL_LOOKUPS - 1) if warm else 0
    return [warm[i % len(warm)] for i in range(n)]


def _torch_missing() -> str | None:
    """``None`` when flexemr.torch can run (torch and torchrec import), else why not."""
    try:
        import flexemr.torch as ft
    except ImportError as exc:
        return str(exc)
    return ft.torchrec_missing()


class _TorchPath:
    """The ``flexemr-torch`` path (module docstring): the remote module inside a torch ranker, timed batch by batch.

    Every method blocks: call them from a worker thread, as a torch ranker runs.
    """

    def __init__(self, ft: Any, torch: Any, remote: Any, ranker: Any, timed_k: list[Any],
                 timed: list[JaggedBatch]) -> None:
        self.ft, self.torch, self.remote, self.ranker = ft, torch, remote, ranker
        self.timed_k, self.timed = timed_k, timed

    @classmethod
    def start(cls, cfg: CompareConfig, config: ClusterConfig, warm: list[JaggedBatch], timed: list[JaggedBatch],
              ref: Pooled) -> _TorchPath | PathResult:
        """Build the ranker, check it against ``ref`` and warm it up (or the reason the path is skipped)."""
        missing = _torch_missing()
        if missing:
            return skipped(FLEXEMR_TORCH, missing)
        import torch

        import flexemr.torch as ft

        specs = list(config.plan.tables.values())
        remote = ft.RemoteEmbeddingBagCollection(ft.embedding_bag_configs(specs), config, transport=cfg.transport)

        class Ranker(torch.nn.Module):
            """The torch ranker: remote pooled embeddings, then a linear head to one CTR per sample."""

            def __init__(self) -> None:
                super().__init__()
                self.ebc = remote
                self.head = torch.nn.Linear(sum(s.dim for s in specs), 1)

            def forward(self, kjt: Any) -> Any:
                return torch.sigmoid(self.head(self.ebc(kjt).values())).squeeze(1)

        try:
            path = cls(ft, torch, remote, Ranker(), [ft.kjt_from_jagged(jb) for jb in timed], timed)
            with torch.inference_mode():  # the ranker's input is a KJT: converting the batches is not timed
                first = remote(path.timed_k[0]).to_dict()
                check_pooled(FLEXEMR_TORCH, {t: v.numpy() for t, v in first.items()}, ref)
                for jb in _client_warmup(warm):
                    path.ranker(ft.kjt_from_jagged(jb))
            remote.client_thread.call(_reset_metrics)
        except BaseException:
            remote.close()
            raise
        return path

    def batch(self, i: int) -> float:
        """Seconds the ranker takes for timed batch ``i``."""
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.ranker(self.timed_k[i])
            return time.perf_counter() - t0

    def result(self, seconds: float, cpu: CpuClock) -> PathResult:
        """The path's result after every timed batch ran in ``seconds`` in all (using ``cpu``'s CPU time)."""
        nbytes = self.remote.client_thread.call(_network_bytes)
        samples = sum(jb.batch_size for jb in self.timed)
        note = (f"RemoteEmbeddingBagCollection + Linear head (torch {self.torch.__version__}), forward from a "
                "thread; same cluster, client options and batches as flexemr, in turns")
        return measured(FLEXEMR_TORCH, self.timed, seconds, nbytes / samples, note, cpu=cpu)

    def close(self) -> None:
        self.remote.close()


async def _reset_metrics(client: Any) -> None:
    client.metrics.reset()


async def _network_bytes(client: Any) -> int:
    return int(client.metrics.network_bytes)


def measure(cfg: CompareConfig) -> dict[str, Any]:
    """Run every path on the same batches; returns a JSON-able dict (``results``: one entry per path)."""
    t_start = time.perf_counter()
    specs = [TableSpec(f"t{i:02d}", cfg.rows, cfg.dim, "float32") for i in range(cfg.tables)]
    stream = [generate(specs, cfg.batch, cfg.pooling, PROFILE_2022, seed=s) for s in range(cfg.warmup + cfg.batches)]
    warm, timed = stream[: cfg.warmup], stream[cfg.warmup:]
    model = build_model(specs, cfg.seed)  # exactly what seeded servers hold
    ref = _reference(model, timed[0])

    res: dict[str, PathResult] = {}
    check_pooled("local", _local(model, timed[0]), ref)
    for jb in warm:
        _local(model, jb)
    settle()
    with CpuClock() as cpu:
        t0 = time.perf_counter()
        for jb in timed:
            _local(model, jb)
        dt = time.perf_counter() - t0
    res["local"] = measured("local", timed, dt, 0.0,
                            f"native kernel pool_many, {kernel.get_threads()} threads ({kernel.isa()}), in memory",
                            cpu=cpu)

    tr = (_peers.TorchRecPeer.start(model, warm, timed, ref) if cfg.torchrec
          else _peers.skipped(_peers.TORCHREC, "disabled (--no-torchrec)"))
    cluster_res, transport, startup_s = rdmaio.run(_cluster_paths(cfg, specs, model, warm, timed, ref, tr))
    res.update(cluster_res)
    res[_peers.REDIS] = (_peers.bench_redis(model, warm, timed, ref) if cfg.redis
                         else _peers.skipped(_peers.REDIS, "disabled (--no-redis)"))

    flex = res["flexemr"].samples_per_s
    local = res["local"].samples_per_s
    rows = []
    for name in PATHS:
        r = res[name].to_dict()
        rate = r["samples_per_s"]
        r["vs_flexemr"] = rate / flex if rate is not None and flex else None
        r["vs_local"] = rate / local if rate is not None and local else None
        rows.append(r)
    ids_per_sample = float(np.mean([len(jb) / jb.batch_size for jb in timed]))
    return {
        "config": asdict(cfg),
        "workload": {"profile": "PROFILE_2022", "profile_params": PROFILE_2022.to_dict(), "pooling_mode": "sum",
                     "bags": "poisson", "ids_per_sample": ids_per_sample, "row_bytes": cfg.dim * 4,
                     "table_mb": cfg.rows * cfg.dim * 4 / 1e6, "reuse_stats": reuse_stats(timed[0])},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "transport": transport,
        "startup_s": startup_s,
        "wall_s": time.perf_counter() - t_start,
        "results": rows,
    }


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _cpu(r: dict[str, Any]) -> str:
    a, b = r.get("ranker_cpu_s_per_sample"), r.get("server_cpu_s_per_sample")
    if a is None or b is None:
        return "-"
    return f"{a * 1e6:.1f}+{b * 1e6:.1f}"


def format_table(res: dict[str, Any]) -> str:
    """The human-readable report of :func:`measure`'s result."""
    cfg, wl = res["config"], res["workload"]
    lines = [
        (f"flexemr bench compare: {cfg['tables']} tables x {cfg['rows']:,} rows x {cfg['dim']} float32 "
         f"({wl['table_mb']:.0f} MB each); {cfg['servers']} embedding servers (own processes, {res['transport']})"),
        (f"workload: PROFILE_2022 reuse (Meta 2022 traces), batch {cfg['batch']} samples, Poisson bags of mean "
         f"{cfg['pooling']:g} ({wl['ids_per_sample']:.1f} ids/sample), sum pooling; {cfg['warmup']} warm-up + "
         f"{cfg['batches']} timed batches, seed {cfg['seed']}; wall {res['wall_s']:.0f} s"),
        "",
        (f"{'path':<14}{'samples/s':>11}{'rows/s':>10}{'net B/sample':>14}{'batch ms':>10}{'cpu us/sample':>15}"
         f"{'vs flexemr':>12}{'vs local':>10}  note"),
        f"{'':<59}{'ranker+servers':>15}",
    ]
    for r in res["results"]:
        if r["skipped"]:
            lines.append(f"{r['path']:<14}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['path']:<14}{_rate(r['samples_per_s']):>11}{_rate(r['rows_per_s']):>10}"
                     f"{r['bytes_per_sample']:>14,.0f}{r['batch_ms']:>10.1f}{_cpu(r):>15}{_ratio(r['vs_flexemr']):>12}"
                     f"{_ratio(r['vs_local']):>10}  {r['note']}")
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m flexemr.bench compare``."""
    d = CompareConfig()
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PATH", help=PLOT_HELP)
    add_config_arguments(p, d, {"pooling": "mean ids per sample and table (Poisson)",
                                "warmup": "warm-up batches per path", "batches": "timed batches per path",
                                "naive_ids": "ids timed on the naive path", "redis": "skip the Redis peer",
                                "torchrec": "skip the TorchRec peer",
                                "torch": "skip the flexemr-torch path (the remote TorchRec module)"})


def main(args: argparse.Namespace) -> int:
    """Run with parsed arguments; prints a table (or, with ``--json``, the whole result as one JSON object)."""
    plot = check_plot_path(args.plot) if args.plot else None
    res = measure(config_from_args(CompareConfig, args))
    print(json.dumps(res, indent=2) if args.json else format_table(res), flush=True)
    if plot is not None:
        png, svg = plot_compare(plot, res)
        print(f"wrote {png} and {svg}", file=sys.stderr if args.json else sys.stdout)
    return 0

