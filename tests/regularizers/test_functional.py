"""The pure functions of ``regtune.regularizers.functional`` against hand values and NumPy float64 references.

References are written here independently (never by calling the function under test); the hand-computable values
are worked out in the comments beside them.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import math
import pkgutil

import numpy as np
import pytest
import torch

from regtune import regularizers
from regtune.regularizers import functional as Fn
from tests.regularizers.tolerance import DTYPES, TOL


def assert_close(actual: torch.Tensor | float, expected: float | np.ndarray, dtype: torch.dtype) -> None:
    if isinstance(actual, torch.Tensor):
        assert actual.dtype == dtype
        actual = actual.detach().cpu().double().numpy()
    np.testing.assert_allclose(actual, expected, **TOL[dtype])


def t(values: object, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def randn(*shape: int, dtype: torch.dtype = torch.float64, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# NumPy float64 references (independent of the module)


def np_entropy_of_softmax(x: np.ndarray, tau: float = 1.0) -> np.ndarray:
    z = x / tau
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=1)


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_prior_losses(mu: np.ndarray, mbar: np.ndarray, intra: str, inter: str) -> tuple[float, float]:
    classes = mu.shape[0]
    if intra == "cosine_sq":
        l_intra = np.mean([(1.0 - np_cos(mu[c], mbar[c])) ** 2 for c in range(classes)])
    else:
        l_intra = np.mean([np.sum((mu[c] - mbar[c]) ** 2) for c in range(classes)])
    pairs = [np_cos(mu[i], mu[j]) for i in range(classes) for j in range(classes) if i != j]
    l_inter = np.mean([p**2 if inter == "cosine_sq" else p for p in pairs]) if pairs else 0.0
    return float(l_intra), float(l_inter)


def np_lm_softmax(cos: np.ndarray, labels: np.ndarray, s: float) -> float:
    per_sample = []
    for b, y in enumerate(labels):
        gaps = [s * (cos[b, j] - cos[b, y]) for j in range(cos.shape[1]) if j != y]
        per_sample.append(np.logaddexp.reduce(gaps))
    return float(np.mean(per_sample) / s)


def np_sample_margins(cos: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([cos[b, y] - max(cos[b, j] for j in range(cos.shape[1]) if j != y) for b, y in enumerate(labels)])


def np_unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def simplex_2d() -> np.ndarray:
    """Regular simplex of C = 3 unit prototypes in 2-D (120 degrees apart), scaled differently per row."""
    angles = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [2.0], [0.5]])


# ----------------------------------------------------------------------------------------------------------------
# Module hygiene


def test_functional_only_re_exports_the_family_modules() -> None:
    # Each equation is written once, next to its method's module; functional.py defines none itself.
    tree = ast.parse(inspect.getsource(Fn))
    assert not [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    for name in Fn.__all__:
        home = getattr(Fn, name).__module__
        assert home.startswith("regtune.regularizers.") and home != Fn.__name__, (name, home)


def test_all_lists_the_public_functions() -> None:
    public = {name for name, obj in vars(Fn).items() if inspect.isfunction(obj) and not name.startswith("_")}
    assert set(Fn.__all__) == public


def _modules() -> list[object]:
    names = [m.name for m in pkgutil.iter_modules(regularizers.__path__)]
    return [importlib.import_module(f"regtune.regularizers.{name}") for name in names]


@pytest.mark.parametrize("module", _modules(), ids=lambda m: m.__name__.rpartition(".")[2])
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module, extraglobs={"torch": torch, "math": math})
    assert result.failed == 0


def test_every_equation_has_a_docstring_example() -> None:
    attempted = sum(doctest.testmod(m, extraglobs={"torch": torch, "math": math}).attempted for m in _modules())
    assert attempted >= len(Fn.__all__)


# ----------------------------------------------------------------------------------------------------------------
# §1 FMR


@DTYPES
def test_channel_entropy_hand_values(dtype: torch.dtype) -> None:
    # by hand: f = (0, ln 3) -> p = (1/4, 3/4);
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.25 * 1.386294 + 0.75 * 0.287682 = 0.346574 + 0.215762 = 0.562335.
    # f = (2, 2) -> p uniform -> ln 2 = 0.693147; f = 0 (D = 5) -> p uniform -> H = ln 5 = 1.609438.
    h = Fn.channel_entropy(t([[0.0, math.log(3.0)], [2.0, 2.0]], dtype))
    assert h.shape == (2,)
    assert_close(h, [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2)], dtype)
    assert h[0].item() == pytest.approx(0.562335, abs=1e-6)
    assert_close(Fn.channel_entropy(torch.zeros(3, 5, dtype=dtype)), np.full(3, math.log(5)), dtype)
    # tau = 2 on f = (0, 2 ln 3) gives the same p = (1/4, 3/4).
    h_tau = Fn.channel_entropy(t([[0.0, 2 * math.log(3.0)]], dtype), tau=2.0)
    assert h_tau.item() == pytest.approx(0.562335, abs=1e-6)


@DTYPES
@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_channel_entropy_matches_numpy(dtype: torch.dtype, tau: float) -> None:
    f = torch.rand(4, 7, dtype=torch.float64) * 3.0  # non-negative, like post-ReLU GAP features
    expected = np_entropy_of_softmax(f.numpy(), tau)
    assert_close(Fn.channel_entropy(f.to(dtype), tau=tau), expected, dtype)


def test_channel_entropy_is_stable_for_large_features() -> None:
    h = Fn.channel_entropy(t([[1000.0, 0.0], [-1000.0, -1000.0]], torch.float32))
    assert torch.isfinite(h).all()
    assert h[0].item() == pytest.approx(0.0, abs=1e-6) and h[1].item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_channel_entropy_gradcheck(tau: float) -> None:
    f = randn(3, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: Fn.channel_entropy(x, tau=tau), (f,))


def test_channel_entropy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, D\).*got shape \(4,\)"):
        Fn.channel_entropy(torch.zeros(4))
    with pytest.raises(ValueError, match="tau must be positive"):
        Fn.channel_entropy(torch.zeros(2, 3), tau=0.0)
    with pytest.raises(TypeError, match="floating dtype"):
        Fn.channel_entropy(torch.zeros(2, 3, dtype=torch.long))


def test_fmr_weight_hand_value() -> None:
    # by hand: beta = 50, H_max = ln 2048 = 7.624619, H_init = 7.0, H_t = 7.3:
    # 50 * (7.624619 - 7.3) / (7.624619 - 7.0) = 50 * 0.324619 / 0.624619 = 50 * 0.519707 = 25.985.
    weight = Fn.fmr_weight(h_t=7.3, h_init=7.0, h_max=math.log(2048), beta=50.0)
    assert isinstance(weight, float)
    assert weight == pytest.approx(25.985, abs=5e-4)
    assert weight == pytest.approx(50.0 * (math.log(2048) - 7.3) / (math.log(2048) - 7.0), rel=1e-12)


def test_fmr_weight_limits_and_no_clamp() -> None:
    h_max = math.log(2048)
    assert Fn.fmr_weight(h_max, 7.0, h_max, 50.0) == 0.0  # uniform features: no pressure
    assert Fn.fmr_weight(7.0, 7.0, h_max, 50.0) == pytest.approx(50.0)  # at H_init: beta
    assert Fn.fmr_weight(6.0, 7.0, h_max, 50.0) > 50.0  # below H_init: above beta, no clamp (§10 #1)
    assert Fn.fmr_weight(7.3, 7, h_max, 50) == pytest.approx(25.985, abs=5e-4)  # ints


def test_fmr_weight_on_tensors_stays_a_tensor() -> None:
    # The module calls it on its float64 buffers at every update: a 0-dim tensor back, no value read on the host.
    h_max = torch.tensor(math.log(2048), dtype=torch.float64)
    weight = Fn.fmr_weight(torch.tensor(7.3, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float64), h_max, 50.0)
    assert isinstance(weight, torch.Tensor) and weight.dim() == 0 and weight.dtype == torch.float64
    assert float(weight) == pytest.approx(50.0 * (math.log(2048) - 7.3) / (math.log(2048) - 7.0), rel=1e-12)
    # dynamic mode: H_init = 0, beta = max_coef gives max_coef (H_max - H_t) / H_max
    dynamic = Fn.fmr_weight(torch.tensor(7.3, dtype=torch.float64), torch.zeros((), dtype=torch.float64), h_max, 200.0)
    assert float(dynamic) == pytest.approx(200.0 * (math.log(2048) - 7.3) / math.log(2048), rel=1e-12)


def test_fmr_weight_undefined_when_h_init_equals_h_max() -> None:
    with pytest.raises(ValueError, match="h_max == h_init"):
        Fn.fmr_weight(h_t=1.0, h_init=math.log(3), h_max=math.log(3), beta=50.0)


# ----------------------------------------------------------------------------------------------------------------
# §2 AdaRand


@DTYPES
def test_random_feature_loss_hand_values(dtype: torch.dtype) -> None:
    # by hand: f = (1, 2), z = 0: mean (1 + 4) / 2 = 2.5; sum over D 1 + 4 = 5.0.
    f, z = t([[1.0, 2.0]], dtype), torch.zeros(1, 2, dtype=dtype)
    assert_close(Fn.random_feature_loss(f, z), 2.5, dtype)
    assert_close(Fn.random_feature_loss(f, z, reduction="sum_dim"), 5.0, dtype)


@DTYPES
def test_random_feature_loss_matches_numpy(dtype: torch.dtype) -> None:
    f, z = randn(4, 6), randn(4, 6)
    diff2 = (f.numpy() - z.numpy()) ** 2
    assert_close(Fn.random_feature_loss(f.to(dtype), z.to(dtype)), diff2.mean(), dtype)
    assert_close(Fn.random_feature_loss(f.to(dtype), z.to(dtype), reduction="sum_dim"), diff2.sum(1).mean(), dtype)


def test_random_feature_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\) and \(2, 4\)"):
        Fn.random_feature_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="'mean', 'sum_dim'"):
        Fn.random_feature_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="sum")


@DTYPES
def test_adarand_prior_losses_hand_values(dtype: torch.dtype) -> None:
    # by hand: mu_1 = (1, 0), mu_2 = (0, 1), mbar = mu: cos(mu_c, mbar_c) = 1 -> L_intra = 0;
    # cos(mu_1, mu_2) = 0 -> L_inter = 0.
    eye = torch.eye(2, dtype=dtype)
    l_intra, l_inter = Fn.adarand_prior_losses(eye, eye)
    assert_close(l_intra, 0.0, dtype)
    assert_close(l_inter, 0.0, dtype)
    # mu_2 = (1, 1)/sqrt 2, mbar_2 = (0, 1): cos(mu_1, mu_2) = 1/sqrt 2, squared 0.5 for both ordered pairs
    # -> L_inter = mean(0.5, 0.5) = 0.5; L_intra = mean(0, (1 - 0.707107)^2) = mean(0, 0.085786) = 0.042893.
    mu = t([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]], dtype)
    l_intra, l_inter = Fn.adarand_prior_losses(mu, eye)
    assert_close(l_inter, 0.5, dtype)
    assert_close(l_intra, (1 - 1 / math.sqrt(2)) ** 2 / 2, dtype)
    assert l_intra.item() == pytest.approx(0.042893, abs=1e-6)
    # inter='cosine': mean(0.707107, 0.707107) = 0.707107; intra='l2': mean(0, ||(0.7071, -0.2929)||^2)
    # = (0.5 + 0.085786) / 2 = 0.292893.
    l_intra, l_inter = Fn.adarand_prior_losses(mu, eye, intra="l2", inter="cosine")
    assert_close(l_inter, 1 / math.sqrt(2), dtype)
    assert_close(l_intra, (0.5 + (1 / math.sqrt(2) - 1) ** 2) / 2, dtype)


@DTYPES
@pytest.mark.parametrize("intra", ["cosine_sq", "l2"])
@pytest.mark.parametrize("inter", ["cosine_sq", "cosine"])
def test_adarand_prior_losses_match_numpy(dtype: torch.dtype, intra: str, inter: str) -> None:
    mu, mbar = randn(4, 6), randn(4, 6)
    expected = np_prior_losses(mu.numpy(), mbar.numpy(), intra, inter)
    actual = Fn.adarand_prior_losses(mu.to(dtype), mbar.to(dtype), intra=intra, inter=inter)
    assert_close(actual[0], expected[0], dtype)
    assert_close(actual[1], expected[1], dtype)


@pytest.mark.parametrize("intra", ["cosine_sq", "l2"])
@pytest.mark.parametrize("inter", ["cosine_sq", "cosine"])
def test_adarand_prior_losses_gradcheck(intra: str, inter: str) -> None:
    mu, mbar = randn(3, 4, requires_grad=True), randn(3, 4)
    assert torch.autograd.gradcheck(lambda m: Fn.adarand_prior_losses(m, mbar, intra=intra, inter=inter)[0], (mu,))
    assert torch.autograd.gradcheck(lambda m: Fn.adarand_prior_losses(m, mbar, intra=intra, inter=inter)[1], (mu,))


def test_adarand_prior_losses_single_class_and_zero_rows() -> None:
    mu = randn(1, 4, requires_grad=True)
    l_intra, l_inter = Fn.adarand_prior_losses(mu, randn(1, 4))
    assert l_inter.item() == 0.0 and l_inter.requires_grad
    (l_intra + l_inter).backward()
    assert torch.isfinite(mu.grad).all()
    # Safe normalisation: a zero prior mean has cosine 0 with everything (no NaN).
    # mu = ((0, 0), (1, 0)), mbar = ((1, 0), (1, 0)): cos = (0, 1) -> L_intra = mean((1 - 0)^2, 0) = 0.5;
    # the only pair involves the zero row -> cos 0 -> L_inter = 0.
    mu = t([[0.0, 0.0], [1.0, 0.0]]).requires_grad_()
    l_intra, l_inter = Fn.adarand_prior_losses(mu, t([[1.0, 0.0], [1.0, 0.0]]))
    assert l_intra.item() == pytest.approx(0.5) and l_inter.item() == 0.0
    (l_intra + l_inter).backward()
    assert torch.isfinite(mu.grad).all()


def test_adarand_prior_losses_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(3, 4\) and \(2, 4\)"):
        Fn.adarand_prior_losses(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="'cosine_sq', 'l2'"):
        Fn.adarand_prior_losses(torch.ones(2, 4), torch.ones(2, 4), intra="cosine")
    with pytest.raises(ValueError, match="'cosine_sq', 'cosine'"):
        Fn.adarand_prior_losses(torch.ones(2, 4), torch.ones(2, 4), inter="l2")


# ----------------------------------------------------------------------------------------------------------------
# §3.2 FNP / SGM


@DTYPES
def test_feature_norm_penalty_hand_values(dtype: torch.dtype) -> None:
    # f = ((3, 4), (0, 1)): ||f||^2 = (25, 1) -> 'none' = 13.
    # logits 0 (C = 2) -> p = (1/2, 1/2); alpha_b = (1/2 - 1)^2 + (1/2)^2 = 1/2 for either label -> 'sgm' = 6.5.
    f = t([[3.0, 4.0], [0.0, 1.0]], dtype)
    assert_close(Fn.feature_norm_penalty(f), 13.0, dtype)
    sgm = Fn.feature_norm_penalty(f, torch.zeros(2, 2, dtype=dtype), torch.tensor([0, 1]), weighting="sgm")
    assert_close(sgm, 6.5, dtype)


@DTYPES
def test_feature_norm_penalty_sgm_matches_numpy(dtype: torch.dtype) -> None:
    f, logits, labels = randn(5, 4), randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    lg = logits.numpy()
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    alpha = ((p - np.eye(3)[labels.numpy()]) ** 2).sum(1)
    expected = np.mean(alpha * (f.numpy() ** 2).sum(1))
    assert_close(Fn.feature_norm_penalty(f.to(dtype), logits.to(dtype), labels, weighting="sgm"), expected, dtype)


def test_feature_norm_penalty_sgm_gradcheck_and_detached_alpha() -> None:
    f, logits, labels = randn(4, 3, requires_grad=True), randn(4, 5, requires_grad=True), torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(lambda x: Fn.feature_norm_penalty(x, logits, labels, weighting="sgm"), (f,))
    Fn.feature_norm_penalty(f, logits, labels, weighting="sgm").backward()
    assert logits.grad is None  # alpha_b is a weight (detached), §3.2


def test_feature_norm_penalty_authors_gradient_through_alpha_matches_numpy() -> None:
    """detach_alpha=False (the authors' code): the same value, and d/dz of mean_b alpha_b s_b with s_b = ||f_b||^2 and
    alpha_b = ||p_b - y_b||^2 is (2 / B) s_b (diag(p_b) - p_b p_b^T)(p_b - y_b), the softmax's Jacobian applied."""
    f, logits, labels = randn(4, 3, requires_grad=True), randn(4, 5, requires_grad=True), torch.tensor([0, 4, 2, 2])
    value = Fn.feature_norm_penalty(f, logits, labels, weighting="sgm", detach_alpha=False)
    assert value.item() == pytest.approx(Fn.feature_norm_penalty(f, logits, labels, weighting="sgm").item(), rel=1e-12)
    value.backward()
    z, fs = logits.detach().numpy(), f.detach().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.eye(5)[labels.numpy()]
    s = (fs ** 2).sum(1)
    expected = np.stack([2 / 4 * s[b] * (np.diag(p[b]) - np.outer(p[b], p[b])) @ (p[b] - y[b]) for b in range(4)])
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-10, atol=1e-12)
    alpha = ((p - y) ** 2).sum(1)
    np.testing.assert_allclose(f.grad.numpy(), 2 / 4 * alpha[:, None] * fs, rtol=1e-10)  # the features' part as before
    assert torch.autograd.gradcheck(
        lambda x, z: Fn.feature_norm_penalty(x, z, labels, weighting="sgm", detach_alpha=False), (f, logits))


