"""Benchmark plots: a metric (test accuracy by default) against the data fraction per method, and a forest plot of
paired differences."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Figures are built as plain ``Figure`` objects, not through pyplot: importing this module (aggregate does) must not
# switch the user's backend, and no figure is left in pyplot's global list.
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from regtune.bench.cells import cell_label, split_cell

__all__ = ["plot_accuracy_vs_fraction", "plot_paired_differences"]

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p", "d", "H", "8"]


def _difference_unit(metric: str) -> str:
    """How a difference in ``metric`` reads on an axis: accuracies and F1 (in percent) differ by points."""
    return f"{metric}, points" if metric.endswith(("acc", "f1")) else metric


def _curves_panel(ax: Any, below: Any, items: list, xs: list[float], methods: list[str], colours: dict,
                  markers: dict, baseline: str, quantity: str, metric: str) -> None:
    """Mean ± std against the fraction, a line per method; below, each paired difference to the baseline."""
    for method in methods:
        points = sorted((x, s.mean, s.std) for s, x, _ in items if s.method == method and x is not None)
        if not points:
            continue
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                    marker=markers[method], capsize=3, label=method, color=colours[method],
                    linewidth=2.2 if method == baseline else 1.3, linestyle="--" if method == baseline else "-")
    ax.set_ylabel(f"{quantity}, mean ± std over seeds")
    _difference_panel(below, items, methods, colours, markers, baseline, metric)
    for a in (ax, below):
        a.set_xscale("log")
        a.xaxis.set_minor_locator(NullLocator())  # only the grid's fractions as ticks
        a.set_xticks(xs)
        a.set_xticklabels([f"{x:g}" for x in xs])
    below.set_xlabel(items[0][2])


def _means_panel(ax: Any, items: list, methods: list[str], colours: dict, baseline: str, quantity: str) -> None:
    """One fraction: each method's mean ± std as a point with an error bar, the baseline's mean dashed."""
    # Points with error bars, not bars: a bar's length would start at an arbitrary axis limit.
    rows = sorted(((s.mean, s.std, s.method) for s, _, _ in items), key=lambda r: methods.index(r[2]))
    y = list(range(len(rows)))[::-1]
    for yi, (mean, std, method) in zip(y, rows):
        ax.errorbar([mean], [yi], xerr=[std], fmt="o", capsize=4, color=colours[method], markersize=7)
        ax.annotate(f"{mean:.2f}", (mean, yi), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    base = next((r[0] for r in rows if r[2] == baseline), None)
    if base is not None:
        ax.axvline(base, color="gray", linestyle="--", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([r[2] for r in rows])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"{quantity}, mean ± std over seeds (dashed: {baseline})")


def plot_accuracy_vs_fraction(summaries: Sequence[Any], path: str | Path, baseline: str = "ft",
                              metric: str = "test_acc") -> Path | None:
    """One column per dataset (and other axes): ``metric``'s mean ± std against the fraction, a line per method; below
    it, each method's paired difference to the baseline against the fraction with its confidence interval (what a
    reader of 15 overlapping lines wants to know).

    With a single fraction the panel is a chart of the methods' means instead. Returns ``None`` when there is nothing
    to plot.
    """
    if not summaries:
        return None
    panels: dict[tuple, list] = {}
    for s in summaries:
        panel, x, axis = split_cell(s.cell)
        panels.setdefault(panel, []).append((s, x, axis))
    methods = []
    for s in summaries:
        if s.method not in methods:
            methods.append(s.method)
    if baseline in methods:
        methods.remove(baseline)
        methods.insert(0, baseline)
    colours = {m: matplotlib.colormaps["tab20"](i % 20) for i, m in enumerate(methods)}
    markers = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(methods)}
    curves = any(len({x for _, x, _ in items if x is not None}) >= 2 for items in panels.values())
    fig = Figure(figsize=(6.0 * len(panels), 8.4 if curves else 4.2))
    axes = fig.subplots(2 if curves else 1, len(panels), squeeze=False, sharex="col")
    unit = " (%)" if metric.endswith(("acc", "f1")) else ""
    for column, (panel, items) in enumerate(panels.items()):
        ax = axes[0][column]
        xs = sorted({x for _, x, _ in items if x is not None})
        if len(xs) >= 2:
            _curves_panel(ax, axes[1][column], items, xs, methods, colours, markers, baseline, f"{metric}{unit}",
                          metric)
        else:
            _means_panel(ax, items, methods, colours, baseline, f"{metric}{unit}")
            if curves:
                axes[1][column].set_visible(False)
        title = cell_label(panel)
        if len(xs) == 1:
            title += f"\n({items[0][2].split(' (')[0]}: {xs[0]:g}{'%' if '%' in items[0][2] else ''})"
        ax.set_title(title, fontsize=10)  # on two lines: side-by-side panels' titles must not run into each other
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _difference_panel(ax: Any, items: list, methods: list[str], colours: dict, markers: dict, baseline: str,
                      metric: str) -> None:
    """Paired difference to the baseline against the fraction, each method's points spread a little sideways."""
    others = [m for m in methods if m != baseline]
    kind = ""
    for k, method in enumerate(others):
        points = sorted(((x, s.difference) for s, x, _ in items
                         if s.method == method and x is not None and s.difference is not None), key=lambda t: t[0])
        if not points:
            continue
        shift = 10 ** (0.012 * (k - (len(others) - 1) / 2))  # multiplicative: even spacing on the log axis
        xs = [x * shift for x, _ in points]
        means = [d.mean for _, d in points]
        low = [d.mean - d.low if math.isfinite(d.low) else 0.0 for _, d in points]
        high = [d.high - d.mean if math.isfinite(d.high) else 0.0 for _, d in points]
        ax.errorbar(xs, means, yerr=[low, high], marker=markers[method], color=colours[method], capsize=2,
                    linewidth=0.9, markersize=5)
        kind = points[0][1].method
    ax.axhline(0.0, color="black", linewidth=0.8)
    interval = "paired t" if kind == "t" else "bootstrap"
    ax.set_ylabel(f"difference to {baseline} ({_difference_unit(metric)}), 95 % CI ({interval})")
    ax.grid(alpha=0.3)


