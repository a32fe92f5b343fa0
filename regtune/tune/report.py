"""What a search found, the tuned comparison on fresh seeds, and the refit of the chosen configuration.

``<out>/search/``: ``search.md`` / ``search.json`` (per study: the budget, trials complete / pruned / interrupted,
the best trial's knobs and its objective, validation accuracy or balanced accuracy, per search seed, run time, what
pruning saved),
``history.png`` (each trial's objective, the best so far, pruned trials marked) and ``knobs.png`` (the trials in
each method's knob space: the objective against a lone knob, or the two most important knobs by Optuna's fANOVA
importances, coloured by the objective; pruned trials marked). ``<out>/finals/``: each method's best configuration on
the finals' seeds (a benchmark grid, resumable), tested once; ``<out>/report/``: the benchmark report of the finals
against the tuned baseline (paired differences, Holm) and the orderings the search file asks about.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from regtune._io import atomic_write_json, atomic_write_text
from regtune.bench.grid import Grid, grid_from_dict
from regtune.tune.search import OBJECTIVES, Search, SearchError, StudySpec, studies
from regtune.tune.study import open_storage, study_for

__all__ = ["chosen", "finals_grid", "study_summaries", "unfinished", "write_orderings", "write_search_report"]

_log = logging.getLogger(__name__)


def _summary(search: Search, spec: StudySpec, study: Any) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    fails = [t for t in trials if t.state == TrialState.FAIL]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    full = [t.user_attrs.get("seconds", 0.0) for t in complete]
    typical = statistics.mean(full) if full else math.nan
    spent = sum(t.user_attrs.get("seconds", 0.0) for t in complete + pruned)
    saved = sum(max(0.0, typical - t.user_attrs.get("seconds", 0.0)) for t in pruned) if full else math.nan
    values = best.user_attrs.get(search.objective, []) if best else []  # per search seed
    return {
        "study": spec.name, "cell": spec.cell, "method": spec.method, "budget": search.budget(spec.method),
        "knobs": list(search.spaces[spec.method]),
        "complete": len(complete), "pruned": len(pruned),
        "interrupted": sum(1 for t in fails if t.number in retried),
        "surplus": sum(1 for t in fails if t.user_attrs.get("surplus")),
        "failed": sum(1 for t in fails if t.number not in retried and not t.user_attrs.get("surplus")),
        "running": sum(1 for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)),
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else None,
        "objective": search.objective,
        "best_val_acc": values, "best_val_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "cpu_seconds": round(spent, 1), "pruning_saved_seconds": None if math.isnan(saved) else round(saved, 1),
        "history": [{"number": t.number, "state": t.state.name, "value": t.value if t.state == TrialState.COMPLETE
                     else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
                     "params": dict(t.params), "seconds": t.user_attrs.get("seconds")}
                    for t in sorted(complete + pruned, key=lambda t: t.number)],
    }


def study_summaries(search: Search, storage_url: str | None = None) -> list[dict[str, Any]]:
    """One summary per study (see `_summary`), in the search file's order."""
    storage = open_storage(search, storage_url)
    return [_summary(search, spec, study_for(search, spec, storage)) for spec in studies(search)]


