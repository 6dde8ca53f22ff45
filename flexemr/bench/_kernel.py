"""``python -m flexemr.bench kernel [--json] [--callgrind]``: the native pooling kernel, locally.

Workload: the one of ``flexemr bench compare`` (:mod:`flexemr.bench._compare`),
built the same way: :func:`flexemr.apps.workload.generate` with
:data:`~flexemr.apps.workload.PROFILE_2022`, ``--tables`` (8) float32 tables of
``--rows`` (500,000) rows x ``--dim`` (64) from
:func:`flexemr.core.init.build_model`, batches of ``--batch`` (2048) samples with
Poisson bags of mean ``--pooling`` (32) ids per table, ``sum`` pooling.
Every path runs locally on the same in-memory tables and batches and is
checked against ``numpy`` before it is timed:

``numpy``
    ``pool(model[t][ids], offsets)`` per table, as ``compare``'s ``local``
    path: ``np.take`` materialises every row, then ``reduceat`` (one thread
    whatever ``--threads``);
``native``
    :func:`flexemr.core.kernel.pool_many` over all tables in one call: rows
    read in place, ``threads`` threads;
``torchrec``
    TorchRec's inference ``EmbeddingBagCollection`` (FBGEMM's table-batched
    kernel) on the CPU, built and fed as ``compare``'s ``torchrec`` path
    (:mod:`flexemr.bench._peers`), ``torch.set_num_threads(threads)``;
    skipped with the reason when torchrec is not installed (``make torch``).

Timing: ``--repeats`` (5) rounds; in every round each path answers
``--warmup`` (2) warm-up batches, then ``--batches`` (5) timed batches, each
timed on its own (the paths take turns, so a burst of load on this shared
machine hits them alike).  Reported: the median per-batch time, samples/s
and rows/s (ids, duplicates included) from it, and the ratio of samples/s to
torchrec at the same thread count.  Run once with ``--threads`` (2) threads
and once with 1.  ``overhead`` gives the per-call cost of small calls.

``--callgrind`` instead counts instructions per pooled row under
``valgrind --tool=callgrind`` (repeatable on a noisy machine): for one batch
of the same workload (tables of ``--callgrind-rows`` rows: an instruction
count does not depend on the table size), one thread, only inside the kernel
(``--toggle-collect`` on ``fxk_run``, resp. FBGEMM's CPU forward
``int_nbit_split_embedding_codegen_forward_unweighted_cpu``): the median of
3 calls after a warm-up call (FBGEMM generates its kernel on the first).  A
call of a marker function after every call makes callgrind dump the counts
of each call separately (``--dump-before``).
Slow: a few minutes (importing torch under valgrind dominates).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.init import build_model
from ..core.jagged import JaggedBatch
from .._native._flexemr_kernel import ffi, lib
from ..core.spec import TableSpec
from ..apps.workload import PROFILE_2022, generate
from ..core import kernel
from . import _peers
from ._args import add_config_arguments, config_from_args
from ._compare import _local
from ._peers import Model, Pooled, check_pooled

__all__ = ["HELP", "PATHS", "KernelConfig", "callgrind", "configure", "format_table", "main", "measure"]

HELP = "native pooling kernel vs numpy and TorchRec/FBGEMM on the compare workload, locally (samples/s; --callgrind)"
#: Paths, in report order.
PATHS = ("numpy", "native", _peers.TORCHREC)
#: FBGEMM's CPU forward of the table-batched kernel that TorchRec's inference EBC calls (callgrind mode).
FBGEMM_FORWARD = "int_nbit_split_embedding_codegen_forward_unweighted_cpu*"
#: Called between two kernel calls under callgrind (``--dump-before``): a plain C name, no wildcard.
MARKER = "fxk_pool_size"

Runner = Callable[[JaggedBatch], Pooled]


@dataclass(frozen=True)
class KernelConfig:
    """Parameters of one run (see the module docstring)."""

    tables: int = 8
    rows: int = 500_000
    dim: int = 64
    batch: int = 2048
    pooling: float = 32.0
    warmup: int = 2
    batches: int = 5
    repeats: int = 5
    threads: int = 2
    seed: int = 0
    torchrec: bool = True
    isa: str = "auto"
    callgrind_rows: int = 20_000


# --------------------------------------------------------------------------- #
# paths


def _native(model: Model, threads: int) -> Runner:
    def run(jb: JaggedBatch) -> Pooled:
        jobs = [kernel.PoolJob(model[t], jb.ids(t), jb.bag_offsets(t)) for t in jb.keys]
        return dict(zip(jb.keys, kernel.pool_many(jobs, threads)))

    return run


def _torchrec(model: Model) -> tuple[Runner | None, str]:
    """(runner, note) of TorchRec's inference EBC on ``model``, or (None, why it cannot run)."""
    missing = _peers.torchrec_missing()
    if missing:
        return None, missing
    try:
        import torch
        import torchrec
        from torchrec import KeyedJaggedTensor

        module, kernel_name = _peers._torchrec_module(model)
    except Exception as exc:  # a broken install is an environment problem, not a bench failure
        return None, f"torchrec unusable: {type(exc).__name__}: {exc}"

    def run(jb: JaggedBatch) -> Pooled:
        # torchrec asks torch.fx whether it is tracing, which logs a deprecation notice once
        with torch.inference_mode(), _peers._quiet_logger("torch.fx._symbolic_trace"):
            kjt = KeyedJaggedTensor(keys=list(jb.keys), values=torch.from_numpy(jb.values.copy()),
                                    lengths=torch.from_numpy(jb.lengths.copy()))
            return {t: v.numpy() for t, v in module(kjt).to_dict().items()}

    return run, f"torchrec {torchrec.__version__}, {kernel_name}, FP32"


