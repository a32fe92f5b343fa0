"""`regtune tune` from end to end: the search, its report, the finals on fresh seeds, the refit of the choice."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from regtune.train.config import apply_overrides
from regtune.tune.report import (
    chosen,
    finals_grid,
    study_summaries,
    unfinished,
    write_orderings,
    write_search_report,
)
from regtune.tune.search import Search, apply_params, studies
from regtune.tune.study import run_search

__all__ = ["choice_table", "refit", "run_tune"]

_log = logging.getLogger(__name__)
_TEST_METRIC = {"val_acc": "test_acc", "val_bal_acc": "test_bal_acc"}  # search.objective -> the finals' metric


def run_tune(search: Search, storage_url: str | None = None, workers: int = 1, finals: bool = True,
             refit_best: bool = False, report_only: bool = False,
             fit_fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Search (unless ``report_only``), report it, run and report the finals, refit the chosen configuration.

    Each step continues where an earlier call stopped. The test set is read only by the finals and the refit, after
    the search has chosen.

    Returns:
        ``{"summaries", "search", "finals", "report", "orderings", "refit"}``: the studies' summaries, the finals'
        run counts (as `regtune.bench.grid.run_grid` returns them) and the written paths (only for the steps that
        ran).
    """
    if not report_only:
        run_search(search, storage_url, workers, fit_fn)
    summaries = study_summaries(search, storage_url)
    result: dict[str, Any] = {"summaries": summaries,
                              "search": write_search_report(search, summaries, search.out / "search")}
    waiting = unfinished(summaries)
    if finals and report_only and waiting:
        _log.info("finals not reported: the search is not finished (%s)", ", ".join(waiting))
        finals = False
    if finals:
        from regtune.bench.aggregate import collect_grid, write_report

        grid = finals_grid(search, summaries)
        if not report_only:
            result["finals"] = _run_finals(grid, workers, fit_fn)
        records = collect_grid(grid)
        metric = _TEST_METRIC[search.objective]  # the finals are compared by what the search chose on
        result["report"] = write_report(records, search.out / "report", baseline=grid.baseline, metric=metric,
                                        title=f"{search.name}: each method tuned ({search.trials} trials), "
                                              "tested on fresh seeds")
        result["orderings"] = write_orderings(search, records, search.out / "report", metric=metric)
    if refit_best:
        result["refit"] = refit(search, summaries, fit_fn)
    return result


def _run_finals(grid: Any, workers: int, fit_fn: Callable[..., Any] | None) -> dict[str, int]:
    """The finals grid, split over ``workers`` processes (its shards) like the search."""
    from regtune.bench.grid import run_grid

    if workers == 1 or fit_fn is not None:
        return run_grid(grid, fit_fn=fit_fn)
    import multiprocessing

    import torch

    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    with context.Pool(workers) as pool:
        shards = pool.starmap(_finals_shard, [(grid, (i, workers), threads) for i in range(1, workers + 1)])
    total = {key: sum(s[key] for s in shards) for key in shards[0]}
    total["total"] = shards[0]["total"]
    total["other_shards"] = 0
    return total


def _finals_shard(grid: Any, shard: tuple[int, int], threads: int) -> dict[str, int]:
    import torch

    from regtune.bench.grid import run_grid

    torch.set_num_threads(threads)
    from regtune.cli import configure_logging

    configure_logging(False)  # as the command line: regtune's lines, Lightning's warnings only
    return run_grid(grid, shard=shard)


def choice_table(summaries: list[dict[str, Any]]) -> str:
    """What was chosen and why: each study's best validation accuracy, mean ± std over the search seeds."""
    best = chosen(summaries)
    lines = []
    for s in sorted(summaries, key=lambda s: -(s["best_value"] if s["best_value"] is not None else -1.0)):
        value = (f"{100 * s['best_value']:6.2f} ± {100 * s['best_val_std']:.2f} %" if s["best_value"] is not None
                 else "   (no complete trial)")
        knobs = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in (s["best_params"] or {}).items())
        mark = "->" if s is best else "  "
        lines.append(f"{mark} {s['study']:<40} validation {value}  {knobs}")
    return "\n".join(lines)


def refit(search: Search, summaries: list[dict[str, Any]], fit_fn: Callable[..., Any] | None = None,
          callbacks: Sequence[Any] = ()) -> Path:
    """Train the chosen method with its chosen knobs as a normal run (tested once): ``<out>/refit``.

    The run draws its own split at the finals' first seed (fresh to the search) from the same data and amount. An
    interrupted refit is resumed where it stopped.

    Raises:
        KeyboardInterrupt: the refit was interrupted (its checkpoint is kept; the same call continues it).
    """
    if fit_fn is None:
        from regtune.train.fit import fit as fit_fn
    from regtune.train.rundir import RunDir

    best = chosen(summaries)
    spec = next(s for s in studies(search) if s.name == best["study"])
    run = next(iter(spec.runs.values()))
    seed = search.grid.axes["trainer.seed"][0]
    config = apply_overrides(apply_params(run.config, best["best_params"]),
                             {"data.split_manifest": None, "trainer.seed": seed})
    run_dir = search.out / "refit"
    status = RunDir(run_dir).status
    if status == "finished":
        _log.info("refit: %s is finished already", run_dir)
        return run_dir
    _log.info("refit: %s with %s, seed %d -> %s", best["study"], best["best_params"], seed, run_dir)
    if status == "interrupted":
        result = fit_fn(run_dir=run_dir, resume=True, callbacks=list(callbacks))
    else:
        result = fit_fn(config, run_dir=run_dir, overwrite=True, callbacks=list(callbacks))
    if getattr(result, "interrupted", False):
        raise KeyboardInterrupt
    return run_dir
