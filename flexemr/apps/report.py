"""Figures of the demo and the benchmarks, drawn with matplotlib (the ``apps`` extra).

Every figure has one row per configuration (or benchmark path) and side by
side panels of horizontal bars -- throughput, network bytes per sample,
latency, and CPU where it was measured -- with labelled axes and units, the
value at the end of each bar ("n/a" where a row did not run), and a caption
under the panels.  Each is written as PNG and SVG.

* :func:`plot_configurations`: the demo (``report.png``): samples/s, KiB per
  sample, p50/p99 batch latency; the caption says what each configuration
  turns on and how many batches it ran, plus a note where a configuration is
  slower than a simpler one (:func:`cost_notes`);
* :func:`plot_compare`: ``flexemr bench compare --plot PATH``: the paths
  (local, naive, flexemr, peers) on a log scale of samples/s, bytes per
  sample, batch latency, and any ``cpu_*`` measurement the rows carry;
  skipped paths are listed with their reason;
* :func:`plot_locality`: ``flexemr bench locality --plot PATH``: the
  configurations' samples/s, bytes per sample (with the reduction against
  naive) and batch latency.

matplotlib is imported only when a figure is drawn, with the non-interactive
Agg backend (no display needed); ``import flexemr`` never imports it.
:func:`require_matplotlib` says, in one line, which extra installs it.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .extras import APPS_EXTRA, require

__all__ = ["APPS_EXTRA", "PLOT_HELP", "Panel", "check_plot_path", "cost_notes", "plot_compare", "plot_configurations",
           "plot_locality", "plot_panels", "require_matplotlib"]


def require_matplotlib() -> None:
    """:class:`~flexemr.ConfigError` (one line naming the ``apps`` extra) unless matplotlib can be imported."""
    require("matplotlib", "the report")


#: Help of the benchmarks' ``--plot`` option.
PLOT_HELP = ("also draw the results: PATH (.png) and the same name with .svg -- samples/s, bytes per sample, "
             "latency (needs matplotlib, the apps extra)")


def check_plot_path(path: str | os.PathLike[str], option: str = "--plot") -> Path:
    """``path`` for a figure to come (PNG, and SVG beside it), checked before a long run:
    :class:`~flexemr.ConfigError` (one line) when matplotlib is missing or the directory does not exist."""
    require("matplotlib", f"{option} (the figure)")
    out = Path(path)
    if not out.name or out.suffix.lower() not in ("", ".png", ".svg"):
        raise ConfigError(f"{option} {path}: give a file name ending in .png (the .svg is written beside it)")
    if not out.parent.resolve().is_dir():
        raise ConfigError(f"{option} {path}: directory {out.parent.resolve()} does not exist")
    return out.with_suffix(".png")


def _kb(row: Mapping[str, Any]) -> float:
    return float(row["bytes_per_sample"]) / 1024.0


def cost_notes(rows: Sequence[Mapping[str, Any]], on: Mapping[str, frozenset[str]]) -> dict[str, str]:
    """One note per configuration that is slower than the best configuration with a subset of its techniques.

    ``rows`` are result dicts (``name``, ``samples_per_s``, ``bytes_per_sample``,
    ``p50_ms``, ``batches``); ``on`` maps a configuration name to the techniques
    it turns on.  The note says by how much it is slower and what the added
    techniques changed in bytes and latency, i.e. what they cost and what they
    saved on this machine.

    >>> rows = [{"name": "a", "samples_per_s": 100.0, "bytes_per_sample": 4096, "p50_ms": 5.0, "batches": 9},
    ...         {"name": "a+b", "samples_per_s": 50.0, "bytes_per_sample": 1024, "p50_ms": 9.0, "batches": 9}]
    >>> cost_notes(rows, {"a": frozenset("a"), "a+b": frozenset("ab")})["a+b"]
    'slower than a (50 vs 100 samples/s): b cut KiB/sample 4.00 -> 1.00 but raised p50 5.0 -> 9.0 ms'
    """
    ran = [r for r in rows if r.get("batches") and r["name"] in on]
    notes: dict[str, str] = {}
    for r in ran:
        mine = on[r["name"]]
        simpler = [s for s in ran if on[s["name"]] < mine]
        if not simpler:
            continue
        best = max(simpler, key=lambda s: s["samples_per_s"])
        if r["samples_per_s"] >= best["samples_per_s"]:
            continue
        added = ", ".join(sorted(mine - on[best["name"]]))
        kb0, kb1 = _kb(best), _kb(r)
        bytes_part = (f"cut KiB/sample {kb0:.2f} -> {kb1:.2f}" if kb1 < kb0
                      else f"did not cut bytes (KiB/sample {kb0:.2f} -> {kb1:.2f})")
        lat0, lat1 = float(best["p50_ms"]), float(r["p50_ms"])
        lat_part = f"raised p50 {lat0:.1f} -> {lat1:.1f} ms" if lat1 > lat0 else f"p50 {lat0:.1f} -> {lat1:.1f} ms"
        joint = " but " if kb1 < kb0 else ", and "
        notes[r["name"]] = (f"slower than {best['name']} ({r['samples_per_s']:,.0f} vs "
                            f"{best['samples_per_s']:,.0f} samples/s): {added} {bytes_part}{joint}{lat_part}")
    return notes


@dataclass(frozen=True)
class Panel:
    """One panel: a heading, the unit of its axis, and one or more series of values (one per row;
    ``None`` where a row has none) with their legend labels."""

    heading: str
    unit: str
    series: Sequence[tuple[str, Sequence[float | None]]]
    log: bool = False                   # a log scale (for values spread over decades)
    fmt: str = "{:,.3g}"                # the label at the end of a bar


def _label(fmt: str, v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else fmt.format(v)


def plot_panels(path: str | os.PathLike[str], title: str, labels: Sequence[str], panels: Sequence[Panel],
                caption: Sequence[str] = ()) -> list[Path]:
    """Draw ``panels`` (one bar per row and series; rows named by ``labels``, top to bottom) with
    ``caption`` lines under them; write ``path`` (.png) and the same name with .svg.  Returns the files."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = len(labels)
    width = max(15.0, 4.6 * len(panels) + 1.5)
    lines = [wrapped for line in caption for wrapped in
             textwrap.wrap(line, int(width * 13), subsequent_indent="    ", break_on_hyphens=False) or [""]]
    panel_h = 0.6 * n + 1.4
    text_h = 0.155 * len(lines) + 0.25
    fig = plt.figure(figsize=(width, panel_h + text_h), dpi=110)
    subs: Any = fig.subfigures(2, 1, height_ratios=[panel_h, text_h])
    top, bottom = subs[0], subs[1]
    axes = top.subplots(1, len(panels), sharey=True, gridspec_kw={"wspace": 0.06}, squeeze=False)[0]
    top.subplots_adjust(left=0.14, right=0.99, top=1 - 0.75 / panel_h, bottom=0.55 / panel_h)
    ys = list(range(n))[::-1]
    colors = ["#3465a4", "#cc6600", "#4e9a06", "#75507b", "#c4a000"]
    for i, (ax, panel) in enumerate(zip(axes, panels)):
        h = 0.8 / len(panel.series)
        shown = [v for _, vals in panel.series for v in vals if v is not None and v > 0]
        if panel.log:
            ax.set_xscale("log")
        for k, (legend, vals) in enumerate(panel.series):
            pos = [y + (len(panel.series) - 1) * h / 2 - k * h for y in ys]
            floor = min(shown) / 3 if panel.log and shown else 0.0       # a bar must start somewhere on a log axis
            widths = [(v if v is not None and v > 0 else floor) for v in vals]
            bars = ax.barh(pos, [w - floor for w in widths], left=floor, height=h,
                           color=colors[(i + k) % len(colors)], label=legend)
            for b, v in zip(bars, vals):
                txt = "n/a" if v is None else _label(panel.fmt, v)
                ax.text(max(b.get_x() + b.get_width(), floor), b.get_y() + b.get_height() / 2, " " + txt,
                        va="center", fontsize=8)
        ax.set_title(panel.heading, fontsize=10)
        ax.set_xlabel(panel.unit + (" (log scale)" if panel.log else ""), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        if panel.log and shown:
            ax.set_xlim(min(shown) / 3, max(shown) * 4)
        else:
            ax.margins(x=0.2)
        if len(panel.series) > 1:
            ax.legend(fontsize=8, loc="lower right")
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels, fontsize=8)
    top.suptitle(title, fontsize=12, x=0.01, ha="left")
    bottom.text(0.01, 1.0, "\n".join(lines), fontsize=8, va="top", ha="left", family="monospace")
    out = Path(path)
    written = [out.with_suffix(".png"), out.with_suffix(".svg")]
    for f in written:
        fig.savefig(f)
    plt.close(fig)
    return written