def _set_torch_threads(n: int) -> None:
    if _peers.torchrec_missing() is None:
        import torch

        torch.set_num_threads(n)


# --------------------------------------------------------------------------- #
# timing


@dataclass
class _Timed:
    """Per-batch seconds of one path at one thread count."""

    path: str
    threads: int
    seconds: list[float]
    note: str = ""
    skipped: str | None = None


def _time_paths(runners: dict[str, Runner], threads: int, warm: Sequence[JaggedBatch],
                timed: Sequence[JaggedBatch], repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            _set_torch_threads(threads)
            for jb in warm:
                run(jb)
            for jb in timed:
                t0 = time.perf_counter()
                run(jb)
                out[name].append(time.perf_counter() - t0)
    return out


def _median_us(f: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def overhead(dim: int = 64) -> dict[str, float]:
    """Per-call costs of small calls, in microseconds (medians).

    ``pool_1``: :func:`~flexemr.core.kernel.pool` of one bag of one id
    (argument checks, the native call); ``pool_many_8``: 8 such jobs in one
    :func:`~flexemr.core.kernel.pool_many`; ``native_8``: the bare native
    call of those 8 jobs (``fxk_run``, no Python checks); ``parallel``: what
    splitting a small call (1024 ids of ``dim``) over 2 threads adds to it
    (waking a worker, waiting for it), measured with the inline threshold
    lifted; ``inline_work``: the threshold (ids x dim) below which calls run
    on the caller's thread only.
    """
    table = np.ones((1000, dim), np.float32)
    ids, offs = np.array([3], np.int64), np.array([0, 1], np.int64)
    out = np.empty((1, dim), np.float32)
    jobs = [kernel.PoolJob(table, ids, offs, out=out) for _ in range(8)]
    res = {
        "pool_1": _median_us(lambda: kernel.pool(table, ids, offs, out=out, threads=1), 2000),
        "pool_many_8": _median_us(lambda: kernel.pool_many(jobs, threads=1), 1000),
    }
    arr = ffi.new("fxk_job[]", 8)
    for i in range(8):
        j = arr[i]
        j.rows, j.row_stride, j.num_rows, j.dim = ffi.cast("void *", table.ctypes.data), table.strides[0], 1000, dim
        j.dtype, j.mode, j.ids, j.id_bytes, j.n_ids = lib.FXK_F32, lib.FXK_SUM, ffi.cast("void *", ids.ctypes.data), 8, 1
        j.offsets, j.num_bags = ffi.cast("int64_t *", offs.ctypes.data), 1
        j.out, j.out_stride = ffi.cast("void *", out.ctypes.data), out.strides[0]
    res["native_8"] = _median_us(lambda: lib.fxk_run(arr, 8, 1), 5000)
    big_ids = np.random.default_rng(0).integers(0, 1000, 1024)
    big_offs = np.arange(0, 1025, 32)
    inline = int(lib.fxk_inline_work())
    lib.fxk_set_inline_work(0)
    try:
        one = _median_us(lambda: kernel.pool(table, big_ids, big_offs, threads=1), 500)
        two = _median_us(lambda: kernel.pool(table, big_ids, big_offs, threads=2), 500)
    finally:
        lib.fxk_set_inline_work(inline)
    res.update({"small_call_1_thread": one, "small_call_2_threads": two, "parallel": two - one,
                "inline_work": float(inline)})
    return res


def measure(cfg: KernelConfig) -> dict[str, Any]:
    """Run every path on the same batches; returns a JSON-able dict (``results``: one entry per path and thread count)."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    if cfg.isa != "auto":
        kernel.set_isa(cfg.isa)
    specs = [TableSpec(f"t{i:02d}", cfg.rows, cfg.dim, "float32") for i in range(cfg.tables)]
    stream = [generate(specs, cfg.batch, cfg.pooling, PROFILE_2022, seed=s) for s in range(cfg.warmup + cfg.batches)]
    warm, timed = stream[: cfg.warmup], stream[cfg.warmup:]
    model = build_model(specs, cfg.seed)
    ref = _local(model, timed[0])

    torchrec_run, torchrec_note = _torchrec(model) if cfg.torchrec else (None, "disabled (--no-torchrec)")
    results: list[_Timed] = []
    for threads in dict.fromkeys((cfg.threads, 1)):
        runners: dict[str, Runner] = {"numpy": lambda jb: _local(model, jb), "native": _native(model, threads)}
        if torchrec_run is not None:
            runners[_peers.TORCHREC] = torchrec_run
        for name, run in runners.items():
            _set_torch_threads(threads)
            check_pooled(f"{name} (threads={threads})", run(timed[0]), ref)
        times = _time_paths(runners, threads, warm, timed, cfg.repeats)
        notes = {"numpy": "np.take + np.add.reduceat per table (1 thread)",
                 "native": f"flexemr.core.kernel.pool_many, {kernel.isa()} code path",
                 _peers.TORCHREC: torchrec_note}
        for name in PATHS:
            if name in times:
                results.append(_Timed(name, threads, times[name], notes[name]))
            else:
                results.append(_Timed(name, threads, [], skipped=torchrec_note))

    ids_per_batch = float(np.mean([len(jb) for jb in timed]))
    rows: list[dict[str, Any]] = []
    for r in results:
        med = statistics.median(r.seconds) if r.seconds else None
        rows.append({
            "path": r.path, "threads": r.threads,
            "samples_per_s": cfg.batch / med if med else None,
            "rows_per_s": ids_per_batch / med if med else None,
            "batch_ms_median": med * 1e3 if med else None,
            "batch_ms_min": min(r.seconds) * 1e3 if r.seconds else None,
            "timed_batches": len(r.seconds), "verified": bool(r.seconds), "skipped": r.skipped, "note": r.note,
        })
    for row in rows:
        peer = next((p for p in rows if p["path"] == _peers.TORCHREC and p["threads"] == row["threads"]), None)
        ok = peer is not None and peer["samples_per_s"] and row["samples_per_s"]
        row["vs_torchrec"] = row["samples_per_s"] / peer["samples_per_s"] if ok and peer else None
    return {
        "config": asdict(cfg),
        "workload": {"profile": "PROFILE_2022", "pooling_mode": "sum", "bags": "poisson",
                     "ids_per_batch": ids_per_batch, "ids_per_sample": ids_per_batch / cfg.batch,
                     "row_bytes": cfg.dim * 4, "table_mb": cfg.rows * cfg.dim * 4 / 1e6},
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "numpy": np.__version__, "platform": platform.platform(), "isa": kernel.isa(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "overhead_us": overhead(cfg.dim),
        "wall_s": time.perf_counter() - t_start,
        "results": rows,
    }


# --------------------------------------------------------------------------- #
# callgrind


def _callgrind_child(argv: Sequence[str]) -> None:
    """Under valgrind: ``PATH ROWS TABLES DIM BATCH POOLING SEED CALLS``; one warm-up call, then CALLS calls.

    A call of :data:`MARKER` follows every call: valgrind dumps the counts
    before each, so every dump holds exactly one call.
    """
    path, rows, tables, dim, batch, pooling, seed, calls = argv
    specs = [TableSpec(f"t{i:02d}", int(rows), int(dim), "float32") for i in range(int(tables))]
    jb = generate(specs, int(batch), float(pooling), PROFILE_2022, seed=int(seed))
    model: Model = {s.name: np.zeros((s.num_rows, s.dim), np.float32) for s in specs}  # values do not matter
    if path == "fbgemm":
        run, note = _torchrec(model)
        if run is None:
            raise SystemExit(note)
        _set_torch_threads(1)
    else:
        kernel.set_isa(path.split("-", 1)[1])
        run = _native(model, 1)
    for _ in range(int(calls) + 1):
        run(jb)
        lib.fxk_pool_size()  # MARKER
    print(json.dumps({"ids": len(jb)}))


def _dump_counts(prefix: str) -> list[int]:
    """Ir of each callgrind dump ``prefix.1``, ``prefix.2``, ... then of the final ``prefix``, in order."""
    def total(path: str) -> int:
        with open(path) as f:
            for line in f:
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
        raise RuntimeError(f"no totals in {path}")

    parts = sorted(glob.glob(prefix + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    return [total(p) for p in parts] + [total(prefix)]


def callgrind(cfg: KernelConfig, paths: Sequence[str] | None = None) -> dict[str, Any]:
    """Instructions per pooled row of each path under callgrind (module docstring); JSON-able."""
    valgrind = shutil.which("valgrind")
    res: dict[str, Any] = {"config": asdict(cfg), "results": []}
    if valgrind is None:
        res["skipped"] = "valgrind not installed (apt-get install valgrind)"
        return res
    if paths is None:
        paths = []
        current = kernel.isa()
        for isa in ("avx2", "baseline"):
            try:
                kernel.set_isa(isa)
                paths.append(f"native-{isa}")
            except InputError:  # not on this CPU
                pass
        kernel.set_isa(current)
        paths.append("fbgemm")
    calls = 3
    for path in paths:
        entry: dict[str, Any] = {"path": path}
        if path == "fbgemm" and (not cfg.torchrec or _peers.torchrec_missing()):
            entry["skipped"] = "disabled (--no-torchrec)" if not cfg.torchrec else _peers.torchrec_missing()
            res["results"].append(entry)
            continue
        fn = FBGEMM_FORWARD if path == "fbgemm" else "fxk_run"
        with tempfile.TemporaryDirectory(prefix="flexemr-cg-") as tmp:
            out = os.path.join(tmp, "cg.out")
            args = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", f"--toggle-collect={fn}",
                    f"--dump-before={MARKER}", sys.executable, "-c",
                    "import sys; from flexemr.bench._kernel import _callgrind_child; _callgrind_child(sys.argv[1:])",
                    path, str(cfg.callgrind_rows), str(cfg.tables), str(cfg.dim), str(cfg.batch), str(cfg.pooling),
                    str(cfg.seed), str(calls)]
            t0 = time.perf_counter()
            proc = subprocess.run(args, capture_output=True, text=True)
            if proc.returncode != 0:
                entry["skipped"] = f"valgrind run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
                res["results"].append(entry)
                continue
            ids = int(json.loads(proc.stdout.strip().splitlines()[-1])["ids"])
            counts = _dump_counts(out)
        # dump k holds call k (the first: the warm-up call); the final file what follows the last marker
        if len(counts) != calls + 2:
            entry["skipped"] = f"expected {calls + 2} callgrind dumps, got {len(counts)}"
            res["results"].append(entry)
            continue
        timed = counts[1:calls + 1]
        per_call = statistics.median(timed)
        entry.update({"instructions_per_row": per_call / ids, "instructions_per_batch": per_call, "ids": ids,
                      "calls": timed, "warmup_call": counts[0], "valgrind_s": time.perf_counter() - t0})
        res["results"].append(entry)
    return res


# --------------------------------------------------------------------------- #
# report


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def format_table(res: dict[str, Any]) -> str:
    """The human-readable report of :func:`measure`'s result."""
    cfg, wl, mach = res["config"], res["workload"], res["machine"]
    lines = [
        (f"flexemr bench kernel: {cfg['tables']} tables x {cfg['rows']:,} rows x {cfg['dim']} float32 "
         f"({wl['table_mb']:.0f} MB each), local; native code path {mach['isa']}"),
        (f"workload: PROFILE_2022, batch {cfg['batch']}, Poisson bags of mean {cfg['pooling']:g} "
         f"({wl['ids_per_sample']:.1f} ids/sample), sum pooling; {cfg['repeats']} rounds x ({cfg['warmup']} warm-up + "
         f"{cfg['batches']} timed batches) per path; load avg {mach['loadavg_start'][0]:.2f} -> "
         f"{mach['loadavg_end'][0]:.2f}; wall {res['wall_s']:.0f} s"),
        "",
        f"{'threads':>7}  {'path':<9}{'samples/s':>11}{'rows/s':>10}{'batch ms':>10}{'min ms':>8}{'vs torchrec':>13}  note",
    ]
    for r in res["results"]:
        if r["skipped"]:
            lines.append(f"{r['threads']:>7}  {r['path']:<9}  skipped: {r['skipped']}")
            continue
        vs = "-" if r["vs_torchrec"] is None else f"{r['vs_torchrec']:.2f}x"
        lines.append(f"{r['threads']:>7}  {r['path']:<9}{_rate(r['samples_per_s']):>11}{_rate(r['rows_per_s']):>10}"
                     f"{r['batch_ms_median']:>10.2f}{r['batch_ms_min']:>8.2f}{vs:>13}  {r['note']}")
    o = res["overhead_us"]
    lines += ["", (f"per-call overhead (us, medians): pool() of 1 id {o['pool_1']:.1f}; pool_many() of 8 such jobs "
                   f"{o['pool_many_8']:.1f}; bare native call of 8 jobs {o['native_8']:.2f}; 2 threads on a call of "
                   f"1024 ids {o['parallel']:+.1f} ({o['small_call_1_thread']:.0f} -> {o['small_call_2_threads']:.0f}), "
                   f"so calls below {o['inline_work']:,.0f} ids x dim run inline")]
    return "\n".join(lines)


def format_callgrind(res: dict[str, Any]) -> str:
    """The human-readable report of :func:`callgrind`'s result."""
    cfg = res["config"]
    if res.get("skipped"):
        return f"flexemr bench kernel --callgrind: skipped: {res['skipped']}"
    lines = [(f"instructions per pooled row (callgrind, 1 thread, one batch of the compare workload: "
              f"{cfg['tables']} tables x {cfg['callgrind_rows']:,} rows x {cfg['dim']} float32, batch "
              f"{cfg['batch']}, mean pooling {cfg['pooling']:g}; counted inside the kernel only)"), ""]
    for r in res["results"]:
        if r.get("skipped"):
            lines.append(f"  {r['path']:<16} skipped: {r['skipped']}")
        else:
            lines.append(f"  {r['path']:<16} {r['instructions_per_row']:7.2f} instr/row   "
                         f"({r['instructions_per_batch'] / 1e6:.2f} M per batch of {r['ids']:,} ids)")
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m flexemr.bench kernel``."""
    d = KernelConfig()
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--callgrind", action="store_true",
                   help="count instructions per pooled row under valgrind instead of timing (slow: minutes)")
    add_config_arguments(p, d, {"rows": f"rows per table (default {d.rows:,})", "batch": "samples per batch",
                                "pooling": "mean ids per sample and table (Poisson)",
                                "warmup": "warm-up batches per path and round", "batches": "timed batches per round",
                                "repeats": "rounds", "threads": "threads of native and torchrec (also run with 1)",
                                "torchrec": "skip the TorchRec peer",
                                "isa": "code path of native: auto (from the CPU), avx2 or baseline",
                                "callgrind_rows": "rows per table under --callgrind"})


def main(args: argparse.Namespace) -> int:
    """Run with parsed arguments; prints a table (or, with ``--json``, the whole result as one JSON object)."""
    if args.batches < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("kernel: --batches, --repeats and --threads must be >= 1, --warmup >= 0")
    cfg = config_from_args(KernelConfig, args)
    if cfg.isa != "auto":
        try:
            kernel.set_isa(cfg.isa)
        except InputError as exc:
            raise SystemExit(f"kernel: --isa: {exc}") from None
    if args.callgrind:
        res = callgrind(cfg)
        print(json.dumps(res, indent=2) if args.json else format_callgrind(res), flush=True)
        return 0
    res = measure(cfg)
    print(json.dumps(res, indent=2) if args.json else format_table(res), flush=True)
    return 0