def test_feature_norm_penalty_rejects_bad_input() -> None:
    f = torch.ones(2, 3)
    with pytest.raises(ValueError, match="'none', 'sgm'"):
        Fn.feature_norm_penalty(f, weighting="SGM")
    with pytest.raises(ValueError, match="needs logits"):
        Fn.feature_norm_penalty(f, weighting="sgm")
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\) = \(2,\)"):
        Fn.feature_norm_penalty(f, torch.zeros(2, 4), torch.tensor([0, 1, 2]), weighting="sgm")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\].*\[0, 4\]"):
        Fn.feature_norm_penalty(f, torch.zeros(2, 4), torch.tensor([0, 4]), weighting="sgm")
    with pytest.raises(TypeError, match="integer class indices"):
        Fn.feature_norm_penalty(f, torch.zeros(2, 4), torch.tensor([0.0, 1.0]), weighting="sgm")


# ----------------------------------------------------------------------------------------------------------------
# §4 MaxEnt


@DTYPES
def test_prediction_entropy(dtype: torch.dtype) -> None:
    # logits (0, 0, 0) -> p uniform -> H = ln 3 = 1.098612; logits (0, ln 3) -> p = (1/4, 3/4) -> 0.562335.
    assert_close(Fn.prediction_entropy(torch.zeros(2, 3, dtype=dtype)), np.full(2, math.log(3)), dtype)
    assert Fn.prediction_entropy(t([[0.0, math.log(3.0)]], dtype)).item() == pytest.approx(0.562335, abs=1e-6)
    logits = randn(4, 6) * 4
    assert_close(Fn.prediction_entropy(logits.to(dtype)), np_entropy_of_softmax(logits.numpy()), dtype)


