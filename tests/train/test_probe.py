"""The linear probe: optimality of the fit (NumPy gradient), selection over C, absent classes, cache, head."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regtune.models import forward_parts
from regtune.regularizers.margins import CosineClassifier
from regtune.train import probe
from regtune.train.probe import ProbeResult, extract_features, fit_linear_probe, linear_probe, set_head
from tests.conftest import TINY_BACKBONE


def _blobs(per_class: int, classes: tuple[int, ...] = (0, 1, 2), spread: float = 1.0, dim: int = 5,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed centres 4 apart (seeded); ``spread`` is the noise's standard deviation."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.eye(max(classes) + 1, dim) + 1.0
    labels = np.repeat(np.array(classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    return torch.from_numpy(features).float(), torch.from_numpy(labels).long()


def _objective_gradient(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray, C: float
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient of 1/2 ||W||^2 + C sum_i CE_i (scikit-learn's objective, intercept unpenalized), in float64;
    also the data term C sum_i (p_i - y_i) f_i^T, the scale the gradient is compared with."""
    logits = x @ weight.T + bias
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(weight.shape[0])[y]
    data = C * residual.T @ x
    return weight + data, C * residual.sum(0), data


@pytest.mark.parametrize("C", (0.01, 0.3, 3.0))
@pytest.mark.parametrize("classes", ((0, 1, 2), (0, 2)), ids=("three_classes", "two_classes"))
def test_the_fit_is_the_optimum_of_the_regularized_objective(C: float, classes: tuple[int, ...]) -> None:
    x, y = _blobs(30, classes, spread=2.0)  # overlapping: a finite optimum
    result = fit_linear_probe(x, y, None, None, num_classes=max(classes) + 1, Cs=(C,), tol=1e-8)
    present = list(classes)  # with (0, 2), class 1 is absent and left out of the objective
    weight, bias = result.weight.double().numpy()[present], result.bias.double().numpy()[present]
    # the intercept is unpenalised, so the optimum is the same on the centred features (W, c = b + W mu) as on the
    # raw ones (W, b): the gradient is checked on the raw features, the problem as a user states it
    remap = {c: i for i, c in enumerate(present)}
    g_weight, g_bias, data = _objective_gradient(weight, bias, x.double().numpy(),
                                                 np.array([remap[int(label)] for label in y]), C)
    assert np.linalg.norm(data) > 1e-3  # not a trivial optimum
    assert np.linalg.norm(g_weight) <= 1e-4 * np.linalg.norm(data)
    assert np.abs(g_bias).max() <= 1e-4 * C * len(y)
    assert result.C == C and result.val_acc == {} and result.val_loss == {}


def test_separable_blobs_are_classified_perfectly_and_the_grid_is_reported() -> None:
    train_x, train_y = _blobs(20, spread=0.5, seed=1)
    val_x, val_y = _blobs(5, spread=0.5, seed=2)
    result = fit_linear_probe(train_x, train_y, val_x, val_y, num_classes=3)
    assert isinstance(result, ProbeResult)
    assert result.weight.shape == (3, 5) and result.bias.shape == (3,) and result.weight.dtype == torch.float32
    assert result.val_acc[result.C] == 1.0 and result.train_acc == 1.0
    assert set(result.val_acc) == set(result.val_loss) == set(probe.DEFAULT_CS)
    # validation loss falls as the penalty weakens on separable data; the chosen fit is the lowest-loss perfect one
    assert result.C == max(c for c, acc in result.val_acc.items() if acc == 1.0)
    predicted = (val_x @ result.weight.T + result.bias).argmax(1)
    assert torch.equal(predicted, val_y)
    again = fit_linear_probe(train_x, train_y, val_x, val_y, num_classes=3)  # deterministic
    assert torch.equal(again.weight, result.weight) and torch.equal(again.bias, result.bias) and again.C == result.C


def test_a_strong_penalty_loses_validation_accuracy_and_is_not_chosen() -> None:
    # Class 0 holds most training images: at C = 1e-4 the head is nearly the bias alone (the prior) and predicts
    # class 0 everywhere (1/3 of the balanced validation set); a weak penalty separates the blobs.
    x0, y0 = _blobs(40, (0,), spread=0.5, seed=3)
    x12, y12 = _blobs(4, (1, 2), spread=0.5, seed=4)
    val_x, val_y = _blobs(6, spread=0.5, seed=5)
    result = fit_linear_probe(torch.cat([x0, x12]), torch.cat([y0, y12]), val_x, val_y, num_classes=3,
                              Cs=(1e-4, 1.0))
    assert result.val_acc[1e-4] == pytest.approx(1 / 3) and result.val_acc[1.0] == 1.0
    assert result.C == 1.0


