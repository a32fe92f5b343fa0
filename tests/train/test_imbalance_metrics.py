"""Metrics for imbalanced classes: hand-computed values on tiny confusions, the module's per-class sums, and what a
run's ``metrics.json`` holds (balanced accuracy, macro-F1, shot groups, selection by balanced validation accuracy)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regtune.analysis.imbalance import (
    balanced_accuracy,
    class_recall,
    confusion_matrix,
    group_accuracy,
    group_thresholds,
    imbalance_metrics,
    macro_f1,
    run_metric,
    shot_groups,
)
from regtune.regularizers import create_criterion
from regtune.train.callbacks import read_epoch_log
from regtune.train.config import ModelConfig, OptimConfig, TrainerConfig
from regtune.train.fit import fit
from regtune.train.module import FineTuner
from tests.conftest import TINY_BACKBONE, write_imagefolder
from tests.train.test_fit import tiny_config
from tests.train.test_numbers import LogitsAsInput

# Lightning's own use of a torch pytree API that torch deprecates (fit() filters it the same way)
LIGHTNING_PYTREE = r"ignore:.*isinstance\(treespec, LeafSpec\)` is deprecated"

# 9 test images of classes 0, 1, 2 (class 3 has none), as in test_numbers.py
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2]
PREDICTED = [0, 0, 0, 1, 1, 2, 2, 2, 0]
# rows: true class; columns: predicted class
CONFUSION = [[3, 1, 0, 0],
             [0, 1, 2, 0],
             [1, 0, 1, 0],
             [0, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------------------------------
# The metrics on hand-made confusions


def test_confusion_matrix_by_hand() -> None:
    assert confusion_matrix(LABELS, PREDICTED, 4) == CONFUSION
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 0], 3)


def test_balanced_accuracy_and_macro_f1_by_hand() -> None:
    hits = [3, 1, 1, 0]
    counts = [4, 3, 2, 0]
    assert class_recall(hits, counts) == [3 / 4, 1 / 3, 1 / 2, None]
    # mean recall over the classes with items: (3/4 + 1/3 + 1/2) / 3 = 19/36
    assert balanced_accuracy(hits, counts) == pytest.approx(19 / 36, abs=1e-15)
    # F1_c = 2 TP / (row + column): class 0: 6 / (4 + 4) = 3/4; class 1: 2 / (3 + 2) = 2/5; class 2: 2 / (2 + 3) = 2/5;
    # class 3 neither occurs nor is predicted: left out. (3/4 + 2/5 + 2/5) / 3 = 31/60
    assert macro_f1(CONFUSION) == pytest.approx(31 / 60, abs=1e-15)
    assert balanced_accuracy([0, 0], [0, 0]) is None and macro_f1([[0, 0], [0, 0]]) is None


def test_a_class_predicted_but_absent_counts_in_macro_f1_not_in_balanced_accuracy() -> None:
    labels, predicted = [0, 0, 1], [0, 2, 1]
    confusion = confusion_matrix(labels, predicted, 3)  # [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    # F1: class 0: 2 / (2 + 1) = 2/3; class 1: 2 / (1 + 1) = 1; class 2 (predicted once, never true): 0 -> 5/9
    assert macro_f1(confusion) == pytest.approx(5 / 9, abs=1e-15)
    # recall over the classes with items: (1/2 + 1) / 2 = 3/4
    assert balanced_accuracy([1, 1, 0], [2, 1, 0]) == pytest.approx(3 / 4, abs=1e-15)


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn warns about the class that is never true
@pytest.mark.parametrize(("labels", "predicted"), [(LABELS, PREDICTED), ([0, 0, 1], [0, 2, 1]),
                                                   ([0, 1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 0, 2, 0])])
def test_the_metrics_are_scikit_learns(labels: list[int], predicted: list[int]) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    confusion = confusion_matrix(labels, predicted, 4)
    hits = [confusion[c][c] for c in range(4)]
    counts = [sum(row) for row in confusion]
    assert macro_f1(confusion) == pytest.approx(metrics.f1_score(labels, predicted, average="macro"), abs=1e-12)
    assert balanced_accuracy(hits, counts) == pytest.approx(metrics.balanced_accuracy_score(labels, predicted),
                                                            abs=1e-12)


@pytest.mark.parametrize(("counts", "thresholds"), [
    ([500, 120, 7], (100, 20)),  # largest class >= 300: the standard thresholds
    ([300, 1], (100, 20)),
    ([299, 1], (100, 20)),  # s = 299/300: round(19.93) = 20, round(99.67) = 100
    ([150, 2], (50, 10)),  # s = 1/2
    ([30, 12, 1], (10, 2)),  # s = 1/10
    ([45, 3], (15, 3)),  # s = 0.15: 20 s = 3, 100 s = 15
    ([10, 1], (3, 1)),  # s = 1/30: round(0.67) = 1, round(3.33) = 3
    ([3, 1], (2, 1)),  # s = 1/100: lo = max(1, round(0.2)) = 1, hi = max(lo + 1, round(1)) = 2
])
def test_group_thresholds_standard_and_scaled(counts: list[int], thresholds: tuple[int, int]) -> None:
    assert group_thresholds(counts) == thresholds


def test_group_thresholds_refuse_no_class() -> None:
    with pytest.raises(ValueError, match="at least one class"):
        group_thresholds([])


def test_shot_groups_boundaries() -> None:
    # many: n > 100; medium: 20 <= n <= 100; few: n < 20
    assert shot_groups([101, 100, 20, 19, 0], (100, 20)) == {"many": [0], "medium": [1, 2], "few": [3, 4]}


def test_group_accuracy_by_hand() -> None:
    names = ["a", "b", "c", "d", "e"]
    result = group_accuracy([0.9, 0.5, 0.25, None, 0.7], [40, 10, 1, 1, 12], names, thresholds=(10, 2))
    assert result["many"] == pytest.approx((0.9 + 0.7) / 2)  # a (40) and e (12) have more than 10
    assert result["medium"] == pytest.approx(0.5)  # b: 2 <= 10 <= 10
    assert result["few"] == pytest.approx(0.25)  # c and d have 1; d has no test image: left out of the mean
    assert result["thresholds"] == [10, 2]
    assert result["classes"] == {"many": ["a", "e"], "medium": ["b"], "few": ["c", "d"]}
    # the scaled rule by default: n_max = 30 gives (10, 2); a group without classes is None
    scaled = group_accuracy([1.0, 0.5], [30, 20], ["x", "y"])
    assert scaled["thresholds"] == [10, 2] and scaled["many"] == pytest.approx(0.75)
    assert scaled["medium"] is None and scaled["few"] is None and scaled["classes"]["few"] == []
    with pytest.raises(ValueError, match="one entry per class"):
        group_accuracy([1.0], [3, 4])


def test_imbalance_metrics_and_reading_them_back() -> None:
    metrics = imbalance_metrics(CONFUSION, [150, 40, 5, 8], ["w", "x", "y", "z"])
    assert metrics["test_bal_acc"] == pytest.approx(19 / 36) and metrics["test_macro_f1"] == pytest.approx(31 / 60)
    assert metrics["test_class_acc_by_name"] == {"w": 3 / 4, "x": 1 / 3, "y": 1 / 2, "z": None}
    # n_max = 150: (hi, lo) = (50, 10); many: w; medium: x; few: y and z (z has no test image)
    assert metrics["test_groups"] == {"many": 3 / 4, "medium": 1 / 3, "few": 1 / 2, "thresholds": [50, 10],
                                      "classes": {"many": ["w"], "medium": ["x"], "few": ["y", "z"]}}
    assert run_metric(metrics, "test_few_acc") == 1 / 2 and run_metric(metrics, "test_bal_acc") == 19 / 36
    assert run_metric({"test_acc": 0.8}, "test_bal_acc") is None  # a run from before the metric existed
    assert run_metric({"test_groups": {"few": None}}, "test_few_acc") is None
    with pytest.raises(ValueError, match="test_macro_f1"):
        run_metric(metrics, "test_f1")


# ---------------------------------------------------------------------------------------------------------------------
# The module's per-class sums


def _loader(labels: list[int], predicted: list[int], num_classes: int) -> DataLoader:
    logits = nn.functional.one_hot(torch.tensor(predicted), num_classes).float().reshape(-1, num_classes, 1, 1)
    return DataLoader(TensorDataset(logits, torch.tensor(labels)), batch_size=4)  # batches of 4, 4, (1)


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.filterwarnings(LIGHTNING_PYTREE)
def test_module_test_confusion_and_validation_balanced_accuracy() -> None:
    module = FineTuner(LogitsAsInput(4), create_criterion("ce"), [], OptimConfig(), 4, channels_last=False)
    tested = _trainer().test(module, _loader(LABELS, PREDICTED, 4), verbose=False)[0]
    assert module.test_confusion() == CONFUSION
    assert module.test_class_accuracy() == [3 / 4, 1 / 3, 1 / 2, None]
    assert tested["test/bal_acc"] == pytest.approx(19 / 36, abs=1e-6) == tested["test/mean_class_acc"]
    validated = _trainer().validate(module, _loader(LABELS, PREDICTED, 4), verbose=False)[0]
    assert validated["val/acc"] == pytest.approx(5 / 9, abs=1e-6)
    assert validated["val/bal_acc"] == pytest.approx(19 / 36, abs=1e-6)
    scores = module.score(_loader(LABELS, PREDICTED, 4), torch.device("cpu"))
    assert scores.acc == pytest.approx(5 / 9, abs=1e-12) and scores.bal_acc == pytest.approx(19 / 36, abs=1e-12)


# 6 images of class 0, one of class 1, one of class 2. The raw weights get half of class 0 and the two others right
# (accuracy 5/8, balanced (1/2 + 1 + 1) / 3 = 5/6); the EMA weights predict class 0 for everything (accuracy 6/8,
# balanced (1 + 0 + 0) / 3 = 1/3): accuracy prefers the EMA, balanced accuracy the raw weights.
EMA_LABELS = [0, 0, 0, 0, 0, 0, 1, 2]
EMA_RAW_PREDICTED = [0, 0, 0, 1, 1, 1, 1, 2]


@pytest.mark.filterwarnings(LIGHTNING_PYTREE)
@pytest.mark.parametrize(("select", "ema_selected"), [("val_acc", True), ("val_bal_acc", False)])
def test_ema_is_selected_by_the_runs_criterion(select: str, ema_selected: bool) -> None:
    module = FineTuner(LogitsAsInput(3), create_criterion("ce"), [], OptimConfig(), 3, channels_last=False,
                       ema_decay=0.9, select_by=select)
    with torch.no_grad():
        module.ema.module.classifier.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    logged = _trainer().validate(module, _loader(EMA_LABELS, EMA_RAW_PREDICTED, 3), verbose=False)[0]
    assert logged["val/acc"] == pytest.approx(5 / 8) and logged["val/bal_acc"] == pytest.approx(5 / 6)
    assert logged["val_ema/acc"] == pytest.approx(6 / 8) and logged["val_ema/bal_acc"] == pytest.approx(1 / 3)
    assert module.ema_selected is ema_selected and logged["select/ema"] == float(ema_selected)
    chosen = "val_ema" if ema_selected else "val"
    assert logged["select/acc"] == logged[f"{chosen}/acc"]
    assert logged["select/bal_acc"] == logged[f"{chosen}/bal_acc"]


# ---------------------------------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training images 20, 8 and 3 per class (4 test images each); with val_fraction 0.2 the training split keeps
    16, 7 and 3 (floor(0.2 n) held out per class)."""
    root = write_imagefolder(tmp_path_factory.mktemp("imbalanced"), classes=3, train_per_class=20, test_per_class=4)
    for c, keep in enumerate((20, 8, 3)):
        for path in sorted((root / "train" / f"class_{c}").glob("*.png"), key=lambda p: int(p.stem))[keep:]:
            path.unlink()
    return root


