"""``python -m flexemr.bench serverpool [--json]``: a server's CPU per pooled row beside the local kernel's.

A real embedding server (its own process, ``flexemr serve``, over the
default transport) answers pooling requests (:mod:`flexemr.core.poolwire`)
sent straight on its ``"flexemr/pool"`` channel, one batch per request, with
``--inflight`` (1) requests outstanding, as a ranker's lookups send them.
Two workload shapes, each in its own cluster (``--shapes``):

``compare``
    the workload of ``flexemr bench compare`` (:mod:`flexemr.bench._compare`):
    ``--tables`` (8) float32 tables of ``--rows`` (500,000) x ``--dim`` (64),
    batches of ``--batch`` (2048) samples, Poisson bags of mean ``--pooling``
    (32) ids per table (about 256 ids per sample), sum pooling;
``criteo``
    Criteo-like: ``--criteo-tables`` (26) float32 tables of ``--criteo-rows``
    (100,000) x ``--criteo-dim`` (16), one id per bag: the server's answer is
    as large as the rows it read.

The server holds every table whole (one server, one shard per table).  For
each of ``--batches`` (48) timed batches (after ``--warmup`` (2)) the same
jobs are pooled twice, in turns: by the local kernel in this process
(:func:`flexemr.core.kernel.pool_each` on a copy of the same tables, with the
server's thread count, :func:`~flexemr.core.kernel.get_threads`), and by
the server.  Reported per shape, summed over the timed batches: pooled rows
(ids), the server process's CPU-seconds (all its threads, from ``/proc``:
:func:`~flexemr.bench._peers.process_cpu_s`, as ``bench compare``'s
``server_cpu_s_per_sample``) from sending each request to receiving its
answer, the local kernel's CPU-seconds (this process, all threads, around
the native call only), both per pooled row, and their ratio (the target:
at most 1.5); plus wall time per request of both.  On a shared 2-vCPU
machine single requests of either side are sometimes preempted or slowed
(the same work varies by 2x), and a sum follows those outliers: the JSON
also keeps every request's CPU of both sides, their medians' ratio
(``median_ratio``, the table's "median" column) and the median of the
ratios of each pair (``paired_median_ratio``, "paired": the server's
request over the local call made just before it).  The machine's speed
comes in spells (a shape's calls of either side cluster around two
values, e.g. 1.7 and 2.9 ms), so the medians of the two sides may come
from different spells; a pair shares its spell.

``--callgrind`` counts instructions instead (repeatable on a noisy,
shared machine): the server runs under ``valgrind --tool=callgrind`` (tables
of ``--callgrind-rows`` rows: the count does not depend on the table size),
its counters are zeroed after the warm-up requests and dumped after the
timed ones (``callgrind_control``), so the dump holds every instruction
of every server thread over the timed requests; the same run's dump also
gives the instructions inside the kernel (``fxk_run`` and the kernel's pool
workers, ``worker_main``, inclusive).  valgrind counts every byte a
``rep movsb`` copies as one instruction, so copies (``memcpy``) weigh more
there than in time.  Slow:
minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rdmaio

from ..apps.cluster import LocalCluster
from ..apps.workload import PROFILE_2022, generate
from ..client.options import ClientOptions
from ..client.pooled import PoolChannel
from ..core import kernel
from ..core.config import ClusterConfig
from ..core.init import build_model
from ..core.jagged import JaggedBatch
from ..core.metrics import LocalityMetrics
from ..core.plan import ShardingPlan
from ..core.poolwire import POOL_CHANNEL, RequestJob, decode_response, encode_request
from ..core.spec import TableSpec
from ._args import add_config_arguments, config_from_args
from ._peers import Model, process_cpu_s, settle

__all__ = ["HELP", "SHAPES", "TARGET_RATIO", "ServerPoolConfig", "configure", "format_table", "main", "measure"]

HELP = "a server's CPU per pooled row beside the local kernel's, on the same ids (bench compare's shape, Criteo's)"
#: Workload shapes, in report order.
SHAPES = ("compare", "criteo")
#: The target: server CPU per pooled row at most this many times the local kernel's.
TARGET_RATIO = 1.5
_DEFAULTS = ClientOptions()


@dataclass(frozen=True)
class ServerPoolConfig:
    """Parameters of one run (see the module docstring)."""

    tables: int = 8
    rows: int = 500_000
    dim: int = 64
    batch: int = 2048
    pooling: float = 32.0
    criteo_tables: int = 26
    criteo_rows: int = 100_000
    criteo_dim: int = 16
    warmup: int = 2
    batches: int = 48
    inflight: int = 1
    pool_slots: int = _DEFAULTS.pool_slots
    pool_slot_kb: int = _DEFAULTS.pool_slot_size >> 10
    shapes: str = "compare,criteo"
    transport: str = "auto"
    seed: int = 0
    callgrind_rows: int = 20_000


def _shape(cfg: ServerPoolConfig, shape: str, rows: int | None = None) -> tuple[list[TableSpec], list[JaggedBatch]]:
    """The tables and the warm-up + timed batches of ``shape``."""
    n = cfg.warmup + cfg.batches
    if shape == "compare":
        specs = [TableSpec(f"t{i:02d}", rows or cfg.rows, cfg.dim, "float32") for i in range(cfg.tables)]
        return specs, [generate(specs, cfg.batch, cfg.pooling, PROFILE_2022, seed=s) for s in range(n)]
    specs = [TableSpec(f"C{i + 1}", rows or cfg.criteo_rows, cfg.criteo_dim, "float32")
             for i in range(cfg.criteo_tables)]
    return specs, [generate(specs, cfg.batch, 1.0, PROFILE_2022, seed=s, pooling="fixed") for s in range(n)]


def _jobs(jb: JaggedBatch) -> list[RequestJob]:
    """One request job per table (the server holds each table whole: shard 0, ids as they are), int32 ids."""
    return [RequestJob(t, 0, jb.bag_offsets(t), jb.ids(t).astype(np.int32), None) for t in jb.keys]


def _local(model: Model, jobs: Sequence[RequestJob], threads: int) -> list[Any]:
    return kernel.pool_each([kernel.PoolJob(model[j.table], j.ids, j.offsets) for j in jobs], threads)


async def _channel(cfg: ServerPoolConfig, ep: rdmaio.Endpoint) -> PoolChannel:
    """A pooling channel on ``ep``, with the ranker's slots (``--pool-slots`` x ``--pool-slot-kb``)."""
    ch = await ep.channel(POOL_CHANNEL, slots=cfg.pool_slots, slot_size=cfg.pool_slot_kb << 10)
    return PoolChannel(ch, LocalityMetrics())


