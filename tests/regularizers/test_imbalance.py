"""Losses for imbalanced training sets: effective-number class weights of ``ce``, the logit-adjusted loss, balanced
softmax and post-hoc logit adjustment, against NumPy float64 references and values worked out by hand."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from regtune.regularizers import CrossEntropy, TrainStep, create_criterion, soft_target_refusals
from regtune.regularizers.functional import (
    balanced_softmax_loss,
    effective_number_weights,
    logit_adjusted_cross_entropy,
    posthoc_logit_adjustment,
)
from regtune.regularizers.imbalance import BalancedSoftmax, LogitAdjusted
from tests.regularizers.tolerance import DTYPES, TOL

C = 4
COUNTS = np.array([20, 3, 9, 1])  # an imbalanced training subset


# ----------------------------------------------------------------------------------------------------------------
# NumPy float64 references (independent of the module)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(z: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the batch of -log softmax(z_b)[y_b]."""
    return float(-np_log_softmax(z)[np.arange(len(labels)), labels].mean())


def np_soft_ce(z: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the batch of -sum_c t_bc log softmax(z_b)_c (targets' rows sum to 1)."""
    return float(-(targets * np_log_softmax(z)).sum(axis=1).mean())


def np_effective_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """(1 - beta) / (1 - beta^n_c), normalised to sum to C, as the official code computes them."""
    w = (1.0 - beta) / (1.0 - np.power(beta, counts.astype(np.float64)))
    return w / w.sum() * len(counts)


def case(seed: int = 0, batch: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels covering every class, and Dirichlet soft targets."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, C)) * 2, np.arange(batch) % C, rng.dirichlet(np.ones(C), size=batch)


def step_of(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> TrainStep:
    return TrainStep(features=torch.zeros(logits.shape[0], 2, dtype=logits.dtype), logits=logits, labels=labels,
                     model=nn.Identity(), targets=targets)


def with_counts(criterion: nn.Module, counts: np.ndarray = COUNTS) -> nn.Module:
    criterion.set_class_counts(torch.tensor(counts))
    return criterion


# ----------------------------------------------------------------------------------------------------------------
# Effective number of samples (Cui et al.)


def test_effective_number_weights_hand_values() -> None:
    # beta = 1/2, n = (1, 3): E_c = (1 - beta^n) / (1 - beta) = (0.5 / 0.5, 0.875 / 0.5) = (1, 7/4);
    # 1 / E = (1, 4/7), sum 11/7; w = C (1 / E) / sum = 2 (7/11, 4/11) = (14/11, 8/11).
    w = effective_number_weights(torch.tensor([1, 3]), beta=0.5)
    assert w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), [14 / 11, 8 / 11], rtol=1e-15)
    # beta = 0.9, n = (1, 1, 2): E = (1, 1, 1.9); 1 / E = (1, 1, 10/19), sum 48/19; w = 3 (19, 19, 10) / 48.
    w = effective_number_weights(torch.tensor([1, 1, 2]), beta=0.9)
    np.testing.assert_allclose(w.numpy(), [57 / 48, 57 / 48, 30 / 48], rtol=1e-14)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999])
def test_effective_number_weights_match_numpy_and_sum_to_c(beta: float) -> None:
    counts = np.array([500, 120, 37, 8, 1])
    w = effective_number_weights(torch.tensor(counts), beta=beta).numpy()
    np.testing.assert_allclose(w, np_effective_weights(counts, beta), rtol=1e-12)
    assert w.sum() == pytest.approx(len(counts), rel=1e-14)
    assert (np.diff(w) >= 0).all()  # fewer images, no smaller weight


def test_effective_number_weights_beta_zero_is_uniform() -> None:
    # beta = 0: E_c = 1 - 0^{n_c} = 1 for every n_c >= 1, so every weight is C / C = 1.
    w = effective_number_weights(torch.tensor([1000, 5, 1]), beta=0.0)
    assert torch.equal(w, torch.ones(3, dtype=torch.float64))


