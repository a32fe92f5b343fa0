"""RandReg and AdaRand (docs/methods/adarand.md): pretrained statistics, priors, the running class means and the Adam
step on the prior means, against hand values and NumPy float64 references written here from the spec."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regtune.regularizers import AdaRand, RandomFeatureRegularizer, TrainStep, create_regularizer
from regtune.regularizers.adarand import feature_statistics
from tests.regularizers.nets import FeatureNet


def loader_of(features: np.ndarray, labels: np.ndarray, batch_size: int = 5) -> DataLoader:
    data = TensorDataset(torch.tensor(features, dtype=torch.float64), torch.tensor(labels, dtype=torch.long))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def make_step(f: np.ndarray | torch.Tensor, labels: list[int] | np.ndarray, model: nn.Module, step: int = 0,
              epoch: int = 0, total_steps: int | None = None) -> TrainStep:
    features = torch.as_tensor(f, dtype=torch.float64).clone().requires_grad_(True)
    return TrainStep(features=features, logits=model.get_classifier()(features),
                     labels=torch.as_tensor(np.asarray(labels), dtype=torch.long), model=model, global_step=step,
                     epoch=epoch, total_steps=total_steps)


RNG = np.random.default_rng(7)
FEATURES = RNG.normal(1.0, 2.0, size=(10, 4))
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])  # counts 4, 3, 3; two batches of 5


def np_class_stats(f: np.ndarray, y: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    mean = np.stack([f[y == c].mean(0) for c in range(classes)])
    std = np.stack([f[y == c].std(0) for c in range(classes)])  # population (ddof = 0)
    return mean, std


def np_prior_loss(mu: np.ndarray, mbar: np.ndarray) -> tuple[float, float]:
    """L_intra = mean_c (1 - cos(mu_c, mbar_c))^2, L_inter = mean over ordered c != c' of cos(mu_c, mu_c')^2."""
    unit = mu / np.linalg.norm(mu, axis=1, keepdims=True)
    unit_bar = mbar / np.linalg.norm(mbar, axis=1, keepdims=True)
    l_intra = float(np.mean((1.0 - (unit * unit_bar).sum(1)) ** 2))
    cos = unit @ unit.T
    off = cos[~np.eye(len(mu), dtype=bool)]
    return l_intra, float(np.mean(off**2))


def np_numeric_grad(fn: Any, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (fn(up) - fn(down)) / (2 * h)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# feature_statistics


def test_feature_statistics_match_numpy() -> None:
    model = FeatureNet(4, 3).train()
    class_mean, class_std, counts, mean, std = feature_statistics(model, loader_of(FEATURES, LABELS), 3)
    ref_mean, ref_std = np_class_stats(FEATURES, LABELS, 3)
    np.testing.assert_allclose(class_mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(class_std.numpy(), ref_std, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(counts.numpy(), [4, 3, 3])
    np.testing.assert_allclose(mean.numpy(), FEATURES.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std.numpy(), FEATURES.std(0), rtol=1e-10, atol=1e-12)
    assert model.training  # caller's mode restored


def test_feature_statistics_eval_mode_keeps_batchnorm_and_restores_mode() -> None:
    model = FeatureNet(4, 3, bn=True).train()
    before = copy.deepcopy(model.norm.state_dict())
    feature_statistics(model, loader_of(FEATURES, LABELS), 3)
    assert model.training
    for key, value in model.norm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_feature_statistics_needs_every_class() -> None:
    with pytest.raises(ValueError, match=r"class\(es\) \[3\]"):
        feature_statistics(FeatureNet(4, 4), loader_of(FEATURES, LABELS), 4)
    with pytest.raises(ValueError, match="empty"):
        feature_statistics(FeatureNet(4, 3), [], 3)


# ----------------------------------------------------------------------------------------------------------------
# RandReg priors


def test_uniform_prior_range_and_moments() -> None:
    term = RandomFeatureRegularizer(prior="uniform", low=-2.0, high=3.0)
    z = term.sample(torch.zeros(500, 8), torch.zeros(500, dtype=torch.long)).numpy()
    assert z.min() >= -2.0 and z.max() < 3.0
    assert z.mean() == pytest.approx(0.5, abs=0.1)  # (low + high) / 2
    assert z.var() == pytest.approx(25.0 / 12.0, rel=0.1)  # (high - low)^2 / 12
    assert z.min() < -1.9 and z.max() > 2.9  # the whole range is used


def test_normal_prior_moments() -> None:
    term = RandomFeatureRegularizer(prior="normal")
    z = term.sample(torch.zeros(2000, 16, dtype=torch.float64), torch.zeros(2000, dtype=torch.long)).numpy()
    assert abs(z.mean()) < 0.03 and z.std() == pytest.approx(1.0, abs=0.03)
    assert z.dtype == np.float64


@pytest.mark.parametrize("prior", ["uniform", "normal"])
@pytest.mark.parametrize("reduction", ["mean", "sum_dim"])
def test_forward_is_weighted_mse_to_the_sample(prior: str, reduction: str) -> None:
    model = FeatureNet(4, 3)
    term = RandomFeatureRegularizer(weight=0.25, prior=prior, reduction=reduction)
    step = make_step(FEATURES[:5], LABELS[:5], model)
    torch.manual_seed(11)
    value = term(step)
    torch.manual_seed(11)
    z = term.sample(step.features, step.labels).numpy()
    squared = (FEATURES[:5] - z) ** 2
    expected = squared.mean() if reduction == "mean" else squared.sum(1).mean()
    assert value.item() == pytest.approx(0.25 * expected, rel=1e-12)
    assert term.stats()["distance"] == pytest.approx(expected, rel=1e-12)


def test_sum_dim_is_dim_times_mean() -> None:
    model = FeatureNet(4, 3)
    values = {}
    for reduction in ("mean", "sum_dim"):
        torch.manual_seed(5)
        values[reduction] = RandomFeatureRegularizer(prior="normal", reduction=reduction)(
            make_step(FEATURES[:5], LABELS[:5], model)).item()
    assert values["sum_dim"] == pytest.approx(4 * values["mean"], rel=1e-12)  # D = 4


def test_pretrained_prior_is_marginal_statistics() -> None:
    model = FeatureNet(4, 3)
    term = RandomFeatureRegularizer(prior="pretrained")
    assert term.needs_setup_pass
    term.setup(model, loader_of(FEATURES, LABELS))
    assert term.mu.shape == (1, 4) and term.sigma.shape == (1, 4)
    np.testing.assert_allclose(term.mu.detach().numpy()[0], FEATURES.mean(0), rtol=1e-12)
    np.testing.assert_allclose(term.sigma.numpy()[0], FEATURES.std(0), rtol=1e-10)
    term.sigma.fill_(1e-9)  # tiny sigma: every sample sits on mu
    z = term.sample(torch.zeros(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])).numpy()
    np.testing.assert_allclose(z, np.broadcast_to(FEATURES.mean(0), (6, 4)), atol=1e-7)


def test_class_prior_is_class_statistics() -> None:
    model = FeatureNet(4, 3)
    term = RandomFeatureRegularizer(prior="class")
    term.setup(model, loader_of(FEATURES, LABELS))
    ref_mean, ref_std = np_class_stats(FEATURES, LABELS, 3)
    np.testing.assert_allclose(term.mu.detach().numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(term.sigma.numpy(), ref_std, rtol=1e-10)
    labels = torch.tensor([2, 0, 1, 1])
    torch.manual_seed(0)
    z = term.sample(torch.zeros(4000, 4, dtype=torch.float64), labels.repeat(1000)).numpy()
    rows = labels.repeat(1000).numpy()
    for c in range(3):  # loose moments of N(mu_c, sigma_c^2) over ~1300 draws
        zc = z[rows == c]
        np.testing.assert_allclose(zc.mean(0), ref_mean[c], atol=5 * ref_std[c].max() / math.sqrt(len(zc)))
        np.testing.assert_allclose(zc.std(0), ref_std[c], rtol=0.1)
    term.sigma.fill_(1e-9)
    z = term.sample(torch.zeros(4, 4, dtype=torch.float64), labels).numpy()
    np.testing.assert_allclose(z, ref_mean[[2, 0, 1, 1]], atol=1e-7)


def test_sigma_is_clamped_to_sigma_min() -> None:
    f = FEATURES.copy()
    f[LABELS == 1, 2] = 5.0  # channel 2 is constant within class 1: std 0
    term = RandomFeatureRegularizer(prior="class", sigma_min=1e-3)
    term.setup(FeatureNet(4, 3), loader_of(f, LABELS))
    _, ref_std = np_class_stats(f, LABELS, 3)
    assert ref_std[1, 2] == 0.0
    np.testing.assert_allclose(term.sigma.numpy(), np.maximum(ref_std, 1e-3), rtol=1e-10)
    assert term.sigma[1, 2].item() == pytest.approx(1e-3, rel=1e-12)


@pytest.mark.parametrize("prior", ["pretrained", "class"])
def test_pretrained_priors_need_setup(prior: str) -> None:
    term = RandomFeatureRegularizer(prior=prior)
    with pytest.raises(RuntimeError, match="setup"):
        term(make_step(FEATURES[:5], LABELS[:5], FeatureNet(4, 3)))
    with pytest.raises(ValueError, match="setup"):
        term.setup(FeatureNet(4, 3), None)


def test_stop_epoch_gives_zero() -> None:
    model = FeatureNet(4, 3)
    term = RandomFeatureRegularizer(prior="normal", stop_epoch=2)
    assert term(make_step(FEATURES[:5], LABELS[:5], model, epoch=1)).item() > 0.0
    for epoch in (2, 3):
        step = make_step(FEATURES[:5], LABELS[:5], model, epoch=epoch)
        value = term(step)
        assert value.dim() == 0 and value.item() == 0.0
        value.backward()
        assert step.features.grad is not None and not step.features.grad.any()


def test_randreg_param_group_options() -> None:
    assert RandomFeatureRegularizer().param_group_options() == {}
    assert not any(p.requires_grad for p in RandomFeatureRegularizer(prior="class").parameters())


@pytest.mark.parametrize("kwargs", [
    {"prior": "laplace"}, {"reduction": "sum"}, {"low": 1.0, "high": 1.0}, {"weight": -1.0},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_randreg_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RandomFeatureRegularizer(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# AdaRand

# Two classes, D = 2. Set-up features: class 0 at (1, 0), (3, 0) -> mean (2, 0); class 1 at (0, 1), (0, 3) -> (0, 2).
SETUP_F = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 3.0]])
SETUP_Y = np.array([0, 1, 0, 1])


def set_up_adarand(**kwargs: Any) -> tuple[AdaRand, FeatureNet]:
    model = FeatureNet(2, 2)
    term = AdaRand(**kwargs)
    term.setup(model, loader_of(SETUP_F, SETUP_Y, batch_size=4))
    return term, model


def test_adarand_setup_initialises_mu_and_running_mean() -> None:
    term, _ = set_up_adarand()
    np.testing.assert_allclose(term.mu.detach().numpy(), [[2.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(term.running_mean.numpy(), [[2.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(term.sigma.numpy(), [[1.0, 1e-6], [1e-6, 1.0]])  # std of (1, 3) = 1; 0 -> sigma_min
    assert term.param_group_options() is None
    # updated by its own step only: outside it, mu asks for no gradient (the training loss and DDP never see it)
    assert not term.mu.requires_grad


def test_adarand_running_means_ema() -> None:
    term, model = set_up_adarand(alpha=0.5)
    sigma = term.sigma.clone()
    # Batch of class 0 only: batch mean (2, 2). mbar_0 = 0.5 (2, 0) + 0.5 (2, 2) = (2, 1); class 1 absent: (0, 2).
    term(make_step([[4.0, 2.0], [0.0, 2.0]], [0, 0], model))
    np.testing.assert_allclose(term.running_mean.numpy(), [[2.0, 1.0], [0.0, 2.0]], rtol=1e-12)
    # Both classes: mbar_0 = 0.5 (2, 1) + 0.5 (0, 1) = (1, 1);
    # mbar_1 = 0.5 (0, 2) + 0.5 mean((2, 4), (0, 0)) = (0, 1) + (0.5, 1) = (0.5, 2).
    term(make_step([[0.0, 1.0], [2.0, 4.0], [0.0, 0.0]], [0, 1, 1], model, step=1))
    np.testing.assert_allclose(term.running_mean.numpy(), [[1.0, 1.0], [0.5, 2.0]], rtol=1e-12)
    assert torch.equal(term.sigma, sigma)  # sigma is never updated


def test_adarand_ema_alpha_weighting() -> None:
    term, model = set_up_adarand(alpha=0.75)
    term(make_step([[6.0, 4.0]], [1], model))
    # mbar_1 = 0.75 (0, 2) + 0.25 (6, 4) = (1.5, 2.5); mbar_0 unchanged (2, 0)
    np.testing.assert_allclose(term.running_mean.numpy(), [[2.0, 0.0], [1.5, 2.5]], rtol=1e-12)


MU0 = np.array([[1.0, 0.2], [0.3, 1.0]])
MBAR = np.array([[1.0, 0.6], [-0.2, 1.0]])


def _toy(prior_schedule: str = "constant", prior_lr: float = 1e-2) -> tuple[AdaRand, FeatureNet]:
    """mu = MU0, mbar = MBAR; a batch whose class means equal MBAR leaves mbar unchanged under the EMA."""
    term, model = set_up_adarand(prior_schedule=prior_schedule, prior_lr=prior_lr)
    with torch.no_grad():
        term.mu.copy_(torch.tensor(MU0))
        term.running_mean.copy_(torch.tensor(MBAR))
    return term, model


def _prior_objective(mu_flat: np.ndarray) -> float:
    return sum(np_prior_loss(mu_flat.reshape(2, 2), MBAR))


@pytest.mark.parametrize(("prior_schedule", "step", "total_steps", "lr"), [
    ("constant", 5, 10, 1e-2),
    ("cosine", 0, 10, 1e-2),
    ("cosine", 5, 10, 1e-2 * math.cos(7 * math.pi * 5 / (16 * 10))),  # 0.0077301
    ("cosine", 3, 8, 1e-2 * math.cos(7 * math.pi * 3 / (16 * 8))),  # 0.0087009
    ("cosine", 5, None, 1e-2),  # T unknown: constant
], ids=["constant", "cosine-t0", "cosine-t5", "cosine-t3-T8", "cosine-no-T"])
def test_adarand_one_adam_step_on_mu(prior_schedule: str, step: int, total_steps: int | None, lr: float) -> None:
    term, model = _toy(prior_schedule)
    l_intra, l_inter = np_prior_loss(MU0, MBAR)
    grad = np_numeric_grad(_prior_objective, MU0.flatten()).reshape(2, 2)
    assert np.abs(grad).min() > 1e-3  # every coordinate moves
    term(make_step(MBAR, [0, 1], model, step=step, total_steps=total_steps))
    np.testing.assert_allclose(term.running_mean.numpy(), MBAR, rtol=1e-15)
    # First Adam step: m_hat / sqrt(v_hat) = g / |g|, so mu moves by lr_t * sign(g) in every coordinate.
    np.testing.assert_allclose(term.mu.detach().numpy(), MU0 - lr * np.sign(grad), rtol=1e-6, atol=1e-9)
    assert sum(np_prior_loss(term.mu.detach().numpy(), MBAR)) < l_intra + l_inter  # L_prior decreased
    stats = term.stats()
    assert stats["l_intra"] == pytest.approx(l_intra, rel=1e-10)  # losses before the step
    assert stats["l_inter"] == pytest.approx(l_inter, rel=1e-10)
    assert stats["mu_norm"] == pytest.approx(np.linalg.norm(term.mu.detach().numpy(), axis=1).mean(), rel=1e-12)


def test_adarand_prior_loss_keeps_decreasing() -> None:
    term, model = _toy()
    losses = [sum(np_prior_loss(MU0, MBAR))]
    for i in range(20):
        term(make_step(MBAR, [0, 1], model, step=i))
        losses.append(sum(np_prior_loss(term.mu.detach().numpy(), MBAR)))
    assert losses[-1] < 0.5 * losses[0]


def test_adarand_main_loss_does_not_reach_mu() -> None:
    term, model = _toy()
    step = make_step(MBAR + 0.3, [0, 1], model)
    z = term.sample(step.features, step.labels)
    assert not z.requires_grad and z.grad_fn is None  # z is drawn without a graph to mu
    loss = term(step)
    loss.backward()
    assert term.mu.grad is None
    assert step.features.grad is not None and step.features.grad.abs().sum() > 0


def test_adarand_loss_uses_mu_before_the_prior_step() -> None:
    term, model = _toy()
    term.sigma.fill_(1e-12)  # z = mu_y (before this step's update)
    f = np.array([[2.0, 1.0], [0.0, -1.0]])
    value = term(make_step(f, [1, 0], model))
    expected = ((f - MU0[[1, 0]]) ** 2).mean()  # mean over B * D
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_update_prior_false_keeps_mu() -> None:
    term, model = set_up_adarand(update_prior=False)
    mu, mbar = term.mu.detach().clone(), term.running_mean.clone()
    assert not term.mu.requires_grad
    for i in range(3):
        term(make_step([[4.0, 2.0], [1.0, 1.0]], [0, 1], model, step=i))
    assert torch.equal(term.mu.detach(), mu) and torch.equal(term.running_mean, mbar)


def test_eval_mode_does_not_update() -> None:
    term, model = _toy()
    term.eval()
    term(make_step(MBAR + 1.0, [0, 1], model))
    np.testing.assert_array_equal(term.mu.detach().numpy(), MU0)
    np.testing.assert_array_equal(term.running_mean.numpy(), MBAR)


def test_adam_state_round_trips_into_fresh_instance() -> None:
    term, model = _toy()
    for i in range(3):
        term(make_step(MBAR + 0.1 * i, [0, 1], model, step=i, total_steps=10))
    saved = copy.deepcopy(term.state_dict())
    extra = saved["_extra_state"]["prior_optimizer"]
    assert extra is not None and extra["state"], "the Adam moments are in the checkpoint"

    # Same kwargs, not set up: mu, sigma, running_mean are (0, 0) placeholders (moved to the model's dtype first, as
    # load_state_dict keeps the destination dtype).
    fresh = create_regularizer("adarand", prior_schedule="constant").to(torch.float64)
    fresh.load_state_dict(copy.deepcopy(saved))
    assert fresh.mu.shape == (2, 2) and fresh.running_mean.shape == (2, 2) and not fresh.mu.requires_grad
    no_moments = create_regularizer("adarand", prior_schedule="constant").to(torch.float64)
    no_moments.load_state_dict(copy.deepcopy(saved))
    no_moments.set_extra_state({"prior_optimizer": None})  # same values, a new Adam

    batch = (MBAR + 0.5, [0, 1], model)
    for module in (term, fresh, no_moments):
        torch.manual_seed(3)
        module(make_step(*batch, step=3, total_steps=10))
    assert torch.equal(fresh.mu.detach(), term.mu.detach())
    assert torch.equal(fresh.running_mean, term.running_mean)
    assert not torch.allclose(no_moments.mu.detach(), term.mu.detach(), rtol=0, atol=1e-6)  # the moments matter


@pytest.mark.parametrize("kwargs", [
    {"alpha": 1.5}, {"alpha": -0.1}, {"prior_lr": -1.0}, {"prior_schedule": "step"}, {"intra": "cosine"},
    {"inter": "l2"}, {"reduction": "sum"}, {"weight": -1.0},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_adarand_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AdaRand(**kwargs)
