"""Benchmark grids: methods x datasets x fractions x seeds (x any config field), run, skipped when done, resumed.

A grid is a YAML file, or the name of one shipped with regtune (``regtune list grids``; their files are
``regtune/grids/<name>.yaml``, worked examples of everything below)::

    name: fmnist-quick                  # output folder name (default: the file's stem)
    out: runs/bench/fmnist-quick        # optional; default runs/bench/<name>
    base:                               # partial fit config applied to every run (as ``regtune fit --config``)
      data: {dataset: fashion_mnist, img_size: 128}
      trainer: {epochs: 15, progress_bar: false}
    datasets: [fashion_mnist]           # sugar for the axis data.dataset
    fractions: [0.01, 0.05]             # sugar for data.fraction (or per_class: [5, 10])
    seeds: [0, 1, 2]                    # sugar for trainer.seed
    axes:                               # any other field of the fit config, by dotted key
      optim.lr: [0.01, 0.02]
    where:                              # optional: overrides for the cells that match (all keys equal)
      - {match: {data.fraction: 1.0}, set: {trainer.epochs: 1}}
    baseline: ft                        # paired differences are taken against it (default: ft, else the first)
    methods:                            # label -> what differs from base
      ft: {}
      fmr: {regularizers: [fmr]}
      fmr-l100: {regularizers: [{name: fmr, args: {mode: provided, lambda_: 100}}]}
      lm_softmax: {criterion: lm_softmax}
      adarand-lr01: {regularizers: [adarand], set: {optim.lr: 0.01}}
      lp_ft-ema: {recipes: [lp_ft, ema]}  # named recipes (`regtune list recipes`), then `set` if any

Layout of the output folder::

    grid.yaml                       the grid as run (a rerun with a different grid in the same folder is refused)
    splits/<dataset>-<fraction>-s<seed>.json   one split manifest per (dataset, fraction, seed): every method of
                                               a cell trains on the very same images (long-tailed splits add
                                               their profile and ratio to the name, e.g. ``-exp100``)
    runs/<cell>/<method>/s<seed>/   one regtune run directory each
    failures.json                   runs that raised, with the error (the others go on)

A run with ``metrics.json`` is finished and skipped; one with ``checkpoints/last.ckpt`` but no metrics was
interrupted and is resumed from its last epoch; one with neither is started again. So an interrupted grid finishes
by running the same command again.

Several processes (GPUs, machines sharing the output folder) split a grid with ``shard=(i, n)``: process ``i`` of
``n`` (1-based) takes the runs ``i - 1, i - 1 + n, ...`` of the expansion order, a fixed assignment that needs no
coordination, so a shard that is killed and rerun takes the same runs again. Files the shards share (``grid.yaml``,
the split manifests, the report) are written atomically under unique temporary names; ``failures.json`` is updated
under a file lock.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regtune._io import atomic_write_json, atomic_write_text, load_yaml
from regtune.bench.shipped import resolve_grid
from regtune.train.config import DataConfig, FitConfig, apply_overrides, check_names, config_from_dict
from regtune.train.rundir import RunDir

__all__ = ["Grid", "GridError", "GridRun", "check_out_dir", "expand", "load_grid", "parse_shard", "run_grid",
           "write_split"]

_log = logging.getLogger(__name__)

_SUGAR = {"datasets": "data.dataset", "fractions": "data.fraction", "per_class": "data.per_class",
          "seeds": "trainer.seed"}
_GRID_KEYS = {"name", "out", "base", "axes", "methods", "baseline", "where", "slurm", *_SUGAR}


class GridError(ValueError):
    """The grid file is malformed, or the output folder holds another grid."""


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: its method, its coordinates on every axis, its config and its directory."""

    method: str
    coords: dict[str, Any]
    config: FitConfig
    run_dir: Path
    split_path: Path

    @property
    def seed(self) -> int:
        return self.config.trainer.seed

    @property
    def cell(self) -> dict[str, Any]:
        """Coordinates without the seed: the runs of one cell are the seeds of one method."""
        return {k: v for k, v in self.coords.items() if k != "trainer.seed"}


@dataclass
class Grid:
    """A parsed grid file (see the module docstring)."""

    name: str
    out: Path
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    methods: dict[str, dict[str, Any]]
    baseline: str
    source: dict[str, Any] = field(default_factory=dict)
    where: list[dict[str, Any]] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)  # resources of --executor slurm (`regtune.cluster`)


def _label(value: Any) -> str:
    text = str(value).replace("/", "_").replace(" ", "")
    return text if text else "none"


