"""Search files: a benchmark grid (``regtune/bench/grid.py``) plus a ``search`` section and search spaces.

A search file is a grid file whose methods may carry a ``space``, with a ``search`` section::

    name: tuned-fmnist1
    base: {data: {dataset: fashion_mnist, img_size: 64}, trainer: {epochs: 15, progress_bar: false}}
    fractions: [0.01]                 # one study per (cell, method)
    seeds: [0, 1, 2, 3, 4]            # the finals: fresh seeds the search never sees
    baseline: ft
    search:
      trials: 12                      # the budget: trials per method, the same for every method
      seeds: [100, 101, 102]          # the splits whose mean validation accuracy is a trial's objective
      objective: val_acc              # val_acc | val_bal_acc (balanced: mean per-class recall) of the chosen weights
      sampler_seed: 0                 # TPE's seed
      startup_trials: 4               # TPE's random trials before it models the results
      pruner_startup_trials: 2        # complete trials before the median rule prunes (default startup_trials // 2)
      pruner: median                  # median | halving | none (per-epoch validation accuracy)
      space:                          # knobs every method searches
        optim.lr: {low: 0.002, high: 0.05, log: true}
    methods:
      ft: {recipes: [ft]}
      fmr:
        recipes: [ft]
        regularizers: [fmr]
        space: {fmr.beta: {low: 5, high: 200, log: true}}   # <term>.<argument>: that term's argument

A knob is a dotted config key (``optim.lr``, ``data.re_prob``) or ``<term>.<argument>`` of one of the method's
regularizers or its criterion. Its range is ``{low, high}`` (floats; ``log: true`` samples on a log scale; ``int:
true`` integers; ``step`` a grid) or ``{choices: [...]}``. Every knob is checked before any trial runs: an unknown key,
term or argument, an empty or inverted range, a value the method refuses.

The objective (``search.objective``) is the validation accuracy (``val_acc``, default) or the balanced validation
accuracy (``val_bal_acc``, the mean per-class recall, for imbalanced classes) of each run's chosen weights, as its
``metrics.json`` records it, averaged over the search seeds; the pruner sees the same quantity after each epoch. The
runs choose their checkpoints by ``trainer.select`` (set ``trainer.select: val_bal_acc`` in ``base`` to choose them
by balanced accuracy too).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regtune._io import load_yaml
from regtune.bench.grid import Grid, GridError, GridRun, expand, grid_from_dict
from regtune.train.config import FitConfig, TermSpec, apply_overrides, check_names

__all__ = ["OBJECTIVES", "Knob", "Search", "SearchError", "StudySpec", "apply_params", "load_search",
           "search_from_dict", "studies"]

_SEARCH_KEYS = {"trials", "seeds", "sampler_seed", "startup_trials", "pruner_startup_trials", "pruner", "space",
                "heartbeat_s", "stale_after_s", "warmup_epochs", "orderings", "objective"}
PRUNERS = ("median", "halving", "none")
OBJECTIVES = {"val_acc": "validation accuracy", "val_bal_acc": "balanced validation accuracy"}  # metrics.json keys
_CONFIG_SECTIONS = ("data", "model", "optim", "trainer")


class SearchError(GridError):
    """The search file is malformed or a knob cannot be searched; nothing has run."""


@dataclass(frozen=True)
class Knob:
    """One searched value: a float or integer range, or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """The value Optuna's ``trial`` proposes for this knob."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """The values a check builds the config with: both ends of a range, every choice."""
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.integer else float
        return [cast(self.low), cast(self.high)]


@dataclass
class Search:
    """A parsed search file (see the module docstring)."""

    grid: Grid  # the finals: each method's best configuration on the fresh seeds
    trials: int
    seeds: list[int]
    spaces: dict[str, dict[str, Knob]]  # method -> knob key -> knob
    sampler_seed: int = 0
    startup_trials: int = 4
    pruner_startup_trials: int = 2
    pruner: str = "median"
    warmup_epochs: int = 2
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0
    objective: str = "val_acc"  # a key of OBJECTIVES
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.grid.name

    @property
    def out(self) -> Path:
        return self.grid.out

    @property
    def methods(self) -> list[str]:
        return list(self.grid.methods)

    def budget(self, method: str) -> int:
        """Trials of ``method``: the budget, or one for a method without knobs (its trials would repeat one
        another; runs are deterministic)."""
        return self.trials if self.spaces[method] else 1

    def search_grid(self) -> Grid:
        """The grid of the search's runs: every method on the search seeds (a trial changes its knobs)."""
        grid = copy.copy(self.grid)
        grid.axes = {**self.grid.axes, "trainer.seed": list(self.seeds)}
        return grid