class _Confusion(pl.Callback):
    """Keeps the module's test confusion matrix."""

    confusion: list[list[int]] | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.confusion = pl_module.test_confusion()


def test_metrics_json_holds_the_imbalance_keys_and_selects_by_balanced_accuracy(imbalanced: Path,
                                                                               tmp_path: Path) -> None:
    kept = _Confusion()
    result = fit(tiny_config(imbalanced, epochs=3, select="val_bal_acc"), run_dir=tmp_path / "run", callbacks=[kept])
    m = json.loads((result.run_dir / "metrics.json").read_text())
    names = m["class_names"]
    assert m["train_class_counts"] == [16, 7, 3] and sum(m["train_class_counts"]) == m["num_train"]
    split = json.loads((result.run_dir / "split.json").read_text())
    assert [sum(item.startswith(f"train/{name}/") for item in split["train"]) for name in names] == [16, 7, 3]
    # per-class accuracy by name, and the balanced accuracy its mean (all classes have test images)
    assert m["test_class_acc_by_name"] == dict(zip(names, m["test_class_acc"]))
    assert m["test_bal_acc"] == pytest.approx(sum(m["test_class_acc"]) / 3, abs=1e-12)
    assert m["test_mean_class_acc"] == pytest.approx(m["test_bal_acc"], abs=1e-6)
    # the confusion behind them: 4 test images per class; macro-F1 from its rows and columns
    confusion = kept.confusion
    assert [sum(row) for row in confusion] == [4, 4, 4]
    assert [confusion[c][c] / 4 for c in range(3)] == m["test_class_acc"]
    columns = [sum(row[c] for row in confusion) for c in range(3)]
    f1 = [2 * confusion[c][c] / (4 + columns[c]) for c in range(3)]  # every class occurs: all three count
    assert m["test_macro_f1"] == pytest.approx(sum(f1) / 3, abs=1e-12)
    assert m["test_acc"] == pytest.approx(sum(confusion[c][c] for c in range(3)) / 12, abs=1e-6)
    # n_max = 16: s = 16/300, (hi, lo) = (max(2, round(5.33)), max(1, round(1.07))) = (5, 1): 16 and 7 are
    # many-shot, 3 medium, no class few-shot
    groups = m["test_groups"]
    assert groups["thresholds"] == [5, 1]
    assert groups["classes"] == {"many": names[:2], "medium": names[2:], "few": []}
    assert groups["many"] == pytest.approx((m["test_class_acc"][0] + m["test_class_acc"][1]) / 2, abs=1e-12)
    assert groups["medium"] == pytest.approx(m["test_class_acc"][2], abs=1e-12) and groups["few"] is None
    # selection: the checkpoint of the first epoch with the best logged balanced validation accuracy, tested as is
    rows = read_epoch_log(result.run_dir / "epochs.csv")
    best = max(r["val/bal_acc"] for r in rows)
    first_best = next(r["epoch"] for r in rows if r["val/bal_acc"] == best)
    assert m["selection"] == "val_bal_acc" and "balanced" in m["selection_note"]
    assert m["selected_epoch"] == first_best and m["best_val"] == pytest.approx(best, abs=1e-6)
    assert m["val_bal_acc"] == pytest.approx(best, abs=1e-6)
    chosen = rows[first_best - 1]
    assert m["val_acc"] == pytest.approx(chosen["val/acc"], abs=1e-6)