async def _open(cfg: ServerPoolConfig, cluster: LocalCluster) -> tuple[PoolChannel, rdmaio.Endpoint, str]:
    """A pooling channel to server ``s0`` on a new endpoint of a client's engine (and the transport)."""
    client = await cluster.client()
    addr = cluster.config.address("s0")
    ep = await client.engine.connect(addr.host, addr.port)
    return await _channel(cfg, ep), ep, client.engine.transport


async def _run_shape(cfg: ServerPoolConfig, shape: str) -> dict[str, Any]:
    specs, stream = _shape(cfg, shape)
    warm, timed = stream[: cfg.warmup], stream[cfg.warmup:]
    plan = ShardingPlan.row_wise(specs, ["s0"])
    model = build_model(specs, cfg.seed)  # what the seeded server holds
    threads = kernel.get_threads()
    async with LocalCluster(specs, servers=1, plan=plan, seed=cfg.seed, transport=cfg.transport) as cluster:
        pid = cluster.pids["s0"]
        pc, ep, transport = await _open(cfg, cluster)
        try:
            first = _jobs(timed[0])
            got = decode_response(await pc.call(encode_request(first, "sum")),
                                  [(j.offsets.size - 1, model[j.table].shape[1]) for j in first])
            for g, want in zip(got, _local(model, first, threads)):
                if not np.allclose(g, want, rtol=1e-5, atol=1e-5):
                    raise RuntimeError(f"{shape}: the server's partials differ from the local kernel's")
            for jb in warm:
                jobs = _jobs(jb)
                _local(model, jobs, threads)
                await pc.call(encode_request(jobs, "sum"))
            settle()
            local_cpu = local_wall = server_cpu = server_wall = 0.0
            rows = 0
            per_req: list[float] = []
            local_req: list[float] = []
            for jb in timed:
                jobs = _jobs(jb)
                rows += sum(int(j.ids.size) for j in jobs)
                c0, t0 = time.process_time(), time.perf_counter()
                _local(model, jobs, threads)
                local_wall += time.perf_counter() - t0
                dc = time.process_time() - c0
                local_cpu += dc
                local_req.append(dc)
                parts = [encode_request(jobs, "sum") for _ in range(cfg.inflight)]
                s0, t0 = process_cpu_s(pid), time.perf_counter()
                await asyncio.gather(*(pc.call(p) for p in parts))
                server_wall += time.perf_counter() - t0
                ds = process_cpu_s(pid) - s0
                server_cpu += ds
                per_req.append(ds / cfg.inflight)
            server_rows = rows * cfg.inflight
        finally:
            await pc.aclose()
            await ep.aclose()
    local_median = statistics.median(local_req)
    pairs = [(s, loc) for s, loc in zip(per_req, local_req) if loc > 0]
    return {
        "shape": shape, "tables": len(specs), "rows": specs[0].num_rows, "dim": specs[0].dim, "transport": transport,
        "ids_per_request": rows / len(timed), "requests": len(timed) * cfg.inflight, "threads": threads,
        "local_cpu_ns_per_row": local_cpu / rows * 1e9,
        "server_cpu_ns_per_row": server_cpu / server_rows * 1e9,
        "ratio": (server_cpu / server_rows) / (local_cpu / rows) if local_cpu > 0 else None,
        "local_ms_per_request": local_wall / len(timed) * 1e3,
        "server_ms_per_request": server_wall / len(timed) * 1e3,
        "median_ratio": statistics.median(per_req) / local_median if local_median > 0 else None,
        "paired_median_ratio": statistics.median(s / loc for s, loc in pairs) if pairs else None,
        "server_cpu_ms_per_request": [x * 1e3 for x in per_req],
        "local_cpu_ms_per_request": [x * 1e3 for x in local_req],
    }