def test_prediction_entropy_gradcheck() -> None:
    assert torch.autograd.gradcheck(Fn.prediction_entropy, (randn(3, 4, requires_grad=True),))


# ----------------------------------------------------------------------------------------------------------------
# §7.5 head penalties


@DTYPES
def test_head_penalties(dtype: torch.dtype) -> None:
    # w = ((1, -2), (0.5, 0)): L1 = 1 + 2 + 0.5 = 3.5; L2 = 1 + 4 + 0.25 = 5.25; negative part = 2.
    w = t([[1.0, -2.0], [0.5, 0.0]], dtype)
    assert_close(Fn.head_l1(w), 3.5, dtype)
    assert_close(Fn.head_l2(w), 5.25, dtype)
    assert_close(Fn.negative_weight_penalty(w), 2.0, dtype)
    w = randn(3, 5)
    wn = w.numpy()
    assert_close(Fn.head_l1(w.to(dtype)), np.abs(wn).sum(), dtype)
    assert_close(Fn.head_l2(w.to(dtype)), (wn**2).sum(), dtype)
    assert_close(Fn.negative_weight_penalty(w.to(dtype)), -wn[wn < 0].sum(), dtype)


def test_negative_weight_penalty_gradient() -> None:
    w = t([[1.0, -2.0], [0.5, -0.1]]).requires_grad_()
    Fn.negative_weight_penalty(w).backward()
    assert w.grad.tolist() == [[0.0, -1.0], [0.0, -1.0]]  # pushes negative weights up, leaves positive ones
    with pytest.raises(TypeError, match="floating dtype"):
        Fn.head_l1(torch.ones(2, 2, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------------
# §5 margins


@DTYPES
def test_cosine_logits(dtype: torch.dtype) -> None:
    f, w = randn(4, 3), randn(5, 3)
    expected = np.array([[np_cos(fb, wc) for wc in w.numpy()] for fb in f.numpy()])
    out = Fn.cosine_logits(f.to(dtype), w.to(dtype))
    assert out.shape == (4, 5)
    assert_close(out, expected, dtype)
    # A zero feature gives cosines 0, not NaN (eps-bounded norm).
    assert Fn.cosine_logits(torch.zeros(1, 3, dtype=dtype), w.to(dtype)).abs().max().item() == 0.0


def test_cosine_logits_rejects_dimension_mismatch() -> None:
    with pytest.raises(ValueError, match=r"share D.*\(2, 3\) and \(4, 5\)"):
        Fn.cosine_logits(torch.ones(2, 3), torch.ones(4, 5))


@DTYPES
def test_lm_softmax_hand_value(dtype: torch.dtype) -> None:
    # by hand: cos = (0.9, 0.1, 0.0), y = 0, s = 1: log(e^{0.1-0.9} + e^{0.0-0.9}) = log(e^{-0.8} + e^{-0.9})
    # = log(0.449329 + 0.406570) = log(0.855899) = -0.155601.
    loss = Fn.lm_softmax_loss(t([[0.9, 0.1, 0.0]], dtype), torch.tensor([0]), s=1.0)
    assert_close(loss, math.log(math.exp(-0.8) + math.exp(-0.9)), dtype)
    assert loss.item() == pytest.approx(-0.1556, abs=5e-5)


@DTYPES
@pytest.mark.parametrize("s", [1.0, 16.0, 64.0])
def test_lm_softmax_matches_numpy(dtype: torch.dtype, s: float) -> None:
    cos, labels = torch.rand(5, 4, dtype=torch.float64) * 2 - 1, torch.tensor([0, 3, 1, 1, 2])
    assert_close(Fn.lm_softmax_loss(cos.to(dtype), labels, s=s), np_lm_softmax(cos.numpy(), labels.numpy(), s), dtype)


def test_lm_softmax_tends_to_negative_margin_for_large_s() -> None:
    cos, labels = torch.rand(5, 4, dtype=torch.float64) * 2 - 1, torch.tensor([0, 3, 1, 1, 2])
    expected = -np_sample_margins(cos.numpy(), labels.numpy()).mean()
    # logsumexp over 3 terms exceeds the max by at most log(3)/s.
    assert Fn.lm_softmax_loss(cos, labels, s=1e4).item() == pytest.approx(expected, abs=math.log(3) / 1e4 + 1e-12)


@pytest.mark.parametrize("s", [1.0, 64.0])
def test_lm_softmax_gradcheck(s: float) -> None:
    cos, labels = (torch.rand(4, 3, dtype=torch.float64) * 0.2 - 0.1).requires_grad_(), torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda c: Fn.lm_softmax_loss(c, labels, s=s), (cos,))


def test_lm_softmax_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 classes.*C = 1"):
        Fn.lm_softmax_loss(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="s must be positive"):
        Fn.lm_softmax_loss(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), s=0.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\) = \(3,\)"):
        Fn.lm_softmax_loss(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


@DTYPES
def test_sample_margin_hand_values(dtype: torch.dtype) -> None:
    # by hand: cos = (0.9, 0.1, 0.0), y = 0: R_sm = max(0.1, 0.0) - 0.9 = -0.8 (margin +0.8);
    # y = 1: margin 0.1 - max(0.9, 0.0) = -0.8.
    cos = t([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0]], dtype)
    assert_close(Fn.sample_margins(cos, torch.tensor([0, 1])), [0.8, -0.8], dtype)
    assert_close(Fn.sample_margin_loss(cos[:1], torch.tensor([0])), -0.8, dtype)