def plot_paired_differences(summaries: Sequence[Any], path: str | Path, baseline: str = "ft",
                            metric: str = "test_acc") -> Path | None:
    """Forest plot: per cell, each method's mean paired difference in ``metric`` to the baseline with its confidence
    interval."""
    with_diff = [s for s in summaries if s.difference is not None]
    if not with_diff:
        return None
    cells: list = []
    for s in with_diff:
        if s.cell not in cells:
            cells.append(s.cell)
    rows_per_cell = max(sum(1 for s in with_diff if s.cell == c) for c in cells)
    fig = Figure(figsize=(5.5 * len(cells), 0.45 * rows_per_cell + 1.6))
    axes = fig.subplots(1, len(cells), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        items = [s for s in with_diff if s.cell == cell]
        y = list(range(len(items)))[::-1]
        for yi, s in zip(y, items):
            d = s.difference
            colour = "tab:green" if d.above_zero else "tab:red" if d.below_zero else "tab:gray"
            if math.isfinite(d.low) and math.isfinite(d.high):
                ax.plot([d.low, d.high], [yi, yi], color=colour, linewidth=2)
            ax.plot([d.mean], [yi], marker="o", color=colour)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([f"{s.method} (n={s.difference.n})" for s in items])
        kind = items[0].difference.method
        ax.set_xlabel(f"difference to {baseline} ({_difference_unit(metric)}), 95 % CI "
                      f"({'paired t' if kind == 't' else 'bootstrap'})")
        ax.set_title(cell_label(cell))
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