def _knob(key: str, spec: Any, where: str) -> Knob:
    if not isinstance(spec, dict):
        raise SearchError(f"{where}: knob {key!r} must be {{low: L, high: H[, log: true, int: true, step: S]}} or "
                          f"{{choices: [...]}}, got {spec!r} (a fixed value goes into the method's 'set')")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise SearchError(f"{where}: knob {key!r}: 'choices' must be a non-empty list and come alone")
        return Knob(key, choices=tuple(spec["choices"]))
    unknown = sorted(set(spec) - {"low", "high", "log", "int", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise SearchError(f"{where}: knob {key!r} needs low and high (and optionally log, int, step); got "
                          f"{sorted(spec)}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise SearchError(f"{where}: knob {key!r}: low and high must be numbers, got {low!r} and {high!r}")
    if not low < high:
        raise SearchError(f"{where}: knob {key!r}: the range [{low}, {high}] is empty or inverted (low < high)")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SearchError(f"{where}: knob {key!r}: a log range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None and (log or not isinstance(step, (int, float)) or step <= 0):
        raise SearchError(f"{where}: knob {key!r}: step must be a positive number, and not with log")
    return Knob(key, low=low, high=high, log=log, integer=bool(spec.get("int", False)), step=step)


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SearchError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def load_search(path: str | Path, out: str | Path | None = None, base: dict[str, Any] | None = None,
                trials: int | None = None) -> Search:
    """Read and check a search file (or the name of one shipped with regtune, ``regtune list searches``).

    Args:
        path: The file, or a shipped search's name.
        out: Output folder instead of the file's ``out`` (default ``runs/tune/<name>``).
        base: Dotted keys set in the file's ``base`` config (``{"data.root": "photos"}``): the command line's
            ``--dataset``, ``--data-root`` and ``--set``.
        trials: The budget instead of the file's ``search.trials`` (``--trials``): a larger one continues a finished
            search to it, the same for every method.

    Raises:
        SearchError: anything malformed or unsearchable, before any trial runs.
    """
    from regtune.bench.shipped import UnknownGridError, resolve_grid

    try:
        path = resolve_grid(path, kind="searches")
    except UnknownGridError as err:
        raise SearchError(str(err)) from err
    data = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
    for key, value in (base or {}).items():
        node = data.setdefault("base", {}) or {}
        data["base"] = node
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    if trials is not None and isinstance(data.get("search"), dict):
        data["search"]["trials"] = trials
    return search_from_dict(data, default_name=Path(path).stem, out=out)


def search_from_dict(data: dict[str, Any], default_name: str = "search", out: str | Path | None = None) -> Search:
    """`load_search` from an already parsed mapping."""
    if not isinstance(data, dict) or not isinstance(data.get("search"), dict):
        raise SearchError("a search file needs a 'search' section (trials, seeds, space, ...); see `regtune tune "
                          "--help`")
    section = data["search"]
    unknown = sorted(set(section) - _SEARCH_KEYS)
    if unknown:
        raise SearchError(f"search: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_SEARCH_KEYS))}")
    trials = _int(section.get("trials"), "search.trials (the budget: trials per method)", 1)
    seeds = section.get("seeds", [100, 101, 102])
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds):
        raise SearchError(f"search.seeds must be a non-empty list of distinct seeds, got {seeds!r}")
    pruner = str(section.get("pruner", "median"))
    if pruner not in PRUNERS:
        raise SearchError(f"search.pruner {pruner!r}: one of {', '.join(PRUNERS)}")
    objective = str(section.get("objective", "val_acc"))
    if objective not in OBJECTIVES:
        raise SearchError(f"search.objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    methods = data.get("methods") or {}
    if not isinstance(methods, dict) or not methods:
        raise SearchError("a search needs 'methods': a mapping of label -> config changes (e.g. ft: {})")
    shared = section.get("space") or {}
    spaces, plain_methods = {}, {}
    for label, changes in methods.items():
        changes = dict(changes or {})
        own = changes.pop("space", None) or {}
        if not isinstance(own, dict) or not isinstance(shared, dict):
            raise SearchError(f"method {label!r}: 'space' must be a mapping of knob -> range")
        spaces[str(label)] = {k: _knob(k, v, f"method {label!r}") for k, v in {**shared, **own}.items()}
        plain_methods[label] = changes
    grid_data = {k: v for k, v in data.items() if k != "search"}
    grid_data["methods"] = plain_methods
    try:
        grid = grid_from_dict(grid_data, default_name=default_name,
                              out=out or data.get("out") or Path("runs") / "tune" / str(data.get("name") or
                                                                                          default_name))
    except GridError as err:
        raise SearchError(str(err)) from err
    overlap = sorted(set(seeds) & set(grid.axes["trainer.seed"]))
    if overlap:
        raise SearchError(f"the finals' seeds {overlap} are also search seeds: the finals must be fresh splits the "
                          "search never saw (change 'seeds' or 'search.seeds')")
    search = Search(grid=grid, trials=trials, seeds=list(seeds), spaces=spaces,
                    sampler_seed=_int(section.get("sampler_seed", 0), "search.sampler_seed", 0),
                    startup_trials=_int(section.get("startup_trials", 4), "search.startup_trials", 0),
                    pruner_startup_trials=_int(section.get("pruner_startup_trials",
                                                           max(1, int(section.get("startup_trials", 4)) // 2)),
                                               "search.pruner_startup_trials", 1),
                    pruner=pruner, warmup_epochs=_int(section.get("warmup_epochs", 2), "search.warmup_epochs", 0),
                    heartbeat_s=float(section.get("heartbeat_s", 10.0)),
                    stale_after_s=float(section.get("stale_after_s", 120.0)), objective=objective, source=data)
    orderings = section.get("orderings") or []
    if not isinstance(orderings, list) or not all(isinstance(o, list) and len(o) == 2 and set(o) <= set(methods)
                                                  for o in orderings):
        raise SearchError(f"search.orderings must be a list of [better, worse] method pairs, got {orderings!r}")
    if not search.heartbeat_s > 0 or not search.stale_after_s > 2 * search.heartbeat_s:
        raise SearchError("search.heartbeat_s must be > 0 and search.stale_after_s more than twice it")
    _check_knobs(search)
    return search


def apply_params(config: FitConfig, params: dict[str, Any]) -> FitConfig:
    """``config`` with a trial's knob values: dotted config keys, and ``<term>.<argument>`` of its terms.

    Raises:
        SearchError: a knob names neither a config key nor one of the config's terms.
    """
    overrides = {k: v for k, v in params.items() if k.split(".", 1)[0] in _CONFIG_SECTIONS}
    term_args = {k: v for k, v in params.items() if k not in overrides}
    config = apply_overrides(config, overrides) if overrides else config
    regularizers = list(config.regularizers)
    criterion = config.criterion
    for key, value in term_args.items():
        name, _, argument = key.partition(".")
        hits = [i for i, term in enumerate(regularizers) if term.name == name]
        if not argument or (not hits and criterion.name != name):
            terms = [t.name for t in regularizers] + [criterion.name]
            raise SearchError(f"knob {key!r}: not a config key (data.*, model.*, optim.*, trainer.*) nor "
                              f"<term>.<argument> of this method's terms ({', '.join(terms)})")
        for i in hits:
            regularizers[i] = TermSpec(name, {**regularizers[i].args, argument: value})
        if criterion.name == name:
            criterion = TermSpec(name, {**criterion.args, argument: value})
    return FitConfig(**{**{f: getattr(config, f) for f in ("data", "model", "optim", "trainer")},
                        "regularizers": tuple(regularizers), "criterion": criterion})


def _check_knobs(search: Search) -> None:
    """Build every method's config at each end of each knob and let the config and the terms check it."""
    seen = set()
    for run in expand(search.search_grid()):
        if run.method in seen:
            continue
        seen.add(run.method)
        for knob in search.spaces[run.method].values():
            for value in knob.extremes():
                try:
                    check_names(apply_params(run.config, {knob.key: value}))
                except SearchError as err:
                    raise SearchError(f"method {run.method!r}: {err}") from err
                except (KeyError, ValueError, TypeError) as err:
                    raise SearchError(f"method {run.method!r}, knob {knob.key!r} = {value!r}: {err}") from err


@dataclass(frozen=True)
class StudySpec:
    """One Optuna study: a method in a cell (dataset and amount), with its search runs per seed."""

    cell: str  # the cell's folder name, as the grid names it (``fashion_mnist-f0.01``)
    method: str
    runs: dict[int, GridRun]  # search seed -> the grid's run (config before the knobs, split manifest)

    @property
    def name(self) -> str:
        return f"{self.cell}/{self.method}"


def studies(search: Search) -> list[StudySpec]:
    """Every (cell, method) study of the search, cells outermost, methods in the file's order."""
    found: dict[tuple[str, str], dict[int, GridRun]] = {}
    for run in expand(search.search_grid()):
        found.setdefault((run.run_dir.parent.parent.name, run.method), {})[run.seed] = run
    return [StudySpec(cell, method, runs) for (cell, method), runs in found.items()]