@pytest.mark.parametrize(("scores", "chosen"), [
    ({0.01: (0.5, 0.1), 0.1: (0.8, 0.4), 1.0: (0.8, 0.3)}, 1.0),  # accuracy first, then the lower loss
    ({0.01: (0.8, 0.3), 0.1: (0.8, 0.3), 1.0: (0.7, 0.1)}, 0.01),  # a full tie: the smaller C
    ({0.01: (0.9, 0.9), 0.1: (0.8, 0.1), 1.0: (0.8, 0.05)}, 0.01),  # loss only breaks accuracy ties
])
def test_selection_rule(monkeypatch: pytest.MonkeyPatch, scores: dict[float, tuple[float, float]],
                        chosen: float) -> None:
    # Each fit's head carries its C; the validation scores are read from the table.
    monkeypatch.setattr(probe, "_fit_one", lambda x, y, k, C, *_: (torch.full((k, 2), C, dtype=torch.float64),
                                                                   torch.zeros(k, dtype=torch.float64)))
    monkeypatch.setattr(probe, "_scores", lambda w, b, x, y, *_: scores.get(float(w[0, 0]), (1.0, 0.0)))
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    result = fit_linear_probe(x, y, x, y, num_classes=2, Cs=tuple(scores))
    assert result.C == chosen and float(result.weight[0, 0]) == pytest.approx(chosen)
    assert result.val_acc == {c: s[0] for c, s in scores.items()}


def test_absent_classes_are_never_predicted_and_named(caplog: pytest.LogCaptureFixture) -> None:
    x, y = _blobs(15, (0, 1, 3), spread=1.0)
    with caplog.at_level(logging.WARNING, logger="regtune.train.probe"):
        result = fit_linear_probe(x, y, None, None, num_classes=5, Cs=(1.0,))
    assert "2 class(es) have no training features and are never predicted: 2, 4" in caplog.text
    fitted = result.bias[[0, 1, 3]]
    assert torch.all(result.weight[[2, 4]] == 0)
    assert torch.allclose(result.bias[[2, 4]], fitted.min() - probe.ABSENT_CLASS_GAP)
    far = torch.randn(2000, 5, generator=torch.Generator().manual_seed(0)) * 1000  # any input, even far out
    predicted = (far @ result.weight.T + result.bias).argmax(1)
    assert not torch.isin(predicted, torch.tensor([2, 4])).any()
    with pytest.raises(ValueError, match="hold 1 class"):
        fit_linear_probe(x[y == 0], y[y == 0], None, None, num_classes=5, Cs=(1.0,))


