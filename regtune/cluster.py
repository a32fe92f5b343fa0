"""Grids and searches on a Slurm cluster, through submitit: job arrays, requeue on the pre-timeout signal, status.

``regtune bench GRID --executor slurm`` submits one Slurm job array whose tasks run the grid's unfinished runs
(one run per task, or ``runs_per_task`` consecutive runs when runs are many and short); ``regtune tune SEARCH
--executor slurm --workers N`` submits N search workers that share one Optuna study (the journal file in the
output folder, on the shared filesystem, or ``--storage URL``), then the finals and the report as arrays that
start when the search has ended (``afterany`` dependencies). The submitting command returns at once; it prints the
job ids and where the logs go (``<out>/slurm/``), and ``--status`` tells what has finished, runs, waits or failed.

Preemption and time limits: submitit asks Slurm for a signal ``signal_delay_s`` before the time limit (``--signal
USR2@90``; the one submitit is configured with). regtune treats it as its stop request: the run in progress stops at
the end of its batch and saves a resumable checkpoint (exactly as on SIGTERM), then submitit requeues the task, which
continues from there with the same result as an uninterrupted run. A task that runs out of time
``max_requeues`` times in a row is not requeued again (submitit's count of timeouts; preemptions are not counted),
and a run that fails (bad data, a diverging loss) is recorded in ``failures.json`` and never requeued: requeueing
cannot fix it.

Resources come from the grid's or search's ``slurm`` section, overridden by the command line's flags::

    slurm:
      partition: gpu
      time_min: 120            # the time limit of one task
      cpus_per_task: 8
      gpus_per_task: 1
      mem: 32G
      array_parallelism: 16    # tasks running at once
      runs_per_task: 1         # >1: each task runs that many runs one after another
      max_requeues: 3          # timeouts in a row before a task is left failed
      signal_delay_s: 90
      setup: ["source ~/venvs/regtune/bin/activate"]   # shell lines run before the task
      sbatch: {qos: normal, account: mylab}            # any other sbatch option

Nothing here unpickles a file a user gives: the tasks' pickles are submitit's own, written by this submission.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regtune._io import atomic_write_json
from regtune.train.callbacks import sigterm_handled

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations are not evaluated at run time

__all__ = ["SlurmError", "SlurmOptions", "grid_status", "submit_grid", "submit_tune", "tune_status"]

_log = logging.getLogger(__name__)


class SlurmError(ValueError):
    """Bad Slurm options, or Slurm cannot be reached (the message says what to do)."""


@dataclass
class SlurmOptions:
    """The resources of every task of a submission (see the module docstring)."""

    partition: str | None = None
    time_min: int = 60
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    mem: str | None = None
    array_parallelism: int = 256
    runs_per_task: int = 1
    max_requeues: int = 3
    signal_delay_s: int = 90
    setup: list[str] = field(default_factory=list)
    sbatch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sources(cls, section: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> SlurmOptions:
        """The file's ``slurm`` section, then the command line's values (``None`` = not given)."""
        merged = {**(section or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise SlurmError(f"slurm: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))} "
                             "(any other sbatch option goes into slurm.sbatch, e.g. {qos: normal})")
        options = cls(**merged)
        for name in ("time_min", "cpus_per_task", "array_parallelism", "runs_per_task", "signal_delay_s"):
            value = getattr(options, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SlurmError(f"slurm.{name} must be an integer >= 1, got {value!r}")
        for name in ("gpus_per_task", "max_requeues"):
            value = getattr(options, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SlurmError(f"slurm.{name} must be an integer >= 0, got {value!r}")
        if options.signal_delay_s >= options.time_min * 60:
            raise SlurmError(f"slurm.signal_delay_s ({options.signal_delay_s} s) must be shorter than the time limit "
                             f"({options.time_min} min)")
        if not isinstance(options.setup, list) or not isinstance(options.sbatch, dict):
            raise SlurmError("slurm.setup must be a list of shell lines and slurm.sbatch a mapping of option -> value")
        return options


def _executor(folder: Path, options: SlurmOptions, name: str, dependency: str | None = None) -> Any:
    """A submitit Slurm executor writing its logs and pickles under ``folder/<job id>/``."""
    import shutil

    import submitit

    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH: run on a Slurm login node, or use --executor local")
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=options.max_requeues)
    parameters: dict[str, Any] = {
        "job_name": name, "time": options.time_min, "cpus_per_task": options.cpus_per_task,
        "array_parallelism": options.array_parallelism, "signal_delay_s": options.signal_delay_s,
        "additional_parameters": dict(options.sbatch),
    }
    if options.partition:
        parameters["partition"] = options.partition
    if options.gpus_per_task:
        parameters["gpus_per_task"] = options.gpus_per_task
    if options.mem:
        parameters["mem"] = str(options.mem)
    if options.setup:
        parameters["setup"] = list(options.setup)
    if dependency:
        parameters["dependency"] = dependency
    executor.update_parameters(**parameters)
    return executor


# -- inside a task ----------------------------------------------------------------------------------------------------


class _StopOnSignal:
    """Inside a submitit task: turn its preemption signal into regtune's stop request; requeue once it is honoured.

    submitit's own handler checkpoints and requeues at once, in the middle of a batch. This one only records the
    signal and raises SIGTERM at the process, which a training in progress honours at the end of its batch (it saves
    its checkpoint there); between runs, `requested` tells the loop to stop. `requeue` then hands the signal to
    submitit's handler, which pickles the task again and requeues it.
    """

    def __init__(self) -> None:
        from submitit.slurm.slurm import SlurmJobEnvironment

        self.signum = getattr(signal, "SIG" + SlurmJobEnvironment.USR_SIG)
        self.caught = False
        self._submitit = signal.getsignal(self.signum)

    def __enter__(self) -> Self:
        signal.signal(self.signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(self.signum, self._submitit)

    def _on_signal(self, signum: int, frame: Any) -> None:
        _log.warning("Slurm signal %s: stopping at the end of this batch to requeue", signal.Signals(signum).name)
        self.caught = True
        if sigterm_handled():
            signal.raise_signal(signal.SIGTERM)  # a training in progress stops after its batch (submitit bypasses it)

    def requested(self) -> bool:
        return self.caught

    def requeue(self) -> None:
        """submitit's checkpoint-and-requeue (exits the process), or a plain stop where no handler is installed."""
        if callable(self._submitit):
            self._submitit(self.signum, None)
        raise KeyboardInterrupt