def test_effective_number_weights_approach_inverse_frequency_as_beta_goes_to_one() -> None:
    counts = np.array([200, 40, 10, 1])
    inverse = (1.0 / counts) / (1.0 / counts).sum() * len(counts)  # 1 / n_c, normalised to sum to C
    gaps = []
    for beta in (0.9, 0.99, 0.999, 0.9999, 1 - 1e-6, 1 - 1e-9):
        w = effective_number_weights(torch.tensor(counts), beta=beta).numpy()
        gaps.append(np.abs(w - inverse).max())
    assert all(a > b for a, b in itertools.pairwise(gaps)), gaps  # closer at each step
    # 1 - beta^n = n (1 - beta) (1 - (n - 1)(1 - beta) / 2 + ...): relative gap of order n_max (1 - beta) = 2e-7
    assert gaps[-1] < 1e-6 * inverse.max()
    # Within a constant factor, the limit is the 'balanced' weights n / (C n_c) (which sum to n/C * sum 1/n_c).
    balanced = counts.sum() / (len(counts) * counts)
    np.testing.assert_allclose(balanced / balanced.sum() * len(counts), inverse, rtol=1e-14)


def test_effective_number_weights_are_exact_for_beta_close_to_one() -> None:
    # For n = 1, E = (1 - beta) / (1 - beta) = 1 exactly; for n = 2, E = 1 + beta. A naive 1 - beta**n loses digits.
    beta = 1 - 1e-12
    w = effective_number_weights(torch.tensor([1, 2]), beta=beta).numpy()
    expected = np.array([1.0, 1.0 / (1.0 + beta)])
    np.testing.assert_allclose(w, expected / expected.sum() * 2, rtol=1e-12)


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, float("nan"), True])
def test_effective_number_weights_reject_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        effective_number_weights(torch.tensor([3, 2]), beta=beta)


