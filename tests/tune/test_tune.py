"""`regtune tune`: budgets, resumption, pruning, selection on validation only, bad input, refit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from regtune.cli import main
from regtune.tune.search import SearchError, load_search, search_from_dict
from regtune.tune.study import run_search, study_for
from tests.conftest import TINY_BACKBONE, write_imagefolder

ROOT = Path(__file__).resolve().parents[2]


def _search_dict(root: Path, out: Path, methods: dict[str, Any] | None = None, **search: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "out": str(out),
        "base": {"data": {"dataset": "imagefolder", "root": str(root), "img_size": 32, "batch_size": 8,
                          "num_workers": 0, "val_fraction": 0.3},
                 "model": {"backbone": TINY_BACKBONE, "pretrained": "none"},
                 "trainer": {"epochs": 2, "progress_bar": False, "accelerator": "cpu"}},
        "fractions": [1.0],
        "seeds": [0, 1],
        "search": {"trials": 3, "seeds": [100], "startup_trials": 1, "heartbeat_s": 0.2, "stale_after_s": 1.5,
                   "space": {"optim.lr": {"low": 0.001, "high": 0.1, "log": True}}, **search},
        "methods": methods or {"ft": {"recipes": ["ft"]},
                               "head_l1": {"recipes": ["ft"], "regularizers": ["head_l1"],
                                           "space": {"head_l1.weight": {"low": 1e-4, "high": 1e-2, "log": True}}}},
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("photos"), classes=3, train_per_class=10, test_per_class=4)


def _trials(search: Any) -> dict[str, list[Any]]:
    from regtune.tune.search import studies
    from regtune.tune.study import open_storage

    storage = open_storage(search)
    return {spec.name: study_for(search, spec, storage).get_trials(deepcopy=False) for spec in studies(search)}


# ------------------------------------------------------------------------------------------------------------------
# A fake fit: what a trial sees of a run (callbacks per epoch, metrics), in milliseconds


@dataclass
class _Trainer:
    current_epoch: int = 0
    callback_metrics: dict[str, float] = field(default_factory=dict)
    sanity_checking: bool = False
    should_stop: bool = False


@dataclass
class _Result:
    metrics: dict[str, Any]
    interrupted: bool = False


def fake_fit(curve: Any) -> Any:
    """``fit`` whose validation accuracy after epoch e is ``curve(config, e)``; records every call."""
    calls = []

    def fit(config: Any, run_dir: Path, overwrite: bool, callbacks: Any, test: bool) -> _Result:
        calls.append({"config": config, "test": test})
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "checkpoints").mkdir(exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text("x")
        trainer = _Trainer()
        value = 0.0
        for epoch in range(config.trainer.epochs):
            trainer.current_epoch = epoch
            value = curve(config, epoch)
            trainer.callback_metrics = {"val/acc": value}
            for callback in callbacks:
                callback.on_validation_end(trainer, None)
            if trainer.should_stop:
                break
        return _Result({"val_acc": value, "wall_time_s": 1.0 + trainer.current_epoch})

    fit.calls = calls
    return fit


def test_every_method_gets_the_budget_and_a_rerun_adds_no_trial(photos: Path, tmp_path: Path) -> None:
    search = search_from_dict(_search_dict(photos, tmp_path / "out"))
    fit = fake_fit(lambda config, epoch: config.optim.lr)  # the higher the lr, the better
    run_search(search, fit_fn=fit)
    trials = _trials(search)
    assert {name: len(t) for name, t in trials.items()} == {"imagefolder-f1.0/ft": 3, "imagefolder-f1.0/head_l1": 3}
    assert all(t.state.name == "COMPLETE" for ts in trials.values() for t in ts)
    assert not any(call["test"] for call in fit.calls)  # trials are never tested
    calls = len(fit.calls)
    run_search(search_from_dict(_search_dict(photos, tmp_path / "out")), fit_fn=fit)
    assert len(fit.calls) == calls and sum(map(len, _trials(search).values())) == 6
    # a trial keeps its record, not its checkpoints
    kept = {p.name for p in (tmp_path / "out" / "trials" / "imagefolder-f1.0" / "ft" / "t000" / "s100").iterdir()}
    assert kept == {"config.yaml"}


def test_a_larger_budget_continues_a_finished_search(photos: Path, tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_search_dict(photos, tmp_path / "out")))
    fit = fake_fit(lambda config, epoch: config.optim.lr)
    run_search(load_search(tmp_path / "s.yaml"), fit_fn=fit)
    run_search(load_search(tmp_path / "s.yaml", trials=5), fit_fn=fit)
    assert {name: len(t) for name, t in _trials(load_search(tmp_path / "s.yaml")).items()} == {
        "imagefolder-f1.0/ft": 5, "imagefolder-f1.0/head_l1": 5}
    assert len(fit.calls) == 10  # the first three trials of each method ran once


def test_a_method_without_knobs_runs_once(photos: Path, tmp_path: Path) -> None:
    methods = {"ft": {"recipes": ["ft"]}, "lp": {"recipes": ["lp"], "space": {}}}
    data = _search_dict(photos, tmp_path / "out", methods=methods, space={})
    search = search_from_dict(data)
    run_search(search, fit_fn=fake_fit(lambda config, epoch: 0.5))
    assert {name: len(t) for name, t in _trials(search).items()} == {"imagefolder-f1.0/ft": 1,
                                                                      "imagefolder-f1.0/lp": 1}


def test_the_random_start_up_trials_spread_over_the_space(photos: Path, tmp_path: Path) -> None:
    import math

    from regtune.tune.report import study_summaries, write_search_report

    # seeded as sampler_seed + position, positions 0 and 3 drew (0.549, 0.715) and (0.551, 0.708): one trial wasted
    data = _search_dict(photos, tmp_path / "out", methods={"head_l1": {"recipes": ["ft"], "regularizers": ["head_l1"],
                        "space": {"head_l1.weight": {"low": 1e-4, "high": 1e-2, "log": True}}}},
                        trials=4, startup_trials=4)
    search = search_from_dict(data)
    run_search(search, fit_fn=fake_fit(lambda config, epoch: config.optim.lr))
    trials = _trials(search)["imagefolder-f1.0/head_l1"]
    unit = [(math.log(t.params["optim.lr"] / 1e-3) / math.log(100), math.log(t.params["head_l1.weight"] / 1e-4)
             / math.log(100)) for t in trials]  # each knob's position in its log range, 0-1
    assert len(unit) == 4
    assert min(math.dist(a, b) for i, a in enumerate(unit) for b in unit[i + 1:]) > 0.1
    paths = write_search_report(search, study_summaries(search), tmp_path / "report")  # the two-knob scatter
    assert paths["knobs"].stat().st_size > 10_000


def test_hopeless_trials_are_pruned_and_the_report_says_what_it_saved(photos: Path, tmp_path: Path) -> None:
    from regtune.tune.report import study_summaries, write_search_report

    data = _search_dict(photos, tmp_path / "out", methods={"ft": {"recipes": ["ft"]}}, trials=8, startup_trials=2,
                        warmup_epochs=1, seeds=[100, 101])
    data["base"]["trainer"]["epochs"] = 6
    search = search_from_dict(data)
    # a trial's curve is its lr: low learning rates are hopeless from the second epoch on
    run_search(search, fit_fn=fake_fit(lambda config, epoch: config.optim.lr * (1 + epoch)))
    states = [t.state.name for t in _trials(search)["imagefolder-f1.0/ft"]]
    assert len(states) == 8 and "PRUNED" in states and states.count("COMPLETE") >= 2
    summary, = study_summaries(search)
    assert summary["pruned"] == states.count("PRUNED") and summary["pruning_saved_seconds"] > 0
    paths = write_search_report(search, [summary], tmp_path / "report")
    assert "pruning saved" in paths["md"].read_text() and paths["history"].is_file() and paths["knobs"].is_file()


def test_a_diverging_configuration_is_stopped_as_pruned_and_the_search_goes_on(photos: Path, tmp_path: Path) -> None:
    from regtune.train.module import NonFiniteLossError

    def curve(config: Any, epoch: int) -> float:
        if config.optim.lr > 0.01:
            raise NonFiniteLossError("loss is nan at step 3")
        return config.optim.lr

    search = search_from_dict(_search_dict(photos, tmp_path / "out", methods={"ft": {"recipes": ["ft"]}}, trials=4))
    run_search(search, fit_fn=fake_fit(curve))
    trials = _trials(search)["imagefolder-f1.0/ft"]
    assert len(trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    diverged = [t for t in trials if "diverged" in t.user_attrs]
    assert diverged and all(t.state.name == "PRUNED" and t.params["optim.lr"] > 0.01 for t in diverged)


def test_the_objective_is_the_mean_over_the_search_seeds(photos: Path, tmp_path: Path) -> None:
    data = _search_dict(photos, tmp_path / "out", methods={"ft": {"recipes": ["ft"]}}, trials=1,
                        seeds=[100, 101, 102], pruner="none")
    search = search_from_dict(data)
    run_search(search, fit_fn=fake_fit(lambda config, epoch: config.trainer.seed / 1000))
    trial, = _trials(search)["imagefolder-f1.0/ft"]
    assert trial.value == pytest.approx(0.101) and trial.user_attrs["val_acc"] == [0.1, 0.101, 0.102]


# ------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any trial


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["search"].update(trials=0), "search.trials"),
    (lambda d: d["search"]["space"].update({"optim.lr": {"low": 0.1, "high": 0.01}}), "empty or inverted"),
    (lambda d: d["search"]["space"].update({"optim.lr": {"low": 0.1, "high": 0.1}}), "empty or inverted"),
    (lambda d: d["search"]["space"].update({"optim.lrr": {"low": 0.01, "high": 0.1}}), "optim.lrr"),
    (lambda d: d["search"]["space"].update({"fmr.beta": {"low": 1, "high": 10}}), "fmr.beta"),
    (lambda d: d["methods"].update(nope={"regularizers": ["no_such_term"]}), "no_such_term"),
    (lambda d: d["methods"]["head_l1"]["space"].update({"head_l1.wieght": {"low": 1, "high": 2}}), "wieght"),
    (lambda d: d["search"].update(seeds=[0]), "fresh"),
])
def test_bad_searches_are_one_line_errors_before_any_trial(photos: Path, tmp_path: Path, capsys: Any,
                                                           change: Any, message: str) -> None:
    data = _search_dict(photos, tmp_path / "out")
    change(data)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert main(["tune", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("regtune: error:") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "trials").exists()


def test_a_storage_that_cannot_be_opened_is_one_line(photos: Path, tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_search_dict(photos, tmp_path / "out")))
    url = f"sqlite:///{tmp_path}/no/such/folder/t.db"
    assert main(["tune", str(tmp_path / "s.yaml"), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot open the storage" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "trials").exists()


def test_an_unknown_shipped_search_lists_the_shipped_ones() -> None:
    with pytest.raises(SearchError, match="tuned_fmnist1"):
        load_search("no_such_search")


# ------------------------------------------------------------------------------------------------------------------
# Real (tiny) runs


def test_selection_never_reads_the_test_set(photos: Path, tmp_path: Path, capsys: Any) -> None:
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    for path in (root / "test").rglob("*.png"):
        path.write_bytes(b"not an image")  # any read of a test image fails
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_search_dict(root, tmp_path / "out")))
    assert main(["tune", str(tmp_path / "s.yaml"), "--no-finals"]) == 0, capsys.readouterr().err
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "out" / "trials").rglob("metrics.json")]
    assert len(metrics) == 6 and all(not m["tested"] and "test_acc" not in m for m in metrics)
    assert all(m["val_acc"] is not None for m in metrics)
    # the control: the finals test, and these test images cannot be read
    assert main(["tune", str(tmp_path / "s.yaml")]) == 1
    assert "finals run(s) failed" in capsys.readouterr().err
    failures = json.loads((tmp_path / "out" / "finals" / "failures.json").read_text())
    assert len(failures) == 4 and all("test" in f["error"] for f in failures.values())


def test_two_workers_on_one_journal_run_exactly_the_budget(photos: Path, tmp_path: Path) -> None:
    data = _search_dict(photos, tmp_path / "out", trials=4)
    data["base"]["trainer"]["epochs"] = 1
    search = search_from_dict(data)
    run_search(search, workers=2)
    trials = _trials(search)
    for name, ts in trials.items():
        finished = [t for t in ts if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) == 4, (name, [t.state.name for t in ts])
        assert not [t for t in ts if t.state.name in ("RUNNING", "WAITING")]


def _tune_process(search_file: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "regtune.cli", "tune", str(search_file), "--no-finals"],
                            cwd=search_file.parent, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finished(search: Any) -> set[tuple[Any, ...]]:
    return {(tuple(sorted(t.params.items())), round(t.value, 6) if t.value is not None else None, t.state.name)
            for ts in _trials(search).values() for t in ts if t.state.name in ("COMPLETE", "PRUNED")}


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_to_the_same_finished_trials(photos: Path, tmp_path: Path) -> None:
    methods = {"ft": {"recipes": ["ft"]}}
    files = {}
    for name in ("reference", "killed"):
        data = _search_dict(photos, tmp_path / name / "out", methods=methods, trials=4, seeds=[100])
        files[name] = tmp_path / name / "s.yaml"
        files[name].parent.mkdir()
        files[name].write_text(yaml.safe_dump(data))
    assert _tune_process(files["reference"], tmp_path / "reference.log").wait(timeout=600) == 0
    process = _tune_process(files["killed"], tmp_path / "killed.log")
    inside = tmp_path / "killed" / "out" / "trials" / "imagefolder-f1.0" / "ft" / "t001" / "s100" / "config.yaml"
    deadline = time.time() + 300
    while not inside.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert inside.is_file(), (tmp_path / "killed.log").read_text()
    os.killpg(process.pid, signal.SIGKILL)  # mid-trial, no chance to clean up
    process.wait()
    (inside.parent / "checkpoints").mkdir(exist_ok=True)  # what a killed run leaves (~50 MB): its last checkpoint
    (inside.parent / "checkpoints" / "last.ckpt").write_bytes(b"0" * 1000)
    assert _tune_process(files["killed"], tmp_path / "killed2.log").wait(timeout=600) == 0
    assert not (inside.parent / "checkpoints").exists() and inside.is_file()  # the record stays, not the weights
    reference = load_search(files["reference"])
    killed = load_search(files["killed"])
    assert _finished(killed) == _finished(reference) and len(_finished(reference)) == 4
    states = [t.state.name for t in _trials(killed)["imagefolder-f1.0/ft"]]
    assert states.count("FAIL") == 1  # the interrupted trial, kept and visible, not counted
    retry = [t for t in _trials(killed)["imagefolder-f1.0/ft"] if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state.name in ("COMPLETE", "PRUNED")


def test_refit_trains_the_choice_as_a_run_that_predict_uses(photos: Path, tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(_search_dict(photos, tmp_path / "out")))
    assert main(["tune", str(tmp_path / "s.yaml"), "--no-finals", "--refit"]) == 0
    out = capsys.readouterr().out
    assert "chosen on validation" in out and "->" in out
    refit = tmp_path / "out" / "refit"
    metrics = json.loads((refit / "metrics.json").read_text())
    assert metrics["tested"] and "test_acc" in metrics
    assert main(["predict", str(refit), str(photos / "test"), "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 12


def test_an_interrupted_refit_is_resumed_not_restarted(photos: Path, tmp_path: Path) -> None:
    from regtune.tune.pipeline import refit
    from regtune.tune.report import study_summaries

    search = search_from_dict(_search_dict(photos, tmp_path / "out", trials=1))
    run_search(search, fit_fn=fake_fit(lambda config, epoch: 0.5))
    summaries = study_summaries(search)
    calls: list[dict[str, Any]] = []

    class _Stopped:
        interrupted = True

    def stopped_fit(config: Any = None, run_dir: Path | None = None, **kwargs: Any) -> Any:
        calls.append({"config": config, **kwargs})
        assert run_dir is not None
        (Path(run_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "checkpoints" / "last.ckpt").write_bytes(b"")  # what an interrupted fit leaves
        return _Stopped()

    with pytest.raises(KeyboardInterrupt):
        refit(search, summaries, fit_fn=stopped_fit)
    with pytest.raises(KeyboardInterrupt):
        refit(search, summaries, fit_fn=stopped_fit)
    assert calls[0]["overwrite"] and calls[0]["config"] is not None
    assert calls[1]["resume"] and calls[1]["config"] is None  # continued from its checkpoint
