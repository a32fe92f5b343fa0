"""Benchmark results -> per-run CSV, per-cell summary (CSV, Markdown) with paired differences, and plots.

A *cell* is one point of the grid without the seed (dataset, fraction, any other axis); a cell's runs of one method
are its seeds. Paired differences compare a method with the baseline on the same split and seed.

The tables, paired differences and plots compare one metric of the runs' ``metrics.json`` (``metric``, one of
`regtune.analysis.imbalance.RUN_METRICS`: test accuracy by default, balanced accuracy, macro-F1, the accuracy of the
many / medium / few-shot classes, ...); accuracies and F1 are shown in percent. ``results.csv`` holds all of them,
empty where a run has no value (runs written before a metric existed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from regtune._io import atomic_write_text, load_yaml
from regtune.analysis.imbalance import RUN_METRICS, run_metric
from regtune.bench.cells import Cell, cell_label
from regtune.bench.grid import Grid, expand
from regtune.bench.plots import plot_accuracy_vs_fraction, plot_paired_differences
from regtune.bench.stats import PairedDifference, holm, mean_std, paired_difference
from regtune.train.recipes import recipe_label
from regtune.train.rundir import RunDir

__all__ = ["RESULT_METRICS", "CellSummary", "RunRecord", "collect_grid", "collect_runs", "markdown_report",
           "method_label", "summarize", "write_report"]

_log = logging.getLogger(__name__)

RESULT_METRICS = ("test_acc", "test_mean_class_acc", "test_bal_acc", "test_macro_f1", "test_many_acc",
                  "test_medium_acc", "test_few_acc", "val_acc", "val_bal_acc")  # results.csv's metric columns


def _in_percent(metric: str) -> bool:
    """Accuracies and F1 are fractions in ``metrics.json`` and percentages in the tables."""
    return metric.endswith(("acc", "f1"))


@dataclass(frozen=True)
class RunRecord:
    """One finished run: which method, which cell, which seed, its metrics."""

    method: str
    cell: Cell
    seed: int
    metrics: dict[str, Any]
    run_dir: Path


@dataclass(frozen=True)
class CellSummary:
    """A method in a cell over its seeds."""

    method: str
    cell: Cell
    values: dict[int, float]  # seed -> metric
    mean: float
    std: float
    difference: PairedDifference | None  # against the baseline, on the seeds both have
    p_holm: float = math.nan  # the difference's p-value, Holm-adjusted over the methods of the cell


def collect_grid(grid: Grid) -> list[RunRecord]:
    """The finished runs of a grid (unfinished ones are left out, so a partial grid can be reported)."""
    records = []
    for run in expand(grid):
        run_dir = RunDir(run.run_dir)
        if run_dir.finished:
            cell = _with_imbalance(run.cell, run.config.data.imbalance_ratio)
            records.append(RunRecord(run.method, cell, run.seed, run_dir.metrics(), run.run_dir))
    return records


def _with_imbalance(cell: Mapping[str, Any], ratio: float | None) -> Cell:
    """The cell, with the imbalance ratio of a long-tailed run when no axis names it: its tables and plots then say
    that the subset is long-tailed and that its amount of data is the head class's."""
    items = list(cell.items())
    if ratio is not None and "data.imbalance_ratio" not in cell:
        items.append(("data.imbalance_ratio", int(ratio) if float(ratio).is_integer() else ratio))
    return tuple(items)


def method_label(config: dict[str, Any]) -> str:
    """A method's name from a run's config: its baseline (`regtune.train.recipes.recipe_label`, left out when
    it is plain fine-tuning), criterion (if not ``ce``) and regularizers with their arguments."""
    recipe = recipe_label(config)
    parts = [recipe] if recipe != "ft" else []
    criterion = config.get("criterion") or {"name": "ce"}
    if criterion.get("name", "ce") != "ce" or criterion.get("args"):
        parts.append(_term_label(criterion))
    parts += [_term_label(term) for term in config.get("regularizers") or []]
    return "+".join(parts) or "ft"


def _term_label(term: dict[str, Any]) -> str:
    args = term.get("args") or {}
    inner = ",".join(f"{k}={v}" for k, v in sorted(args.items()))
    return f"{term['name']}({inner})" if inner else term["name"]


def collect_runs(run_dirs: Iterable[str | Path], labels: Mapping[str | Path, str] | None = None) -> list[RunRecord]:
    """Finished runs from any run directories; the method is named from each run's config unless ``labels`` names it.

    The cell is the dataset with its fraction (or images per class); runs that differ in other settings but share
    a method name are flagged by `summarize` through duplicate seeds. Runs that the config cannot tell apart
    (plain fine-tuning at two learning rates is ``ft`` twice) get their names from ``labels``, which maps a run
    directory to the method name it is reported under.
    """
    names = {Path(k): v for k, v in (labels or {}).items()}
    records = []
    for run_dir in map(Path, run_dirs):
        run = RunDir(run_dir)
        if not run.finished or not run.config_path.is_file():
            continue
        metrics = run.metrics()
        # The config as plain YAML, not checked against this version's names: reports also read older runs.
        config = load_yaml(run.config_path.read_text())
        data = config["data"]
        amount = (("data.fraction", data["fraction"]) if data.get("fraction") is not None
                  else ("data.per_class", data["per_class"]))
        cell = _with_imbalance(dict([("data.dataset", data["dataset"]), amount]), data.get("imbalance_ratio"))
        records.append(RunRecord(names.get(run_dir) or method_label(config), cell,
                                 int(config["trainer"]["seed"]),
                                 metrics, run_dir))
    return records


