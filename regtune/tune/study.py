"""Running a search: one Optuna study per (cell, method), the same budget of trials for each, on any Optuna storage.

A trial draws its knob values from Optuna's TPE sampler, trains the method once per search seed (every trial of
every method on the same split manifests) without testing, and reports the mean validation accuracy of the chosen
weights as its objective (``search.objective``: ``val_acc``, or ``val_bal_acc``, the balanced accuracy). The same
quantity after each epoch feeds Optuna's pruner (steps ``i * epochs + e`` for seed ``i``, epoch ``e``: the same split
and epoch across trials), which stops hopeless trials early.

Budget and interruptions. The budget counts the trials that finished (complete or pruned) plus those running or
queued; a worker claims a trial under a lock, and a trial claimed beyond the budget (workers on several machines
racing) is marked failed with ``surplus`` and never runs. A running trial writes a heartbeat (a user attribute) every
``heartbeat_s``; one whose heartbeat is older than ``stale_after_s`` belongs to a worker that died: it is marked failed
with ``interrupted`` (kept, visible) and its knob values are queued again, so the search continues to the same set of
finished trials. TPE is seeded per trial from the search's sampler seed and the trial's position in the budget
(`trial_seed`), so an interrupted sequential search draws what an uninterrupted one draws.

Disk: a finished trial keeps each run's config, metrics and logs (25-40 KB per seed), not its checkpoints, weights or
cached features; an interrupted trial's runs are reduced to the same once no trial runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regtune.tune.search import OBJECTIVES, Search, SearchError, StudySpec, apply_params, studies

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations are not evaluated at run time

__all__ = ["COUNTED", "counted_trials", "open_storage", "run_search", "run_worker", "study_for"]

_log = logging.getLogger(__name__)
KEEP = {"config.yaml", "metrics.json", "epochs.csv", "steps.csv", "probe.json", "split.json"}


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # regtune logs what matters, once per trial
    return optuna


def _states() -> tuple[Any, ...]:
    state = _optuna().trial.TrialState
    return state.COMPLETE, state.PRUNED, state.RUNNING, state.WAITING


COUNTED = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


def open_storage(search: Search, url: str | None = None) -> Any:
    """The search's Optuna storage: ``url`` (any Optuna storage URL: ``sqlite:///x.db``, ``postgresql://...``) or, by
    default, the journal file ``<out>/study.journal`` (no server; processes on one machine, or machines sharing the
    folder, use it together).

    Raises:
        SearchError: the storage cannot be opened (the message says which and why).
    """
    optuna = _optuna()
    try:
        if url is None:
            from optuna.storages.journal import JournalFileBackend

            search.out.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(search.out / "study.journal")))
        storage = optuna.storages.get_storage(url)
        storage.get_all_studies()  # connect now: a bad URL fails before any trial
        return storage
    except Exception as err:  # any driver's error: one clear line
        first = (str(err).strip().splitlines() or [""])[0]  # drivers add lines (links, SQL) after the reason
        raise SearchError(f"cannot open the storage {url or search.out / 'study.journal'}: {type(err).__name__}: "
                          f"{first}") from err


def study_for(search: Search, spec: StudySpec, storage: Any) -> Any:
    """The Optuna study of ``spec`` (created on first use), maximising the mean of the search's objective."""
    optuna = _optuna()
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=_pruner(search))
    if study.user_attrs.get("budget") != search.budget(spec.method):  # once: every write grows the journal
        study.set_user_attr("budget", search.budget(spec.method))
    return study


def _pruner(search: Search) -> Any:
    optuna = _optuna()
    if search.pruner == "none":
        return optuna.pruners.NopPruner()
    if search.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, search.warmup_epochs))
    return optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup_trials,
                                       n_warmup_steps=search.warmup_epochs)


def counted_trials(study: Any, below: int | None = None) -> list[Any]:
    """The trials that count against the budget (complete, pruned, running, queued), optionally numbered below
    ``below``."""
    states = _states()
    return [t for t in study.get_trials(deepcopy=False, states=states) if below is None or t.number < below]