def load_grid(grid: str | Path, out: str | Path | None = None) -> Grid:
    """Read and check a grid: a grid file, or the name of a grid shipped with regtune (``"quick"``; see
    `regtune.bench.shipped`). An existing file of that name comes first.

    Args:
        grid: Path of a grid YAML, or a shipped grid's name (``regtune list grids``).
        out: Output folder instead of the grid's ``out`` (default ``runs/bench/<name>``).

    Raises:
        UnknownGridError: ``grid`` is neither a file nor a shipped grid (the message lists the shipped names).
        GridError: unknown keys, no methods, an axis without values, a baseline that is not a method, or a method
            or base config that is not a valid fit config.
    """
    path = resolve_grid(grid)
    data = load_yaml(path.read_text(encoding="utf-8")) or {}
    return grid_from_dict(data, default_name=path.stem, out=out)


def grid_from_dict(data: dict[str, Any], default_name: str = "grid", out: str | Path | None = None) -> Grid:
    """`load_grid` from an already parsed mapping."""
    unknown = sorted(set(data) - _GRID_KEYS)
    if unknown:
        raise GridError(f"unknown grid key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_GRID_KEYS))}")
    methods = data.get("methods") or {}
    if not isinstance(methods, dict) or not methods:
        raise GridError("a grid needs 'methods': a mapping of label -> config changes (e.g. ft: {})")
    axes: dict[str, list[Any]] = {}
    for key, dotted in _SUGAR.items():
        if key in data:
            axes[dotted] = list(data[key]) if isinstance(data[key], (list, tuple)) else [data[key]]
    if "data.fraction" in axes and "data.per_class" in axes:
        raise GridError("give 'fractions' or 'per_class', not both")
    for key, values in (data.get("axes") or {}).items():
        if key in axes:
            raise GridError(f"axis {key!r} is given twice")
        axes[key] = list(values) if isinstance(values, (list, tuple)) else [values]
    for key, values in axes.items():
        if not values:
            raise GridError(f"axis {key!r} has no values")
    axes.setdefault("trainer.seed", [0])
    baseline = data.get("baseline", "ft" if "ft" in methods else next(iter(methods)))
    if baseline not in methods:
        raise GridError(f"baseline {baseline!r} is not one of the methods {list(methods)}")
    where = data.get("where") or []
    if not isinstance(where, list):
        raise GridError("'where' must be a list of {match: {KEY: VALUE, ...}, set: {KEY: VALUE, ...}}")
    for i, rule in enumerate(where):
        if not isinstance(rule, dict) or set(rule) != {"match", "set"} or not isinstance(rule["match"], dict) \
                or not isinstance(rule["set"], dict) or not rule["match"]:
            raise GridError(f"where[{i}] must be {{match: {{KEY: VALUE, ...}}, set: {{KEY: VALUE, ...}}}}, "
                            f"got {rule!r}")
        missing = sorted(k for k in rule["match"] if k not in axes)
        if missing:
            raise GridError(f"where[{i}] matches on {', '.join(missing)}, which is not an axis of the grid "
                            f"(axes: {', '.join(axes)})")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise GridError("'slurm' must be a mapping of option -> value (partition, time_min, cpus_per_task, ...)")
    name = str(data.get("name") or default_name)
    grid = Grid(name=name, out=Path(out or data.get("out") or Path("runs") / "bench" / name),
                base=data.get("base") or {},
                axes=axes, methods={str(k): dict(v or {}) for k, v in methods.items()}, baseline=str(baseline),
                # where a grid runs is not what it is: a grid file with other resources fills the same folder
                source={k: v for k, v in data.items() if k != "slurm"}, where=where, slurm=slurm)
    _check_every_config(grid)
    return grid


def _check_every_config(grid: Grid) -> None:
    """Build and check every run's config (keys, values, names and arguments of terms) before anything runs."""
    checked: set[str] = set()
    for run in expand(grid):
        plain = run.config.to_dict()
        plain["trainer"].pop("seed")
        key = repr(plain)  # every distinct config but the seed: a refusal may depend on any field (mixup, AdaRand)
        if key in checked:
            continue
        try:
            check_names(run.config)
        except (KeyError, ValueError) as err:
            raise GridError(f"method {run.method!r} at {run.cell} seed {run.seed}: {err}") from err
        checked.add(key)


def _method_config(base: dict[str, Any], changes: dict[str, Any], label: str) -> dict[str, Any]:
    from regtune.train.recipes import UnknownRecipeError, recipe_overrides

    changes = dict(changes)
    recipes = changes.pop("recipes", []) or []
    try:  # the method's recipes first, its own `set` after them (it may refine a recipe's value)
        overrides = {**recipe_overrides(list(recipes)), **(changes.pop("set", {}) or {})}
    except UnknownRecipeError as err:
        raise GridError(f"method {label!r}: {err}") from err
    merged = json.loads(json.dumps(base))  # deep copy of plain data
    for section, value in changes.items():
        if section in ("regularizers", "criterion"):
            merged[section] = value
        elif isinstance(value, dict):
            merged.setdefault(section, {}).update(value)
        else:
            raise GridError(f"method {label!r}: {section!r} must be a mapping, 'regularizers', 'criterion', 'recipes' "
                            "or 'set'")
    return {"config": merged, "set": overrides}


