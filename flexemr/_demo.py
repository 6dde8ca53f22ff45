"""``flexemr demo``: a DLRM served end to end on disaggregated embeddings, no configuration.

What it does:

1. builds the 26 Criteo-Kaggle-shaped tables (:func:`flexemr._dlrm.criteo_specs`,
   scaled to ~128 MiB unless ``--scale`` says otherwise) and the DLRM;
2. starts ``--servers`` embedding servers, each in its own process on
   loopback (:class:`~flexemr.LocalCluster`, transport ``auto``: verbs when an
   RDMA device is up, else tcp);
3. generates a request stream with the calibrated workload generator
   (:func:`flexemr._trace.generate_trace`);
4. ranks it once per *configuration* of the lookup techniques (the table
   :data:`CONFIGURATIONS`), checking CTRs of a sample of every batch against
   the local reference model;
5. prints a table and writes ``report.json`` and ``report.png`` (a bar chart,
   encoded by the small PNG writer below) to ``--out``.

Techniques and how each maps to :class:`~flexemr.EmbeddingClient` (the
:data:`TECHNIQUES` table).  Support is detected from the client's signature
and methods, so a build without a technique shows it as "n/a" and a build
that adds it is picked up without editing this file:

============  =======================================  ==========================================
technique     on                                       off
============  =======================================  ==========================================
coalescing    ``lookup_jagged`` (dedup, merged reads,   one rdmaio read per id (the naive path)
              one request per server)
cache         ``cache_bytes=--cache-mb MiB``            ``cache_bytes=0``
pooling       ``server_pooling=True``                   ``server_pooling=False``
prefetch      ``client.prefetch(batches, depth=1)``     sequential: look up, then run the model
============  =======================================  ==========================================

The process cleans up after itself: every server is stopped when the demo
ends, fails or is interrupted (Ctrl-C: exit code 130); servers also exit
by themselves when the demo process dies (they watch their stdin).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import struct
import sys
import time
import typing
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ._client import EmbeddingClient
from ._cluster import LocalCluster
from ._dlrm import DLRM, ReferenceTables, auto_scale, criteo_specs
from ._errors import ConfigError, FlexEMRError
from ._rank import Ranker, format_results
from ._trace import generate_trace
from ._workload import PROFILE_2022

__all__ = ["CONFIGURATIONS", "TECHNIQUES", "Configuration", "Support", "Technique", "bar_chart_png", "configure",
           "detect_support", "main", "run_demo", "write_png"]

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


def _switch_value(param: inspect.Parameter, annotation: Any, on: bool, amount: int) -> Any:
    """The value of keyword ``param`` that switches its technique on/off (by its default's type or ``Literal``)."""
    default = param.default
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


def detect_support(client_cls: type[Any] = EmbeddingClient, *, cache_bytes: int = 32 << 20) -> dict[str, Support]:
    """Which :data:`TECHNIQUES` ``client_cls`` has, and the keywords switching each (see module docstring)."""
    params = inspect.signature(client_cls).parameters
    try:  # resolves string annotations (``from __future__ import annotations``) such as Literal[...] aliases
        hints = typing.get_type_hints(client_cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
        hints = {}
    out: dict[str, Support] = {}
    for t in TECHNIQUES:
        if t.key == "coalescing":
            out[t.key] = Support(True, {}, {}, "EmbeddingClient.lookup_jagged vs one rdmaio read per id")
            continue
        amount = cache_bytes if t.key == "cache" else 1
        opt = params.get(t.option) if t.option else None
        has_method = bool(t.method) and callable(getattr(client_cls, t.method or "", None))
        if opt is not None and t.option:
            ann = hints.get(opt.name, opt.annotation)
            out[t.key] = Support(True, {t.option: _switch_value(opt, ann, True, amount)},
                                 {t.option: _switch_value(opt, ann, False, amount)},
                                 f"EmbeddingClient({t.option}=...)")
        elif has_method:
            out[t.key] = Support(True, {}, {}, f"EmbeddingClient.{t.method}()")
        else:
            out[t.key] = Support(False, {}, {}, "not available in this build")
    return out


# ------------------------------------------------------------- progress


class _Progress:
    """A one-line text progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.label = ""
        self._last = 0.0

    def update(self, done: int, total: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1 and done < total:
            return
        self._last = now
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r  [{'#' * fill}{'.' * (width - fill)}] {self.label:<24} {done}/{total} batches ")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()


# -------------------------------------------------------------------- PNG


def write_png(path: str | os.PathLike[str], rgb: npt.NDArray[np.uint8]) -> Path:
    """Write an ``[h, w, 3]`` uint8 image as a PNG (8-bit RGB, no filtering, zlib level 9)."""
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an [h, w, 3] image, got {img.shape}")
    h, w = img.shape[:2]
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)       # filter type 0 (None) per scanline
    raw[:, 1:] = img.reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)     # 8-bit, truecolour, deflate, no filter, no interlace
    out = Path(path)
    out.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
                    + chunk(b"IEND", b""))
    return out


# 5x7 glyphs: 7 rows of 5 bits (bit 4 = leftmost column), after the HD44780 character ROM.
_GLYPHS: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11), "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E), "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F), "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F), "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E), "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11), "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11), "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D), "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E), "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A), "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04), "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 0x0C, 0x0C), ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0), "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "-": (0, 0, 0, 0x1F, 0, 0, 0), "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08), ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03), "_": (0, 0, 0, 0, 0, 0, 0x1F),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0), "|": (0x04,) * 7,
}
_BITS = np.array([16, 8, 4, 2, 1], dtype=np.uint8)


def _text(img: npt.NDArray[np.uint8], x: int, y: int, s: str, color: tuple[int, int, int], scale: int = 2) -> int:
    """Draw ``s`` with its top-left corner at ``(x, y)``; returns the x after the text."""
    for ch in s.upper():
        rows = np.array(_GLYPHS.get(ch, _GLYPHS[" "]), dtype=np.uint8)
        mask = np.kron((rows[:, None] & _BITS[None, :]) > 0, np.ones((scale, scale), dtype=bool))
        h, w = mask.shape
        sub = img[y : y + h, x : x + w]
        sub[mask[: sub.shape[0], : sub.shape[1]]] = color
        x += 6 * scale
    return x


def _human(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def bar_chart_png(path: str | os.PathLike[str], title: str, labels: Sequence[str],
                  panels: Sequence[tuple[str, Sequence[float | None]]]) -> Path:
    """A horizontal bar chart: one panel per ``(heading, values)``, one bar per label (``None``: "n/a")."""
    scale, row_h, pad = 2, 24, 16
    label_w = 12 * max([len(s) for s in labels] + [10]) + pad
    bar_w, value_w = 360, 110
    width = pad + label_w + bar_w + value_w
    height = pad + 30 + sum(30 + row_h * len(labels) + pad for _ in panels)
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    ink, grey = (20, 20, 20), (150, 150, 150)
    colors = [(52, 101, 164), (204, 102, 0)]
    _text(img, pad, pad, title, ink, scale)
    y = pad + 30
    for p, (heading, values) in enumerate(panels):
        _text(img, pad, y, heading, ink, scale)
        y += 30
        present = [v for v in values if v is not None]
        vmax = max(present) if present and max(present) > 0 else 1.0
        for label, v in zip(labels, values):
            _text(img, pad, y + 5, label, ink, scale)
            x0 = pad + label_w
            img[y : y + row_h - 4, x0 - 2 : x0] = grey                       # axis
            if v is None:
                _text(img, x0 + 6, y + 5, "n/a", grey, scale)
            else:
                n = max(1, int(round(bar_w * v / vmax))) if v > 0 else 0
                img[y + 2 : y + row_h - 6, x0 : x0 + n] = colors[p % len(colors)]
                _text(img, x0 + n + 6, y + 5, _human(v), ink, scale)
            y += row_h
        y += pad
    return write_png(path, img)


# ------------------------------------------------------------------ running


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flexemr demo`` (every one has a default)."""
    p.add_argument("--servers", type=int, default=2, help="embedding server processes (default 2)")
    p.add_argument("--batches", type=int, default=50, help="timed batches per configuration (default 50)")
    p.add_argument("--batch-size", type=int, default=512, help="samples per batch (default 512)")
    p.add_argument("--pooling", type=float, default=8.0, help="mean ids per sample and table (default 8)")
    p.add_argument("--seconds", type=float, default=6.0,
                   help="at most this long per configuration; at least one batch runs (default 6)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _say(msg: str) -> None:
    print(f"flexemr demo: {msg}", flush=True)


async def run_demo(args: argparse.Namespace, *, client_cls: type = EmbeddingClient) -> dict[str, Any]:
    """Run the demo (module docstring); returns the report dict (also written to ``--out``)."""
    for name, val, lo in (("--servers", args.servers, 1), ("--batches", args.batches, 1),
                          ("--batch-size", args.batch_size, 1)):
        if val < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {val}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_begin = time.perf_counter()
    scale = args.scale if args.scale is not None else auto_scale(args.dim)
    specs = criteo_specs(scale, args.dim)
    table_bytes = sum(s.nbytes for s in specs)
    model = DLRM(specs, seed=args.seed)
    configs = [c for c in CONFIGURATIONS if not args.only or c.name in args.only]
    if not configs:
        raise ConfigError(f"--only matches no configuration; names: {[c.name for c in CONFIGURATIONS]}")
    support = detect_support(client_cls, cache_bytes=int(args.cache_mb * (1 << 20)))
    batches = generate_trace(specs, args.batches + 1, args.batch_size, args.pooling, seed=args.seed)
    ids_per_batch = float(np.mean([len(b.sparse) for b in batches]))
    _say(f"{len(specs)} Criteo-shaped tables x dim {args.dim} (scale {scale:g}: "
         f"{sum(s.num_rows for s in specs):,} rows, {table_bytes / (1 << 20):.0f} MiB), {model}")
    _say(f"workload: {args.batches} batches x {args.batch_size} samples x ~{args.pooling:g} ids/table "
         f"({ids_per_batch:,.0f} ids/batch, calibrated to Meta's 2022 DLRM traces)")
    progress = _Progress(not args.no_progress)
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
        for cfg in configs:
            marks = {t.key: ("on" if t.key in cfg.on else "off") if support[t.key].available else "n/a"
                     for t in TECHNIQUES}
            row: dict[str, Any] = {"name": cfg.name, "techniques": marks, "available": True, "note": None}
            missing = [k for k in cfg.on if not support[k].available]
            if missing:
                row.update(available=False, note=f"n/a ({', '.join(sorted(missing))} not available in this build)")
                rows.append(row)
                continue
            options: dict[str, Any] = {}
            for t in TECHNIQUES:
                s = support[t.key]
                options.update(s.on if t.key in cfg.on else s.off)
            row["client_options"] = options
            progress.label = cfg.name
            try:
                client = client_cls(cluster.config, transport=args.transport, **options)
            except (FlexEMRError, TypeError, ValueError) as exc:
                row.update(available=False, note=f"n/a (client refused {options}: {exc})")
                rows.append(row)
                continue
            async with client:
                prefetch = "prefetch" in cfg.on
                ranker = Ranker(model, client, naive="coalescing" not in cfg.on, prefetch=1 if prefetch else 0,
                                reference=reference, check_samples=args.check_samples,
                                client_prefetch=prefetch and callable(getattr(client, "prefetch", None)))
                res = await ranker.run(batches, name=cfg.name, seconds=args.seconds, progress=progress.update)
            progress.clear()
            row.update(res.to_dict())
            rows.append(row)
            _say(f"{cfg.name}: {res.samples_per_s:,.0f} samples/s over {res.batches} batches")
    ran = [r for r in rows if r.get("batches")]
    worst = max((r["max_abs_err"] for r in ran if r.get("max_abs_err") is not None), default=None)
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
                     "seconds_per_configuration": args.seconds},
        "techniques": {t.key: {"available": support[t.key].available, "how": support[t.key].how,
                               "on": support[t.key].on, "off": support[t.key].off, "what": t.what}
                       for t in TECHNIQUES},
        "configurations": rows,
        "check": {"samples_per_batch": args.check_samples, "max_abs_err": worst, "tolerance": MAX_ABS_ERR,
                  "passed": worst is None or worst <= MAX_ABS_ERR},
        "elapsed_s": time.perf_counter() - t_begin,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    labels = [r["name"] for r in rows]
    bar_chart_png(out_dir / "report.png", f"flexemr demo: DLRM on {args.servers} servers ({transport})", labels, [
        ("samples/s (higher is better)", [r["samples_per_s"] if r.get("batches") else None for r in rows]),
        ("network bytes/sample (lower is better)",
         [r["bytes_per_sample"] if r.get("batches") else None for r in rows]),
    ])
    report["files"] = {"json": str(out_dir / "report.json"), "png": str(out_dir / "report.png")}
    return report


def print_report(report: Mapping[str, Any]) -> None:
    """The human-readable summary of a demo report."""
    print()
    print(format_results(report["configurations"], [t.key for t in TECHNIQUES]))
    print()
    for t in TECHNIQUES:
        info = report["techniques"][t.key]
        print(f"  {t.key:<11} {info['how'] if info['available'] else 'n/a: ' + info['how']} - {t.what}")
    chk = report["check"]
    err = chk["max_abs_err"]
    verdict = "OK" if chk["passed"] else "FAILED"
    print(f"\nCTR check against the local reference model ({chk['samples_per_batch']} samples per batch): "
          f"max abs error {err if err is None else format(err, '.1e')} - {verdict}")
    print(f"wrote {report['files']['json']} and {report['files']['png']} "
          f"({report['elapsed_s']:.0f} s in all)")


def main(args: argparse.Namespace, *, run: Callable[..., Any] = rdmaio.run) -> int:
    """``flexemr demo``: exit code 0 when every check passed, 1 otherwise (130 on Ctrl-C)."""
    report = run(run_demo(args))
    print_report(report)
    return 0 if report["check"]["passed"] else 1