@pytest.mark.parametrize("select", ["val_bal_acc", "val_loss"])
def test_wise_ft_chooses_its_mix_by_what_selection_chooses_by(imbalanced: Path, tmp_path: Path, select: str) -> None:
    alphas = (0.0, 0.5, 1.0)
    config = dataclasses.replace(
        tiny_config(imbalanced, epochs=1),
        model=ModelConfig(backbone=TINY_BACKBONE, pretrained="none", head_init="lp", lp_select="best"),
        trainer=TrainerConfig(epochs=1, progress_bar=False, accelerator="cpu", select=select, wise_alphas=alphas))
    m = fit(config, run_dir=tmp_path / "run").metrics
    wise = m["wise"]
    assert wise["chosen_by"] == select and len(wise["val_bal_acc"]) == len(alphas)
    if select == "val_bal_acc":
        best = min(range(len(alphas)), key=lambda i: (-wise["val_bal_acc"][i], wise["val_loss"][i], i))
        assert m["val_bal_acc"] == pytest.approx(wise["val_bal_acc"][best], abs=1e-9)
    else:
        best = min(range(len(alphas)), key=lambda i: (wise["val_loss"][i], -wise["val_acc"][i], i))
        assert m["val_loss"] == pytest.approx(wise["val_loss"][best], abs=1e-9)
    assert wise["alpha"] == alphas[best]
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in wise["val_bal_acc"])


def test_the_fit_command_prints_balanced_accuracy_and_the_groups_of_an_imbalanced_run(
        imbalanced: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from regtune.cli import main
    from tests.test_cli import TINY

    assert main(["fit", *TINY, "--data-root", str(imbalanced), "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert f"(balanced {m['test_bal_acc']:.4f}, macro-F1 {m['test_macro_f1']:.4f};" in out
    hi, lo = m["test_groups"]["thresholds"]
    assert f"by training images per class (many > {hi}, few < {lo}): " in out  # counts 16, 7, 3: imbalanced
