"""`regtune soup`: the greedy rule on a fake evaluation, a soup of one run is that run, refused inputs, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from regtune.cli import main
from regtune.models.weights import read_class_names
from regtune.posthoc import soup as soup_module
from regtune.posthoc.soup import SOUP_FILE, Score, SoupStep, greedy_soup, make_soup, rank_ingredients
from regtune.train.config import apply_overrides
from regtune.train.fit import fit
from regtune.train.rundir import RunDir, RunDirError
from tests.conftest import write_imagefolder
from tests.train.test_fit import tiny_config

# -- the greedy rule, without I/O ------------------------------------------------------------------------------------

SCORES = [Score(0.5, 1.0), Score(0.8, 0.5), Score(0.8, 0.4), Score(0.6, 0.1)]  # ranked 2, 1, 3, 0
SOUPS = {  # members -> the soup's validation score
    (2, 1): Score(0.8, 0.45),  # equal to the soup so far (0.8): kept
    (2, 1, 3): Score(0.79, 0.3),  # a drop: left out
    (2, 1, 0): Score(0.85, 0.4),  # kept
}


class _FakeEvaluation:
    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, members: list[int]) -> Score:
        self.calls.append(tuple(members))
        return SOUPS[tuple(members)]


def test_ranking_by_accuracy_then_loss_then_input_order() -> None:
    assert rank_ingredients(SCORES) == [2, 1, 3, 0]
    assert rank_ingredients([Score(0.5, 0.2), Score(0.5, 0.2), Score(0.5, 0.1)]) == [2, 0, 1]


def test_greedy_rule_keeps_a_candidate_unless_validation_accuracy_drops() -> None:
    evaluate, saved = _FakeEvaluation(), []
    members, steps = greedy_soup(SCORES, evaluate, on_step=saved.append)
    assert evaluate.calls == [(2, 1), (2, 1, 3), (2, 1, 0)]  # each candidate once, against the soup so far
    assert members == [2, 1, 0]
    assert steps == [SoupStep(1, SOUPS[(2, 1)], True), SoupStep(3, SOUPS[(2, 1, 3)], False),
                     SoupStep(0, SOUPS[(2, 1, 0)], True)]
    assert [len(s) for s in saved] == [1, 2, 3] and saved[-1] == steps


def test_greedy_rule_continues_recorded_steps_without_evaluating_them() -> None:
    full = greedy_soup(SCORES, _FakeEvaluation())
    evaluate = _FakeEvaluation()
    assert greedy_soup(SCORES, evaluate, done=full[1][:2]) == full
    assert evaluate.calls == [(2, 1, 0)]
    with pytest.raises(ValueError, match="do not follow the ranking"):
        greedy_soup(SCORES, evaluate, done=[full[1][1]])


def test_a_soup_of_one_ingredient_evaluates_nothing() -> None:
    evaluate = _FakeEvaluation()
    assert greedy_soup([Score(0.3, 2.0)], evaluate) == ([0], [])
    assert evaluate.calls == []
    with pytest.raises(ValueError, match="at least one ingredient"):
        greedy_soup([], evaluate)


@pytest.mark.parametrize(("precision", "dtype"), [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_forward_passes_run_at_the_runs_precision(precision: str, dtype: torch.dtype) -> None:
    with soup_module._autocast(precision, "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


# -- finished runs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three finished tiny runs of one split (seed 0) at three learning rates, under ``grid/``."""
    base = tmp_path_factory.mktemp("soup")
    root = write_imagefolder(base / "data", classes=3, train_per_class=10, test_per_class=4)
    found = {}
    for name, lr in (("a", 0.02), ("b", 0.05), ("c", 0.01)):
        config = apply_overrides(tiny_config(root, epochs=2), {"optim.lr": lr})
        found[name] = fit(config, run_dir=base / "grid" / name).run_dir
    return found


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_soup_of_one_run_is_that_run(runs: dict[str, Path], tmp_path: Path) -> None:
    result = make_soup([runs["a"]], tmp_path / "soup")
    original = RunDir(runs["a"])
    model, _, _ = original.load_model(3)
    saved = load_file(tmp_path / "soup" / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value) and saved[key].dtype == value.dtype, key
    soup_run = RunDir(tmp_path / "soup")
    assert soup_run.finished and soup_run.config() == original.config()
    assert json.loads(soup_run.split_path.read_text()) == json.loads(original.split_path.read_text())
    metrics, run_metrics = soup_run.metrics(), original.metrics()
    assert metrics["test_acc"] == pytest.approx(run_metrics["test_acc"], abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(run_metrics["test_loss"], rel=1e-5)
    assert metrics["test_class_acc"] == pytest.approx(run_metrics["test_class_acc"])
    assert metrics["best_val"] == pytest.approx(run_metrics["best_val"], abs=1e-6)  # selected on val accuracy
    for key in ("num_train", "num_val", "num_test", "num_classes", "class_names", "dataset", "backbone", "input_size",
                "seed", "train_class_counts", "test_class_acc_by_name", "test_groups", "tested"):
        assert metrics[key] == run_metrics[key], key
    for key in ("test_bal_acc", "test_macro_f1"):  # the imbalance metrics, as fit computes them
        assert metrics[key] == pytest.approx(run_metrics[key], abs=1e-9), key
    assert read_class_names(tmp_path / "soup" / "model.safetensors") == ["class_0", "class_1", "class_2"]
    assert metrics["selection"] == "greedy_soup" and metrics["model_file"] == "model.safetensors"
    assert metrics["soup"] == [str(runs["a"].resolve())] and result.members == [runs["a"].resolve()]
    reloaded, _, weights = soup_run.load_model(3)  # the soup reads like any run
    assert weights == soup_run.model_path
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())
    record = json.loads((tmp_path / "soup" / SOUP_FILE).read_text())
    assert record["members"] == metrics["soup"] and record["ingredients"][0]["kept"] is True