def summarize(records: Sequence[RunRecord], baseline: str = "ft", metric: str = "test_acc", ci: str = "t",
              confidence: float = 0.95) -> list[CellSummary]:
    """Mean ± std per (method, cell), and the paired difference to ``baseline`` over the seeds both have.

    Args:
        records: The finished runs.
        baseline: The method the paired differences are taken against.
        metric: What is compared (`regtune.analysis.imbalance.RUN_METRICS`); accuracies and F1 in percent. Runs
            without it (written before it existed, or a shot group without classes) are left out, with a warning.
        ci: ``t`` or ``bootstrap``, the interval of the paired differences.
        confidence: Level of the intervals.

    Raises:
        ValueError: an unknown metric; no run has the metric; two runs of the same method, cell and seed (ambiguous
            pairing).
    """
    scale = 100.0 if _in_percent(metric) else 1.0
    table: dict[tuple[str, tuple], dict[int, float]] = {}
    seen: set[tuple[str, tuple, int]] = set()
    missing = []
    for record in records:
        if (record.method, record.cell, record.seed) in seen:
            raise ValueError(f"two runs of {record.method} in {cell_label(record.cell)} with seed {record.seed} "
                             f"(one is {record.run_dir}); give each method one run per seed")
        seen.add((record.method, record.cell, record.seed))
        value = run_metric(record.metrics, metric)
        if value is None:
            missing.append(record)
            continue
        table.setdefault((record.method, record.cell), {})[record.seed] = scale * value
    if records and len(missing) == len(records):
        raise ValueError(f"none of the {len(records)} runs has {metric} ({RUN_METRICS[metric]}) in its metrics.json: "
                         "runs from an older regtune lack the imbalance metrics; compare by test_acc, or run them "
                         "again")
    if missing:
        _log.warning("%d of %d runs have no %s and are left out of the tables (e.g. %s)", len(missing), len(records),
                     metric, missing[0].run_dir)
    summaries = []
    for (method, cell), values in table.items():
        mean, std = mean_std(list(values.values()))
        base = table.get((baseline, cell))
        difference = None
        if base is not None and method != baseline:
            seeds = sorted(set(values) & set(base))
            if seeds:
                difference = paired_difference([values[s] for s in seeds], [base[s] for s in seeds],
                                               confidence=confidence, ci=ci)
        summaries.append(CellSummary(method, cell, values, mean, std, difference))
    adjusted: dict[int, float] = {}
    for cell in {s.cell for s in summaries}:  # one family per cell: every method against the same baseline
        family = [i for i, s in enumerate(summaries) if s.cell == cell and s.difference is not None]
        adjusted.update(zip(family, holm([summaries[i].difference.p for i in family])))
    return [replace(s, p_holm=adjusted[i]) if i in adjusted else s for i, s in enumerate(summaries)]


def _orders(summaries: Sequence[CellSummary], baseline: str) -> tuple[list[str], list[tuple]]:
    methods: list[str] = []
    cells: list[tuple] = []
    for s in summaries:
        if s.method not in methods:
            methods.append(s.method)
        if s.cell not in cells:
            cells.append(s.cell)
    if baseline in methods:
        methods.remove(baseline)
        methods.insert(0, baseline)
    return methods, cells