def measure(cfg: ServerPoolConfig) -> dict[str, Any]:
    """Run every shape; returns a JSON-able dict (``results``: one entry per shape)."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    results = [rdmaio.run(_run_shape(cfg, s)) for s in _shapes(cfg)]
    return {
        "config": asdict(cfg),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "isa": kernel.isa(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "target_ratio": TARGET_RATIO,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
    }


def _shapes(cfg: ServerPoolConfig) -> list[str]:
    shapes = [s.strip() for s in cfg.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        raise SystemExit(f"serverpool: --shapes takes a comma-separated list of {', '.join(SHAPES)}, "
                         f"got {cfg.shapes!r}")
    return shapes


# --------------------------------------------------------------------------- #
# callgrind


def _callgrind_server(argv: Sequence[str]) -> None:
    """Under valgrind: ``CONFIG_JSON SHAPE PORT_FILE``; one embedding server holding the shape's tables."""
    from ..server.server import EmbeddingServer

    cfg = ServerPoolConfig(**json.loads(argv[0]))
    specs, _ = _shape(cfg, argv[1], cfg.callgrind_rows)

    async def serve() -> None:
        plan = ShardingPlan.row_wise(specs, ["s0"])
        async with EmbeddingServer(plan, "s0", seed=cfg.seed, transport=cfg.transport) as server:
            Path(argv[2] + ".tmp").write_text(json.dumps({"port": server.address.port}))
            os.replace(argv[2] + ".tmp", argv[2])
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes

    rdmaio.run(serve())