def _task_setup() -> None:
    """Logging as on the command line, and torch's threads to the task's CPUs (Slurm does not bind them here)."""
    import torch

    from regtune.cli import configure_logging

    configure_logging(False)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        torch.set_num_threads(int(cpus))


def _run_stoppable(work: Callable[[Callable[[], bool]], Any]) -> Any:
    """``work(stop)`` under `_StopOnSignal`; requeued through submitit when it stopped for the signal."""
    with _StopOnSignal() as stop:
        try:
            return work(stop.requested)
        except KeyboardInterrupt:
            if stop.caught:
                stop.requeue()
            raise


class GridTask:
    """One array task of a grid: its runs by position in the grid's expansion order (submitit calls it)."""

    def __init__(self, grid: Any, stop_on_error: bool = False) -> None:
        self.grid, self.stop_on_error = grid, stop_on_error

    def __call__(self, positions: list[int]) -> dict[str, int]:
        from regtune.bench.grid import run_grid

        _task_setup()
        return _run_stoppable(lambda stop: run_grid(self.grid, stop_on_error=self.stop_on_error,
                                                    positions=positions, stop=stop))

    def checkpoint(self, positions: list[int]) -> Any:
        """What submitit requeues: the same task (its finished runs are skipped, the interrupted one resumed)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, positions)


class TuneTask:
    """One array task of a search: a worker (``"search"``), a finals shard (``"finals"``) or the refit."""

    def __init__(self, search: Any, storage_url: str | None, phase: str, workers: int) -> None:
        self.search, self.storage_url, self.phase, self.workers = search, storage_url, phase, workers

    def __call__(self, index: int) -> Any:
        _task_setup()
        return _run_stoppable(lambda stop: self._work(index, stop))

    def _work(self, index: int, stop: Callable[[], bool]) -> Any:
        from regtune.tune.pipeline import refit, run_tune
        from regtune.tune.report import study_summaries, unfinished
        from regtune.tune.study import run_worker

        if self.phase == "search":
            return run_worker(self.search, self.storage_url, stop=stop)
        summaries = study_summaries(self.search, self.storage_url)
        waiting = unfinished(summaries)
        if waiting:
            raise SlurmError(f"the search has not finished ({', '.join(waiting)}): its workers failed or were "
                             "cancelled; see regtune tune --status, then submit again")
        if self.phase == "refit":
            from regtune.train.callbacks import StopWhen

            return str(refit(self.search, summaries, callbacks=[StopWhen(stop)]))
        from regtune.bench.grid import run_grid
        from regtune.tune.report import finals_grid

        counts = run_grid(finals_grid(self.search, summaries), shard=(index + 1, self.workers), stop=stop)
        run_tune(self.search, self.storage_url, report_only=True)  # the last shard to end writes the whole report
        return counts

    def checkpoint(self, index: int) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, index)


# -- submitting -------------------------------------------------------------------------------------------------------


def _record(out: Path, entry: dict[str, Any]) -> Path:
    """Append a submission to ``<out>/slurm/submissions.json`` (what ``--status`` asks Slurm about)."""
    path = out / "slurm" / "submissions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append(entry)
    atomic_write_json(path, entries)
    return path


def _logs(folder: Path, jobs: list[Any]) -> Path:
    """Where submitit writes the tasks' logs: ``<id>/`` for one task, ``<id>_<task>/`` for each of an array's."""
    job_id = _array_id(jobs)
    return folder / (job_id if len(jobs) == 1 else f"{job_id}_*")


def _array_id(jobs: list[Any]) -> str:
    """The array's id (``"12"`` of ``"12_0"``; submitit submits a single task as a plain job, ``"12"``)."""
    return str(jobs[0].job_id).split("_")[0]