def markdown_report(summaries: Sequence[CellSummary], baseline: str = "ft", metric: str = "test_acc",
                    confidence: float = 0.95) -> str:
    """Which metric, then two tables: mean ± std (best mean per column in bold) and paired differences with their
    interval."""
    if not summaries:
        return "(no finished runs)\n"
    methods, cells = _orders(summaries, baseline)
    index = {(s.method, s.cell): s for s in summaries}
    unit = " (%)" if _in_percent(metric) else ""
    header = "| method | " + " | ".join(cell_label(c) for c in cells) + " |"
    rule = "|---|" + "---:|" * len(cells)
    lines = [f"Metric: `{metric}`, {RUN_METRICS.get(metric, metric)}{unit}.", "",
             (f"**{metric}{unit}**: mean ± sample std over seeds (n); best mean per column in bold (where more "
              "than one method has finished runs)."), "", header, rule]
    best = {c: max((s.mean for s in summaries if s.cell == c), default=math.nan) for c in cells
            if sum(1 for s in summaries if s.cell == c) > 1}  # one method alone is best of nothing
    for method in methods:
        row = []
        for c in cells:
            s = index.get((method, c))
            if s is None:
                row.append("—")
                continue
            text = f"{s.mean:.2f} ± {s.std:.2f} ({len(s.values)})"
            row.append(f"**{text}**" if s.mean == best.get(c) else text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    kinds = {s.difference.method for s in summaries if s.difference is not None}
    how = {"t": "paired t over seeds", "bootstrap": "percentile bootstrap over seeds"}
    lines += ["", (f"**Paired difference to {baseline}** in {metric} ({'points; ' if unit else ''}same split and "
                   "seed), mean "
                   f"[{100 * confidence:g} % CI, {', '.join(how[k] for k in sorted(kinds)) or '-'}]; "
                   "▲ = interval above zero, ▼ = below zero."), "", header, rule]
    for method in methods:
        if method == baseline:
            continue
        row = []
        for c in cells:
            s = index.get((method, c))
            d = s.difference if s is not None else None
            if d is None:
                row.append("—")
            elif d.n < 2:
                row.append(f"{d.mean:+.2f} (1 seed)")
            else:
                mark = " ▲" if d.above_zero else " ▼" if d.below_zero else ""
                holm_mark = "†" if s.p_holm < 1.0 - confidence else ""
                row.append(f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]{mark}{holm_mark}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", (f"† = still significant at {100 * (1 - confidence):g} % after Holm's correction over the "
                   "methods of the cell (p-values in summary.csv: p, p_holm); an interval is per comparison, and with "
                   "many methods some exclude zero by chance.")]
    return "\n".join(lines) + "\n"


def _relative(path: Path) -> str:
    """The path relative to the working directory when it lies below it (tables stay valid in a clone)."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _imbalance_note(records: Sequence[RunRecord]) -> str:
    """A line under the tables when some runs trained on long-tailed subsets: their ratios, and that the test set is
    the dataset's own (as the dataset gives it, not long-tailed)."""
    ratios = set()
    for record in records:
        split = RunDir(record.run_dir).split_path
        settings = json.loads(split.read_text()).get("settings", {}) if split.is_file() else {}
        if settings.get("imbalance_ratio") is not None:
            ratios.add((settings.get("imbalance_profile", "exp"), settings["imbalance_ratio"]))
    if not ratios:
        return ""
    shown = ", ".join(f"{profile} rho = {ratio:g}" for profile, ratio in sorted(ratios))
    return (f"\nTraining subsets are long-tailed ({shown}; validation follows the training distribution). The test "
            "set is the dataset's own, as the dataset gives it (not long-tailed): per-class and balanced metrics "
            "weigh its classes as it does.\n")


def write_report(records: Sequence[RunRecord], out_dir: str | Path, baseline: str = "ft", metric: str = "test_acc",
                 ci: str = "t", title: str = "") -> dict[str, Path]:
    """Write ``results.csv`` (one row per run), ``summary.csv``, ``summary.md`` and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.csv", "summary_csv": out / "summary.csv", "summary_md": out / "summary.md"}
    handle = io.StringIO()
    writer = csv.writer(handle)
    writer.writerow(["method", "cell", "seed", *RESULT_METRICS, "best_val", "selected_epoch", "wall_time_s",
                     "run_dir"])
    for r in sorted(records, key=lambda r: (cell_label(r.cell), r.method, r.seed)):
        m = r.metrics
        writer.writerow([r.method, cell_label(r.cell), r.seed, *(run_metric(m, k) for k in RESULT_METRICS),
                         m.get("best_val"), m.get("selected_epoch"), m.get("wall_time_s"), _relative(r.run_dir)])
    atomic_write_text(paths["results"], handle.getvalue())
    summaries = summarize(records, baseline, metric, ci)
    handle = io.StringIO()
    writer = csv.writer(handle)
    writer.writerow(["method", "cell", "n", "mean", "std", "diff_mean", "diff_low", "diff_high", "diff_ci",
                     "p", "p_holm", "seeds"])
    for s in summaries:
        d = s.difference
        writer.writerow([s.method, cell_label(s.cell), len(s.values), f"{s.mean:.4f}", f"{s.std:.4f}",
                         f"{d.mean:.4f}" if d else "", f"{d.low:.4f}" if d else "", f"{d.high:.4f}" if d else "",
                         d.method if d else "", f"{d.p:.4g}" if d else "", f"{s.p_holm:.4g}" if d else "",
                         " ".join(map(str, sorted(s.values)))])
    atomic_write_text(paths["summary_csv"], handle.getvalue())
    text = (f"# {title}\n\n" if title else "") + markdown_report(summaries, baseline, metric) + _imbalance_note(records)
    atomic_write_text(paths["summary_md"], text)
    accuracy = plot_accuracy_vs_fraction(summaries, out / "accuracy.png", baseline=baseline, metric=metric)
    if accuracy is not None:
        paths["accuracy_png"] = accuracy
    forest = plot_paired_differences(summaries, out / "paired_differences.png", baseline=baseline, metric=metric)
    if forest is not None:
        paths["forest_png"] = forest
    return paths