@DTYPES
def test_sample_margins_match_numpy(dtype: torch.dtype) -> None:
    cos, labels = torch.rand(6, 5, dtype=torch.float64) * 2 - 1, torch.tensor([0, 4, 2, 2, 1, 3])
    expected = np_sample_margins(cos.numpy(), labels.numpy())
    assert_close(Fn.sample_margins(cos.to(dtype), labels), expected, dtype)
    assert_close(Fn.sample_margin_loss(cos.to(dtype), labels), -expected.mean(), dtype)


def test_sample_margin_loss_gradcheck() -> None:
    # Distinct, well-separated values so the non-target max is unique under the finite-difference step.
    cos = torch.randperm(12, dtype=torch.float64).reshape(3, 4).div(12).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: Fn.sample_margin_loss(c, torch.tensor([1, 0, 3])), (cos,))


def test_sample_margins_rejects_single_class() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        Fn.sample_margins(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))


@DTYPES
def test_zero_centroid_loss(dtype: torch.dtype) -> None:
    # Rows (2, 0), (0, 3) -> unit (1, 0), (0, 1): sum (1, 1) -> 2 (norm 1.414214), the default;
    # mean (1/2, 1/2) -> 1/4 + 1/4 = 0.5 (norm 0.707107).
    w = t([[2.0, 0.0], [0.0, 3.0]], dtype)
    assert_close(Fn.zero_centroid_loss(w), 2.0, dtype)
    assert_close(Fn.zero_centroid_loss(w, reduce="mean"), 0.5, dtype)
    assert_close(Fn.zero_centroid_loss(w, reduce="mean", squared=False), math.sqrt(0.5), dtype)
    assert_close(Fn.zero_centroid_loss(w, squared=False), math.sqrt(2.0), dtype)
    w = randn(5, 3)
    unit = np_unit_rows(w.numpy())
    assert_close(Fn.zero_centroid_loss(w.to(dtype)), (unit.sum(0) ** 2).sum(), dtype)
    assert_close(Fn.zero_centroid_loss(w.to(dtype), reduce="mean"), (unit.mean(0) ** 2).sum(), dtype)  # C^2 = 25 x