@contextlib.contextmanager
def _claim_lock(search: Search) -> Iterator[None]:
    """Serialises claiming trials between the processes that share the search folder."""
    search.out.mkdir(parents=True, exist_ok=True)
    with open(search.out / ".claim.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reap_stale(study: Any, search: Search) -> None:
    """Mark trials whose worker died as failed (``interrupted``) and queue their knob values again, once."""
    optuna = _optuna()
    now = time.time()
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        beat = trial.user_attrs.get("heartbeat", trial.datetime_start.timestamp() if trial.datetime_start else now)
        if now - beat <= search.stale_after_s:
            continue
        _log.warning("%s: trial %d stopped without finishing (no heartbeat for %.0f s)", study.study_name,
                     trial.number, now - beat)
        _interrupted(study, trial.number, trial.params)


def _interrupted(study: Any, number: int, params: dict[str, Any]) -> None:
    """Mark a running trial failed and queue its knob values again (the queued trial's ``retry_of`` names it: the
    report counts it as interrupted, not as a failure of the method)."""
    optuna = _optuna()
    try:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    except (ValueError, RuntimeError):  # it finished (or was marked) meanwhile
        return
    if number not in {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}:
        study.enqueue_trial(params, user_attrs={"retry_of": number})


def _claim(study: Any, search: Search, spec: StudySpec) -> tuple[Any, int] | None:
    """A trial to run and its position in the budget, or ``None`` when the budget is taken."""
    optuna = _optuna()
    with _claim_lock(search):
        _reap_stale(study, search)
        queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        budget = search.budget(spec.method)
        if not queued and len(counted_trials(study)) >= budget:
            return None
        trial = study.ask()
        position = len(counted_trials(study, below=trial.number))
        if position >= budget:  # another machine claimed the last one first
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
    return trial, position


class _Heartbeat:
    """Writes the trial's heartbeat every ``interval`` seconds until stopped."""

    def __init__(self, trial: Any, interval: float) -> None:
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.trial.set_user_attr("heartbeat", time.time())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _reporter(trial: Any, offset: int, objective: str = "val_acc") -> Any:
    """A Lightning callback that reports each epoch's ``objective`` (validation accuracy or balanced accuracy; the
    better of the raw and EMA weights' where an EMA is kept) to the pruner and stops a pruned run."""
    import lightning.pytorch as pl

    name = objective.removeprefix("val_")  # val_bal_acc -> select/bal_acc, val/bal_acc

    class _Report(pl.Callback):
        pruned = False

        def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            metrics = trainer.callback_metrics
            value = metrics.get(f"select/{name}", metrics.get(f"val/{name}"))
            if trainer.sanity_checking or value is None:
                return
            trial.report(float(value), offset + trainer.current_epoch)
            if trial.should_prune():
                self.pruned = True
                trainer.should_stop = True

    return _Report()


def _strip(run_dir: Path) -> None:
    """Keep a finished trial run's record (config, metrics, logs), not its checkpoints, weights or caches."""
    for path in run_dir.iterdir():
        if path.name in KEEP:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def trial_dir(search: Search, spec: StudySpec, number: int) -> Path:
    return search.out / "trials" / spec.cell / spec.method / f"t{number:03d}"


def trial_seed(sampler_seed: int, position: int) -> int:
    """The TPE seed of the trial at ``position`` of a study's budget: NumPy's SeedSequence of the pair.

    Not ``sampler_seed + position``: the Mersenne Twister's first draws from small consecutive seeds are correlated
    (seeds 0 and 3 both start near (0.55, 0.71)), so the random start-up trials of a study would nearly coincide.
    """
    import numpy as np

    return int(np.random.SeedSequence([sampler_seed, position]).generate_state(1)[0])


def _run_trial(search: Search, spec: StudySpec, trial: Any, position: int, fit_fn: Callable[..., Any],
               stop: Callable[[], bool] | None = None) -> None:
    """Draw the knobs, train once per search seed, tell Optuna the mean of the objective (or that it pruned)."""
    from regtune.bench.grid import write_split
    from regtune.train.callbacks import StopWhen
    from regtune.train.config import apply_overrides
    from regtune.train.module import NonFiniteLossError

    optuna = _optuna()
    study = trial.study
    study.sampler = optuna.samplers.TPESampler(seed=trial_seed(search.sampler_seed, position),
                                               n_startup_trials=search.startup_trials)
    params = {knob.key: knob.suggest(trial) for knob in search.spaces[spec.method].values()}
    trial.set_user_attr("position", position)
    folder = trial_dir(search, spec, trial.number)
    shutil.rmtree(folder, ignore_errors=True)  # a number is never reused; leftovers are a crashed attempt's
    values, seconds = [], 0.0
    with _Heartbeat(trial, search.heartbeat_s):
        for i, (seed, run) in enumerate(sorted(spec.runs.items())):
            write_split(run)
            config = apply_overrides(apply_params(run.config, params),
                                     {"data.split_manifest": str(run.split_path.absolute()),
                                      "trainer.progress_bar": False})
            reporter = _reporter(trial, i * max(1, config.trainer.epochs), search.objective)
            try:
                stops = [StopWhen(stop)] if stop is not None else []  # a scheduler's signal (regtune.cluster)
                result = fit_fn(config, run_dir=folder / f"s{seed}", overwrite=True, callbacks=[reporter, *stops],
                                test=False)
            except NonFiniteLossError as err:  # a diverging configuration is a (hopeless) result, not a crash
                trial.set_user_attr("diverged", f"seed {seed}: {err}")
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                _log.info("%s trial %d (%d/%d): diverged during seed %d, stopped as pruned %s", spec.name,
                          trial.number, position + 1, search.budget(spec.method), seed, params)
                return
            if getattr(result, "interrupted", False):
                raise KeyboardInterrupt
            _strip(folder / f"s{seed}")
            seconds += float(result.metrics.get("wall_time_s", 0.0))
            trial.set_user_attr("seconds", round(seconds, 1))
            if reporter.pruned:
                trial.set_user_attr("pruned_at_seed", seed)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                _log.info("%s trial %d (%d/%d): pruned during seed %d (%.0f s) %s", spec.name, trial.number,
                          position + 1, search.budget(spec.method), seed, seconds, params)
                return
            if result.metrics.get(search.objective) is None:
                raise SearchError(f"{spec.name}: the run has no {search.objective} (no validation images to choose "
                                  "on: raise data.val_fraction or use more images per class)")
            values.append(float(result.metrics[search.objective]))
            trial.set_user_attr(search.objective, values)
    value = sum(values) / len(values)
    study.tell(trial, value)
    _log.info("%s trial %d (%d/%d): %s %.4f over %d seeds (%.0f s) %s", spec.name, trial.number,
              position + 1, search.budget(spec.method), OBJECTIVES[search.objective], value, len(values), seconds,
              params)


def run_worker(search: Search, storage_url: str | None = None, fit_fn: Callable[..., Any] | None = None,
               wait: bool = True, stop: Callable[[], bool] | None = None) -> int:
    """Run trials until every study's budget is taken; then, with ``wait``, until no trial of any worker is running
    or queued (a queued one, the retry of an interrupted trial, is run here).

    Args:
        stop: Asked before each trial and while waiting; when it answers true the worker stops as if interrupted
            (a scheduler's signal arrived between trials; a trial in progress stops on SIGTERM).

    Returns:
        The number of trials this worker ran.

    Raises:
        KeyboardInterrupt: the worker was interrupted (its trial's knob values are queued again) or ``stop`` asked.
    """
    if fit_fn is None:
        from regtune.train.fit import fit as fit_fn
    storage = open_storage(search, storage_url)
    specs = studies(search)
    ran = 0
    while True:
        for spec in specs:
            ran += _run_study(search, spec, study_for(search, spec, storage), fit_fn, stop)
        if not wait:
            return ran
        running, queued = _pending(search, specs, storage)
        if queued:
            continue
        if not running:
            _strip_interrupted(search, specs, storage)
            return ran
        _log.info("waiting for %d trial(s) of other workers", running)
        time.sleep(min(search.heartbeat_s, 30.0))
        _check_stop(stop)


def _check_stop(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        _log.warning("worker stopped between trials (asked to stop); run it again to continue")
        raise KeyboardInterrupt


def _run_study(search: Search, spec: StudySpec, study: Any, fit_fn: Callable[..., Any],
               stop: Callable[[], bool] | None = None) -> int:
    """Claim and run trials of one study until its budget is taken; the number run."""
    ran = 0
    while True:
        _check_stop(stop)
        claimed = _claim(study, search, spec)
        if claimed is None:
            return ran
        trial, position = claimed
        try:
            _run_trial(search, spec, trial, position, fit_fn, stop)
        except KeyboardInterrupt:
            _log.warning("%s: trial %d interrupted; its values are queued again (run the same command to "
                         "continue)", spec.name, trial.number)
            _interrupted(study, trial.number, trial.params)
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            study.tell(trial, state=_optuna().trial.TrialState.FAIL)
            raise
        ran += 1
    return ran


def _strip_interrupted(search: Search, specs: list[StudySpec], storage: Any) -> None:
    """Once no trial runs anywhere: the runs of interrupted trials keep their records, not the checkpoints a killed
    run left (about 50 MB each; the retry started afresh)."""
    for spec in specs:
        for trial in study_for(search, spec, storage).get_trials(deepcopy=False):
            retry_of = trial.user_attrs.get("retry_of")
            folder = trial_dir(search, spec, retry_of) if retry_of is not None else None
            for run_dir in folder.iterdir() if folder is not None and folder.is_dir() else ():
                if run_dir.is_dir():
                    _strip(run_dir)


def _pending(search: Search, specs: list[StudySpec], storage: Any) -> tuple[int, int]:
    """``(running, queued)`` trials over the studies, after marking the stale ones interrupted."""
    optuna = _optuna()
    running = queued = 0
    for spec in specs:
        study = study_for(search, spec, storage)
        with _claim_lock(search):
            _reap_stale(study, search)
        running += len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        queued += len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    return running, queued


def run_search(search: Search, storage_url: str | None = None, workers: int = 1,
               fit_fn: Callable[..., Any] | None = None) -> None:
    """Run the search to its budget with ``workers`` local processes (each one a `run_worker`)."""
    if workers < 1:
        raise SearchError(f"--workers must be at least 1, got {workers}")
    open_storage(search, storage_url)  # a bad URL fails here, once
    if workers == 1:
        run_worker(search, storage_url, fit_fn)
        return
    import multiprocessing

    import torch

    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    processes = [context.Process(target=_worker_main, args=(search, storage_url, threads), daemon=False)
                 for _ in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} workers failed (exit codes {failed}); run the same command "
                           "again to continue the search")


def _worker_main(search: Search, storage_url: str | None, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from regtune.cli import configure_logging

    configure_logging(False)  # as the command line: regtune's lines, Lightning's warnings only
    run_worker(search, storage_url)
