"""`regtune.cluster` without a cluster: options, a task's share of a grid, stopping between runs and trials, the
signal that becomes a stop, status from the run directories. The real Slurm runs in tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, ClassVar

import pytest

from regtune.bench.grid import check_out_dir, expand, grid_from_dict, run_grid
from regtune.cli import main
from regtune.cluster import SlurmError, SlurmOptions, _StopOnSignal, grid_status
from tests.bench.test_grid import tiny_grid
from tests.conftest import write_imagefolder


class _Done:
    interrupted = False
    metrics: ClassVar[dict[str, float]] = {"test_acc": 1.0}


def _recording_fit(ran: list[Path]) -> Any:
    def fit(config: Any = None, run_dir: Path | None = None, **kwargs: Any) -> _Done:
        assert run_dir is not None
        ran.append(Path(run_dir))
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "metrics.json").write_text("{}")
        return _Done()
    return fit


def test_options_come_from_the_file_then_the_flags_and_bad_ones_say_what_is_valid() -> None:
    options = SlurmOptions.from_sources({"partition": "gpu", "time_min": 30, "sbatch": {"qos": "low"}},
                                        {"time_min": 90, "partition": None, "cpus_per_task": 4})
    assert (options.partition, options.time_min, options.cpus_per_task, options.sbatch) == ("gpu", 90, 4,
                                                                                             {"qos": "low"})
    with pytest.raises(SlurmError, match="unknown option.*partiton.*valid:.*partition"):
        SlurmOptions.from_sources({"partiton": "gpu"})
    with pytest.raises(SlurmError, match="runs_per_task must be an integer >= 1"):
        SlurmOptions.from_sources({}, {"runs_per_task": 0})
    with pytest.raises(SlurmError, match="signal_delay_s .* shorter than the time limit"):
        SlurmOptions.from_sources({"time_min": 1, "signal_delay_s": 60})


def test_a_grid_file_may_say_where_it_runs_without_changing_what_it_is(tmp_path: Path) -> None:
    spec = tiny_grid(tmp_path / "data", tmp_path / "out")
    check_out_dir(grid_from_dict(spec))
    moved = grid_from_dict({**spec, "slurm": {"partition": "gpu", "time_min": 30}})
    check_out_dir(moved)  # the same grid: its folder is not refused
    assert moved.slurm == {"partition": "gpu", "time_min": 30}
    with pytest.raises(ValueError, match="'slurm' must be a mapping"):
        grid_from_dict({**spec, "slurm": ["gpu"]})


def test_a_task_runs_only_its_positions_and_stops_between_runs_when_asked(tmp_path: Path) -> None:
    grid = grid_from_dict(tiny_grid(write_imagefolder(tmp_path / "data"), tmp_path / "out"))
    runs = list(expand(grid))
    ran: list[Path] = []
    counts = run_grid(grid, fit_fn=_recording_fit(ran), positions=[1, 4])
    assert ran == [runs[1].run_dir, runs[4].run_dir] and counts["other_shards"] == len(runs) - 2
    asked = iter([False, True])
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, fit_fn=_recording_fit(ran), positions=[0, 2, 3], stop=lambda: next(asked))
    assert ran[2:] == [runs[0].run_dir]  # the second run was not started


def test_the_slurm_signal_becomes_a_stop_and_the_requeue_is_submitits(monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: handed.append(signum))  # submitit's handler
    try:
        with _StopOnSignal() as stop:
            assert not stop.requested()
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested() and handed == []  # nothing requeued in the middle of a batch
            with pytest.raises(KeyboardInterrupt):
                stop.requeue()
            assert handed == [signal.SIGUSR2]  # submitit's checkpoint-and-requeue gets the signal, once stopped
        assert signal.getsignal(signal.SIGUSR2) is not stop._on_signal  # restored on leaving
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_status_from_the_run_directories_alone(tmp_path: Path, capsys: Any) -> None:
    spec = tiny_grid(write_imagefolder(tmp_path / "data"), tmp_path / "out")
    grid = grid_from_dict(spec)
    runs = list(expand(grid))
    run_grid(grid, fit_fn=_recording_fit([]), positions=[0, 1])
    (runs[2].run_dir / "checkpoints").mkdir(parents=True)
    (runs[2].run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (runs[2].run_dir / "config.yaml").write_text("{}")
    key = str(runs[3].run_dir.relative_to(grid.out))
    (grid.out / "failures.json").write_text(json.dumps({key: {"error": "ValueError: bad image"}}))
    status = grid_status(grid)
    assert status["counts"] == {"finished": 2, "interrupted": 1, "failed": 1, "not started": len(runs) - 4}
    assert status["runs"][key] == "failed"
    path = tmp_path / "grid.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    assert main(["bench", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert f"{len(runs)} runs: 2 finished, 1 interrupted, 1 failed, {len(runs) - 4} not started" in out
    assert "failures.json" in out


@pytest.mark.slow
def test_a_stop_asked_before_training_listens_is_honoured_at_a_batch_end_and_resumes_exactly(tmp_path: Path) -> None:
    spec = tiny_grid(write_imagefolder(tmp_path / "data"), tmp_path / "out", fractions=[1.0], seeds=[0],
                     methods={"ft": {}})
    spec["base"]["data"]["batch_size"] = 2
    reference = grid_from_dict({**spec, "out": str(tmp_path / "reference")})
    run_grid(reference)
    grid = grid_from_dict(spec)
    calls = []

    def stop() -> bool:  # asked before the run (1), then at each batch start: the signal "arrives" at batch 5
        calls.append(1)
        return len(calls) >= 6

    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, stop=stop)
    (run,) = expand(grid)
    assert run.run_dir.joinpath("checkpoints", "last.ckpt").is_file() and not run.run_dir.joinpath(
        "metrics.json").is_file()
    assert len(calls) == 6  # the stop came at the end of the batch that asked, not later
    run_grid(grid)
    (done,) = expand(reference)
    ours, theirs = (json.loads((r.run_dir / "metrics.json").read_text()) for r in (run, done))
    assert {k: ours[k] for k in ("test_acc", "test_loss", "val_loss")} == {k: theirs[k] for k in ("test_acc",
                                                                                                  "test_loss",
                                                                                                  "val_loss")}


def _fake_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\n" + script)
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_scheduler_states_read_squeue_and_say_when_it_cannot_be_asked(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from regtune.cluster import scheduler_states

    _fake_squeue(tmp_path, monkeypatch, 'echo "12_0 RUNNING"; echo "12_1 PENDING"; echo "13 PENDING"\n')
    assert scheduler_states(["12", "13"]) == {"12_0": "RUNNING", "12_1": "PENDING", "13": "PENDING"}
    assert scheduler_states([]) == {}


def test_scheduler_states_gone_jobs_and_a_broken_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from regtune.cluster import scheduler_states

    _fake_squeue(tmp_path, monkeypatch, 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n')
    assert scheduler_states(["12"]) == {}  # every job has left the queue
    (tmp_path / "bin" / "squeue").write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2; exit 1\n")
    assert scheduler_states(["12"]) is None  # the status then comes from the run directories alone


def test_status_marks_the_runs_of_queued_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = grid_from_dict(tiny_grid(write_imagefolder(tmp_path / "data"), tmp_path / "out"))
    keys = [str(r.run_dir.relative_to(grid.out)) for r in expand(grid)]
    (grid.out / "slurm").mkdir(parents=True)
    (grid.out / "slurm" / "submissions.json").write_text(json.dumps(
        [{"job_id": "7", "kind": "bench", "tasks": {"7_0": keys[0:2], "7_1": keys[2:4], "7_2": keys[4:5]}}]))
    _fake_squeue(tmp_path, monkeypatch, 'echo "7_0 RUNNING"; echo "7_1 PENDING"\n')
    status = grid_status(grid)
    assert status["scheduler"] and status["jobs"] == {"7_0": "RUNNING", "7_1": "PENDING"}
    # a running task runs its first unfinished run, its others wait; a pending task's runs wait; 7_2 has ended
    assert [status["runs"][k] for k in keys[:5]] == ["running", "pending", "pending", "pending", "not started"]


def test_submitting_without_slurm_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: Any) -> None:
    spec = tiny_grid(write_imagefolder(tmp_path / "data"), tmp_path / "out")
    path = tmp_path / "grid.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no squeue
    assert main(["bench", str(path), "--executor", "slurm"]) == 2
    assert "sbatch is not on PATH: run on a Slurm login node, or use --executor local" in capsys.readouterr().err
    assert not (tmp_path / "out" / "slurm" / "submissions.json").exists()


def test_stop_when_never_sends_sigterm_that_nobody_handles(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from regtune.train.callbacks import StopWhen

    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # no trainer listens here
    stop = StopWhen(lambda: True)
    stop.on_train_batch_start(SimpleNamespace(received_sigterm=False), None, None, 0)  # would kill the process
    stop.on_train_batch_start(SimpleNamespace(received_sigterm=False), None, None, 1)
    assert [r.message for r in caplog.records].count(
        "a stop was asked for, but no SIGTERM handler listens (not the main thread): the run goes on to its end") == 1