@DTYPES
def test_zero_centroid_of_simplex_is_zero(dtype: torch.dtype) -> None:
    w = t(simplex_2d(), dtype)
    assert Fn.zero_centroid_loss(w).item() == pytest.approx(0.0, abs=1e-6)
    assert Fn.zero_centroid_loss(w, reduce="sum", squared=False).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("squared", [True, False])
def test_zero_centroid_loss_gradcheck(reduce: str, squared: bool) -> None:
    w = randn(4, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: Fn.zero_centroid_loss(x, reduce=reduce, squared=squared), (w,))


def test_zero_centroid_loss_rejects_bad_reduce() -> None:
    with pytest.raises(ValueError, match="'sum', 'mean'"):
        Fn.zero_centroid_loss(torch.ones(3, 2), reduce="max")


@DTYPES
def test_class_margin(dtype: torch.dtype) -> None:
    # Regular simplex, C = 3 in 2-D: every pair 120 degrees apart -> 2 pi / 3 = arccos(-1/2) = 2.094395.
    assert_close(Fn.class_margin(t(simplex_2d(), dtype)), 2 * math.pi / 3, dtype)
    w = randn(5, 3)
    u = np_unit_rows(w.numpy())
    expected = min(np.arccos(np.clip(u[i] @ u[j], -1, 1)) for i in range(5) for j in range(5) if i != j)
    assert_close(Fn.class_margin(w.to(dtype)), expected, dtype)