def test_greedy_soup_of_runs_and_its_resume(runs: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    grid = runs["a"].parent
    whole = make_soup([grid], tmp_path / "whole")
    record = json.loads((tmp_path / "whole" / SOUP_FILE).read_text())
    entries = record["ingredients"]
    assert len(entries) == 3 and entries[0]["kept"] and [e["val_acc"] for e in entries] == sorted(
        (e["val_acc"] for e in entries), reverse=True)
    current = entries[0]["soup_val_acc"]
    assert current == entries[0]["val_acc"]
    for entry in entries[1:]:  # the rule, on what was recorded
        assert entry["kept"] == (entry["soup_val_acc"] >= current)
        current = entry["soup_val_acc"] if entry["kept"] else current
    assert record["members"] == [e["run"] for e in entries if e["kept"]] == [str(m) for m in whole.members]
    # the soup's weights are the members' mean (NumPy, float64)
    members = [RunDir(m).load_model(3)[0].state_dict() for m in whole.members]
    saved = load_file(tmp_path / "whole" / "model.safetensors")
    for key, value in saved.items():
        if value.is_floating_point():
            reference = np.mean([m[key].double().numpy() for m in members], axis=0).astype(np.float32)
            np.testing.assert_array_equal(value.numpy(), reference, err_msg=key)

    # interrupted at the second candidate: 3 ingredients scored, then candidate 1 evaluated, candidate 2 not
    evaluate, calls = soup_module._evaluate, []

    def interrupted(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(soup_module, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_soup([grid], tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    partial = json.loads((tmp_path / "resumed" / SOUP_FILE).read_text())
    assert [e["kept"] is not None for e in partial["ingredients"]] == [True, True, False]
    calls.clear()
    resumed = make_soup([grid], tmp_path / "resumed")
    assert len(calls) == 2  # the last candidate and the test, nothing recorded evaluated again
    assert (tmp_path / "resumed" / SOUP_FILE).read_text() == (tmp_path / "whole" / SOUP_FILE).read_text()
    assert resumed.metrics["resumed"] and not whole.metrics["resumed"]
    assert resumed.test_acc == whole.test_acc and resumed.members == whole.members
    with pytest.raises(RunDirError, match="already holds a finished soup.*--overwrite"):
        make_soup([grid], tmp_path / "resumed")
    with pytest.raises(RunDirError, match="unfinished soup of other runs"):
        (tmp_path / "resumed" / "metrics.json").unlink()
        make_soup([runs["a"]], tmp_path / "resumed")
    assert make_soup([runs["a"]], tmp_path / "resumed", overwrite=True).members == [runs["a"].resolve()]


def test_refused_inputs_write_nothing(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    split = json.loads((runs["a"] / "split.json").read_text())
    split["train"][0], split["val"][0] = split["val"][0], split["train"][0]
    (_copy(runs["a"], tmp_path / "other_split") / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="different splits.*--split-manifest"):
        make_soup([runs["a"], tmp_path / "other_split"], out)
    config = yaml.safe_load((runs["b"] / "config.yaml").read_text())
    config["model"]["backbone"] = "resnet18"
    (_copy(runs["b"], tmp_path / "other_backbone") / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="differs .* in its backbone.*'resnet18' vs 'test_efficientnet'"):
        make_soup([runs["a"], tmp_path / "other_backbone"], out)
    split = json.loads((runs["a"] / "split.json").read_text())
    split["train"], split["val"] = split["train"] + split["val"], []
    (_copy(runs["a"], tmp_path / "no_val") / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="no validation split.*val_fraction > 0"):
        make_soup([tmp_path / "no_val"], out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished run"):
        make_soup([tmp_path / "empty"], out)
    with pytest.raises(ValueError, match="is or holds the ingredient run"):
        make_soup([runs["a"]], runs["a"].parent)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="no soup.json"):
        make_soup([runs["a"]], tmp_path / "busy")
    assert not out.exists() and (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_runs_of_another_architecture_cannot_be_mixed(runs: dict[str, Path], tmp_path: Path) -> None:
    config = RunDir(runs["a"]).config()
    cosine = fit(apply_overrides(config, {"trainer.epochs": 1, "criterion": {"name": "lm_softmax", "args": {}}}),
                 run_dir=tmp_path / "cosine").run_dir
    with pytest.raises(ValueError, match="different keys.*cosine head.*cannot be mixed"):
        make_soup([runs["a"], cosine], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_soup_command(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["soup", str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "soup")]) == 0
    out = capsys.readouterr().out
    assert "of 2 runs" in out and str(runs["a"].resolve()) in out and "test accuracy" in out
    assert main(["soup", str(runs["a"]), "--out", str(tmp_path / "soup")]) == 2  # finished: refused, said why
    assert "already holds a finished soup" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["soup", str(runs["a"]), "--out", str(tmp_path / "soup"), "--over"])
    assert "unrecognized arguments: --over" in capsys.readouterr().err