def test_input_errors_say_what_to_do() -> None:
    x, y = _blobs(5)
    with pytest.raises(ValueError, match="needs validation features: give one C, or a validation split"):
        fit_linear_probe(x, y, None, None, num_classes=3)
    with pytest.raises(ValueError, match="give one C, or a validation split"):  # an empty validation split
        fit_linear_probe(x, y, x[:0], y[:0], num_classes=3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        fit_linear_probe(x, y, None, None, num_classes=2, Cs=(1.0,))
    with pytest.raises(ValueError, match="Cs must be positive"):
        fit_linear_probe(x, y, x, y, num_classes=3, Cs=(0.0, 1.0))
    with pytest.raises(ValueError, match="do not match the training features"):
        fit_linear_probe(x, y, x[:, :3], y, num_classes=3)
    with pytest.raises(ValueError, match="both validation features and labels"):
        fit_linear_probe(x, y, x, None, num_classes=3)


def test_non_convergence_is_logged_with_what_to_do(caplog: pytest.LogCaptureFixture) -> None:
    x, y = _blobs(10, spread=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's ConvergenceWarning must not escape
        with caplog.at_level(logging.WARNING, logger="regtune.train.probe"):
            fit_linear_probe(x, y, None, None, num_classes=3, Cs=(10.0,), max_iter=1)
    assert "C=10: L-BFGS did not converge in 1 iterations; raise max_iter" in caplog.text


# -- with a backbone ---------------------------------------------------------------------------------------------------


def _tiny_model(num_classes: int = 3) -> nn.Module:
    return timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=num_classes)


def _loader(n: int, seed: int, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3
    return DataLoader(TensorDataset(images, labels, torch.arange(n)), batch_size=batch_size)  # extra: an index


def test_extract_features_are_the_eval_mode_penultimate_features() -> None:
    model = _tiny_model().train()
    loader = _loader(10, seed=0)
    features, labels = extract_features(model, loader)
    assert model.training  # mode restored
    images = torch.cat([batch[0] for batch in loader])
    with torch.no_grad():
        expected = model.eval().forward_head(model.forward_features(images), pre_logits=True)
    assert features.dtype == torch.float32 and features.shape == (10, model.num_features)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 3 for i in range(10)]
    with pytest.raises(ValueError, match="no batch"):
        extract_features(model, DataLoader(TensorDataset(images[:0], labels[:0])))


class _Refuses(nn.Module):
    def forward(self, *args: object) -> None:
        raise AssertionError("features should have come from the cache")

    forward_features = forward


def test_linear_probe_caches_its_features(tmp_path) -> None:
    model, cache = _tiny_model(), tmp_path / "features.npz"
    train, val = _loader(12, seed=1), _loader(6, seed=2)
    first = linear_probe(model, train, val, num_classes=3, Cs=(0.1, 1.0), cache=cache)
    assert cache.is_file() and not list(tmp_path.glob("*.tmp"))
    with np.load(cache, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["train_x", "train_y", "val_x", "val_y"]
        assert saved["train_x"].shape == (12, model.num_features) and saved["val_y"].dtype == np.int64
    second = linear_probe(_Refuses(), train, val, num_classes=3, Cs=(0.1, 1.0), cache=cache)
    assert torch.equal(first.weight, second.weight) and first.C == second.C and first.val_acc == second.val_acc
    with pytest.raises(ValueError, match="holds 12 train features but the train loader has 10 items"):
        linear_probe(_Refuses(), _loader(10, seed=1), val, num_classes=3, Cs=(0.1, 1.0), cache=cache)
    with pytest.raises(ValueError, match="holds val features but a val loader was not given"):
        linear_probe(_Refuses(), train, None, num_classes=3, Cs=(1.0,), cache=cache)
    no_val = linear_probe(model, train, None, num_classes=3, Cs=(1.0,), cache=tmp_path / "train_only.npz")
    assert no_val.val_acc == {} and no_val.C == 1.0


def test_set_head_makes_the_model_compute_the_probe() -> None:
    model = _tiny_model().eval()
    features, labels = extract_features(model, _loader(12, seed=3))
    result = fit_linear_probe(features, labels, None, None, num_classes=3, Cs=(1.0,))
    set_head(model, result)
    images = torch.cat([batch[0] for batch in _loader(12, seed=3)])
    with torch.no_grad():
        _, f, logits = forward_parts(model, images)
    torch.testing.assert_close(logits, f @ result.weight.T + result.bias, rtol=1e-5, atol=1e-5)
    assert result.train_acc == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    with pytest.raises(ValueError, match=r"probe's head is \(3, .*\) but the model's classifier is \(4, "):
        set_head(_tiny_model(4), result)
    cosine = _tiny_model()
    cosine.classifier = CosineClassifier(cosine.num_features, 3, s=8.0)
    with pytest.raises(ValueError, match="linear classifier with a bias.*cosine head"):
        set_head(cosine, result)


def test_the_config_default_grid_is_the_probe_default() -> None:
    from regtune.train.config import ModelConfig

    assert ModelConfig().lp_cs == probe.DEFAULT_CS


@pytest.mark.parametrize(("accuracies", "chosen"), [
    # 60 validation images: the best 0.767 (46/60), one standard error sqrt(0.767 * 0.233 / 60) = 0.0546
    ({0.003: 0.75, 0.01: 0.75, 0.1: 0.75, 1.0: 46 / 60}, 0.003),  # won by one image: the most regularised
    ({0.003: 0.70, 0.01: 0.75, 0.1: 0.75, 1.0: 46 / 60}, 0.01),  # 0.70 < 0.767 - 0.0546: out of reach
    ({0.003: 0.5, 0.01: 0.6, 0.1: 0.9, 1.0: 0.9}, 0.1),  # 0.9 - sqrt(0.09 / 60) = 0.861: only the two best
])
def test_one_standard_error_rule(monkeypatch: pytest.MonkeyPatch, accuracies: dict[float, float],
                                 chosen: float) -> None:
    monkeypatch.setattr(probe, "_fit_one", lambda x, y, k, C, *_: (torch.full((k, 2), C, dtype=torch.float64),
                                                                   torch.zeros(k, dtype=torch.float64)))
    monkeypatch.setattr(probe, "_scores", lambda w, b, x, y, *_: (accuracies.get(float(w[0, 0]), 1.0), 0.5))
    x, y = torch.zeros(60, 2), torch.arange(60) % 2
    assert fit_linear_probe(x, y, x, y, num_classes=2, Cs=tuple(accuracies), select="one_se").C == chosen
    best = fit_linear_probe(x, y, x, y, num_classes=2, Cs=tuple(accuracies), select="best").C
    assert best == max(accuracies, key=lambda c: (accuracies[c], -c))
    with pytest.raises(ValueError, match="select must be one of best, one_se"):
        fit_linear_probe(x, y, x, y, num_classes=2, Cs=(1.0,), select="1se")
