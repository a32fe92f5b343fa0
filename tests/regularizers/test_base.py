"""The registry, the TrainStep record and the cross-entropy criterion."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from regtune.regularizers import (
    CrossEntropy,
    Regularizer,
    TrainStep,
    UnknownNameError,
    create_criterion,
    create_regularizer,
    list_criteria,
    list_regularizers,
    register_regularizer,
)
from regtune.regularizers import base as base_module


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base_module, "_REGULARIZERS", dict(base_module._REGULARIZERS))


def test_regularizers_import_only_torch() -> None:
    code = ("import sys, regtune.regularizers; bad = [m for m in ('timm', 'lightning', 'torchvision', "
            "'regtune.train', 'regtune.models', 'regtune.data', 'matplotlib') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_register_create_and_list(clean_registry: None) -> None:
    @register_regularizer("toy_l2")
    class ToyL2(Regularizer):
        def __init__(self, weight: float = 1.0) -> None:
            super().__init__()
            self.weight = weight

        def forward(self, step: TrainStep) -> torch.Tensor:
            return self.weight * step.features.pow(2).mean()

    assert "toy_l2" in list_regularizers()
    term = create_regularizer("toy_l2", weight=0.5)
    assert isinstance(term, ToyL2) and term.weight == 0.5 and term.registry_name == "toy_l2"


def test_duplicate_name_raises(clean_registry: None) -> None:
    @register_regularizer("toy_dup")
    class A(Regularizer):
        pass

    with pytest.raises(ValueError, match="already registered"):
        @register_regularizer("toy_dup")
        class B(Regularizer):
            pass


def test_unknown_name_lists_known() -> None:
    with pytest.raises(UnknownNameError, match="unknown criterion 'nope'; known: ce"):
        create_criterion("nope")
    with pytest.raises(UnknownNameError, match="unknown regularizer 'nope'"):
        create_regularizer("nope")


def test_unknown_argument_lists_valid() -> None:
    with pytest.raises(UnknownNameError, match="no argument.*smoothing.*valid: label_smoothing"):
        create_criterion("ce", smoothing=0.1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_numpy(smoothing: float) -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = np.array([0, 2])
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    target = np.full_like(logits, smoothing / 3)
    target[np.arange(2), labels] += 1 - smoothing
    expected = -(target * log_p).sum(1).mean()
    step = TrainStep(features=torch.zeros(2, 4), logits=torch.tensor(logits), labels=torch.tensor(labels),
                     model=torch.nn.Identity())
    assert float(CrossEntropy(smoothing)(step)) == pytest.approx(expected, rel=1e-12)
    assert "ce" in list_criteria()


def test_cross_entropy_rejects_bad_smoothing() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CrossEntropy(1.0)


def test_train_step_global_step_and_its_former_name() -> None:
    common = {"features": torch.zeros(2, 3), "logits": torch.zeros(2, 2), "labels": torch.zeros(2).long(),
              "model": torch.nn.Identity()}
    record = TrainStep(**common, global_step=7, epoch=1)
    assert record.global_step == 7 and record.epoch == 1
    with pytest.warns(DeprecationWarning, match="global_step"):
        old = TrainStep(**common, step=7, epoch=1)  # the name before the rename still builds the same record
    assert old == record
    with pytest.warns(DeprecationWarning, match="global_step"):
        assert record.step == 7
    with pytest.raises(TypeError, match="both"):
        TrainStep(**common, step=1, global_step=2)
