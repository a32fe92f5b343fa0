"""The median rule replayed on an unpruned search: which trials it would stop, and whether the choice survives.

    python benchmarks/pruning_replay.py runs/tune/tune_unpruned/study.journal \
        --warmup 5 --startup 2 --out benchmarks/results/tuned_fmnist1/unpruned/replay

An unpruned study has every trial's whole learning curve (one intermediate value per epoch and search seed). This
script walks its complete trials in the order they finished and asks Optuna's own ``MedianPruner`` (the pruner of
``search.pruner: median``, with the search's ``warmup_epochs`` and ``pruner_startup_trials``) at every step whether
it would have stopped the trial there, against the trials that had completed by then and that the replay itself
did not stop. A step's time is taken as the trial's start plus the step's share of its run time (the journal has
no per-step times). It writes ``replay.md`` (per study: each trial's knobs, objective, where it would stop, the
run time saved, and whether the best trial survives) and ``replay.png`` (the learning curves, cut where the rule
would stop them). The curves are the per-epoch values the pruner is given (for WiSE-FT the fine-tuned weights'
accuracy before the mix); a trial's objective is its runs' final metric, which can differ from its curve's end.

This answers "does pruning change the chosen configuration" on the same trials. A pruned search also differs in
what the sampler saw afterwards (pruned trials' last values), which this replay cannot show.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState


@dataclass
class Verdict:
    """One complete trial of the unpruned study, replayed."""

    number: int
    params: dict
    value: float  # its objective (mean over the search seeds)
    seconds: float
    steps: int  # intermediate values it reported
    stop: int | None  # the step the median rule would stop it at, None: it would complete
    curve: dict[int, float]

    @property
    def saved(self) -> float:
        """Run time the replayed stop saves (the share of the steps it would not run)."""
        return 0.0 if self.stop is None else self.seconds * (1 - (self.stop + 1) / self.steps)


def _when(trial: FrozenTrial, step: int, steps: int) -> float:
    """Approximate wall time at which ``trial`` reported ``step``."""
    start, end = trial.datetime_start.timestamp(), trial.datetime_complete.timestamp()
    return start + (step + 1) / steps * (end - start)


def _stop_step(trial: FrozenTrial, survivors: list[FrozenTrial], pruner: optuna.pruners.BasePruner) -> int | None:
    """The first step at which ``pruner`` would stop ``trial``, given the survivors that had completed by then."""
    steps = max(trial.intermediate_values) + 1
    for step in sorted(trial.intermediate_values):
        done = [t for t in survivors if t.datetime_complete.timestamp() <= _when(trial, step, steps)]
        study = optuna.create_study(direction="maximize")
        for t in done:
            study.add_trial(t)
        partial = optuna.trial.create_trial(
            state=TrialState.RUNNING, params=trial.params, distributions=trial.distributions,
            intermediate_values={s: v for s, v in trial.intermediate_values.items() if s <= step})
        if pruner.prune(study, partial):
            return step
    return None


def replay(trials: list[FrozenTrial], warmup: int, startup: int) -> list[Verdict]:
    """Every complete trial in the order it finished, with the step the median rule would stop it at."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.intermediate_values),
                      key=lambda t: t.datetime_complete)
    survivors: list[FrozenTrial] = []
    verdicts = []
    for trial in complete:
        stop = _stop_step(trial, survivors, pruner)
        if stop is None:
            survivors.append(trial)
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        seconds = float(trial.user_attrs.get("seconds", wall))  # the runs' own time where the trial recorded it
        verdicts.append(Verdict(trial.number, trial.params, float(trial.value), seconds,
                                max(trial.intermediate_values) + 1, stop, dict(trial.intermediate_values)))
    return verdicts


def _knobs(params: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in params.items())


def _where(step: int, epochs: int | None) -> str:
    return f"step {step}" + (f" (split {step // epochs + 1}, epoch {step % epochs + 1})" if epochs else "")