def submit_grid(grid: Any, options: SlurmOptions, stop_on_error: bool = False) -> dict[str, Any]:
    """Submit the grid's unfinished runs as one job array (nothing when every run has finished).

    Returns:
        ``{"job_id", "tasks", "runs", "logs", "queued"}``: the array's id (``None`` when nothing was submitted), its
        number of tasks and runs, the folder of its logs, and the runs that earlier tasks still hold (not submitted
        again).
    """
    from regtune.bench.grid import check_out_dir, expand
    from regtune.train.rundir import RunDir

    check_out_dir(grid)
    runs = list(expand(grid))
    queued = grid_status(grid)["runs"]  # a run that a task still holds is not submitted twice
    todo = [i for i, run in enumerate(runs) if RunDir(run.run_dir).status != "finished"
            and queued[str(run.run_dir.relative_to(grid.out))] not in ("running", "pending")]
    if not todo:
        return {"job_id": None, "tasks": 0, "runs": 0, "logs": None,
                "queued": sum(state in ("running", "pending") for state in queued.values())}
    k = options.runs_per_task
    chunks = [todo[i:i + k] for i in range(0, len(todo), k)]
    folder = grid.out / "slurm"
    executor = _executor(folder, options, f"regtune-{grid.name}")
    jobs = executor.map_array(GridTask(grid, stop_on_error), chunks)
    job_id = _array_id(jobs)
    _record(grid.out, {"job_id": job_id, "kind": "bench", "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "tasks": {str(job.job_id): [str(runs[i].run_dir.relative_to(grid.out)) for i in chunk]
                                 for job, chunk in zip(jobs, chunks, strict=True)}})
    return {"job_id": job_id, "tasks": len(chunks), "runs": len(todo), "logs": _logs(folder, jobs),
            "queued": sum(state in ("running", "pending") for state in queued.values())}


def submit_tune(search: Any, options: SlurmOptions, workers: int, storage_url: str | None = None,
                finals: bool = True, refit: bool = False) -> list[dict[str, Any]]:
    """Submit ``workers`` search workers, then (after them) ``workers`` finals shards and the refit.

    Returns:
        One ``{"phase", "job_id", "tasks", "logs"}`` per submitted array.
    """
    from regtune.tune.study import open_storage

    if workers < 1:
        raise SlurmError(f"--workers must be at least 1, got {workers}")
    live = [job for job, tasks in tune_status_jobs(search.out).items() if any(s != "not queued" for s in
                                                                               tasks.values())]
    if live:  # a second finals array would train the same runs at the same time
        raise SlurmError(f"{', '.join(live)} of this search still queued or running: wait for them (regtune tune "
                         "--status) or scancel them, then submit again")
    open_storage(search, storage_url)  # a bad URL fails here, before anything is submitted
    folder = search.out / "slurm"
    phases = ["search", *(["finals"] if finals else []), *(["refit"] if refit else [])]
    submitted: list[dict[str, Any]] = []
    dependency = None
    for phase in phases:
        count = 1 if phase == "refit" else workers
        executor = _executor(folder, options, f"regtune-{search.name}-{phase}", dependency)
        jobs = executor.map_array(TuneTask(search, storage_url, phase, workers), list(range(count)))
        job_id = _array_id(jobs)
        entry = {"phase": phase, "job_id": job_id, "tasks": count, "logs": _logs(folder, jobs)}
        _record(search.out, {"job_id": job_id, "kind": f"tune-{phase}",
                             "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "tasks": {str(j.job_id): []
                                                                                        for j in jobs}})
        submitted.append(entry)
        dependency = f"afterany:{job_id}"
    return submitted