def _knob_text(params: dict[str, Any] | None) -> str:
    if not params:
        return "—"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def write_search_report(search: Search, summaries: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """``search.md``, ``search.json`` and the plots of the search (validation only: no test metric exists yet)."""
    out.mkdir(parents=True, exist_ok=True)
    header = (f"Budget: **{search.trials} trials per method**, the same for every method (one for a method without "
              f"knobs); objective: {OBJECTIVES[search.objective]} (`{search.objective}`) of the chosen weights, mean "
              f"over the search seeds "
              f"{search.seeds}; TPE seed {search.sampler_seed}, pruner {search.pruner}.")
    columns = (f"| study | knobs | complete | pruned | interrupted | best trial | {_axis(search)} | chosen knobs | "
               "run time (min) | pruning saved (min) |")
    lines = [f"# {search.name}: the search (validation only)", "", header, "", columns,
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for s in summaries:
        best = (f"{100 * s['best_value']:.2f} ± {100 * s['best_val_std']:.2f}" if s["best_value"] is not None
                else "—")
        saved = f"{s['pruning_saved_seconds'] / 60:.1f}" if s["pruning_saved_seconds"] is not None else "—"
        lines.append(f"| {s['study']} | {', '.join(s['knobs']) or '—'} | {s['complete']} | {s['pruned']} | "
                     f"{s['interrupted']} | {s['best_trial'] if s['best_trial'] is not None else '—'} | {best} | "
                     f"{_knob_text(s['best_params'])} | {s['cpu_seconds'] / 60:.1f} | {saved} |")
    total = sum(s["cpu_seconds"] for s in summaries)
    trials = sum(s["complete"] + s["pruned"] for s in summaries)
    lines += ["", (f"Run time of the search: {total / 3600:.2f} h over {trials} trials (the runs' wall time, summed "
                   "over the workers). ± is the standard deviation of "
                   f"the best trial's {OBJECTIVES[search.objective]} over the search seeds (its spread, not an "
                   "interval). Pruning "
                   "saved: for each pruned trial, the mean time of a complete trial of the same study minus its own.")]
    paths = {"md": out / "search.md", "json": out / "search.json"}
    atomic_write_text(paths["md"], "\n".join(lines) + "\n")
    atomic_write_json(paths["json"], {"search": search.name, "budget": search.trials, "seeds": search.seeds,
                                      "objective": search.objective, "studies": summaries})
    paths.update(_plots(summaries, search, out))
    return paths


def _axis(search: Search) -> str:
    """The objective as a column or axis label: ``validation acc (%)``, ``balanced validation acc (%)``."""
    return f"{OBJECTIVES[search.objective].replace('accuracy', 'acc')} (%)"


def _plots(summaries: list[dict[str, Any]], search: Search, out: Path) -> dict[str, Path]:
    """``history.png`` and ``knobs.png``: one panel per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(summaries)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    paths = {}
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, s in zip(axes.flat, summaries):
        done = [h for h in s["history"] if h["value"] is not None]
        if not done:
            ax.set_title(s["study"], fontsize=9)
            ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center")
            ax.axis("off")
            continue
        complete = [h for h in done if h["state"] == "COMPLETE"]
        ax.plot([h["number"] for h in complete], [100 * h["value"] for h in complete], "o", color="tab:blue",
                label="complete")
        pruned = [h for h in done if h["state"] == "PRUNED"]
        ax.plot([h["number"] for h in pruned], [100 * h["value"] for h in pruned], "x", color="grey",
                label="pruned (last epoch reported)")
        best, xs, ys = -math.inf, [], []
        for h in complete:
            best = max(best, h["value"])
            xs.append(h["number"])
            ys.append(100 * best)
        ax.step(xs, ys, where="post", color="crimson", label="best so far")
        ax.set_title(s["study"], fontsize=9)
        ax.set_xlabel("trial (Optuna's number)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(_axis(search))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    for ax in axes.flat:  # one legend, on the first panel that has data
        if ax.lines:
            ax.legend(fontsize=7)
            break
    fig.suptitle(f"{search.name}: objective per trial ({search.trials} per method)")
    fig.tight_layout()
    paths["history"] = out / "history.png"
    fig.savefig(paths["history"], dpi=110)
    plt.close(fig)
    paths["knobs"] = _knob_plot(summaries, search, out)
    return paths


def _knob_plot(summaries: list[dict[str, Any]], search: Search, out: Path) -> Path:
    """Where each study's trials fell in its knob space, and what they scored.

    A one-knob study: the objective against the knob. Several knobs: the two that mattered most (Optuna's fANOVA
    importances of the complete trials, in the axis labels; the first two while fewer than 3 trials are complete),
    each complete trial coloured by its objective, the best one starred. Pruned trials are grey crosses in both, so
    that a region the pruner stopped shows as such.
    """
    import matplotlib.pyplot as plt

    n = len(summaries)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, s in zip(axes.flat, summaries):
        complete = [h for h in s["history"] if h["state"] == "COMPLETE"]
        pruned = [h for h in s["history"] if h["state"] == "PRUNED"]
        knobs = search.spaces[s["method"]]
        ax.set_title(f"{s['study']}\n{len(complete)} complete, {len(pruned)} pruned", fontsize=9)
        if not knobs or not complete:
            ax.text(0.5, 0.5, "no knob" if not knobs else "no complete trial yet", ha="center", va="center")
            ax.axis("off")
        elif len(knobs) == 1:
            knob = next(iter(knobs.values()))
            ax.plot([h["params"][knob.key] for h in pruned], [100 * h["value"] for h in pruned], "x", color="grey",
                    label="pruned (last epoch reported)")
            ax.plot([h["params"][knob.key] for h in complete], [100 * h["value"] for h in complete], "o",
                    color="tab:blue", label="complete")
            _knob_axis(ax, "x", knob, [h["params"][knob.key] for h in complete + pruned])
            ax.set_xlabel(knob.key)
            ax.set_ylabel(_axis(search))
        else:
            _knob_scatter(fig, ax, s, search, complete, pruned)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{search.name}: the trials in each method's knob space (crosses: pruned)")
    fig.tight_layout()
    path = out / "knobs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _knob_scatter(fig: Any, ax: Any, summary: dict[str, Any], search: Search, complete: list[dict[str, Any]],
                  pruned: list[dict[str, Any]]) -> None:
    """Two knobs of a study against each other, complete trials coloured by objective, pruned ones grey."""
    knobs = search.spaces[summary["method"]]
    importances: dict[str, float] = {}
    if len(complete) >= 3 and len({h["value"] for h in complete}) > 1:
        importances = _importances(summary, search)
    keys = sorted(knobs, key=lambda k: -importances.get(k, 0.0))[:2] if importances else list(knobs)[:2]
    x, y = (knobs[k] for k in keys)
    ax.plot([h["params"][x.key] for h in pruned], [h["params"][y.key] for h in pruned], "x", color="grey")
    points = ax.scatter([h["params"][x.key] for h in complete], [h["params"][y.key] for h in complete],
                        c=[100 * h["value"] for h in complete], cmap="viridis", edgecolors="k", linewidths=0.4)
    best = max(complete, key=lambda h: h["value"])
    ax.plot([best["params"][x.key]], [best["params"][y.key]], "*", color="crimson", markersize=13, fillstyle="none")
    for which, knob in (("x", x), ("y", y)):
        _knob_axis(ax, which, knob, [h["params"][knob.key] for h in complete + pruned])
    label = (lambda k: f"{k} (importance {importances[k]:.2f})") if importances else (lambda k: k)
    ax.set_xlabel(label(x.key), fontsize=8)
    ax.set_ylabel(label(y.key), fontsize=8)
    fig.colorbar(points, ax=ax, fraction=0.08, pad=0.02).set_label(_axis(search), fontsize=8)


def _knob_axis(ax: Any, which: str, knob: Any, values: list[Any]) -> None:
    """The ``which`` ("x" or "y") axis of ``ax`` on a log scale for a log knob, with a few labelled ticks where the
    trials are (a range within one decade has no labelled power of ten)."""
    if not knob.log or not values:
        return
    import numpy as np
    from matplotlib.ticker import FixedLocator, NullLocator

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    low, high = min(values), max(values)
    ticks = [float(f"{v:.2g}") for v in np.geomspace(low, high, 4)] if high > low else [low]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(lambda v, _: f"{v:.2g}")
    axis.set_minor_locator(NullLocator())


def _importances(summary: dict[str, Any], search: Search) -> dict[str, float]:
    """Optuna's parameter importances of a study's complete trials (fANOVA, seeded)."""
    import optuna

    study = optuna.create_study(direction="maximize")
    distributions = {k: _distribution(v) for k, v in search.spaces[summary["method"]].items()}
    for h in summary["history"]:
        if h["state"] == "COMPLETE":
            study.add_trial(optuna.trial.create_trial(params=h["params"], distributions=distributions,
                                                      value=h["value"]))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def _distribution(knob: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if knob.choices is not None:
        return CategoricalDistribution(list(knob.choices))
    if knob.integer:
        return IntDistribution(int(knob.low), int(knob.high), log=knob.log, step=int(knob.step or 1))
    return FloatDistribution(knob.low, knob.high, log=knob.log, step=knob.step)


def _with_params(changes: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A grid method's changes with a trial's knob values: config keys into ``set``, term arguments into its terms."""
    changes = json.loads(json.dumps(changes))
    sets = dict(changes.get("set") or {})
    for key, value in params.items():
        section, _, rest = key.partition(".")
        if section in ("data", "model", "optim", "trainer"):
            sets[key] = value
            continue
        found = False
        terms = changes.get("regularizers") or []
        for i, term in enumerate(terms):
            spec = {"name": term, "args": {}} if isinstance(term, str) else dict(term)
            if spec["name"] == section:
                spec["args"] = {**(spec.get("args") or {}), rest: value}
                terms[i] = spec
                found = True
        changes["regularizers"] = terms
        criterion = changes.get("criterion")
        if criterion is not None:
            spec = {"name": criterion, "args": {}} if isinstance(criterion, str) else dict(criterion)
            if spec["name"] == section:
                spec["args"] = {**(spec.get("args") or {}), rest: value}
                changes["criterion"] = spec
                found = True
        if not found:
            raise SearchError(f"knob {key!r} names no term of the method {changes}")
    if sets:
        changes["set"] = sets
    if not changes.get("regularizers"):
        changes.pop("regularizers", None)
    return changes


def finals_grid(search: Search, summaries: list[dict[str, Any]]) -> Grid:
    """The grid of the finals: every method with its best knobs, on the finals' seeds, in ``<out>/finals``.

    Raises:
        SearchError: a study has not reached its budget, or has no complete trial.
    """
    if len({s["cell"] for s in summaries}) > 1:
        raise SearchError("the finals of a search over several cells are not supported yet: one cell per search")
    methods = {}
    for s in summaries:
        if unfinished([s]):
            raise SearchError(f"{s['study']}: {s['complete'] + s['pruned']} of {s['budget']} trials finished; run "
                              "the search to its budget first (the same command continues it)")
        if s["best_params"] is None:
            raise SearchError(f"{s['study']}: no trial completed (all pruned or failed): no configuration to test")
        methods[s["method"]] = _with_params(search.grid.methods[s["method"]], s["best_params"])
    data = {k: v for k, v in search.grid.source.items() if k not in ("search", "methods", "out", "name")}
    data["methods"] = methods
    return grid_from_dict(data, default_name=f"{search.name}-finals", out=search.out / "finals")


def unfinished(summaries: list[dict[str, Any]]) -> list[str]:
    """The studies that have not reached their budget, or still have a trial running or queued."""
    return [s["study"] for s in summaries if s["complete"] + s["pruned"] < s["budget"] or s["running"]]


def chosen(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The study with the best mean objective, validation accuracy or balanced accuracy (ties: the earlier in the
    file)."""
    candidates = [s for s in summaries if s["best_value"] is not None]
    if not candidates:
        raise SearchError("no study has a complete trial: nothing to choose")
    return max(candidates, key=lambda s: (s["best_value"], -summaries.index(s)))


def write_orderings(search: Search, records: list[Any], out: Path, metric: str = "test_acc") -> Path | None:
    """``orderings.md``: for each ordering the search file names (``search.orderings: [[a, b], ...]``, read "a
    beats b"), the paired difference a - b of ``metric`` on the finals' seeds with its 95 % interval."""
    from regtune.bench.stats import paired_difference

    pairs = search.source.get("search", {}).get("orderings") or []
    if not pairs:
        return None
    by_method: dict[str, dict[int, float]] = {}
    for record in records:
        if record.metrics.get(metric) is not None:
            by_method.setdefault(record.method, {})[record.seed] = 100.0 * float(record.metrics[metric])
    lines = ["# Claimed orderings, every method tuned with the same budget", "", f"Metric: {metric} of the finals.", "",
             "| claim | paired difference (points) [95 % CI] | p | holds? |", "|---|---:|---:|---|"]
    for a, b in pairs:
        seeds = sorted(set(by_method.get(a, {})) & set(by_method.get(b, {})))
        if len(seeds) < 2:
            lines.append(f"| {a} > {b} | (fewer than 2 common seeds) | | |")
            continue
        d = paired_difference([by_method[a][s] for s in seeds], [by_method[b][s] for s in seeds])
        verdict = "yes (interval above 0)" if d.low > 0 else "no (interval below 0)" if d.high < 0 else \
            "not shown (interval spans 0)"
        lines.append(f"| {a} > {b} | {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}] | {d.p:.3g} | {verdict} |")
    path = out / "orderings.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
