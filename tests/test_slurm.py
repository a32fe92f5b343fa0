"""`--executor slurm` against a real Slurm: a single-node cluster that scripts/slurm.sh installs and starts.

CI starts it (`.ci/run`) and sets REGTUNE_REQUIRE_SLURM=1, so there a cluster that cannot start fails these tests;
elsewhere they are skipped with the reason (no root, no apt, a package missing), never passed silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from regtune.bench.grid import expand, load_grid, run_grid
from regtune.cli import main
from regtune.cluster import grid_status, scheduler_states
from regtune.tune.search import load_search
from tests.bench.test_grid import tiny_grid
from tests.conftest import write_imagefolder
from tests.tune.test_tune import _search_dict, _trials

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm.sh"


def _up() -> bool:
    return shutil.which("squeue") is not None and subprocess.run(["squeue", "-h"], capture_output=True,
                                                                   timeout=30, check=False).returncode == 0


def _ours() -> bool:
    """The Slurm that answers is the test cluster of scripts/slurm.sh (ClusterName regtune), not a real one."""
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=False)
    return any(line.split("=", 1)[0].strip() == "ClusterName" and line.split("=", 1)[1].strip() == "regtune"
               for line in shown.stdout.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    """A running Slurm: the one scripts/slurm.sh started, or the one it starts now (and stops afterwards). Test jobs
    never go to another cluster."""
    if _up():
        if not _ours():
            pytest.skip("a Slurm other than scripts/slurm.sh's test cluster answers here: the tests submit no jobs "
                        "to it")
        yield
        return
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600,
                             check=False)
    if started.returncode != 0 or not _up():
        reason = f"Slurm could not be started by scripts/slurm.sh: {(started.stderr or started.stdout).strip()[-500:]}"
        if os.environ.get("REGTUNE_REQUIRE_SLURM"):
            pytest.fail(reason)
        pytest.skip(reason)
    yield
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("photos"), classes=3, train_per_class=10, test_per_class=4)


def _grid_file(path: Path, photos: Path, out: Path, **changes: Any) -> Path:
    spec = tiny_grid(photos, out, fractions=[1.0])
    spec["base"]["trainer"]["accelerator"] = "cpu"
    for key, value in changes.items():
        spec[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def _local(grid_file: Path, out: Path) -> dict[str, dict[str, Any]]:
    """The same grid run here, on one thread like a one-CPU task: its metrics by run."""
    grid = load_grid(grid_file, out=out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_grid(grid)
    finally:
        torch.set_num_threads(threads)
    return _metrics(grid)


def _metrics(grid: Any) -> dict[str, dict[str, Any]]:
    found = {}
    for run in expand(grid):
        path = run.run_dir / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            found[str(run.run_dir.relative_to(grid.out))] = {k: metrics[k] for k in ("test_acc", "test_loss",
                                                                                      "val_loss", "selected_epoch")}
    return found


def _submitted_job(out: Path) -> str:
    return json.loads((out / "slurm" / "submissions.json").read_text())[-1]["job_id"]


def _wait_gone(job_id: str, timeout: float = 600) -> None:
    """Until Slurm lists no task of the job (all ended, none pending or requeued)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not scheduler_states([job_id]):
            return
        time.sleep(1)
    raise AssertionError(f"job {job_id} still queued after {timeout} s: {scheduler_states([job_id])}")


