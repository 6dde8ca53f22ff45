"""``flexemr demo``: a DLRM served end to end on disaggregated embeddings, no configuration.

What it does:

1. builds the 26 Criteo-Kaggle-shaped tables (:func:`flexemr.apps.dlrm.criteo_specs`,
   scaled to ~128 MiB unless ``--scale`` says otherwise) and the DLRM;
2. starts ``--servers`` embedding servers, each in its own process on
   loopback (:class:`~flexemr.LocalCluster`, transport ``auto``: verbs when an
   RDMA device is up, else tcp);
3. generates a request stream with the calibrated workload generator
   (:func:`flexemr.apps.trace.generate_trace`);
4. ranks it per *configuration* of the lookup techniques (the table
   :data:`CONFIGURATIONS`), checking CTRs of a sample of every batch against
   the local reference model; the configurations run ``--rounds`` (3) times
   in turn, each round for at most ``--seconds`` / ``--rounds``, and each is
   reported by its median run (on a machine shared with other jobs, load
   swings between configurations otherwise decide the comparison: with the
   model taking ~80% of a batch's time on two cores, the best
   configurations lie within that noise of each other);
5. prints a table and writes ``report.json``, ``report.png`` and
   ``report.svg`` (:func:`flexemr.apps.report.plot_configurations`: throughput,
   bytes per sample and p50/p99 latency per configuration, with a caption
   saying what each turns on, how many batches it ran, and why it is slower
   than a simpler configuration where it is) to ``--out``.

Techniques and how each maps to :class:`~flexemr.EmbeddingClient` (the
:data:`TECHNIQUES` table).  Support is detected from the fields of
:class:`~flexemr.ClientOptions` and the client's methods, so a build without
a technique shows it as "n/a" and a build that adds it is picked up without
editing this file:

============  =======================================  ==========================================
technique     on                                       off
============  =======================================  ==========================================
coalescing    ``lookup_jagged`` (dedup, merged reads,   one rdmaio read per id (the naive path)
              one request per server)
cache         ``cache_bytes=--cache-mb MiB``            ``cache_bytes=0``
pooling       ``server_pooling=True``                   ``server_pooling=False``
prefetch      ``client.prefetch(batches, depth=1)``     sequential: look up, then run the model
============  =======================================  ==========================================

``--model torchrec`` runs TorchRec's DLRM instead (:mod:`flexemr.apps.torch_demo`,
the ``torch`` extra): servers holding its EmbeddingBagCollection's weights,
the model with that EBC swapped for a remote one, CTRs checked against the
same model run locally; rows ``torchrec local`` and ``torchrec remote``.

The process cleans up after itself: every server is stopped and the
cluster's temporary directory removed when the demo ends, fails or is
stopped by SIGINT (Ctrl-C, exit code 130) or SIGTERM (143); servers also exit
by themselves when the demo process dies (they watch their stdin).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..client.client import EmbeddingClient
from ..client.options import ClientOptions
from ..core.errors import ConfigError, FlexEMRError
from .blas import add_option as add_blas_option
from .blas import limit_threads
from .cli_support import blocking_section, check_range, run_interruptible
from .cluster import LocalCluster
from .dlrm import DLRM, ReferenceTables, auto_scale, criteo_specs
from .progress import Bars, as_callback
from .progress import add_option as add_progress_option
from .rank import Ranker, format_results
from .report import cost_notes, plot_configurations, require_matplotlib
from .trace import generate_trace
from .workload import PROFILE_2022

__all__ = ["CONFIGURATIONS", "TECHNIQUES", "Configuration", "Support", "Technique", "configure", "detect_support",
           "main", "run_demo", "usage_note"]

#: Largest CTR difference from the local reference accepted (float32 sums in another order).
MAX_ABS_ERR = 1e-4


# ------------------------------------------------------------ techniques


@dataclass(frozen=True)
class Technique:
    """One lookup technique: the :class:`EmbeddingClient` keyword or method that switches it."""

    key: str
    option: str | None          # keyword argument of EmbeddingClient (None: none)
    method: str | None          # method of EmbeddingClient that provides it (None: none)
    what: str                   # one line for the report


#: The techniques the demo measures, in column order.
TECHNIQUES: tuple[Technique, ...] = (
    Technique("coalescing", "coalesce_window_us", None,
              "dedup + merged reads, one request per server per batch (off: one rdmaio read per id)"),
    Technique("cache", "cache_bytes", None, "ranker-side row cache for hot rows"),
    Technique("pooling", "server_pooling", None, "servers sum their rows of each bag (hierarchical pooling)"),
    Technique("prefetch", "prefetch", "prefetch", "lookups of the next batch overlap the model"),
)


@dataclass(frozen=True)
class Configuration:
    """A named set of techniques switched on (the others off)."""

    name: str
    on: frozenset[str]


def _cfg(name: str, *on: str) -> Configuration:
    return Configuration(name, frozenset(on))


#: What the demo runs: the baseline, coalescing, each further technique on top of it, everything.
CONFIGURATIONS: tuple[Configuration, ...] = (
    _cfg("baseline (all off)"),
    _cfg("coalescing", "coalescing"),
    _cfg("coalescing+cache", "coalescing", "cache"),
    _cfg("coalescing+pooling", "coalescing", "pooling"),
    _cfg("coalescing+prefetch", "coalescing", "prefetch"),
    _cfg("all on", "coalescing", "cache", "pooling", "prefetch"),
)


@dataclass(frozen=True)
class Support:
    """Whether this build has a technique, and the client keyword values that turn it on and off."""

    available: bool
    on: dict[str, Any]
    off: dict[str, Any]
    how: str


def _switch_value(default: Any, annotation: Any, on: bool, amount: int) -> Any:
    """The value of an option (its ``default``, its ``annotation``) that switches its technique on/off."""
    if isinstance(default, bool):
        return on
    if isinstance(default, int):
        return amount if on else 0
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
    if choices or isinstance(default, str):
        prefer = ("on", "always", "auto", "server", "true", "yes") if on else ("off", "never", "none", "false", "no")
        for p in prefer:
            if p in choices:
                return p
        return prefer[0]
    return amount if on else None


def detect_support(options_cls: type[Any] = ClientOptions, client_cls: type[Any] = EmbeddingClient, *,
                   cache_bytes: int = 32 << 20) -> dict[str, Support]:
    """Which :data:`TECHNIQUES` a build has, and the options switching each (see module docstring).

    Options are the fields of the dataclass ``options_cls``
    (:class:`~flexemr.ClientOptions`), methods those of ``client_cls``.
    """
    options = {f.name: f for f in dataclasses.fields(options_cls)}
    try:  # resolves string annotations (``from __future__ import annotations``) such as Literal[...] aliases
        hints = typing.get_type_hints(options_cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
        hints = {}
    out: dict[str, Support] = {}
    for t in TECHNIQUES:
        if t.key == "coalescing":
            out[t.key] = Support(True, {}, {}, "EmbeddingClient.lookup_jagged vs one rdmaio read per id")
            continue
        amount = cache_bytes if t.key == "cache" else 1
        opt = options.get(t.option) if t.option else None
        has_method = bool(t.method) and callable(getattr(client_cls, t.method or "", None))
        if opt is not None and t.option:
            default = None if opt.default is dataclasses.MISSING else opt.default
            ann = hints.get(opt.name, opt.type)
            out[t.key] = Support(True, {t.option: _switch_value(default, ann, True, amount)},
                                 {t.option: _switch_value(default, ann, False, amount)},
                                 f"EmbeddingClient({t.option}=...)")
        elif has_method:
            out[t.key] = Support(True, {}, {}, f"EmbeddingClient.{t.method}()")
        else:
            out[t.key] = Support(False, {}, {}, "not available in this build")
    return out


# ------------------------------------------------------------------ running


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr demo`` (every one has a default)."""
    p.add_argument("--servers", type=int, default=2, help="embedding server processes (default 2)")
    p.add_argument("--batches", type=int, default=200,
                   help="timed batches per configuration (default 200)")
    p.add_argument("--batch-size", type=int, default=512, help="samples per batch (default 512)")
    p.add_argument("--pooling", type=float, default=8.0, help="mean ids per sample and table (default 8)")
    p.add_argument("--seconds", type=float, default=6.0,
                   help="at most this long per configuration, its rounds together (each round SECONDS / ROUNDS); "
                        "at least one batch runs per round (default 6)")
    p.add_argument("--scale", type=float, default=None,
                   help="table rows = Criteo Kaggle cardinality x SCALE (default: all tables ~128 MiB)")
    p.add_argument("--dim", type=int, default=16, choices=[16, 32, 64], help="embedding dimension (default 16)")
    p.add_argument("--cache-mb", type=float, default=8.0, help="row cache budget where available (default 8)")
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "verbs"],
                   help="auto: verbs when an RDMA device is up, else tcp")
    p.add_argument("--seed", type=int, default=0, help="seed of tables, model weights and requests")
    p.add_argument("--check-samples", type=int, default=32, help="samples per batch checked against the reference")
    p.add_argument("--out", default=".", help="directory for report.json and report.png (default: cwd)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this configuration (repeatable); names as printed")
    p.add_argument("--rounds", type=int, default=3,
                   help="run the configurations this many times in turn and report each one's median run "
                        "(default 3): on a machine shared with other jobs, load swings between configurations "
                        "otherwise decide the comparison")
    add_progress_option(p)
    add_blas_option(p)
    p.add_argument("--model", choices=["numpy", "torchrec"], default="numpy",
                   help="numpy: flexemr's DLRM, every technique (default); torchrec: TorchRec's DLRM with its "
                        "EmbeddingBagCollection served remotely (needs the torch extra: make torch)")


