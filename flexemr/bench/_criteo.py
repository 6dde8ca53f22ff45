"""``python -m flexemr.bench criteo [--json]``: lines/s of the Criteo reader, beside plain pyarrow in the same run.

Input: ``--file`` (a Criteo TSV, compressed TSV or Parquet file) or, by default,
``--lines`` (1,000,000) synthetic samples written by
:func:`flexemr.apps.criteo.write_sample` to a temporary directory as TSV and
as Parquet (removed afterwards).  Each path reads the whole file ``--repeat``
(3) times, in rounds (every path once, then again: a change of load weighs on
every path alike); the best run counts (wall time), its CPU time (all threads
of the process) is reported too.  Paths, per format:

``pyarrow.csv.open_csv`` / ``pyarrow.csv.read_csv``
    plain pyarrow on the same TSV: the streaming reader, and the multithreaded
    whole-file reader, tab-separated, column types inferred -- what reading
    costs before anything is checked or converted;
``pyarrow.parquet``
    ``ParquetFile.iter_batches`` over every Criteo column;
``read_criteo``
    :func:`~flexemr.apps.criteo.read_criteo`: every field checked, converted
    to labels, integers and categorical values;
``read_criteo + jagged``
    the same in batches of ``--batch-size`` (8192) samples, each hashed into a
    :class:`~flexemr.JaggedBatch` for the 26 Criteo Kaggle tables -- what
    ``flexemr rank --criteo`` does, and the figure of the target
    (>= 1,000,000 lines/s on TSV);
``baseline: FILE``
    with ``--baseline FILE`` (TSV only): ``parse(data: bytes, first_line=...)``
    from that Python file, called on 8 MiB blocks of whole lines as
    ``read_criteo`` called its parser before it read through pyarrow -- e.g.
    ``--baseline tests/flexemr/_criteo_oracle.py``, the numpy parser kept as
    the tests' oracle, for the old-versus-new figure.

Every path's lines/s is also given over plain pyarrow's in the same run
(``vs_plain``: over ``pyarrow.csv.read_csv`` for TSV, ``pyarrow.parquet``
for Parquet), and the target's entry holds ``read_criteo + jagged``'s
lines/s and that ratio.  The load average before and after the run is
printed with the results: the figures are the machine's, whatever else ran
on it meanwhile.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..apps.cli_support import check_range
from ..apps.criteo import criteo_format, read_criteo, write_sample
from ..apps.criteo_columns import arrow, field_names
from ..apps.dlrm import criteo_specs
from ..apps.progress import Bars, as_callback
from ..apps.progress import add_option as add_progress_option
from ..core.errors import ConfigError

__all__ = ["BASELINE_BLOCK", "HELP", "PLAIN", "TARGET_LINES_PER_S", "CriteoBenchConfig", "configure", "format_table",
           "load_baseline", "main", "measure"]

HELP = "Criteo reader: lines/s of read_criteo (+ hashing into JaggedBatches) beside plain pyarrow.csv/parquet"
#: lines/s that read_criteo + jagged should reach on TSV
TARGET_LINES_PER_S = 1_000_000


@dataclass(frozen=True)
class CriteoBenchConfig:
    """Parameters of one run (see the module docstring)."""

    lines: int = 1_000_000
    batch_size: int = 8192
    repeat: int = 3
    file: str | None = None
    seed: int = 0
    baseline: str | None = None


def _timed(run: Callable[[], int], repeat: int) -> dict[str, float]:
    """Best of ``repeat`` calls of ``run`` (which returns the lines it read): lines/s by wall and by CPU time."""
    best: tuple[float, float, int] | None = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        n = run()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu, n)
    assert best is not None
    wall, cpu, n = best
    return {"lines": n, "seconds": wall, "lines_per_s": n / wall if wall > 0 else 0.0,
            "cpu_seconds": cpu, "lines_per_cpu_s": n / cpu if cpu > 0 else 0.0}


#: the plain pyarrow path that each format's "vs plain" ratio divides by
PLAIN = {"tsv": "pyarrow.csv.read_csv", "parquet": "pyarrow.parquet"}


#: bytes per call of the baseline parser (what read_criteo read per chunk before pyarrow)
BASELINE_BLOCK = 8 << 20


def load_baseline(file: str) -> Callable[..., Any]:
    """``parse`` of the Python file ``file`` (``--baseline``); :class:`~flexemr.ConfigError` when it has none."""
    if not os.path.isfile(file):
        raise ConfigError(f"--baseline {file}: no such file")
    spec = importlib.util.spec_from_file_location("_flexemr_criteo_baseline", file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--baseline {file}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = getattr(module, "parse", None)
    if not callable(parse):
        raise ConfigError(f"--baseline {file}: defines no parse(data: bytes, first_line=...) function")
    return parse  # type: ignore[no-any-return]


def _baseline_run(path: str, parse: Callable[..., Any]) -> Callable[[], int]:
    """Read ``path`` (a TSV file, decompressed by pyarrow as read_criteo does) in blocks of whole lines and call
    ``parse`` on each: the lines parsed."""
    from ..apps.criteo import _open_tsv

    def run() -> int:
        stream, raw = _open_tsv(path)
        n, rest = 0, b""
        try:
            while True:
                block = stream.read(BASELINE_BLOCK)
                data = rest + block
                if not block:
                    cut = len(data)
                else:
                    cut = data.rfind(b"\n") + 1
                if cut:
                    n += len(parse(data[:cut], first_line=n + 1)["labels"])
                rest = data[cut:]
                if not block:
                    return n
        finally:
            stream.close()
            raw.close()

    return run


def _paths(path: str, cfg: CriteoBenchConfig) -> dict[str, Callable[[], int]]:
    arrow()                                       # pyarrow, or the one-line error naming the extra
    specs = criteo_specs(1.0)

    def records() -> int:
        return sum(len(r) for r in read_criteo(path))

    def jagged() -> int:
        n = 0
        for r in read_criteo(path, batch_size=cfg.batch_size):
            r.jagged(specs)
            n += len(r)
        return n

    if criteo_format(path) == "parquet":
        import pyarrow.parquet as pq

        def parquet() -> int:
            return sum(b.num_rows for b in pq.ParquetFile(path).iter_batches(columns=field_names(True)))

        return {"pyarrow.parquet": parquet, "read_criteo": records, "read_criteo + jagged": jagged}
    import pyarrow.csv as pacsv

    options = {"read_options": pacsv.ReadOptions(column_names=field_names(True)),
               "parse_options": pacsv.ParseOptions(delimiter="\t")}

    def open_csv() -> int:
        with pacsv.open_csv(path, **options) as reader:
            return sum(b.num_rows for b in reader)

    def read_csv() -> int:
        return int(pacsv.read_csv(path, **options).num_rows)

    paths = {"pyarrow.csv.open_csv": open_csv, "pyarrow.csv.read_csv": read_csv, "read_criteo": records,
             "read_criteo + jagged": jagged}
    if cfg.baseline is not None:
        paths[f"baseline: {os.path.basename(cfg.baseline)}"] = _baseline_run(path, load_baseline(cfg.baseline))
    return paths


def measure(cfg: CriteoBenchConfig, bars: Bars | None = None) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able dict (``results``: one entry per format and path)."""
    bars = bars or Bars(False)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flexemr-criteo-bench-") as tmp:
        if cfg.baseline is not None:
            load_baseline(cfg.baseline)             # a bad --baseline fails before any file is written
        if cfg.file is not None:
            if not os.path.isfile(cfg.file):
                raise ConfigError(f"--file {cfg.file}: no such file")
            files = [cfg.file]
        else:
            files = []
            for name in ("criteo.tsv", "criteo.parquet"):
                with bars.bar(desc=f"writing {name}", unit="sample", unit_scale=True) as bar:
                    files.append(str(write_sample(Path(tmp) / name, cfg.lines, seed=cfg.seed,
                                                  progress=as_callback(bar))))
        results: list[dict[str, Any]] = []
        for path in files:
            paths = _paths(path, cfg)
            best: dict[str, dict[str, float]] = {}
            fmt = criteo_format(path)
            with bars.bar(desc=fmt, total=cfg.repeat * len(paths), unit="run") as bar:
                # round after round of every path, not every run of one path then the next: a change of the
                # machine's load during the run weighs on every path alike, so the ratios within a run hold
                for _ in range(cfg.repeat):
                    for name, run in paths.items():
                        bar.set_description_str(f"{fmt}: {name}")
                        res = _timed(run, 1)
                        if name not in best or res["seconds"] < best[name]["seconds"]:
                            best[name] = res
                        bar.update(1)
            results += [{"format": fmt, "path": name, "file_bytes": os.path.getsize(path), **best[name]}
                        for name in paths]
    jagged_tsv = [float(r["lines_per_s"]) for r in results
                  if r["format"] == "tsv" and r["path"] == "read_criteo + jagged"]
    plain = {r["format"]: float(r["lines_per_s"]) for r in results if r["path"] == PLAIN[r["format"]]}
    for r in results:                 # lines/s over plain pyarrow's (read_csv; parquet: iter_batches) in this run
        base = plain.get(r["format"], 0.0)
        r["vs_plain"] = float(r["lines_per_s"]) / base if base > 0 else None
    vs_plain = [r["vs_plain"] for r in results if r["format"] == "tsv" and r["path"] == "read_criteo + jagged"]
    return {
        "config": asdict(cfg),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "pyarrow": arrow().__version__, "loadavg_before": list(load_before),
                    "loadavg_after": list(os.getloadavg())},
        "wall_s": time.perf_counter() - t_start,
        "results": results,
        "target": {"lines_per_s": TARGET_LINES_PER_S, "path": "read_criteo + jagged (TSV)",
                   "met": bool(jagged_tsv) and max(jagged_tsv) >= TARGET_LINES_PER_S,
                   "measured_lines_per_s": max(jagged_tsv) if jagged_tsv else None,
                   "vs_plain_read_csv": vs_plain[0] if vs_plain else None},
    }