def _inclusive(path: str, fn: str) -> int:
    """Inclusive Ir of C function ``fn`` in callgrind output ``path`` (``callgrind_annotate --inclusive=yes``)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines():  # "  27,119,081 (24.29%)  /path/file.c:fxk_run [/path/lib.so]"
        parts = line.split()
        if len(parts) >= 3 and parts[2].endswith(":" + fn):
            try:
                total = max(total, int(parts[0].replace(",", "")))
            except ValueError:
                pass
    return total


def _dump_total(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


async def _callgrind_shape(cfg: ServerPoolConfig, shape: str, tmp: str) -> dict[str, Any]:
    specs, stream = _shape(cfg, shape, cfg.callgrind_rows)
    warm, timed = stream[: cfg.warmup], stream[cfg.warmup:]
    out = os.path.join(tmp, f"cg-{shape}.out")
    port_file = os.path.join(tmp, f"port-{shape}.json")
    args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=yes",
            sys.executable, "-c",
            "import sys; from flexemr.bench._serverpool import _callgrind_server; _callgrind_server(sys.argv[1:])",
            json.dumps(asdict(cfg)), shape, port_file]
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        while not os.path.exists(port_file):
            if proc.returncode is not None:
                raise RuntimeError("the server under valgrind exited early")
            await asyncio.sleep(0.5)
        port = json.loads(Path(port_file).read_text())["port"]
        plan = ShardingPlan.row_wise(specs, ["s0"])
        options: dict[str, Any] = {"transport": cfg.transport}  # checked by the engine
        engine = rdmaio.Engine(**options)
        await engine.start()
        try:
            ep = await engine.connect("127.0.0.1", port, timeout=600)
            pc = await _channel(cfg, ep)
            for jb in warm:
                await pc.call(encode_request(_jobs(jb), "sum"))
            await asyncio.to_thread(subprocess.run, ["callgrind_control", "-z", str(proc.pid)], capture_output=True,
                                    check=True)
            rows = 0
            for jb in timed:
                jobs = _jobs(jb)
                rows += sum(int(j.ids.size) for j in jobs)
                await pc.call(encode_request(jobs, "sum"))
            await asyncio.to_thread(subprocess.run, ["callgrind_control", "-d", "timed", str(proc.pid)],
                                    capture_output=True, check=True)
            await pc.aclose()
            await ep.aclose()
        finally:
            await engine.aclose()
        del plan
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 120)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
    dumps = sorted(p for p in os.listdir(tmp) if p.startswith(f"cg-{shape}.out.") and p.rsplit(".", 1)[1].isdigit())
    if not dumps:
        raise RuntimeError("callgrind wrote no dump of the timed requests")
    path = os.path.join(tmp, dumps[0])
    # the kernel: the calls (fxk_run, on the pooling thread) and the tasks its pool workers ran (worker_main)
    total, kernel_ir = _dump_total(path), _inclusive(path, "fxk_run") + _inclusive(path, "worker_main")
    return {"shape": shape, "rows_pooled": rows, "requests": len(timed),
            "server_instructions_per_row": total / rows,
            "kernel_instructions_per_row": kernel_ir / rows if kernel_ir else None,
            "ratio": total / kernel_ir if kernel_ir else None}


def callgrind(cfg: ServerPoolConfig) -> dict[str, Any]:
    """Instructions per pooled row of the server (all threads) and of its kernel calls; JSON-able."""
    res: dict[str, Any] = {"config": asdict(cfg), "results": []}
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        res["skipped"] = "valgrind not installed (apt-get install valgrind)"
        return res
    with tempfile.TemporaryDirectory(prefix="flexemr-cgs-") as tmp:
        for shape in _shapes(cfg):
            t0 = time.perf_counter()
            entry = rdmaio.run(_callgrind_shape(cfg, shape, tmp))
            entry["valgrind_s"] = time.perf_counter() - t0
            res["results"].append(entry)
    return res


# --------------------------------------------------------------------------- #
# report


def format_table(res: dict[str, Any]) -> str:
    """The human-readable report of :func:`measure`'s result."""
    cfg, mach = res["config"], res["machine"]
    lines = [
        (f"flexemr bench serverpool: one server process, {cfg['inflight']} request(s) in flight, "
         f"{cfg['warmup']} warm-up + {cfg['batches']} timed batches per shape; load avg "
         f"{mach['loadavg_start'][0]:.2f} -> {mach['loadavg_end'][0]:.2f}; wall {res['wall_s']:.0f} s"),
        "",
        (f"{'shape':<9}{'tables':>7}{'dim':>5}{'ids/req':>10}{'local ns/row':>14}{'server ns/row':>15}"
         f"{'ratio':>8}{'median':>8}{'paired':>8}{'local ms':>10}{'server ms':>11}"
         "  (CPU per pooled row, summed; median: of per-request CPU; paired: median of the pairs' ratios; "
         "ms: wall per request)"),
    ]
    for r in res["results"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        med = "-" if r["median_ratio"] is None else f"{r['median_ratio']:.2f}x"
        paired = "-" if r.get("paired_median_ratio") is None else f"{r['paired_median_ratio']:.2f}x"
        lines.append(f"{r['shape']:<9}{r['tables']:>7}{r['dim']:>5}{r['ids_per_request']:>10,.0f}"
                     f"{r['local_cpu_ns_per_row']:>14.2f}{r['server_cpu_ns_per_row']:>15.2f}{ratio:>8}{med:>8}"
                     f"{paired:>8}"
                     f"{r['local_ms_per_request']:>10.2f}{r['server_ms_per_request']:>11.2f}")
    lines.append(f"target: server CPU per pooled row <= {res['target_ratio']}x the local kernel's "
                 f"({res['results'][0]['threads'] if res['results'] else '-'} kernel threads, transport "
                 f"{res['results'][0]['transport'] if res['results'] else '-'})")
    return "\n".join(lines)


def format_callgrind(res: dict[str, Any]) -> str:
    """The human-readable report of :func:`callgrind`'s result."""
    if res.get("skipped"):
        return f"flexemr bench serverpool --callgrind: skipped: {res['skipped']}"
    cfg = res["config"]
    lines = [(f"instructions per pooled row under callgrind (server process, every thread, over "
              f"{cfg['batches']} timed requests; tables of {cfg['callgrind_rows']:,} rows)"), ""]
    for r in res["results"]:
        kir = "-" if r["kernel_instructions_per_row"] is None else f"{r['kernel_instructions_per_row']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"  {r['shape']:<9} server {r['server_instructions_per_row']:8.1f} instr/row   kernel (fxk_run) "
                     f"{kir:>7} instr/row   ratio {ratio}")
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m flexemr.bench serverpool``."""
    d = ServerPoolConfig()
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--callgrind", action="store_true",
                   help="count the server's instructions per pooled row under valgrind instead (slow: minutes)")
    add_config_arguments(p, d, {"pooling": "mean ids per sample and table (Poisson), compare shape",
                                "criteo_tables": "tables of the criteo shape", "criteo_rows": "rows per criteo table",
                                "criteo_dim": "dimension of the criteo tables",
                                "inflight": "requests outstanding at a time",
                                "pool_slots": "slots of the pooling channel (the ranker's pool_slots)",
                                "pool_slot_kb": "slot size of the pooling channel in KiB (the ranker's pool_slot_size)",
                                "shapes": f"comma-separated shapes to run ({', '.join(SHAPES)})",
                                "callgrind_rows": "rows per table under --callgrind"})


def main(args: argparse.Namespace) -> int:
    """Run with parsed arguments; prints a table (or, with ``--json``, the whole result as one JSON object)."""
    cfg = config_from_args(ServerPoolConfig, args)
    _shapes(cfg)
    if args.callgrind:
        res = callgrind(cfg)
        print(json.dumps(res, indent=2) if args.json else format_callgrind(res), flush=True)
        return 0
    res = measure(cfg)
    print(json.dumps(res, indent=2) if args.json else format_table(res), flush=True)
    return 0
