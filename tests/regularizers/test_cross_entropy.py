"""The cross-entropy criterion on soft (mixed) targets and with class weights: NumPy references, torch's hard-label
loss as the one-hot case, the balanced weights, errors, gradients and the checkpoint of the weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from regtune.regularizers import CrossEntropy, LMSoftmax, TrainStep, create_criterion, soft_cross_entropy
from regtune.regularizers.base import in_float32
from tests.regularizers.tolerance import DTYPES, TOL

C = 4


def np_soft_ce(logits: np.ndarray, targets: np.ndarray, weight: np.ndarray, eps: float) -> float:
    """sum_b sum_c w_c t'_bc (-log p_bc) / sum_b sum_c w_c t_bc, t' = (1 - eps) t + eps / C, in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    smoothed = (1 - eps) * targets + eps / logits.shape[1]
    return float(-(weight * smoothed * log_p).sum() / (weight * targets).sum())


def random_case(seed: int = 0, batch: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Logits, soft targets (Dirichlet rows), labels and positive class weights.

    The weights are float32 values: the criterion keeps them in a float32 buffer until the module is moved to float64.
    """
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.2, 3.0, size=C).astype(np.float32).astype(np.float64)
    return (rng.normal(size=(batch, C)) * 2, rng.dirichlet(np.ones(C), size=batch), rng.integers(0, C, size=batch),
            weight)


def step_of(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> TrainStep:
    return TrainStep(features=torch.zeros(logits.shape[0], 2, dtype=logits.dtype), logits=logits, labels=labels,
                     model=nn.Identity(), targets=targets)


# ----------------------------------------------------------------------------------------------------------------
# Soft targets


@DTYPES
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_soft_targets_match_numpy(dtype: torch.dtype, eps: float, weighted: bool) -> None:
    logits, targets, labels, weight = random_case(seed=1)
    weight = weight if weighted else np.ones(C)
    expected = np_soft_ce(logits, targets, weight, eps)
    criterion = CrossEntropy(eps, class_weights=weight.tolist() if weighted else None).to(dtype)
    value = criterion(step_of(torch.tensor(logits, dtype=dtype), torch.tensor(labels),
                              torch.tensor(targets, dtype=dtype)))
    assert value.dim() == 0 and value.dtype == dtype
    np.testing.assert_allclose(value.item(), expected, **TOL[dtype])
    function = soft_cross_entropy(torch.tensor(logits, dtype=dtype), torch.tensor(targets, dtype=dtype),
                                  torch.tensor(weight, dtype=dtype) if weighted else None, eps)
    np.testing.assert_allclose(function.item(), expected, **TOL[dtype])


def test_soft_targets_hand_value() -> None:
    # logits 0: p = (1/2, 1/2) for both samples, -log p = log 2 everywhere; w = (1, 3).
    # numerator sum_b sum_c w_c t_bc log 2 = (0.25 + 3 * 0.75 + 1 * 1 + 0) log 2 = 3.5 log 2; denominator 3.5 -> log 2.
    targets = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64)
    value = soft_cross_entropy(torch.zeros(2, 2, dtype=torch.float64), targets, torch.tensor([1.0, 3.0]))
    assert value.item() == pytest.approx(np.log(2), rel=1e-12)
    # logits (0, log 3): p = (1/4, 3/4); one sample, t = (1/2, 1/2), no weights: -(log 1/4 + log 3/4) / 2.
    value = soft_cross_entropy(torch.tensor([[0.0, np.log(3.0)]]), torch.tensor([[0.5, 0.5]]))
    assert value.item() == pytest.approx(-(np.log(0.25) + np.log(0.75)) / 2, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_one_hot_soft_targets_equal_torch_hard_label_cross_entropy(eps: float, weighted: bool) -> None:
    logits, _, labels, weight = random_case(seed=2, batch=7)
    logits, labels = torch.tensor(logits), torch.tensor(labels)
    weight = torch.tensor(weight) if weighted else None
    criterion = CrossEntropy(eps, class_weights=weight.tolist() if weighted else None).double()
    torch_loss = nn.functional.cross_entropy(logits, labels, weight=weight, label_smoothing=eps)
    one_hot = nn.functional.one_hot(labels, C).double()
    torch.testing.assert_close(criterion(step_of(logits, labels, one_hot)), torch_loss, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(criterion(step_of(logits, labels)), torch_loss, rtol=0, atol=0)  # the hard path


def test_hard_weighted_smoothed_loss_matches_numpy() -> None:
    """The hard-label path against the docstring's formula, computed without torch (torch's weight semantics)."""
    logits, _, labels, weight = random_case(seed=3, batch=6)
    eps = 0.2
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    rows = [(1 - eps) * weight[y] * -log_p[b, y] + eps / C * (weight * -log_p[b]).sum() for b, y in enumerate(labels)]
    expected = sum(rows) / weight[labels].sum()
    value = CrossEntropy(eps, class_weights=weight.tolist()).double()(step_of(torch.tensor(logits),
                                                                               torch.tensor(labels)))
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)


def test_soft_weighted_cross_entropy_gradcheck() -> None:
    logits, targets, _, weight = random_case(seed=4, batch=3)
    x = torch.tensor(logits, requires_grad=True)
    t = torch.tensor(targets, requires_grad=True)
    assert gradcheck(lambda a, b: soft_cross_entropy(a, b, torch.tensor(weight), 0.1), (x, t))


def test_soft_path_reads_targets_not_labels() -> None:
    logits, targets, labels, _ = random_case(seed=5)
    criterion = CrossEntropy(0.1, class_weights="balanced")
    criterion.set_class_counts(torch.tensor([3, 1, 2, 6]))
    step = step_of(torch.tensor(logits).float(), torch.tensor(labels), torch.tensor(targets).float())
    value = criterion(step)
    assert torch.equal(criterion(step_of(step.logits, (step.labels + 1) % C, step.targets)), value)
    assert not torch.allclose(criterion(step_of(step.logits, step.labels, step.targets.flip(0))), value)


def test_soft_targets_of_the_wrong_shape_are_rejected() -> None:
    step = step_of(torch.zeros(3, C), torch.zeros(3, dtype=torch.long), torch.full((3, C - 1), 1.0 / (C - 1)))
    with pytest.raises(ValueError, match=r"same shape \(B, C\)"):
        CrossEntropy()(step)
    with pytest.raises(TypeError, match="floating"):
        CrossEntropy()(step_of(torch.zeros(3, C), torch.zeros(3, dtype=torch.long), torch.zeros(3, C).long()))


def test_half_precision_targets_are_upcast() -> None:
    logits, targets, labels, _ = random_case(seed=6)
    step = step_of(torch.tensor(logits).bfloat16(), torch.tensor(labels), torch.tensor(targets).bfloat16())
    assert in_float32(step).targets.dtype == torch.float32
    value = CrossEntropy(0.1)(step)
    reference = CrossEntropy(0.1)(in_float32(step))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Class weights


def test_balanced_weights_hand_values() -> None:
    # n = 12 images, C = 3 classes: w_c = 12 / (3 n_c) = 12/6, 12/18, 12/12 = 2, 2/3, 1
    criterion = CrossEntropy(class_weights="balanced")
    criterion.set_class_counts(torch.tensor([2, 6, 4]))
    torch.testing.assert_close(criterion.weight, torch.tensor([2.0, 2.0 / 3.0, 1.0]))
    assert criterion.weight.dtype == torch.float32  # the buffer keeps the module's dtype


def test_balanced_weights_match_numpy_and_weight_the_loss() -> None:
    rng = np.random.default_rng(7)
    counts = rng.integers(1, 50, size=C)
    expected = counts.sum() / (C * counts.astype(np.float64))  # scikit-learn's compute_class_weight("balanced")
    criterion = CrossEntropy(class_weights="balanced").double()
    criterion.set_class_counts(torch.tensor(counts))
    np.testing.assert_allclose(criterion.weight.numpy(), expected, rtol=1e-15)
    logits, targets, labels, _ = random_case(seed=8)
    value = criterion(step_of(torch.tensor(logits), torch.tensor(labels), torch.tensor(targets)))
    np.testing.assert_allclose(value.item(), np_soft_ce(logits, targets, expected, 0.0), rtol=1e-12)


def test_balanced_weights_need_every_class() -> None:
    criterion = CrossEntropy(class_weights="balanced")
    with pytest.raises(ValueError, match=r"class\(es\) \[1, 3\] have none.*explicit class_weights.*more data"):
        criterion.set_class_counts(torch.tensor([3, 0, 2, 0]))


def test_balanced_without_counts_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="set_class_counts"):
        CrossEntropy(class_weights="balanced")(step_of(torch.zeros(2, C), torch.zeros(2, dtype=torch.long)))


def test_explicit_weights_of_the_wrong_length() -> None:
    criterion = CrossEntropy(class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="2 weights but the class counts have 3 classes"):
        criterion.set_class_counts(torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="2 weights but the logits have 4 classes"):  # no counts were given
        criterion(step_of(torch.zeros(2, C), torch.zeros(2, dtype=torch.long)))
    criterion.set_class_counts(torch.tensor([5, 1]))  # the right length: the given weights stay
    torch.testing.assert_close(criterion.weight, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("weights", [[1.0, -1.0], [1.0, 0.0], [1.0, float("nan")], [float("inf")], [], ["a", 1.0]])
def test_explicit_weights_must_be_positive_and_finite(weights: list) -> None:
    with pytest.raises(ValueError, match="class_weights"):
        CrossEntropy(class_weights=weights)


def test_unknown_class_weights_string_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'balanced'.*got 'inverse'"):
        CrossEntropy(class_weights="inverse")


def test_bad_class_counts_are_rejected() -> None:
    criterion = CrossEntropy(class_weights="balanced")
    with pytest.raises(TypeError, match="int64"):
        criterion.set_class_counts(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(C,\)"):
        criterion.set_class_counts(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        criterion.set_class_counts(torch.tensor([2, -1]))


def test_without_class_weights_counts_change_nothing_and_the_state_stays_empty() -> None:
    criterion = create_criterion("ce", label_smoothing=0.1)
    criterion.set_class_counts(torch.tensor([1, 0, 5]))  # a class without images is no error without weights
    assert criterion.weight is None and criterion.state_dict() == {}  # checkpoints of earlier runs still load
    lm = LMSoftmax()
    lm.set_class_counts(torch.tensor([1, 2]))  # the base class's default: nothing
    assert lm.state_dict() == {}


def test_balanced_weights_round_trip_through_a_checkpoint() -> None:
    criterion = create_criterion("ce", class_weights="balanced", label_smoothing=0.1)
    criterion.set_class_counts(torch.tensor([5, 1, 2, 8]))
    saved = copy.deepcopy(criterion.state_dict())
    assert set(saved) == {"weight"}
    fresh = CrossEntropy(label_smoothing=0.1, class_weights="balanced")  # as a resumed run builds it: no counts
    fresh.load_state_dict(saved)  # strict
    torch.testing.assert_close(fresh.weight, criterion.weight, rtol=0, atol=0)
    logits, targets, labels, _ = random_case(seed=9)
    for soft in (None, torch.tensor(targets).float()):
        step = step_of(torch.tensor(logits).float(), torch.tensor(labels), soft)
        torch.testing.assert_close(fresh(step), criterion(step), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="weight"):  # a run without class weights does not take them silently
        CrossEntropy(label_smoothing=0.1).load_state_dict(saved)


def test_class_weights_follow_to_float64() -> None:
    criterion = CrossEntropy(class_weights=[1.0, 2.0, 3.0, 4.0])
    assert criterion.to(torch.float64).weight.dtype == torch.float64
    logits, targets, labels, _ = random_case(seed=10)
    value = criterion(step_of(torch.tensor(logits), torch.tensor(labels), torch.tensor(targets)))
    assert value.dtype == torch.float64
    np.testing.assert_allclose(value.item(), np_soft_ce(logits, targets, np.arange(1.0, 5.0), 0.0), rtol=1e-12)