def expand(grid: Grid) -> Iterator[GridRun]:
    """Every run of the grid, seeds innermost (a cell's seeds run one after another), methods inside cells."""
    keys = list(grid.axes)
    cell_keys = [k for k in keys if k != "trainer.seed"]
    for cell_values in itertools.product(*(grid.axes[k] for k in cell_keys)):
        cell = dict(zip(cell_keys, cell_values))
        for seed in grid.axes["trainer.seed"]:
            for label, changes in grid.methods.items():
                spec = _method_config(grid.base, changes, label)
                try:
                    config = config_from_dict(spec["config"])
                    coordinates = {**cell, "trainer.seed": seed}
                    matched = {k: v for rule in grid.where
                               if all(coordinates.get(key) == value for key, value in rule["match"].items())
                               for k, v in rule["set"].items()}
                    # cell-specific rules first, the method's own changes last (they define the method)
                    config = apply_overrides(config, {**coordinates, **matched, **spec["set"]})
                    if "data.fraction" in cell:
                        config = apply_overrides(config, {"data.per_class": None})
                    if "data.per_class" in cell:
                        config = apply_overrides(config, {"data.fraction": None})
                except ValueError as err:
                    raise GridError(f"method {label!r} at {cell} seed {seed}: {err}") from err
                d = config.data
                amount = f"f{d.fraction}" if d.fraction is not None else f"n{d.per_class}"
                cell_dir = "-".join([_label(d.dataset), amount] + [f"{k.split('.')[-1]}{_label(v)}"
                                                                    for k, v in cell.items()
                                                                    if k not in ("data.dataset", "data.fraction",
                                                                                 "data.per_class")])
                split_name = f"{_label(d.dataset)}-{amount}-vf{d.val_fraction}{_imbalance(d)}-s{seed}.json"
                split = grid.out / "splits" / split_name
                coords = {"data.dataset": d.dataset, **cell, "trainer.seed": seed}  # the dataset names every cell
                yield GridRun(method=label, coords=coords, config=config,
                              run_dir=grid.out / "runs" / cell_dir / _label(label) / f"s{seed}", split_path=split)


def _imbalance(d: DataConfig) -> str:
    """The long-tailed settings in a split manifest's name (nothing for a balanced split, whose names stay as they
    were): ``-exp100``, ``-step10m0.5``, ``-exp100-random``."""
    if d.imbalance_ratio is None:
        return ""
    minority = f"m{d.imbalance_minority}" if d.imbalance_profile == "step" else ""
    order = f"-{d.imbalance_order}" if d.imbalance_order != "index" else ""
    ratio = f"{d.imbalance_ratio:g}"
    if float(ratio) != d.imbalance_ratio:  # more digits than %g keeps: two such ratios must not share a manifest
        ratio = repr(d.imbalance_ratio)
    return f"-{d.imbalance_profile}{ratio}{minority}{order}"


def write_split(run: GridRun) -> None:
    """The split manifest of the run's (dataset, amount, seed), made once and shared by every method."""
    if run.split_path.is_file():
        return
    from regtune.data.datasets import build_dataset
    from regtune.data.subset import write_manifest
    from regtune.train.rundir import make_split

    d = run.config.data
    train_set = build_dataset(d.dataset, d.root, "train", download=d.download)
    split = make_split(run.config, train_set)
    run.split_path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(run.split_path, split, train_set.ids, d.dataset)


def check_out_dir(grid: Grid) -> None:
    """Record the grid in its output folder, or refuse a folder that holds another grid's results."""
    record = grid.out / "grid.yaml"
    as_run = yaml.safe_dump(grid.source, sort_keys=True)
    if record.is_file():
        if yaml.safe_dump(load_yaml(record.read_text()), sort_keys=True) != as_run:
            raise GridError(f"{grid.out} holds the results of a different grid ({record}); give another --out or "
                            "delete the folder")
        return
    grid.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, as_run)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N`` (the command line's ``--shard``)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise GridError(f"--shard {text!r}: expected I/N, e.g. 1/4 for the first of four processes") from None
    if not 1 <= index <= count:
        raise GridError(f"--shard {text!r}: I must be between 1 and N")
    return index, count


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if absent) for the duration of the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _record_failure(grid: Grid, key: str, failure: dict[str, str] | None) -> None:
    """Add (or, with ``None``, remove) a run's entry of ``failures.json``; read-modify-write under a lock (shards)."""
    path = grid.out / "failures.json"
    if failure is None and not path.is_file():
        return  # only this shard writes this run's entry: with no file there is nothing of it to remove
    with _locked(grid.out / ".failures.lock"):
        failures = json.loads(path.read_text()) if path.is_file() else {}
        if failure is None:
            if key not in failures:
                return
            failures.pop(key)
        else:
            failures[key] = failure
        _write_json(path, failures)