def test_effective_number_weights_reject_bad_counts() -> None:
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have none"):
        effective_number_weights(torch.tensor([3, 0, 2]))
    with pytest.raises(TypeError, match="int64"):
        effective_number_weights(torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(C,\)"):
        effective_number_weights(torch.ones(2, 2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# The ce criterion with class_weights="effective"


def test_ce_effective_weights_default_beta_and_buffer() -> None:
    criterion = with_counts(create_criterion("ce", class_weights="effective"))
    assert criterion.effective_beta == 0.999
    assert criterion.weight.dtype == torch.float32  # the buffer keeps the module's dtype
    np.testing.assert_allclose(criterion.weight.numpy(), np_effective_weights(COUNTS, 0.999), rtol=1e-6)
    criterion = with_counts(create_criterion("ce", class_weights="effective", effective_beta=0.5).double())
    np.testing.assert_allclose(criterion.weight.numpy(), np_effective_weights(COUNTS, 0.5), rtol=1e-15)


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft_targets"])
def test_ce_effective_loss_matches_numpy(soft: bool) -> None:
    logits, labels, targets = case(seed=1)
    w = np_effective_weights(COUNTS, 0.9)
    if soft:  # sum_b sum_c w_c t_bc (-log p_bc) / sum_b sum_c w_c t_bc
        expected = -(w * targets * np_log_softmax(logits)).sum() / (w * targets).sum()
    else:  # torch's weighted mean: sum_b w_{y_b} (-log p_{b,y_b}) / sum_b w_{y_b}
        expected = -(w[labels] * np_log_softmax(logits)[np.arange(len(labels)), labels]).sum() / w[labels].sum()
    criterion = with_counts(CrossEntropy(class_weights="effective", effective_beta=0.9).double())
    value = criterion(step_of(torch.tensor(logits), torch.tensor(labels), torch.tensor(targets) if soft else None))
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)


def test_ce_balanced_weights_are_unchanged() -> None:
    # n = 33, C = 4: w_c = 33 / (4 n_c) = (33/80, 11/4, 11/12, 33/4), in float32 as before the effective option.
    criterion = with_counts(CrossEntropy(class_weights="balanced"))
    expected = torch.tensor([33 / 80, 11 / 4, 11 / 12, 33 / 4], dtype=torch.float64).float()
    assert torch.equal(criterion.weight, expected)
    assert criterion.effective_beta is None


def test_ce_effective_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="effective_beta applies to class_weights='effective' only"):
        CrossEntropy(class_weights="balanced", effective_beta=0.9)
    with pytest.raises(ValueError, match="effective_beta applies"):
        CrossEntropy(effective_beta=0.9)
    with pytest.raises(ValueError, match=r"effective_beta must be in \[0, 1\).*got 1.0"):
        CrossEntropy(class_weights="effective", effective_beta=1.0)
    with pytest.raises(ValueError, match="'balanced', 'effective'.*got 'inverse'"):
        CrossEntropy(class_weights="inverse")
    with pytest.raises(ValueError, match=r"class_weights='effective'.*class\(es\) \[3\] have none.*more data"):
        CrossEntropy(class_weights="effective").set_class_counts(torch.tensor([2, 2, 1, 0]))
    with pytest.raises(RuntimeError, match=r"class_weights='effective'.*set_class_counts"):
        CrossEntropy(class_weights="effective")(step_of(torch.zeros(2, C), torch.zeros(2, dtype=torch.long)))


def test_ce_effective_weights_travel_with_the_checkpoint() -> None:
    criterion = with_counts(CrossEntropy(class_weights="effective", effective_beta=0.99))
    fresh = CrossEntropy(class_weights="effective", effective_beta=0.99)  # no counts: the checkpoint gives them
    fresh.load_state_dict(copy.deepcopy(criterion.state_dict()))
    assert torch.equal(fresh.weight, criterion.weight)
    logits, labels, _ = case(seed=2)
    step = step_of(torch.tensor(logits).float(), torch.tensor(labels))
    assert torch.equal(fresh(step), criterion(step))


# ----------------------------------------------------------------------------------------------------------------
# Logit-adjusted loss (Menon et al.)


def test_logit_adjusted_hand_values() -> None:
    # z = 0, pi = (1/4, 3/4), tau = 1: softmax(log pi) = pi, so -log(1/4) = log 4 for label 0, -log(3/4) for label 1.
    log_prior = torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    assert logit_adjusted_cross_entropy(zeros, torch.tensor([0]), log_prior).item() == pytest.approx(math.log(4))
    assert logit_adjusted_cross_entropy(zeros, torch.tensor([1]), log_prior).item() == pytest.approx(-math.log(0.75))
    # tau = 2: softmax(2 log pi) is proportional to pi^2 = (1/16, 9/16), i.e. (1/10, 9/10): -log(1/10) for label 0.
    value = logit_adjusted_cross_entropy(zeros, torch.tensor([0]), log_prior, tau=2.0)
    assert value.item() == pytest.approx(math.log(10), rel=1e-14)


@DTYPES
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_matches_numpy(dtype: torch.dtype, tau: float) -> None:
    logits, labels, _ = case(seed=3)
    log_prior = np.log(COUNTS / COUNTS.sum())
    expected = np_ce(logits + tau * log_prior, labels)
    value = logit_adjusted_cross_entropy(torch.tensor(logits, dtype=dtype), torch.tensor(labels),
                                         torch.tensor(log_prior, dtype=dtype), tau)
    assert value.dtype == dtype and value.dim() == 0
    np.testing.assert_allclose(value.item(), expected, **TOL[dtype])


def test_logit_adjusted_with_uniform_priors_or_tau_zero_is_plain_cross_entropy() -> None:
    logits, labels, _ = case(seed=4)
    z, y = torch.tensor(logits), torch.tensor(labels)
    plain = F.cross_entropy(z, y)
    uniform = torch.full((C,), -math.log(C), dtype=torch.float64)  # a constant shift: the softmax ignores it
    torch.testing.assert_close(logit_adjusted_cross_entropy(z, y, uniform, 1.0), plain, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(logit_adjusted_cross_entropy(z, y, uniform, 3.0), plain, rtol=1e-14, atol=1e-15)
    log_prior = torch.tensor(np.log(COUNTS / COUNTS.sum()))
    assert torch.equal(logit_adjusted_cross_entropy(z, y, log_prior, 0.0), plain)  # z + 0 log pi is z
    # Any constant added to log pi changes nothing either.
    torch.testing.assert_close(logit_adjusted_cross_entropy(z, y, log_prior + 7.0, 1.5),
                               logit_adjusted_cross_entropy(z, y, log_prior, 1.5), rtol=1e-14, atol=1e-15)
    # The module: uniform counts give exactly what the plain ce criterion gives, up to rounding.
    criterion = with_counts(LogitAdjusted(tau=1.0).double(), np.array([5, 5, 5, 5]))
    torch.testing.assert_close(criterion(step_of(z, y)), CrossEntropy().double()(step_of(z, y)), rtol=1e-15,
                               atol=1e-15)


def test_logit_adjusted_gradcheck() -> None:
    logits, labels, _ = case(seed=5, batch=3)
    z = torch.tensor(logits, requires_grad=True)
    log_prior = torch.tensor(np.log(COUNTS / COUNTS.sum()), requires_grad=True)
    assert gradcheck(lambda a, b: logit_adjusted_cross_entropy(a, torch.tensor(labels), b, 0.7), (z, log_prior))


def test_logit_adjusted_rejects_bad_input() -> None:
    z, y, log_prior = torch.zeros(2, C), torch.tensor([0, 1]), torch.zeros(C)
    with pytest.raises(ValueError, match=r"log_prior must hold one value per class, shape \(C,\) = \(4,\)"):
        logit_adjusted_cross_entropy(z, y, torch.zeros(C - 1))
    with pytest.raises(TypeError, match="floating"):
        logit_adjusted_cross_entropy(z, y, torch.zeros(C, dtype=torch.long))
    for tau in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
            logit_adjusted_cross_entropy(z, y, log_prior, tau)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        logit_adjusted_cross_entropy(z, torch.tensor([0, 4]), log_prior)


# ----------------------------------------------------------------------------------------------------------------
# Balanced softmax (Ren et al.)


@DTYPES
def test_balanced_softmax_matches_numpy(dtype: torch.dtype) -> None:
    logits, labels, _ = case(seed=6)
    # p_hat_{b,y} = n_y exp(z_by) / sum_j n_j exp(z_bj), written without the log-shift form
    e = COUNTS * np.exp(logits)
    expected = float(-np.log(e[np.arange(len(labels)), labels] / e.sum(axis=1)).mean())
    value = balanced_softmax_loss(torch.tensor(logits, dtype=dtype), torch.tensor(labels), torch.tensor(COUNTS))
    assert value.dtype == dtype
    np.testing.assert_allclose(value.item(), expected, **TOL[dtype])


def test_balanced_softmax_gradient_at_a_known_point() -> None:
    # z = 0, n = (3, 1): z + log n = (log 3, 0), p_adj = (3/4, 1/4) for both samples; labels (0, 1), B = 2.
    # dL/dz = (p_adj - onehot) / B = ((3/4 - 1, 1/4), (3/4, 1/4 - 1)) / 2 = ((-1/8, 1/8), (3/8, -3/8)).
    z = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    loss = balanced_softmax_loss(z, torch.tensor([0, 1]), torch.tensor([3, 1]))
    loss.backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-1 / 8, 1 / 8], [3 / 8, -3 / 8]], dtype=torch.float64),
                               rtol=1e-15, atol=1e-16)
    # The loss there: -(log 3/4 + log 1/4) / 2.
    assert loss.item() == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, rel=1e-15)
    # The same through the criterion.
    z = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    with_counts(BalancedSoftmax(), np.array([3, 1]))(step_of(z, torch.tensor([0, 1]))).backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-1 / 8, 1 / 8], [3 / 8, -3 / 8]], dtype=torch.float64))