def plot_configurations(path: str | os.PathLike[str], title: str, rows: Sequence[Mapping[str, Any]],
                        captions: Mapping[str, str] | None = None, notes: Mapping[str, str] | None = None,
                        *, footer: Sequence[str] = (), throughput_label: str = "samples/s") -> list[Path]:
    """The demo's figure: throughput, KiB per sample and p50/p99 batch latency of ``rows`` (result dicts
    with ``name``, ``batches``, ``samples_per_s``, ``bytes_per_sample``, ``p50_ms``, ``p99_ms``); write
    ``path`` (.png) and the same name with .svg.

    ``captions``: a short line per row name (what it turns on); ``notes``: a
    note per row name (:func:`cost_notes`); ``footer``: more caption lines
    (e.g. what each technique does).  Rows that did not run (no
    ``batches``) appear as "n/a".  Returns the files written.
    """
    captions = captions or {}
    notes = notes or {}
    names = [str(r["name"]) for r in rows]
    ran = [bool(r.get("batches")) for r in rows]

    def col(key: str, scale: float = 1.0) -> list[float | None]:
        return [float(r[key]) * scale if ok else None for r, ok in zip(rows, ran)]

    labels = [f"{n}\n({int(r['batches'])} batches)" if ok else f"{n}\n(n/a)" for n, r, ok in zip(names, rows, ran)]
    lines = []
    for n, r, ok in zip(names, rows, ran):
        text = captions.get(n, "")
        line = f"{n}: {text}" if text else n
        if not ok:
            line += f" -- n/a: {r.get('note') or 'did not run'}"
        lines.append(line)
        if n in notes:
            lines.append(f"    {notes[n]}")
    lines += list(footer)
    panels = [
        Panel("throughput (higher is better)", throughput_label, [(throughput_label, col("samples_per_s"))]),
        Panel("network bytes per sample (lower is better)", "KiB/sample",
              [("KiB/sample", col("bytes_per_sample", 1 / 1024))]),
        Panel("batch latency (lower is better)", "ms", [("p50", col("p50_ms")), ("p99", col("p99_ms"))]),
    ]
    return plot_panels(path, title, labels, panels, lines)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _cpu_panels(rows: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """A panel per ``cpu_*`` measurement that any row carries (e.g. ``cpu_ms_per_batch`` -> "CPU ms per batch")."""
    keys = sorted({k for r in rows for k, v in r.items() if k.startswith("cpu_") and _num(v) is not None})
    return [Panel("CPU (lower is better)", "CPU " + k[4:].replace("_", " "), [(k, [_num(r.get(k)) for r in rows])])
            for k in keys]


def plot_compare(path: str | os.PathLike[str], res: Mapping[str, Any]) -> list[Path]:
    """The figure of ``flexemr bench compare`` (the result of :func:`flexemr.bench._compare.measure`)."""
    cfg = res["config"]
    rows = list(res["results"])
    ran = [not r.get("skipped") and _num(r.get("samples_per_s")) is not None for r in rows]

    def col(key: str, scale: float = 1.0) -> list[float | None]:
        return [(_num(r.get(key)) or 0.0) * scale if ok and _num(r.get(key)) is not None else None
                for r, ok in zip(rows, ran)]

    labels = [f"{r['path']}\n({r['vs_flexemr']:.2f}x flexemr)" if ok and _num(r.get("vs_flexemr"))
              else f"{r['path']}\n(skipped)" if not ok else str(r["path"]) for r, ok in zip(rows, ran)]
    panels = [Panel("throughput (higher is better)", "samples/s", [("samples/s", col("samples_per_s"))], log=True),
              Panel("network bytes per sample (lower is better)", "KiB/sample",
                    [("KiB/sample", col("bytes_per_sample", 1 / 1024))])]
    if any(_num(r.get("p50_ms")) is not None for r in rows):
        panels.append(Panel("batch latency (lower is better)", "ms", [("p50", col("p50_ms")), ("p99", col("p99_ms"))],
                            log=True))
    else:
        panels.append(Panel("batch latency (lower is better)", "ms per batch", [("batch ms", col("batch_ms"))],
                            log=True))
    panels += _cpu_panels(rows)
    wl = res.get("workload", {})
    title = (f"flexemr bench compare: {cfg['tables']} tables x {cfg['rows']:,} rows x dim {cfg['dim']}, batches of "
             f"{cfg['batch']} samples (~{wl.get('ids_per_sample', 0):.0f} ids/sample), {cfg['servers']} servers "
             f"({res.get('transport', '?')})")
    caption = [f"{r['path']}: {r['note']}" if ok else f"{r['path']}: skipped ({r['skipped']})"
               for r, ok in zip(rows, ran)]
    caption.append(f"{cfg['warmup']} warm-up + {cfg['batches']} timed batches per path, seed {cfg['seed']}; "
                   "bytes: payload over the network per sample (0: in-process paths)")
    return plot_panels(path, title, labels, panels, caption)


def plot_locality(path: str | os.PathLike[str], res: Mapping[str, Any]) -> list[Path]:
    """The figure of ``flexemr bench locality`` (the result of :func:`flexemr.bench._locality.measure`)."""
    cfg = res["config"]
    names = list(res["results"])
    rows = [res["results"][n] for n in names]

    def col(key: str, scale: float = 1.0) -> list[float | None]:
        return [None if _num(r.get(key)) is None else float(r[key]) * scale for r in rows]

    labels = []
    for n, r in zip(names, rows):
        pct = 100 * (_num(r.get("fraction_of_local")) or 0.0)
        parts = [f"{pct:.0f}% of local" if pct >= 1 else f"{pct:.2g}% of local"] if pct else []
        if _num(r.get("byte_reduction_vs_naive")) and n != "naive":
            parts.append(f"{r['byte_reduction_vs_naive']:.1f}x fewer B")
        labels.append(n + (f"\n({', '.join(parts)})" if parts else ""))
    panels = [Panel("throughput (higher is better)", "samples/s", [("samples/s", col("samples_per_s"))], log=True),
              Panel("network bytes per sample (lower is better)", "KiB/sample",
                    [("KiB/sample", col("bytes_per_sample", 1 / 1024))]),
              Panel("batch latency (lower is better)", "ms per batch", [("batch ms", col("batch_ms"))], log=True),
              *_cpu_panels(rows)]
    title = (f"flexemr bench locality: {cfg['tables']} tables x {cfg['rows']:,} rows x dim {cfg['dim']}, batches of "
             f"{cfg['batch']} samples, {cfg['servers']} servers ({res.get('transport', '?')})")
    what = {"naive": "one rdmaio read per id, no dedup",
            "coalesce": "dedup + coalesced reads, pooled on the ranker",
            "cache": f"coalescing + a {cfg.get('cache_mb', '?')} MiB row cache",
            "pooling": "coalescing + server-side pooling",
            "all": "coalescing + adaptive cache + server pooling + prefetch + frequency remap",
            "local": "everything in local memory (numpy gather + pool)"}
    caption = [f"{n}: {what.get(n, '')}" + (f"; {r['note']}" if r.get("note") else "") for n, r in zip(names, rows)]
    met = res.get("targets_met", {})
    if met:
        caption.append(f"targets: all >= 10x fewer bytes than naive: {'met' if met.get('bytes') else 'NOT met'}; "
                       f"all >= 50% of local samples/s: {'met' if met.get('throughput') else 'NOT met'}")
    caption.append("B: network bytes per sample; fewer B: how many times fewer than naive moves")
    return plot_panels(path, title, labels, panels, caption)