# -- status -----------------------------------------------------------------------------------------------------------


def scheduler_states(job_ids: list[str]) -> dict[str, str] | None:
    """Slurm state (PENDING, RUNNING, ...) by task id (``"12_0"``, or ``"12"`` for a one-task submission) of the
    jobs Slurm still lists; ``None`` when squeue cannot be asked (then the status comes from the run directories
    only)."""
    if not job_ids:
        return {}
    try:
        listed = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True,
                                text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        _log.warning("squeue failed (%s): the status comes from the run directories only", err)
        return None
    if listed.returncode != 0:
        if "Invalid job id" in listed.stderr:  # every job has left the queue
            return {}
        _log.warning("squeue failed (%s): the status comes from the run directories only", listed.stderr.strip())
        return None
    states = {}
    for line in listed.stdout.splitlines():
        task, _, state = line.strip().partition(" ")
        states[task] = state
    return states


def _submissions(out: Path) -> list[dict[str, Any]]:
    path = out / "slurm" / "submissions.json"
    return json.loads(path.read_text()) if path.is_file() else []


def grid_status(grid: Any) -> dict[str, Any]:
    """Each run's state: ``finished``, ``failed``, ``running``, ``pending`` (its task waits in the queue, or runs
    an earlier run of its share), ``interrupted`` (a checkpoint, no task to continue it), ``started`` (running here,
    or stopped before its first checkpoint) or ``not started``.

    Returns:
        ``{"runs": {run key: state}, "counts": {state: n}, "jobs": {task: Slurm state}, "scheduler": bool}``.
    """
    from regtune.bench.grid import expand
    from regtune.train.rundir import RunDir

    failures_path = grid.out / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.is_file() else {}
    states: dict[str, str] = {}  # in the expansion order
    for run in expand(grid):
        key = str(run.run_dir.relative_to(grid.out))
        status = RunDir(run.run_dir).status
        states[key] = ("finished" if status == "finished" else "failed" if key in failures
                       else "interrupted" if status == "interrupted"
                       else "started" if status == "started" else "not started")  # started: no checkpoint yet
    submissions = _submissions(grid.out)
    jobs = scheduler_states([s["job_id"] for s in submissions])
    for submission in submissions:  # in submission order: a later submission of a run decides
        for task, task_runs in submission["tasks"].items():
            state = (jobs or {}).get(task)
            if state is None:
                continue
            waiting = [k for k in task_runs if states.get(k) not in ("finished", "failed")]
            for n, key in enumerate(waiting):
                states[key] = "running" if state == "RUNNING" and n == 0 else "pending"
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    return {"runs": states, "counts": counts, "jobs": jobs or {}, "scheduler": jobs is not None}


def tune_status(search: Any, storage_url: str | None = None) -> dict[str, Any]:
    """The studies' trial counts, the finals' run states (once the search has chosen) and the Slurm jobs."""
    from regtune.tune.report import finals_grid, study_summaries, unfinished

    summaries = study_summaries(search, storage_url)
    result: dict[str, Any] = {"studies": summaries}
    if not unfinished(summaries):
        result["finals"] = grid_status(finals_grid(search, summaries))
    jobs = scheduler_states([s["job_id"] for s in _submissions(search.out)])
    result["jobs"] = tune_status_jobs(search.out, jobs)
    result["scheduler"] = jobs is not None
    return result


def tune_status_jobs(out: Path, jobs: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """``"tune-<phase> <job id>" -> {task id: Slurm state or "not queued"}`` of the search's submissions."""
    submissions = _submissions(out)
    if jobs is None:
        jobs = scheduler_states([s["job_id"] for s in submissions])
    return {s["kind"] + " " + s["job_id"]: {t: (jobs or {}).get(t, "not queued") for t in s["tasks"]}
            for s in submissions}