def test_balanced_softmax_gradient_matches_numpy_at_a_random_point() -> None:
    logits, labels, _ = case(seed=7)
    log_adjusted = np_log_softmax(logits + np.log(COUNTS))
    expected = (np.exp(log_adjusted) - np.eye(C)[labels]) / len(labels)
    z = torch.tensor(logits, requires_grad=True)
    balanced_softmax_loss(z, torch.tensor(labels), torch.tensor(COUNTS)).backward()
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_balanced_softmax_equals_logit_adjustment_with_tau_one() -> None:
    # log n = log pi + log(sum n): the shifts differ by a constant, which the softmax ignores.
    logits, labels, targets = case(seed=8)
    y = torch.tensor(labels)
    za = torch.tensor(logits, requires_grad=True)
    zb = torch.tensor(logits, requires_grad=True)
    a = balanced_softmax_loss(za, y, torch.tensor(COUNTS))
    b = logit_adjusted_cross_entropy(zb, y, torch.tensor(np.log(COUNTS / COUNTS.sum())), tau=1.0)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    a.backward()
    b.backward()
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-13, atol=1e-15)
    # The criteria, on labels and on soft targets.
    balanced = with_counts(BalancedSoftmax().double())
    adjusted = with_counts(LogitAdjusted(tau=1.0).double())
    for t in (None, torch.tensor(targets)):
        step = step_of(torch.tensor(logits), y, t)
        torch.testing.assert_close(balanced(step), adjusted(step), rtol=1e-14, atol=1e-15)


def test_balanced_softmax_rejects_bad_counts() -> None:
    z, y = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have none.*-inf"):
        balanced_softmax_loss(z, y, torch.tensor([4, 2, 0]))
    with pytest.raises(ValueError, match=r"counts must hold the images of each class, shape \(C,\) = \(3,\)"):
        balanced_softmax_loss(z, y, torch.tensor([4, 2]))


# ----------------------------------------------------------------------------------------------------------------
# Post-hoc logit adjustment


