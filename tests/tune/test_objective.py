"""`search.objective`: a search may choose on balanced validation accuracy instead of accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from regtune.cli import main
from regtune.tune.search import search_from_dict
from regtune.tune.study import run_search
from tests.conftest import write_imagefolder
from tests.tune.test_tune import _Result, _search_dict, _Trainer, _trials


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("photos"), classes=3, train_per_class=10, test_per_class=4)


def fake_fit(calls: list[dict[str, Any]]) -> Any:
    """``fit`` whose accuracy after epoch e is lr and balanced accuracy (1 + e) / 10 + seed / 1000 (the two
    disagree); the Lightning names after each epoch, metrics.json's at the end."""

    def fit(config: Any, run_dir: Path, overwrite: bool, callbacks: Any, test: bool) -> _Result:
        calls.append({"config": config, "test": test})
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        trainer = _Trainer()
        acc = bal = 0.0
        for epoch in range(config.trainer.epochs):
            trainer.current_epoch = epoch
            acc, bal = config.optim.lr, (1 + epoch) / 10 + config.trainer.seed / 1000
            trainer.callback_metrics = {"val/acc": acc, "val/bal_acc": bal}
            for callback in callbacks:
                callback.on_validation_end(trainer, None)
        return _Result({"val_acc": acc, "val_bal_acc": bal, "wall_time_s": 1.0})

    return fit


def test_balanced_objective_is_the_mean_balanced_accuracy_and_the_pruners_value(photos: Path, tmp_path: Path) -> None:
    from regtune.tune.report import study_summaries, write_search_report

    data = _search_dict(photos, tmp_path / "out", methods={"ft": {"recipes": ["ft"]}}, trials=1, seeds=[100, 101],
                        pruner="none", objective="val_bal_acc")
    search = search_from_dict(data)
    assert search.objective == "val_bal_acc"
    calls: list[dict[str, Any]] = []
    run_search(search, fit_fn=fake_fit(calls))
    trial, = _trials(search)["imagefolder-f1.0/ft"]
    # 2 epochs: balanced accuracy after the last one, 0.2 + seed / 1000, per search seed
    assert trial.user_attrs["val_bal_acc"] == pytest.approx([0.3, 0.301])
    assert trial.value == pytest.approx(0.3005) and "val_acc" not in trial.user_attrs
    # the pruner saw the balanced accuracy of each epoch (steps: seed i x 2 epochs + epoch)
    assert trial.intermediate_values == pytest.approx({0: 0.2, 1: 0.3, 2: 0.201, 3: 0.301})
    summary, = study_summaries(search)
    assert summary["objective"] == "val_bal_acc" and summary["best_val_acc"] == pytest.approx([0.3, 0.301])
    paths = write_search_report(search, [summary], tmp_path / "report")
    text = paths["md"].read_text()
    assert "objective: balanced validation accuracy (`val_bal_acc`)" in text and "balanced validation acc (%)" in text
    assert json.loads(paths["json"].read_text())["objective"] == "val_bal_acc"


def test_default_objective_is_validation_accuracy(photos: Path, tmp_path: Path) -> None:
    data = _search_dict(photos, tmp_path / "out", methods={"ft": {"recipes": ["ft"]}}, trials=1, pruner="none")
    search = search_from_dict(data)
    assert search.objective == "val_acc"
    run_search(search, fit_fn=fake_fit([]))
    trial, = _trials(search)["imagefolder-f1.0/ft"]
    lr = trial.params["optim.lr"]
    assert trial.value == pytest.approx(lr) and trial.user_attrs["val_acc"] == [pytest.approx(lr)]
    assert trial.intermediate_values == pytest.approx({0: lr, 1: lr})  # accuracy is lr at every epoch


def test_an_unknown_objective_is_a_one_line_error(photos: Path, tmp_path: Path, capsys: Any) -> None:
    data = _search_dict(photos, tmp_path / "out", objective="test_acc")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert main(["tune", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "search.objective 'test_acc': one of val_acc, val_bal_acc" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "trials").exists()