def format_table(res: dict[str, Any]) -> str:
    """The human-readable report of :func:`measure`'s result."""
    cfg, m = res["config"], res["machine"]
    src = cfg["file"] or f"{cfg['lines']:,} synthetic samples (write_sample, seed {cfg['seed']})"
    lines = [f"flexemr bench criteo: {src}; best of {cfg['repeat']} rounds; jagged batches of "
             f"{cfg['batch_size']} samples",
             f"machine: {m['cpus']} CPUs, pyarrow {m['pyarrow']}; load average {m['loadavg_before'][0]:.2f} before, "
             f"{m['loadavg_after'][0]:.2f} after; wall {res['wall_s']:.0f} s", "",
             f"{'format':<9}{'path':<32}{'lines/s':>12}{'lines/CPU-s':>13}{'vs plain':>10}"]
    for r in res["results"]:
        ratio = f"{r['vs_plain']:.2f}x" if r.get("vs_plain") is not None else "-"
        lines.append(f"{r['format']:<9}{r['path']:<32}{r['lines_per_s']:>12,.0f}{r['lines_per_cpu_s']:>13,.0f}"
                     f"{ratio:>10}")
    t = res["target"]
    lines += ["", f"target: {t['path']} >= {t['lines_per_s']:,} lines/s: {'met' if t['met'] else 'NOT met'}"]
    if t.get("vs_plain_read_csv") is not None:
        lines.append(f"read_criteo + jagged: {t['measured_lines_per_s']:,.0f} lines/s, {t['vs_plain_read_csv']:.2f}x "
                     f"the lines/s of {PLAIN['tsv']} in this run")
    rate = {(r["format"], r["path"]): r["lines_per_s"] for r in res["results"]}
    for (fmt, path), old in rate.items():
        if path.startswith("baseline: ") and old > 0:
            lines.append(f"{fmt}: read_criteo {rate[(fmt, 'read_criteo')] / old:.2f}x, read_criteo + jagged "
                         f"{rate[(fmt, 'read_criteo + jagged')] / old:.2f}x the lines/s of {path}")
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m flexemr.bench criteo``."""
    d = CriteoBenchConfig()
    p.add_argument("--lines", type=int, default=d.lines, help=f"synthetic samples to write (default {d.lines:,})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"samples per JaggedBatch (default {d.batch_size})")
    p.add_argument("--repeat", type=int, default=d.repeat, help=f"runs per path, the best counts (default {d.repeat})")
    p.add_argument("--file", help="measure this Criteo file (TSV, compressed TSV or Parquet) instead")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the synthetic samples (default 0)")
    p.add_argument("--baseline", metavar="FILE",
                   help="also time parse(data: bytes, first_line=...) from this Python file on the TSV, in 8 MiB "
                        "blocks (e.g. tests/flexemr/_criteo_oracle.py: the numpy parser used before pyarrow)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_progress_option(p)


def main(args: argparse.Namespace) -> int:
    """Run with parsed arguments; prints a table (or, with ``--json``, one JSON object)."""
    check_range("--lines", args.lines, 1)
    check_range("--batch-size", args.batch_size, 1)
    check_range("--repeat", args.repeat, 1)
    cfg = CriteoBenchConfig(args.lines, args.batch_size, args.repeat, args.file, args.seed, args.baseline)
    res = measure(cfg, Bars.from_args(args))
    print(json.dumps(res, indent=2) if args.json else format_table(res), flush=True)
    return 0