def test_class_margin_of_duplicate_rows_is_zero_not_nan() -> None:
    # Identical rows: rounding can give a cosine just above 1; the clamp keeps arccos finite.
    w = t([[0.1, 0.7, 0.3], [0.1, 0.7, 0.3], [1.0, 0.0, 0.0]], torch.float32) * 3.3
    margin = Fn.class_margin(w)
    assert torch.isfinite(margin) and margin.item() == pytest.approx(0.0, abs=1e-3)


def test_class_margin_rejects_single_class() -> None:
    with pytest.raises(ValueError, match="at least 2 class prototypes, got C = 1"):
        Fn.class_margin(torch.ones(1, 3))


# ----------------------------------------------------------------------------------------------------------------
# Cross-cutting: inputs untouched, devices


def _call_everything(device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(device)
    z = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(device)
    logits = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device)
    labels = torch.tensor([0, 2, 1, 1], device=device)
    inputs = [f, z, w, logits, labels]
    before = [x.clone() for x in inputs]
    cos = Fn.cosine_logits(f, w)
    out = {
        "channel_entropy": Fn.channel_entropy(f, tau=0.5),
        "random_feature_loss": Fn.random_feature_loss(f, z, reduction="sum_dim"),
        "prior": torch.stack(Fn.adarand_prior_losses(w, w.flip(0))),
        "fnp": Fn.feature_norm_penalty(f, logits, labels, weighting="sgm"),
        "prediction_entropy": Fn.prediction_entropy(logits),
        "heads": torch.stack([Fn.head_l1(w), Fn.head_l2(w), Fn.negative_weight_penalty(w)]),
        "cos": cos,
        "lm": Fn.lm_softmax_loss(cos, labels),
        "margins": Fn.sample_margins(cos, labels),
        "margin_loss": Fn.sample_margin_loss(cos, labels),
        "zc": Fn.zero_centroid_loss(w, reduce="sum", squared=False),
        "class_margin": Fn.class_margin(w),
    }
    for x, x0 in zip(inputs, before):
        assert torch.equal(x, x0), "an input was modified in place"
    for name, value in out.items():
        assert value.device.type == device.type, name
    return out


def test_inputs_are_not_modified() -> None:
    outputs = _call_everything(torch.device("cpu"))  # asserts inside: inputs unchanged, outputs on the device
    assert len(outputs) == 12 and all(torch.isfinite(v).all() for v in outputs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu, cuda = _call_everything(torch.device("cpu")), _call_everything(torch.device("cuda"))
    for name in cpu:
        torch.testing.assert_close(cuda[name].cpu(), cpu[name], msg=name)
