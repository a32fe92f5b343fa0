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
    soft_target_refusals,
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
    with pytest.raises(UnknownNameError, match=r"unknown criterion 'nope'; known: (\w+, )*ce(, \w+)*$"):
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


def test_soft_target_refusals_name_each_refusing_term_with_its_reason(clean_registry: None) -> None:
    @register_regularizer("toy_undeclared")
    class Undeclared(Regularizer):  # a third-party term that says nothing: refused, and told what to declare
        pass

    class Unregistered(Regularizer):
        accepts_soft_targets = False
        soft_targets_note = "it needs one class per sample"

    terms = [CrossEntropy(), create_regularizer("adarand"), create_regularizer("bss"), Undeclared(), Unregistered(),
             create_regularizer("randreg", prior="class"), create_regularizer("randreg", prior="pretrained"),
             create_regularizer("lwf"), create_regularizer("lwf", teacher="online"), create_criterion("lm_softmax")]
    refusals = soft_target_refusals(terms)
    assert [line.split(" does not accept mixed (soft) targets: ")[0] for line in refusals] == [
        "adarand", "toy_undeclared", "Unregistered", "randreg", "lwf", "lm_softmax"]
    assert "mean of its one class" in refusals[0]
    assert "accepts_soft_targets = True" in refusals[1] and "TrainStep.targets" in refusals[1]
    assert refusals[2].endswith(": it needs one class per sample")
    assert "prior='class'" in refusals[3] and "teacher='online'" in refusals[4]
    assert soft_target_refusals([]) == [] and soft_target_refusals(terms[2:3]) == []


def test_train_step_targets_default_to_none() -> None:
    step = TrainStep(features=torch.zeros(2, 3), logits=torch.zeros(2, 2), labels=torch.zeros(2).long(),
                     model=torch.nn.Identity())
    assert step.targets is None
    assert base_module.in_float32(step).targets is None


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


def test_labels_verified_spares_the_device_read_of_the_range_and_nothing_else() -> None:
    from regtune.regularizers._utils import check_labels, labels_verified

    # A meta tensor has no values: reading its minimum fails, as a GPU read would cost a host wait.
    device_labels = torch.tensor([0, 5], device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        check_labels(device_labels, 2, 3, "logits")
    with labels_verified(3):
        check_labels(device_labels, 2, 3, "logits")  # trusted: not read
        with pytest.raises(RuntimeError, match="meta"):
            check_labels(device_labels, 2, 4, "logits")  # scores with another number of classes: read
        with pytest.raises(ValueError, match=r"got values in \[0, 5\]"):
            check_labels(torch.tensor([0, 5]), 2, 3, "logits")  # CPU labels: checked (it is free)
        with pytest.raises(ValueError, match="shape"):
            check_labels(device_labels, 3, 3, "logits")  # shapes are still checked
    with pytest.raises(RuntimeError, match="meta"):
        check_labels(device_labels, 2, 3, "logits")  # outside the block again