def test_posthoc_logit_adjustment_hand_values_and_shapes() -> None:
    # pi = (1/4, 3/4), tau = 1: z - log pi = (0 + log 4, 0 - log 3/4) = (1.3863, 0.2877): the rare class wins a tie.
    log_prior = torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    adjusted = posthoc_logit_adjustment(torch.zeros(1, 2, dtype=torch.float64), log_prior)
    torch.testing.assert_close(adjusted, torch.tensor([[math.log(4), -math.log(0.75)]], dtype=torch.float64))
    # tau = 0.5 on (B, C) and on (..., C)
    logits = np.random.default_rng(9).normal(size=(2, 3, 2))
    adjusted = posthoc_logit_adjustment(torch.tensor(logits), log_prior, tau=0.5)
    np.testing.assert_allclose(adjusted.numpy(), logits - 0.5 * np.log([0.25, 0.75]), rtol=1e-15)


def test_posthoc_logit_adjustment_undoes_the_training_shift_and_leaves_inputs() -> None:
    logits, _, _ = case(seed=10)
    z = torch.tensor(logits)
    before = z.clone()
    log_prior = torch.tensor(np.log(COUNTS / COUNTS.sum()))
    trained = z + 1.5 * log_prior  # what the logit-adjusted loss fits
    torch.testing.assert_close(posthoc_logit_adjustment(trained, log_prior, 1.5), z, rtol=1e-14, atol=1e-14)
    assert torch.equal(z, before)
    # A uniform prior moves every logit by the same amount: the predicted classes do not change.
    uniform = torch.full((C,), -math.log(C), dtype=torch.float64)
    assert torch.equal(posthoc_logit_adjustment(z, uniform).argmax(dim=1), z.argmax(dim=1))