def _say(msg: str) -> None:
    print(f"flexemr demo: {msg}", flush=True)


async def run_demo(args: argparse.Namespace, *, client_cls: type = EmbeddingClient,
                   options_cls: type = ClientOptions) -> dict[str, Any]:
    """Run the demo (module docstring); returns the report dict (also written to ``--out``).

    ``client_cls`` / ``options_cls``: the client and its options dataclass
    (another build's, in tests); :func:`detect_support` reads which techniques they have.
    """
    check_range("--servers", args.servers, 1, 64)
    check_range("--batches", args.batches, 1)
    check_range("--batch-size", args.batch_size, 1)
    check_range("--pooling", args.pooling, above=0)
    check_range("--seconds", args.seconds, above=0)
    check_range("--scale", args.scale, above=0)
    check_range("--cache-mb", args.cache_mb, 0)
    check_range("--check-samples", args.check_samples, 0)
    rounds = getattr(args, "rounds", 1)
    check_range("--rounds", rounds, 1)
    check_range("--blas-threads", getattr(args, "blas_threads", 0), 0)
    if getattr(args, "blas_threads", 0):
        limit_threads(args.blas_threads)
    require_matplotlib()
    if getattr(args, "model", "numpy") == "torchrec":
        return await _run_torchrec(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_begin = time.perf_counter()
    scale = args.scale if args.scale is not None else auto_scale(args.dim)
    specs = criteo_specs(scale, args.dim)
    table_bytes = sum(s.nbytes for s in specs)
    with blocking_section():
        model = DLRM(specs, seed=args.seed)
    configs = [c for c in CONFIGURATIONS if not args.only or c.name in args.only]
    if not configs:
        raise ConfigError(f"--only matches no configuration; names: {[c.name for c in CONFIGURATIONS]}")
    support = detect_support(options_cls, client_cls, cache_bytes=int(args.cache_mb * (1 << 20)))
    with blocking_section():
        batches = generate_trace(specs, args.batches + 1, args.batch_size, args.pooling, seed=args.seed)
    ids_per_batch = float(np.mean([len(b.sparse) for b in batches]))
    _say(f"{len(specs)} Criteo-shaped tables x dim {args.dim} (scale {scale:g}: "
         f"{sum(s.num_rows for s in specs):,} rows, {table_bytes / (1 << 20):.0f} MiB), {model}")
    _say(f"workload: {args.batches} batches x {args.batch_size} samples x ~{args.pooling:g} ids/table "
         f"({ids_per_batch:,.0f} ids/batch, calibrated to Meta's 2022 DLRM traces)")
    bars = Bars.from_args(args)
    rows: list[dict[str, Any]] = []
    reference = ReferenceTables(specs, args.seed)
    async with LocalCluster(specs, servers=args.servers, seed=args.seed, transport=args.transport) as cluster:
        pids = " ".join(str(p) for p in cluster.pids.values())
        all_off: dict[str, Any] = {k: v for s in support.values() for k, v in s.off.items()}
        probe = client_cls(cluster.config, transport=args.transport, **all_off)
        async with probe:
            transport = probe.engine.transport
        _say(f"{args.servers} embedding servers ready (pids {pids}), {transport} transport, "
             f"started in {time.perf_counter() - t_begin:.1f} s")
        runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
        # the reference CTRs of the checked samples, computed once before the runs (Ranker.prepare_reference) and
        # shared by them: computed in every run's timed loop (~6 ms per batch on the event loop's thread) they
        # slowed every configuration and kept the lookups that run ahead from overlapping the model
        reference_ctrs: dict[int, Any] = {}
        for rnd in range(rounds):
            for cfg in configs:
                if rnd and not runs[cfg.name][0]["available"]:
                    continue
                runs[cfg.name].append(await _run_configuration(cfg, args, support, cluster, client_cls, model,
                                                               reference, reference_ctrs, batches, bars,
                                                               f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""))
        for cfg in configs:  # the median run of each (by samples/s), with every run's samples/s
            done = sorted(runs[cfg.name], key=lambda r: r.get("samples_per_s") or 0.0)
            row = done[len(done) // 2]
            if rounds > 1 and row["available"]:
                row["rounds_samples_per_s"] = [r.get("samples_per_s") for r in runs[cfg.name]]
            rows.append(row)
    ran = [r for r in rows if r.get("batches")]
    worst = max((r["max_abs_err"] for r in ran if r.get("max_abs_err") is not None), default=None)
    refused = [r["name"] for r in rows if r.get("note", "") and "refused" in str(r.get("note"))]
    checked = args.check_samples > 0
    passed = bool(ran) and not refused and (not checked or (worst is not None and worst <= MAX_ABS_ERR))
    on = {c.name: c.on for c in configs}
    notes = cost_notes(rows, on)
    for r in rows:
        used = usage_note(r.get("usage") or {}, on.get(r["name"], frozenset()))
        r["usage_note"] = used or None
        if r["name"] in notes and used:  # what the client did with the techniques says why
            notes[r["name"]] += f" ({used})"
        r["cost_note"] = notes.get(r["name"])
    report: dict[str, Any] = {
        "flexemr_demo": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "transport": transport,
        "servers": args.servers,
        "tables": {"count": len(specs), "dim": args.dim, "scale": scale, "rows": sum(s.num_rows for s in specs),
                   "bytes": table_bytes, "num_rows": {s.name: s.num_rows for s in specs}},
        "model": {"repr": repr(model), "parameters": model.num_parameters, "seed": args.seed},
        "workload": {"batches": args.batches, "batch_size": args.batch_size, "pooling_factor": args.pooling,
                     "ids_per_batch": ids_per_batch, "profile": PROFILE_2022.to_dict(),
                     "seconds_per_configuration": args.seconds, "rounds": rounds},
        "techniques": {t.key: {"available": support[t.key].available, "how": support[t.key].how,
                               "on": support[t.key].on, "off": support[t.key].off, "what": t.what}
                       for t in TECHNIQUES},
        "configurations": rows,
        "check": {"samples_per_batch": args.check_samples, "max_abs_err": worst, "tolerance": MAX_ABS_ERR,
                  "skipped": not checked, "refused": refused, "passed": passed},
        "elapsed_s": time.perf_counter() - t_begin,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    captions = {c.name: " + ".join(t.key for t in TECHNIQUES if t.key in c.on) or "every technique off"
                for c in configs}
    footer = ["", *(f"{t.key}: {t.what}" for t in TECHNIQUES)]
    figures = plot_configurations(out_dir / "report.png",
                                  f"flexemr demo: DLRM, 26 Criteo-shaped tables on {args.servers} servers "
                                  f"({transport}), batches of {args.batch_size} samples", rows, captions, notes,
                                  footer=footer)
    report["files"] = {"json": str(out_dir / "report.json"), "png": str(figures[0]), "svg": str(figures[1])}
    return report


async def _run_configuration(cfg: Configuration, args: argparse.Namespace, support: Mapping[str, Support],
                             cluster: LocalCluster, client_cls: type, model: DLRM, reference: ReferenceTables,
                             reference_ctrs: dict[int, Any], batches: list[Any], bars: Bars,
                             label: str) -> dict[str, Any]:
    """One run of one configuration: its report row."""
    marks = {t.key: ("on" if t.key in cfg.on else "off") if support[t.key].available else "n/a"
             for t in TECHNIQUES}
    row: dict[str, Any] = {"name": cfg.name, "techniques": marks, "available": True, "note": None}
    missing = [k for k in cfg.on if not support[k].available]
    if missing:
        row.update(available=False, note=f"n/a ({', '.join(sorted(missing))} not available in this build)")
        return row
    options: dict[str, Any] = {}
    for t in TECHNIQUES:
        s = support[t.key]
        options.update(s.on if t.key in cfg.on else s.off)
    row["client_options"] = options
    try:
        client = client_cls(cluster.config, transport=args.transport, **options)
    except (FlexEMRError, TypeError, ValueError) as exc:
        row.update(available=False, note=f"n/a (client refused {options}: {exc})")
        return row
    async with client:
        prefetch = "prefetch" in cfg.on
        ranker = Ranker(model, client, naive="coalescing" not in cfg.on, prefetch=1 if prefetch else 0,
                        reference=reference, check_samples=args.check_samples, reference_ctrs=reference_ctrs,
                        client_prefetch=prefetch and callable(getattr(client, "prefetch", None)))
        ranker.prepare_reference(batches)   # once: the next runs share reference_ctrs
        with bars.bar(desc=cfg.name, unit="batch", delay=0) as bar:
            res = await ranker.run(batches, name=cfg.name, seconds=args.seconds / getattr(args, "rounds", 1),
                                    progress=as_callback(bar))
    row.update(res.to_dict())
    row["usage"] = _usage(client)
    _say(f"{cfg.name}{label}: {res.samples_per_s:,.0f} samples/s over {res.batches} batches")
    return row


def _usage(client: Any) -> dict[str, Any]:
    """What the client did with each technique over a run (warm-up included): the lookups that probed the
    cache or bypassed it (by measured time), the rows servers pooled, the batches looked up ahead."""
    m = getattr(client, "metrics", None)
    out: dict[str, Any] = {}
    for k in ("lookups", "cache_hits", "cache_misses", "pooled_rows", "local_pooled_rows", "prefetched_batches"):
        v = getattr(m, k, None)
        if isinstance(v, int):
            out[k] = v
    choice = getattr(getattr(client, "_pooler", None), "cache_cost", None)
    if getattr(client, "cache", None) is not None and choice is not None:
        out["cache_bypassed_lookups"] = int(getattr(choice, "bypassed", 0))
        out["cache_trials"] = int(getattr(choice, "trials", 0))
        out["cache_switches"] = int(getattr(choice, "switches", 0))
    return out


def usage_note(usage: Mapping[str, Any], on: frozenset[str]) -> str:
    """One line saying how a configuration's client used its techniques (``usage``: :func:`_usage`'s dict).

    >>> usage_note({"lookups": 51, "cache_bypassed_lookups": 4, "cache_trials": 1, "cache_switches": 0,
    ...             "pooled_rows": 10, "local_pooled_rows": 990}, frozenset({"cache", "pooling"}))
    'cache probed in 47 of 51 lookups (4 bypassed it: 1 trial, measured slower than the cache); servers pooled 1% of rows'
    """
    parts = []
    n = int(usage.get("lookups", 0))
    if "cache" in on and "cache_bypassed_lookups" in usage and n:
        by, trials, sw = usage["cache_bypassed_lookups"], usage.get("cache_trials", 0), usage.get("cache_switches", 0)
        why = ("measured faster: the client stepped aside from the cache" if sw
               else "measured slower than the cache")
        parts.append(f"cache probed in {n - by} of {n} lookups"
                     + (f" ({by} bypassed it: {trials} trial{'s' if trials != 1 else ''}, {why})" if by else ""))
    if "pooling" in on:
        pooled, local = int(usage.get("pooled_rows", 0)), int(usage.get("local_pooled_rows", 0))
        if pooled + local:
            parts.append(f"servers pooled {100 * pooled / (pooled + local):.0f}% of rows")
    return "; ".join(parts)


async def _run_torchrec(args: argparse.Namespace) -> dict[str, Any]:
    """``--model torchrec``: the demo's tables and requests through :func:`flexemr.apps.torch_demo.run_dlrm`."""
    with blocking_section():
        from . import torch_demo  # torch (and then torchrec): a DependencyError names the install steps
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_begin = time.perf_counter()
    scale = args.scale if args.scale is not None else auto_scale(args.dim)
    specs = criteo_specs(scale, args.dim)
    with blocking_section():
        batches = generate_trace(specs, args.batches + 1, args.batch_size, args.pooling, seed=args.seed)
    _say(f"{len(specs)} Criteo-shaped tables x dim {args.dim} (scale {scale:g}: {sum(s.num_rows for s in specs):,} "
         f"rows, {sum(s.nbytes for s in specs) / (1 << 20):.0f} MiB) in a TorchRec EmbeddingBagCollection, "
         f"TorchRec's DLRM; {args.batches} batches x {args.batch_size} samples x ~{args.pooling:g} ids/table")
    bars = Bars.from_args(args)
    current: list[Any] = []          # the bar of the model that runs now

    def done() -> None:
        while current:
            current.pop().close()

    def bar(name: str) -> Callable[[int, int], None]:
        done()
        current.append(bars.bar(desc=name, unit="batch", delay=0))
        return as_callback(current[0])

    def say(message: str) -> None:   # a finished model's line replaces its bar
        done()
        _say(message)

    try:
        res = await torch_demo.run_dlrm(specs, [(b.dense, b.sparse) for b in batches], servers=args.servers,
                                        transport=args.transport, seed=args.seed, seconds=args.seconds,
                                        check_samples=args.check_samples, say=say, progress=bar)
    finally:
        done()
    support = detect_support()
    on = {torch_demo.LOCAL: frozenset(), torch_demo.REMOTE: frozenset({"coalescing", "pooling"})}
    rows = res["rows"]
    for r in rows:
        r["techniques"] = {t.key: ("on" if t.key in on[r["name"]] else "off") if r["name"] == torch_demo.REMOTE
                           else "-" for t in TECHNIQUES}
        r["available"], r["note"], r["cost_note"] = True, None, None
    remote = next(r for r in rows if r["name"] == torch_demo.REMOTE)
    checked = args.check_samples > 0
    err = remote["max_abs_err"]
    passed = bool(remote["batches"]) and (not checked or (err is not None and err <= MAX_ABS_ERR))
    report: dict[str, Any] = {
        "flexemr_demo": 1, "model_kind": "torchrec",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "transport": res["transport"], "servers": args.servers, "server_pids": res["pids"],
        "tables": {"count": len(specs), "dim": args.dim, "scale": scale, "rows": sum(s.num_rows for s in specs),
                   "bytes": sum(s.nbytes for s in specs), "num_rows": {s.name: s.num_rows for s in specs}},
        "model": {**res["model"], "seed": args.seed},
        "workload": {"batches": args.batches, "batch_size": args.batch_size, "pooling_factor": args.pooling,
                     "profile": PROFILE_2022.to_dict(), "seconds_per_configuration": args.seconds},
        "techniques": {t.key: {"available": support[t.key].available, "how": support[t.key].how,
                               "on": support[t.key].on, "off": support[t.key].off, "what": t.what}
                       for t in TECHNIQUES},
        "configurations": rows,
        "check": {"samples_per_batch": args.check_samples, "max_abs_err": err, "tolerance": MAX_ABS_ERR,
                  "skipped": not checked, "refused": [], "passed": passed,
                  "against": "the same TorchRec model with its local EmbeddingBagCollection"},
        "elapsed_s": time.perf_counter() - t_begin,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    figures = plot_configurations(out_dir / "report.png",
                                  f"flexemr demo --model torchrec: TorchRec's DLRM, 26 Criteo-shaped tables on "
                                  f"{args.servers} servers ({res['transport']}), batches of {args.batch_size} samples",
                                  rows, {torch_demo.LOCAL: "the EmbeddingBagCollection in this process (reference)",
                                         torch_demo.REMOTE: "RemoteEmbeddingBagCollection: coalescing + pooling"},
                                  {})
    report["files"] = {"json": str(out_dir / "report.json"), "png": str(figures[0]), "svg": str(figures[1])}
    return report


def print_report(report: Mapping[str, Any]) -> None:
    """The human-readable summary of a demo report."""
    print()
    print(format_results(report["configurations"], [t.key for t in TECHNIQUES]))
    print()
    for t in TECHNIQUES:
        info = report["techniques"][t.key]
        print(f"  {t.key:<11} {info['how'] if info['available'] else 'n/a: ' + info['how']} - {t.what}")
    used = [(r["name"], r["usage_note"]) for r in report["configurations"] if r.get("usage_note")]
    if used:
        print("\nhow each configuration's client used its techniques (decided by measured time):")
        for name, note in used:
            print(f"  {name}: {note}")
    notes = [(r["name"], r["cost_note"]) for r in report["configurations"] if r.get("cost_note")]
    if notes:
        print("\nwhere a technique costs more than it saves on this machine:")
        for name, note in notes:
            print(f"  {name}: {note}")
    chk = report["check"]
    err = chk["max_abs_err"]
    verdict = "OK" if chk["passed"] else "FAILED"
    if chk["skipped"]:
        print(f"\nCTR check skipped (--check-samples 0) - {verdict}")
    else:
        print(f"\nCTR check against {chk.get('against', 'the local reference model')} "
              f"({chk['samples_per_batch']} samples per batch): "
              f"max abs error {'none measured' if err is None else format(err, '.1e')} - {verdict}")
    if chk["refused"]:
        print(f"configurations the client refused: {', '.join(chk['refused'])} - FAILED")
    files = report["files"]
    print(f"wrote {files['json']}, {files['png']} and {files['svg']} ({report['elapsed_s']:.0f} s in all)")


def main(args: argparse.Namespace) -> int:
    """``flexemr demo``: exit code 0 when every check passed, 1 otherwise (130/143 on SIGINT/SIGTERM)."""
    report = run_interruptible(lambda: run_demo(args))
    print_report(report)
    return 0 if report["check"]["passed"] else 1
