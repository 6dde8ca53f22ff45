"""Figures of the demo and the benchmarks, drawn with matplotlib (the ``apps`` extra).

:func:`plot_configurations` draws one row per configuration (or benchmark
path) in three panels -- throughput, network bytes per sample, and p50/p99
latency -- with labelled axes and units, and a caption under the panels: one
line per configuration saying what it turns on and how many batches it ran,
plus a note where a configuration is slower than a simpler one (see
:func:`cost_notes`).  It writes PNG and SVG.

matplotlib is imported only when a figure is drawn, with the non-interactive
Agg backend (no display needed); ``import flexemr`` never imports it.
:func:`require_matplotlib` says, in one line, which extra installs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .extras import APPS_EXTRA, require

__all__ = ["APPS_EXTRA", "cost_notes", "plot_configurations", "require_matplotlib"]


def require_matplotlib() -> None:
    """:class:`~flexemr.ConfigError` (one line naming the ``apps`` extra) unless matplotlib can be imported."""
    require("matplotlib", "the report")


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


def plot_configurations(path: str | os.PathLike[str], title: str, rows: Sequence[Mapping[str, Any]],
                        captions: Mapping[str, str] | None = None, notes: Mapping[str, str] | None = None,
                        *, footer: Sequence[str] = (), throughput_label: str = "samples/s") -> list[Path]:
    """Draw the three panels for ``rows`` and write ``path`` (.png) and the same name with .svg.

    ``captions``: a short line per row name (what it turns on); ``notes``: a
    note per row name (:func:`cost_notes`); ``footer``: more caption lines
    (e.g. what each technique does).  Rows that did not run (no
    ``batches``) appear as "n/a".  Returns the files written.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    captions = captions or {}
    notes = notes or {}
    names = [str(r["name"]) for r in rows]
    ran = [bool(r.get("batches")) for r in rows]

    def col(key: str, scale: float = 1.0) -> list[float]:
        return [float(r[key]) * scale if ok else 0.0 for r, ok in zip(rows, ran)]

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
    panel_h = 0.6 * len(rows) + 1.4
    text_h = 0.155 * len(lines) + 0.25
    fig = plt.figure(figsize=(15, panel_h + text_h), dpi=110)
    subs: Any = fig.subfigures(2, 1, height_ratios=[panel_h, text_h])
    top, bottom = subs[0], subs[1]
    axes = top.subplots(1, 3, sharey=True, gridspec_kw={"wspace": 0.06})
    top.subplots_adjust(left=0.14, right=0.99, top=1 - 0.75 / panel_h, bottom=0.55 / panel_h)
    ys = list(range(len(rows)))[::-1]
    colors = ["#3465a4", "#cc6600", "#4e9a06", "#75507b"]
    panels: list[tuple[str, str, list[list[float]], list[str]]] = [
        ("throughput (higher is better)", throughput_label, [col("samples_per_s")], [throughput_label]),
        ("network bytes per sample (lower is better)", "KiB/sample", [col("bytes_per_sample", 1 / 1024)],
         ["KiB/sample"]),
        ("batch latency (lower is better)", "ms", [col("p50_ms"), col("p99_ms")], ["p50", "p99"]),
    ]
    for i, (ax, (heading, unit, series, legend)) in enumerate(zip(axes, panels)):
        h = 0.8 / len(series)
        for k, (vals, lab) in enumerate(zip(series, legend)):
            pos = [y + (len(series) - 1) * h / 2 - k * h for y in ys]
            bars = ax.barh(pos, vals, height=h, color=colors[(i + k) % len(colors)], label=lab)
            for b, v, ok in zip(bars, vals, ran):
                txt = (f"{v:,.3g}" if v < 1000 else f"{v:,.0f}") if ok else "n/a"
                ax.text(b.get_width(), b.get_y() + b.get_height() / 2, " " + txt, va="center", fontsize=8)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel(unit, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.2)
        if len(series) > 1:
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