def test_posthoc_logit_adjustment_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"shape \(C,\) = \(3,\)"):
        posthoc_logit_adjustment(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="tau"):
        posthoc_logit_adjustment(torch.zeros(2, 3), torch.zeros(3), tau=-0.5)
    with pytest.raises(ValueError, match="0-dim"):
        posthoc_logit_adjustment(torch.tensor(1.0), torch.zeros(1))
    with pytest.raises(TypeError, match="floating"):
        posthoc_logit_adjustment(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------------
# The criteria: values, soft targets, logs, state, errors


@DTYPES
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft_targets"])
def test_logit_adjusted_criterion_matches_numpy(dtype: torch.dtype, soft: bool) -> None:
    logits, labels, targets = case(seed=11)
    adjusted = logits + 0.5 * np.log(COUNTS / COUNTS.sum())
    expected = np_soft_ce(adjusted, targets) if soft else np_ce(adjusted, labels)
    criterion = with_counts(create_criterion("logit_adjusted", tau=0.5)).to(dtype)
    value = criterion(step_of(torch.tensor(logits, dtype=dtype), torch.tensor(labels),
                              torch.tensor(targets, dtype=dtype) if soft else None))
    assert value.dtype == dtype
    np.testing.assert_allclose(value.item(), expected, **TOL[dtype])


def test_criteria_log_the_unadjusted_loss_and_the_priors() -> None:
    logits, labels, targets = case(seed=12)
    for name in ("logit_adjusted", "balanced_softmax"):
        criterion = with_counts(create_criterion(name).double())
        assert criterion.stats() == {}  # nothing before the first forward
        criterion(step_of(torch.tensor(logits), torch.tensor(labels)))
        stats = criterion.stats()
        assert set(stats) == {"unadjusted_ce", "prior_min", "prior_max"}
        # pi = (20, 3, 9, 1) / 33: min 1/33, max 20/33
        assert stats["prior_min"] == pytest.approx(1 / 33, rel=1e-14)
        assert stats["prior_max"] == pytest.approx(20 / 33, rel=1e-14)
        assert stats["unadjusted_ce"] == pytest.approx(np_ce(logits, labels), rel=1e-12)
        criterion(step_of(torch.tensor(logits), torch.tensor(labels), torch.tensor(targets)))
        assert criterion.stats()["unadjusted_ce"] == pytest.approx(np_soft_ce(logits, targets), rel=1e-12)


def test_criteria_accept_soft_targets_and_read_them_not_the_labels() -> None:
    logits, labels, targets = case(seed=13)
    for name in ("logit_adjusted", "balanced_softmax"):
        criterion = with_counts(create_criterion(name))
        assert criterion.accepts_soft_targets and soft_target_refusals([criterion]) == []
        step = step_of(torch.tensor(logits).float(), torch.tensor(labels), torch.tensor(targets).float())
        value = criterion(step)
        assert torch.equal(criterion(step_of(step.logits, (step.labels + 1) % C, step.targets)), value)
        # One-hot soft targets give the hard-label loss.
        one_hot = F.one_hot(step.labels, C).float()
        torch.testing.assert_close(criterion(step_of(step.logits, step.labels, one_hot)),
                                   criterion(step_of(step.logits, step.labels)), **TOL[torch.float32])


def test_criteria_state_travels_with_the_checkpoint_and_moves_with_to() -> None:
    logits, labels, _ = case(seed=14)
    step = step_of(torch.tensor(logits).float(), torch.tensor(labels))
    for cls, kwargs in ((LogitAdjusted, {"tau": 1.5}), (BalancedSoftmax, {})):
        criterion = with_counts(cls(**kwargs))
        fresh = cls(**kwargs)  # no counts: a resumed run loads them
        fresh.load_state_dict(copy.deepcopy(criterion.state_dict()))
        assert torch.equal(fresh.class_counts, torch.tensor(COUNTS, dtype=torch.float32))
        assert torch.equal(fresh(step), criterion(step))
        assert criterion.double().class_counts.dtype == torch.float64


def test_criteria_errors_say_what_to_do() -> None:
    for name in ("logit_adjusted", "balanced_softmax"):
        with pytest.raises(RuntimeError, match=f"the {name} criterion has no class counts.*set_class_counts"):
            create_criterion(name)(step_of(torch.zeros(2, C), torch.tensor([0, 1])))
        with pytest.raises(ValueError, match=r"class\(es\) \[1\] have none.*log prior would be -inf.*more data"):
            create_criterion(name).set_class_counts(torch.tensor([3, 0, 2, 1]))
        with pytest.raises(ValueError, match="class counts hold 3 classes but the logits have 4"):
            with_counts(create_criterion(name), np.array([3, 1, 2]))(step_of(torch.zeros(2, C), torch.tensor([0, 1])))
        with pytest.raises(TypeError, match="int64"):
            create_criterion(name).set_class_counts(torch.tensor([3.0, 1.0]))
    for tau in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
            create_criterion("logit_adjusted", tau=tau)


def test_logit_adjustment_favours_the_rare_classes_after_training() -> None:
    """Fitting free logits on an imbalanced set: plain cross-entropy learns log pi (the majority class always wins);
    the logit-adjusted loss learns logits whose softmax is uniform (z + log pi = log pi is its optimum)."""
    counts = np.array([12, 3, 1])
    labels = torch.tensor(np.repeat(np.arange(3), counts))
    log_prior = torch.tensor(np.log(counts / counts.sum()))
    fitted = {}
    for tau in (0.0, 1.0):
        z = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # one logit vector shared by every image
        optimizer = torch.optim.LBFGS([z], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure(tau: float = tau, z: torch.Tensor = z) -> torch.Tensor:
            z.grad = None
            loss = logit_adjusted_cross_entropy(z.expand(len(labels), 3), labels, log_prior, tau)
            loss.backward()
            return loss

        optimizer.step(closure)
        fitted[tau] = torch.softmax(z.detach(), dim=0)
    torch.testing.assert_close(fitted[0.0], torch.tensor(counts / counts.sum()), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(fitted[1.0], torch.full((3,), 1 / 3, dtype=torch.float64), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["ce", "logit_adjusted", "balanced_softmax"])
def test_a_criterion_step_reads_nothing_back_from_the_device(name: str) -> None:
    # Meta tensors stand in for a GPU's: they have no values, so any read of one on the host fails. Inside
    # labels_verified (the trainer checked the batch's labels on the CPU) a step and its stats read none.
    from regtune.regularizers._utils import labels_verified

    criterion = create_criterion(name)
    criterion.set_class_counts(torch.tensor([5, 3, 1]))
    criterion.to("meta")
    logits = torch.zeros(4, 3, device="meta", requires_grad=True)
    step = TrainStep(features=torch.zeros(4, 2, device="meta"), logits=logits,
                     labels=torch.zeros(4, dtype=torch.long, device="meta"), model=torch.nn.Identity())
    with labels_verified(3):
        loss = criterion.forward(step)  # the float32 wrapper of criterion(step) asks autocast, which has no meta device
        stats = criterion.stats()
    assert loss.device.type == "meta" and loss.dim() == 0 and loss.requires_grad
    assert all(isinstance(v, float) or v.device.type == "meta" for v in stats.values())