def summary(name: str, verdicts: list[Verdict], epochs: int | None) -> list[str]:
    """The markdown of one study: the verdicts and what they mean for the choice."""
    best = max(verdicts, key=lambda v: v.value)
    kept = [v for v in verdicts if v.stop is None]
    chosen = max(kept, key=lambda v: v.value)
    total, saved = sum(v.seconds for v in verdicts), sum(v.saved for v in verdicts)
    rank = {v.number: i + 1 for i, v in enumerate(sorted(verdicts, key=lambda v: -v.value))}
    lines = [f"## {name}", "",
             f"The median rule would stop {len(verdicts) - len(kept)} of {len(verdicts)} complete trials, saving "
             f"{saved / 3600:.2f} h of {total / 3600:.2f} h run time ({100 * saved / total:.0f} %). "
             f"The best trial (#{best.number}, {_knobs(best.params)}, {100 * best.value:.2f} %) "
             + ("survives: the choice is the same with pruning." if best.stop is None else
                f"would be stopped at {_where(best.stop, epochs)}; the replayed choice is #{chosen.number} "
                f"({_knobs(chosen.params)}, {100 * chosen.value:.2f} %, rank {rank[chosen.number]})."), "",
             "| trial | knobs | objective (%) | rank | replayed median rule | run time (min) | saved (min) |",
             "|---:|---|---:|---:|---|---:|---:|"]
    for v in sorted(verdicts, key=lambda v: v.number):
        verdict = "completes" if v.stop is None else f"stopped at {_where(v.stop, epochs)}"
        lines.append(f"| {v.number} | {_knobs(v.params)} | {100 * v.value:.2f} | {rank[v.number]} | {verdict} "
                     f"| {v.seconds / 60:.1f} | {v.saved / 60:.1f} |")
    return lines + [""]


def plot(studies: dict[str, list[Verdict]], epochs: int | None, path: Path) -> None:
    """Each study's learning curves: kept trials blue, stopped ones grey and dotted after the stop (x), best bold."""
    fig, axes = plt.subplots(1, len(studies), figsize=(6 * len(studies), 4.2), squeeze=False)
    for ax, (name, verdicts) in zip(axes[0], studies.items()):
        best = max(verdicts, key=lambda v: v.value).number
        for v in verdicts:
            steps = sorted(v.curve)
            ys = [100 * v.curve[s] for s in steps]
            colour, width = ("tab:blue" if v.stop is None else "0.55"), (2.4 if v.number == best else 1.0)
            cut = len(steps) if v.stop is None else steps.index(v.stop) + 1
            ax.plot(steps[:cut], ys[:cut], color=colour, lw=width, alpha=0.9)
            if v.stop is not None:
                ax.plot(steps[cut - 1:], ys[cut - 1:], color=colour, lw=width, ls=":", alpha=0.7)
                ax.scatter([v.stop], [100 * v.curve[v.stop]], marker="x", color="tab:red", zorder=3)
        if epochs:
            for b in range(epochs, max(max(v.curve) for v in verdicts) + 1, epochs):
                ax.axvline(b - 0.5, color="0.8", lw=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step (epochs of split 1, then split 2, ...)" if epochs else "step")
        ax.set_ylabel("per-epoch validation score (%): what the pruner sees", fontsize=9)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color="tab:blue", label="completes"),
               plt.Line2D([], [], color="0.55", ls=":", label="stopped (its unpruned rest dotted)"),
               plt.Line2D([], [], color="tab:red", marker="x", ls="", label="where the median rule stops it"),
               plt.Line2D([], [], color="k", lw=2.4, label="best trial")]
    ncol = 2 if len(studies) == 1 else 4
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * (4 // ncol) + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("journal", type=Path, help="the unpruned search's study.journal")
    parser.add_argument("--studies", nargs="*", help="study names (default: all in the journal)")
    parser.add_argument("--warmup", type=int, default=5, help="the search's warmup_epochs (n_warmup_steps)")
    parser.add_argument("--startup", type=int, default=2, help="the search's pruner_startup_trials")
    parser.add_argument("--epochs", type=int, help="epochs per split, to name steps (split k, epoch e)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.journal.is_file():
        raise SystemExit(f"{args.journal}: no such journal file (an unpruned search's <out>/study.journal)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(args.journal)))
    names = args.studies or [s.study_name for s in optuna.get_all_study_summaries(storage)]
    studies = {}
    for name in names:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        verdicts = replay(trials, args.warmup, args.startup)
        if not verdicts:
            raise SystemExit(f"{name}: no complete trial with intermediate values to replay")
        if math.isnan(max(v.value for v in verdicts)):
            raise SystemExit(f"{name}: a complete trial has no objective")
        studies[name] = verdicts
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# The median rule replayed on {args.journal}", "",
             (f"Optuna's MedianPruner(n_startup_trials={args.startup}, n_warmup_steps={args.warmup}), asked at every "
              "step of every complete trial, in the order the trials finished, against the trials completed by then "
              "that it did not stop itself (`benchmarks/pruning_replay.py`)."), ""]
    for name, verdicts in studies.items():
        lines += summary(name, verdicts, args.epochs)
    (args.out / "replay.md").write_text("\n".join(lines))
    plot(studies, args.epochs, args.out / "replay.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
