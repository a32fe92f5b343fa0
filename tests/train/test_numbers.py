"""Numbers of the training loop against hand-computed values: learning-rate schedule, per-class test accuracy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regtune.regularizers import create_criterion
from regtune.train.config import OptimConfig
from regtune.train.module import FineTuner, lr_factor

# ---------------------------------------------------------------------------------------------------------------------
# lr_factor: 5 epochs of 4 steps (20 steps); warm-up of w steps gives (step + 1) / w for step < w.

STEPS_PER_EPOCH, TOTAL = 4, 20


def _cos(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize(("step", "expected"), [
    (0, 1 / 4), (1, 2 / 4), (2, 3 / 4), (3, 4 / 4),  # warm-up: 4 steps, the last one at the full rate
    (4, 1.0),  # cosine starts at progress (4 - 4) / (20 - 4) = 0
    (8, 0.8535533905932737),  # progress 4 / 16 = 1/4: 0.5 (1 + cos(pi / 4)) = 0.5 (1 + 0.7071068)
    (12, 0.5),  # progress 1/2
    (16, 0.14644660940672627),  # progress 3/4: 0.5 (1 - 0.7071068)
    (19, 0.009607359798384785),  # progress 15/16: 0.5 (1 + cos(15 pi / 16)) = 0.5 (1 - 0.9807853)
    (20, 0.0), (25, 0.0),  # the end, and past it (clamped)
])
def test_cosine_with_warmup(step: int, expected: float) -> None:
    optim = OptimConfig(scheduler="cosine", warmup_epochs=1.0)
    assert lr_factor(step, TOTAL, STEPS_PER_EPOCH, optim) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("step", "expected"), [
    (0, 1.0),  # no warm-up: progress 0 at the first step
    (5, 0.8535533905932737),  # progress 5 / 20 = 1/4
    (10, 0.5),
    (15, 0.14644660940672627),
    (20, 0.0),
])
def test_cosine_without_warmup(step: int, expected: float) -> None:
    optim = OptimConfig(scheduler="cosine", warmup_epochs=0.0)
    assert lr_factor(step, TOTAL, STEPS_PER_EPOCH, optim) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("warmup_epochs", "step", "expected"), [
    # milestones at epochs 2 and 4 (steps 8 and 16), gamma 0.1; epochs count from step 0, warm-up included
    (0.0, 0, 1.0), (0.0, 7, 1.0), (0.0, 8, 0.1), (0.0, 15, 0.1), (0.0, 16, 0.01), (0.0, 19, 0.01),
    (1.0, 0, 1 / 4), (1.0, 3, 1.0), (1.0, 4, 1.0), (1.0, 7, 1.0), (1.0, 8, 0.1), (1.0, 16, 0.01),
])
def test_step_schedule(warmup_epochs: float, step: int, expected: float) -> None:
    optim = OptimConfig(scheduler="step", warmup_epochs=warmup_epochs, milestones=(2, 4), gamma=0.1)
    assert lr_factor(step, TOTAL, STEPS_PER_EPOCH, optim) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("warmup_epochs", "step", "expected"), [
    (0.0, 0, 1.0), (0.0, 19, 1.0),
    (0.5, 0, 1 / 2), (0.5, 1, 1.0), (0.5, 2, 1.0), (0.5, 19, 1.0),  # half an epoch of 4 steps: 2 warm-up steps
])
def test_constant_schedule(warmup_epochs: float, step: int, expected: float) -> None:
    optim = OptimConfig(scheduler="constant", warmup_epochs=warmup_epochs)
    assert lr_factor(step, TOTAL, STEPS_PER_EPOCH, optim) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# A model whose logits are its input: the test step sees exactly the predictions the test chooses.


class LogitsAsInput(nn.Module):
    """timm's contract (forward_features, forward_head(pre_logits), get_classifier); logits = input (B, C, 1, 1).

    One backbone parameter (a scale of 1) and an identity head, so both optimizer groups exist.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))
        self.classifier = nn.Linear(num_classes, num_classes, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(num_classes))
        self.pretrained_cfg = {"classifier": "classifier"}

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)  # (B, C, 1, 1) -> (B, C)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _module(num_classes: int, optim: OptimConfig | None = None) -> FineTuner:
    return FineTuner(LogitsAsInput(num_classes), create_criterion("ce"), [], optim or OptimConfig(), num_classes,
                     channels_last=False)


# 9 test images of classes 0, 1, 2 (class 3 has none); per class: (label -> predicted)
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2]
PREDICTED = [0, 0, 0, 1, 1, 2, 2, 2, 0]
# per class, correct / images of that class: 3/4, 1/3, 1/2, absent. (Correct / images PREDICTED as the class would
# give 3/4 (0 predicted 4 times), 1/2 (1 predicted twice), 1/3 (2 predicted 3 times).)
CLASS_ACC = [3 / 4, 1 / 3, 1 / 2, None]
COUNTS = [4, 3, 2]


# Lightning's own use of a torch pytree API that torch deprecates (fit() filters it the same way)
@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)` is deprecated")
def test_per_class_test_accuracy_hand_values() -> None:
    num_classes = 4
    logits = torch.nn.functional.one_hot(torch.tensor(PREDICTED), num_classes).float().reshape(-1, num_classes, 1, 1)
    loader = DataLoader(TensorDataset(logits, torch.tensor(LABELS)), batch_size=4)  # batches of 4, 4, 1
    module = _module(num_classes)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(module, loader, verbose=False)[0]
    per_class = module.test_class_accuracy()
    assert per_class[3] is None
    assert per_class[:3] == pytest.approx(CLASS_ACC[:3], abs=1e-12)
    # correct: 3 + 1 + 1 = 5 of 9
    assert result["test/acc"] == pytest.approx(5 / 9, abs=1e-6)
    # accuracy = sum_c acc_c n_c / N over the classes present: (3/4 * 4 + 1/3 * 3 + 1/2 * 2) / 9 = 5 / 9
    assert sum(a * n for a, n in zip(per_class[:3], COUNTS)) / sum(COUNTS) == pytest.approx(result["test/acc"],
                                                                                             abs=1e-6)
    # mean over the present classes only: (3/4 + 1/3 + 1/2) / 3 = 19/36 = 0.52777...
    assert result["test/mean_class_acc"] == pytest.approx(19 / 36, abs=1e-6)


def test_scheduler_wires_lr_factor_to_each_step() -> None:
    optim = OptimConfig(optimizer="sgd", lr=0.02, head_lr_mult=10.0, scheduler="cosine", warmup_epochs=1.0)
    module = _module(3, optim)
    module.trainer = SimpleNamespace(estimated_stepping_batches=20, max_epochs=5)  # 4 steps per epoch
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = []
    for _ in range(21):
        groups = {g["name"]: g["lr"] for g in scheduler.optimizer.param_groups}
        assert groups["head"] == pytest.approx(10.0 * groups["backbone"], rel=1e-12)
        factors.append(groups["backbone"] / 0.02)
        scheduler.optimizer.step()
        scheduler.step()
    expected = [1 / 4, 2 / 4, 3 / 4, 1.0, 1.0] + [_cos((s - 4) / 16) for s in range(5, 21)]
    assert factors == pytest.approx(expected, abs=1e-12)
    assert factors[8] == pytest.approx(0.8535533905932737, abs=1e-12) and factors[20] == 0.0