def run_grid(grid: Grid, fit_fn: Callable[..., Any] | None = None, stop_on_error: bool = False,
             dry_run: bool = False, shard: tuple[int, int] = (1, 1), positions: Collection[int] | None = None,
             stop: Callable[[], bool] | None = None) -> dict[str, int]:
    """Run every unfinished run of ``grid`` in order (finished ones are skipped, interrupted ones resumed).

    Args:
        grid: The parsed grid.
        fit_fn: `regtune.train.fit.fit` (replaceable in tests).
        stop_on_error: Raise on the first failing run instead of recording it in ``failures.json`` and going on.
        dry_run: Only report what would run.
        shard: ``(i, n)``: run only the runs ``i - 1, i - 1 + n, ...`` of the expansion order (1-based ``i``), so
            that ``n`` processes started with ``i = 1 .. n`` share the grid without overlap.
        positions: Run only these runs, by 0-based position in the expansion order (a Slurm array task's share);
            the others count as ``other_shards``.
        stop: Asked before each run and at the start of each training batch (`StopWhen`); when it answers true
            the run in progress stops at the end of its batch with a resumable checkpoint, and the grid stops as if
            interrupted (a scheduler's signal arrived).

    Returns:
        Counts: ``{"total", "other_shards", "done_before", "ran", "resumed", "failed"}`` (``total`` is the whole
        grid; ``other_shards`` the runs left to the other shards).

    Raises:
        KeyboardInterrupt: passed on after the interrupted run's checkpoint is in place (rerun to continue), or
            when ``stop`` asked for it.
    """
    if fit_fn is None:
        from regtune.train.fit import fit as fit_fn
    from regtune.train.callbacks import StopWhen

    index, count = shard
    if not 1 <= index <= count:
        raise GridError(f"shard {index}/{count}: the index must be between 1 and the number of shards")
    runs = list(expand(grid))
    counts = {"total": len(runs), "other_shards": 0, "done_before": 0, "ran": 0, "resumed": 0, "failed": 0}
    if not dry_run:
        check_out_dir(grid)
    chosen = set(positions) if positions is not None else None
    for i, run in enumerate(runs, 1):
        if (i - 1) % count != index - 1 or (chosen is not None and i - 1 not in chosen):
            counts["other_shards"] += 1
            continue
        status = RunDir(run.run_dir).status
        where = f"[{i}/{len(runs)}] {run.method} {run.run_dir.parent.parent.name} seed {run.seed}"
        if status == "finished":
            counts["done_before"] += 1
            continue
        if dry_run:
            _log.info("%s: would %s", where, "resume" if status == "interrupted" else "run")
            continue
        if stop is not None and stop():
            _log.warning("grid stopped before %s (asked to stop); run it again to continue", where)
            raise KeyboardInterrupt
        _log.info("%s: %s", where, "resuming" if status == "interrupted" else "starting")
        started = time.perf_counter()
        try:
            write_split(run)
            config = apply_overrides(run.config, {"data.split_manifest": str(run.split_path.absolute())})
            extra = {"callbacks": [StopWhen(stop)]} if stop is not None else {}
            if status == "interrupted":
                result = fit_fn(run_dir=run.run_dir, resume=True, **extra)
            else:
                result = fit_fn(config, run_dir=run.run_dir, overwrite=True, **extra)
        except KeyboardInterrupt:
            _log.warning("grid interrupted during %s; run the same command again to continue", where)
            raise
        except Exception as err:
            if stop_on_error:
                raise
            counts["failed"] += 1
            _record_failure(grid, str(run.run_dir.relative_to(grid.out)),
                            {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=5)})
            _log.error("%s failed (%s: %s); recorded in %s, going on", where, type(err).__name__, err,
                       grid.out / "failures.json")
            continue
        if getattr(result, "interrupted", False):
            _log.warning("grid interrupted during %s; run the same command again to continue", where)
            raise KeyboardInterrupt
        _record_failure(grid, str(run.run_dir.relative_to(grid.out)), None)
        counts["resumed" if status == "interrupted" else "ran"] += 1
        acc = getattr(result, "metrics", {}).get("test_acc")
        _log.info("%s: test accuracy %s (%.0f s)", where, f"{acc:.4f}" if acc is not None else "?",
                  time.perf_counter() - started)
    return counts


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload)