def _logs(out: Path, job_id: str) -> str:
    """Every log of the job's tasks (``<id>/`` for a one-task job, ``<id>_<task>/`` for an array's tasks)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted((out / "slurm").glob(f"{job_id}*/*_log.*")))


@pytest.mark.slow
def test_a_grid_as_a_job_array_equals_the_grid_run_here(slurm: None, photos: Path, tmp_path: Path,
                                                        capsys: Any) -> None:
    grid_file = _grid_file(tmp_path / "grid.yaml", photos, tmp_path / "slurm")
    spec = yaml.safe_load(grid_file.read_text())
    spec["base"]["trainer"]["epochs"] = 1
    grid_file.write_text(yaml.safe_dump(spec))
    reference = _local(grid_file, tmp_path / "local")
    assert len(reference) == 4
    # two runs per task (a shard of the array; one run per task is the default, as in the tests below)
    assert main(["bench", str(grid_file), "--executor", "slurm", "--time-min", "10", "--runs-per-task", "2"]) == 0
    printed = capsys.readouterr().out
    job_id = _submitted_job(tmp_path / "slurm")
    assert f"submitted job array {job_id}: 2 task(s) for 4 unfinished run(s)" in printed
    grid = load_grid(grid_file)
    early = grid_status(grid)
    assert early["scheduler"] and sum(early["counts"].get(k, 0) for k in ("pending", "running", "finished")) == 4
    if early["counts"].get("finished", 0) == 0:  # submitted again while queued: the runs are not submitted twice
        assert main(["bench", str(grid_file), "--executor", "slurm"]) == 0
        assert "nothing submitted" in capsys.readouterr().out
    _wait_gone(job_id)
    assert _metrics(grid) == reference, _logs(tmp_path / "slurm", job_id)
    assert grid_status(grid)["counts"] == {"finished": 4}
    assert main(["bench", str(grid_file), "--executor", "slurm"]) == 0  # nothing left: nothing submitted
    assert "nothing submitted" in capsys.readouterr().out


@pytest.mark.slow
def test_a_preempted_task_is_requeued_and_ends_as_if_uninterrupted(slurm: None, photos: Path,
                                                                   tmp_path: Path) -> None:
    changes = {"seeds": [0], "methods": {"ft": {}}}
    grid_file = _grid_file(tmp_path / "grid.yaml", photos, tmp_path / "slurm", **changes)
    spec = yaml.safe_load(grid_file.read_text())
    spec["base"]["trainer"]["epochs"] = 12
    spec["base"]["data"]["batch_size"] = 1  # many short batches: the signal most likely lands mid-epoch
    grid_file.write_text(yaml.safe_dump(spec))
    reference = _local(grid_file, tmp_path / "local")
    # 30 min: submitit counts a signal in the last 10 minutes of the time limit as a timeout, not a preemption
    assert main(["bench", str(grid_file), "--executor", "slurm", "--time-min", "30"]) == 0
    job_id = _submitted_job(tmp_path / "slurm")
    grid = load_grid(grid_file)
    run = next(iter(expand(grid)))
    deadline = time.time() + 300
    while time.time() < deadline and len((run.run_dir / "epochs.csv").read_text().splitlines()
                                         if (run.run_dir / "epochs.csv").is_file() else []) < 2:
        time.sleep(0.2)
    assert grid_status(grid)["runs"][str(run.run_dir.relative_to(grid.out))] == "running"
    (task,) = json.loads((tmp_path / "slurm" / "slurm" / "submissions.json").read_text())[-1]["tasks"]
    subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=60)  # the pre-timeout signal
    _wait_gone(job_id)
    logs = _logs(tmp_path / "slurm", job_id)
    assert "Slurm signal SIGUSR2: stopping at the end of this batch to requeue" in logs, logs
    assert "checkpoint saved" in logs or "at the last end-of-epoch checkpoint" in logs, logs  # mid-epoch, or between
    assert "this job is preempted" in logs and "Requeued job" in logs, logs  # not counted as a timeout
    assert "ft imagefolder-f1.0 seed 0: resuming" in logs, logs
    assert _metrics(grid) == reference, logs


@pytest.mark.slow
def test_a_failing_run_is_reported_failed_and_not_requeued(slurm: None, photos: Path, tmp_path: Path,
                                                           capsys: Any) -> None:
    methods = {"ft": {}, "diverges": {"set": {"optim.lr": 1.0e8}}}
    grid_file = _grid_file(tmp_path / "grid.yaml", photos, tmp_path / "slurm", seeds=[0], methods=methods)
    assert main(["bench", str(grid_file), "--executor", "slurm", "--time-min", "10"]) == 0
    job_id = _submitted_job(tmp_path / "slurm")
    _wait_gone(job_id)
    grid = load_grid(grid_file)
    status = grid_status(grid)
    assert status["counts"] == {"finished": 1, "failed": 1}, _logs(tmp_path / "slurm", job_id)
    failures = json.loads((tmp_path / "slurm" / "failures.json").read_text())
    assert list(failures) == ["runs/imagefolder-f1.0/diverges/s0"] and "NonFiniteLoss" in str(failures)
    assert "Requeu" not in _logs(tmp_path / "slurm", job_id)
    capsys.readouterr()
    assert main(["bench", str(grid_file), "--status"]) == 0
    assert "2 runs: 1 finished, 1 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_two_tune_workers_as_array_tasks_share_one_study_and_stop_at_the_budget(slurm: None, photos: Path,
                                                                                tmp_path: Path,
                                                                                capsys: Any) -> None:
    data = _search_dict(photos, tmp_path / "out", trials=3)
    data["base"]["trainer"]["epochs"] = 1
    search_file = tmp_path / "search.yaml"
    search_file.write_text(yaml.safe_dump(data))
    assert main(["tune", str(search_file), "--executor", "slurm", "--workers", "2", "--time-min", "10"]) == 0
    printed = capsys.readouterr().out
    assert "submitted search: job array" in printed and "submitted finals: job array" in printed
    submissions = json.loads((tmp_path / "out" / "slurm" / "submissions.json").read_text())
    job_id, finals_id = (s["job_id"] for s in submissions)
    assert main(["tune", str(search_file), "--executor", "slurm", "--workers", "2"]) == 2  # not a second finals
    assert f"tune-search {job_id}" in capsys.readouterr().err
    _wait_gone(job_id)
    search = load_search(search_file)
    for name, trials in _trials(search).items():
        finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) == 3, (name, [t.state.name for t in trials], _logs(tmp_path / "out", job_id))
        assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    logs = [p.read_text() for p in sorted((tmp_path / "out" / "slurm").glob(f"{job_id}_*/*_log.err"))]
    assert len(logs) == 2  # two array tasks, each a worker on the one journal file
    ran = [log.count("over 1 seeds") + log.count("pruned during") for log in logs]
    assert sum(ran) == 2 * 3, logs  # the budget of both studies, each trial run by one of the two
    _wait_gone(finals_id)  # started after the search (afterany), each task a shard of the finals, then the report
    assert (tmp_path / "out" / "report" / "summary.md").is_file(), _logs(tmp_path / "out", finals_id)
    capsys.readouterr()
    assert main(["tune", str(search_file), "--status"]) == 0
    status = capsys.readouterr().out
    assert "imagefolder-f1.0/ft: 3 / 0 / 0 of 3" in status and "finals: 4 finished" in status
    assert f"tune-search {job_id}: {job_id}_0 not queued, {job_id}_1 not queued" in status
