"""The stateless terms as modules: FNP / SGM, MaxEnt, head L1 / L2 / negative, sample-margin and zero-centroid
(docs/methods/), against hand values and NumPy float64 references written here from the equations.
(The underlying pure functions are tested in test_functional.py; these tests check the modules' wiring: the weight,
which tensor each term reads, the head of ``step.model``, gradients and ``stats()``.)"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from regtune.regularizers import (
    FeatureNormPenalty,
    HeadL1,
    HeadL2,
    HeadNegativePenalty,
    LMSoftmax,
    MaxEntropy,
    SampleMarginRegularizer,
    TrainStep,
    ZeroCentroidRegularizer,
)
from tests.regularizers.nets import FeatureNet
from tests.regularizers.tolerance import DTYPES, TOL


class HeadNet(FeatureNet):
    """timm contract around a Linear head with a given weight (and a bias the head penalties must ignore)."""

    def __init__(self, weight: np.ndarray, dtype: torch.dtype = torch.float64) -> None:
        classes, dim = weight.shape
        super().__init__(dim, classes, dtype=dtype)
        with torch.no_grad():  # the parameters already have ``dtype``: no float32 rounding of the weight
            self.classifier.weight.copy_(torch.tensor(weight))
            self.classifier.bias.fill_(100.0)


def make_step(features: np.ndarray, labels: list[int], model: nn.Module, dtype: torch.dtype = torch.float64,
              logits: np.ndarray | None = None) -> TrainStep:
    f = torch.tensor(features, dtype=dtype, requires_grad=True)
    out = torch.tensor(logits, dtype=dtype, requires_grad=True) if logits is not None else model.get_classifier()(f)
    return TrainStep(features=f, logits=out, labels=torch.tensor(labels), model=model)


def check(value: torch.Tensor, expected: float, dtype: torch.dtype) -> None:
    assert value.dim() == 0 and value.dtype == dtype
    np.testing.assert_allclose(value.item(), expected, **TOL[dtype])


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_cos(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T


W_KNOWN = np.array([[1.0, -2.0, 0.0], [-0.5, 3.0, -1.0]])
F3 = np.array([[1.0, 2.0, 0.5], [3.0, 0.0, -1.0], [0.0, -1.0, 2.0]])


# ----------------------------------------------------------------------------------------------------------------
# FNP / SGM


@DTYPES
def test_fnp_none_hand_value(dtype: torch.dtype) -> None:
    f = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, -1.0]])
    term = FeatureNormPenalty(weight=0.1)
    value = term(make_step(f, [0, 1, 0], HeadNet(np.eye(2), dtype), dtype))
    check(value, 0.5, dtype)  # ||f||^2 = 5, 9, 1 -> mean 5 -> 0.1 * 5 = 0.5
    assert term.stats() == {"value": pytest.approx(5.0, rel=1e-6)}


@DTYPES
def test_fnp_sgm_matches_numpy_and_alpha_is_detached(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4))
    labels = [1, 3, 0]
    term = FeatureNormPenalty(weight=0.3, weighting="sgm")
    step = make_step(F3, labels, HeadNet(rng.normal(size=(4, 3)), dtype), dtype, logits=logits)
    value = term(step)
    alpha = ((np_softmax(logits) - np.eye(4)[labels]) ** 2).sum(1)  # sum_c (p_bc - 1[c = y_b])^2
    norms = (F3**2).sum(1)
    check(value, 0.3 * (alpha * norms).mean(), dtype)
    value.backward()
    # alpha is a constant weight: d/df_b = lambda * 2 alpha_b f_b / B; no gradient into the logits.
    np.testing.assert_allclose(step.features.grad.double().numpy(), 0.3 * 2 * alpha[:, None] * F3 / 3, **TOL[dtype])
    assert step.logits.grad is None


def test_fnp_authors_gradient_reaches_the_logits_and_is_refused_without_sgm() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4))
    step = make_step(F3, [1, 3, 0], HeadNet(rng.normal(size=(4, 3)), torch.float64), torch.float64, logits=logits)
    FeatureNormPenalty(weight=0.3, weighting="sgm", detach_alpha=False)(step).backward()
    assert step.logits.grad is not None and step.logits.grad.abs().sum() > 0  # through alpha (values: test_functional)
    with pytest.raises(ValueError, match="detach_alpha=False changes only weighting='sgm'"):
        FeatureNormPenalty(detach_alpha=False)
    with pytest.raises(TypeError, match="detach_alpha must be true or false"):
        FeatureNormPenalty(weighting="sgm", detach_alpha="no")


@DTYPES
def test_fnp_sgm_on_soft_targets_matches_numpy(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4))
    targets = rng.dirichlet(np.ones(4), size=3)
    step = make_step(F3, [1, 3, 0], HeadNet(rng.normal(size=(4, 3)), dtype), dtype, logits=logits)
    mixed = TrainStep(features=step.features, logits=step.logits, labels=step.labels, model=step.model,
                      targets=torch.tensor(targets, dtype=dtype))
    value = FeatureNormPenalty(weight=0.3, weighting="sgm")(mixed)
    alpha = ((np_softmax(logits) - targets) ** 2).sum(1)  # sum_c (p_bc - t_bc)^2
    check(value, 0.3 * (alpha * (F3**2).sum(1)).mean(), dtype)
    one_hot = TrainStep(features=step.features, logits=step.logits, labels=torch.tensor([2, 2, 2]), model=step.model,
                        targets=torch.eye(4, dtype=dtype)[[1, 3, 0]])
    torch.testing.assert_close(FeatureNormPenalty(weight=0.3, weighting="sgm")(one_hot),
                               FeatureNormPenalty(weight=0.3, weighting="sgm")(step), **TOL[dtype])


def test_fnp_uses_features_not_logits() -> None:
    step = make_step(F3, [0, 1, 0], HeadNet(W_KNOWN))
    value = FeatureNormPenalty(weight=1.0)(step)
    value.backward()
    np.testing.assert_allclose(step.features.grad.numpy(), 2 * F3 / 3, rtol=1e-12)  # d mean ||f||^2 = 2 f / B


# ----------------------------------------------------------------------------------------------------------------
# MaxEnt


@DTYPES
def test_maxent_hand_value(dtype: torch.dtype) -> None:
    logits = np.array([[0.0, math.log(3.0)], [0.0, 0.0]])
    term = MaxEntropy(gamma=0.5)
    value = term(make_step(np.zeros((2, 2)), [0, 1], HeadNet(np.eye(2), dtype), dtype, logits=logits))
    # p = (1/4, 3/4): H = 0.5623351; p = (1/2, 1/2): H = ln 2 = 0.6931472; mean 0.6277412; -0.5 * 0.6277412
    assert value.dim() == 0 and value.dtype == dtype
    assert value.item() == pytest.approx(-0.3138706, abs=1e-7)
    assert term.stats()["entropy"] == pytest.approx(0.6277412, abs=1e-6)


@DTYPES
def test_maxent_matches_numpy_with_gradient_through_p(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, size=(4, 5))
    step = make_step(np.zeros((4, 2)), [0, 1, 2, 3], HeadNet(np.eye(2), dtype), dtype, logits=logits)
    value = MaxEntropy(gamma=0.2)(step)
    p = np_softmax(logits)
    h = -(p * np.log(p)).sum(1)
    check(value, -0.2 * h.mean(), dtype)
    value.backward()
    # dH_b/dz_bi = -p_bi (log p_bi + H_b); loss = -gamma mean_b H_b
    expected = 0.2 * p * (np.log(p) + h[:, None]) / 4
    np.testing.assert_allclose(step.logits.grad.double().numpy(), expected, **TOL[dtype])


# ----------------------------------------------------------------------------------------------------------------
# Head penalties


@DTYPES
@pytest.mark.parametrize(("cls", "unweighted"), [
    (HeadL1, 7.5),  # |1| + |-2| + |0| + |-0.5| + |3| + |-1| = 7.5
    (HeadL2, 15.25),  # 1 + 4 + 0 + 0.25 + 9 + 1 = 15.25
    (HeadNegativePenalty, 3.5),  # relu(-w): 2 + 0.5 + 1 = 3.5
], ids=["head_l1", "head_l2", "head_neg"])
def test_head_penalties_hand_values(cls: type, unweighted: float, dtype: torch.dtype) -> None:
    model = HeadNet(W_KNOWN, dtype)  # bias = 100 everywhere: excluded
    term = cls(weight=0.2)
    value = term(make_step(np.ones((2, 3)), [0, 1], model, dtype))
    check(value, 0.2 * unweighted, dtype)
    assert term.stats() == {"value": pytest.approx(unweighted, rel=1e-6)}
    value.backward()
    assert model.classifier.bias.grad is None
    grad = {HeadL1: np.sign(W_KNOWN), HeadL2: 2 * W_KNOWN, HeadNegativePenalty: -(W_KNOWN < 0).astype(float)}[cls]
    np.testing.assert_allclose(model.classifier.weight.grad.double().numpy(), 0.2 * grad, **TOL[dtype])


def test_head_penalty_reads_the_model_of_the_step() -> None:
    term = HeadL2(weight=1.0)
    assert term(make_step(np.ones((1, 3)), [0], HeadNet(W_KNOWN))).item() == pytest.approx(15.25)
    assert term(make_step(np.ones((1, 3)), [0], HeadNet(2 * W_KNOWN))).item() == pytest.approx(61.0)  # 4 * 15.25
    no_head = TrainStep(features=torch.ones(1, 3), logits=torch.ones(1, 2), labels=torch.tensor([0]),
                        model=nn.Identity())
    with pytest.raises(TypeError, match="get_classifier"):
        term(no_head)


# ----------------------------------------------------------------------------------------------------------------
# Sample margin and zero centroid


@DTYPES
def test_sample_margin_matches_numpy(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 3))
    labels = [0, 3, 1]
    model = HeadNet(w, dtype)
    term = SampleMarginRegularizer(weight=0.5)
    step = make_step(F3, labels, model, dtype)
    value = term(step)
    cos = np_cos(F3, w)
    margins = np.array([cos[b, y] - np.max(np.delete(cos[b], y)) for b, y in enumerate(labels)])
    check(value, 0.5 * (-margins).mean(), dtype)  # lambda * mean (max_{j != y} cos_j - cos_y)
    stats = term.stats()
    assert set(stats) == {"margin_mean", "margin_min"}
    np.testing.assert_allclose([stats["margin_mean"], stats["margin_min"]], [margins.mean(), margins.min()],
                               **TOL[dtype])
    value.backward()
    assert step.features.grad.abs().sum() > 0 and model.classifier.weight.grad.abs().sum() > 0


def test_sample_margin_hand_value() -> None:
    # Head = identity (C = D = 3), f = (0.9, 0.1, 0) / ||.|| ... choose unit-free: f = (3, 4, 0), ||f|| = 5:
    # cos = (0.6, 0.8, 0); y = 0: margin = 0.6 - 0.8 = -0.2; y = 1: 0.8 - 0.6 = 0.2 -> R = mean(0.2, -0.2) = 0
    # y = 2: 0 - 0.8 = -0.8. For labels (0, 2): R = mean(0.2, 0.8) = 0.5, margins (-0.2, -0.8).
    term = SampleMarginRegularizer(weight=1.0)
    value = term(make_step(np.array([[3.0, 4.0, 0.0], [3.0, 4.0, 0.0]]), [0, 2], HeadNet(np.eye(3))))
    assert value.item() == pytest.approx(0.5, abs=1e-12)
    assert term.stats()["margin_mean"] == pytest.approx(-0.5, abs=1e-12)
    assert term.stats()["margin_min"] == pytest.approx(-0.8, abs=1e-12)


@DTYPES
@pytest.mark.parametrize(("reduce", "squared", "expected"), [
    ("mean", True, 0.6476030),  # unit rows (1,0), (0,1), (1,1)/sqrt2: centroid (0.5690356, 0.5690356); 2 * 0.3238015
    ("mean", False, 0.8047379),  # sqrt(0.6476030)
    ("sum", True, 5.8284271),  # sum (1.7071068, 1.7071068): 2 * 2.9142136 = 3 + 2 sqrt2
], ids=["mean-squared", "mean-norm", "sum-squared"])
def test_zero_centroid_hand_values(reduce: str, squared: bool, expected: float, dtype: torch.dtype) -> None:
    model = HeadNet(np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), dtype)  # row norms do not matter
    term = ZeroCentroidRegularizer(weight=2.0, reduce=reduce, squared=squared)
    value = term(make_step(np.ones((1, 2)), [0], model, dtype))
    np.testing.assert_allclose(value.item(), 2.0 * expected, rtol=1e-6)
    stats = term.stats()
    assert stats["centroid"] == pytest.approx(expected, rel=1e-6)
    assert stats["class_margin_deg"] == pytest.approx(45.0, rel=1e-6)  # smallest angle: (1,0) / (1,1)
    value.backward()
    assert model.classifier.weight.grad.abs().sum() > 0


@DTYPES
def test_zero_centroid_matches_numpy_and_class_margin(dtype: torch.dtype) -> None:
    w = np.random.default_rng(3).normal(size=(5, 4))
    term = ZeroCentroidRegularizer(weight=1.0)  # default: squared norm of the sum of the normalised prototypes
    value = term(make_step(np.ones((1, 4)), [0], HeadNet(w, dtype), dtype))
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    check(value, float((unit.sum(0) ** 2).sum()), dtype)
    cos = unit @ unit.T
    margin = np.degrees(np.arccos(cos[~np.eye(5, dtype=bool)].max()))
    assert term.stats()["class_margin_deg"] == pytest.approx(margin, rel=1e-5)


def test_zero_centroid_of_simplex_head() -> None:
    # Regular simplex of 3 classes in 2-D: angles 120 deg, centroid 0, class margin arccos(-1/2) = 120 deg.
    angles = np.deg2rad([90.0, 210.0, 330.0])
    term = ZeroCentroidRegularizer()
    value = term(make_step(np.ones((1, 2)), [0], HeadNet(np.stack([np.cos(angles), np.sin(angles)], 1))))
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    assert term.stats()["class_margin_deg"] == pytest.approx(120.0, rel=1e-9)


def test_stats_empty_before_forward() -> None:
    for term in (FeatureNormPenalty(), MaxEntropy(), HeadL1(), SampleMarginRegularizer(), ZeroCentroidRegularizer()):
        assert term.stats() == {}


# ----------------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(("cls", "kwargs"), [
    (FeatureNormPenalty, {"weight": -1.0}),
    (FeatureNormPenalty, {"weighting": "l1"}),
    (MaxEntropy, {"gamma": -0.1}),
    (HeadL1, {"weight": -1.0}),
    (HeadL2, {"weight": -1e-3}),
    (HeadNegativePenalty, {"weight": -1.0}),
    (SampleMarginRegularizer, {"weight": -0.5}),
    (ZeroCentroidRegularizer, {"weight": -1.0}),
    (ZeroCentroidRegularizer, {"reduce": "max"}),
    (LMSoftmax, {"s": 0.0}),
    (LMSoftmax, {"s": -1.0}),
], ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_bad_arguments_raise_value_error(cls: type, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cls(**kwargs)
