"""FMR (docs/methods/fmr.md): the weight lambda_t over scripted steps, the statistics pass, the loss and its gradient.

References are NumPy float64 written here from the spec (never the module); the model is an in-file module with
timm's contract whose penultimate features are the input itself, so every entropy is under the test's control.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regtune.regularizers import FeatureMagnitudeRegularization, TrainStep, create_regularizer
from tests.regularizers.nets import FeatureNet
from tests.regularizers.tolerance import DTYPES, TOL

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------------
# NumPy references


def np_entropy(f: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Per-sample entropy of softmax(f / tau) over channels."""
    z = f / tau
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return -(p * np.log(p)).sum(axis=1)


def np_entropy_grad(f: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """d(mean_b H_b)/df: dH_b/df_bi = -(1/tau) p_bi (log p_bi + H_b), divided by B for the batch mean."""
    z = f / tau
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    h = -(p * np.log(p)).sum(axis=1, keepdims=True)
    return -(p * (np.log(p) + h)) / tau / f.shape[0]


def two_channel(a: list[float]) -> np.ndarray:
    """Rows (0, a_b): p = (1, e^a) / (1 + e^a)."""
    return np.stack([np.zeros(len(a)), np.asarray(a, dtype=np.float64)], axis=1)


def make_step(f: np.ndarray, step: int = 0, epoch: int = 0, dtype: torch.dtype = torch.float64,
              model: nn.Module | None = None) -> TrainStep:
    features = torch.tensor(f, dtype=dtype, requires_grad=True)
    model = model if model is not None else FeatureNet(f.shape[1]).to(dtype)
    logits = model.get_classifier()(features)
    labels = torch.zeros(f.shape[0], dtype=torch.long)
    return TrainStep(features=features, logits=logits, labels=labels, model=model, global_step=step, epoch=epoch)


def loader_of(batches: list[np.ndarray], dtype: torch.dtype = torch.float64) -> DataLoader:
    """A loader yielding exactly ``batches`` (all the same size), in order."""
    data = torch.tensor(np.concatenate(batches), dtype=dtype)
    labels = torch.arange(len(data)) % 2
    return DataLoader(TensorDataset(data, labels), batch_size=len(batches[0]), shuffle=False)


# (step, epoch, a-values of the batch's two-channel features): epoch 0 then epoch 1 with update_every = 2, so after
# epoch 0 lambda is recomputed at the odd steps (step % 2 == 1, the official loop's cadence).
SCRIPT = [
    (0, 0, [math.log(3.0), math.log(3.0)]),
    (1, 0, [0.0, math.log(3.0)]),
    (2, 0, [2.0, 1.0]),
    (3, 1, [4.0, 6.0]),  # update
    (4, 1, [0.1, 4.0]),  # 4 % 2 != 1: lambda kept although H moves
    (5, 1, [0.0, 0.0]),  # update
    (6, 1, [3.0, 0.5]),  # kept
    (7, 1, [1.0, 2.0]),  # update
]


def reference_lambdas(weight: Any, window: int = 3, update_every: int = 2,
                      lambda_max: float | None = None) -> list[tuple[float, float]]:
    """(lambda_t, mean H) after each SCRIPT step; ``weight(h_t)`` is the mode's formula."""
    history: list[float] = []
    lam, out = float("nan"), []
    for step, epoch, a in SCRIPT:
        h = float(np_entropy(two_channel(a)).mean())
        history.append(h)
        h_t = float(np.mean(history[-window:]))  # running mean INCLUDING the current batch
        if epoch == 0 or step % update_every == 1:
            lam = weight(h_t)
            if lambda_max is not None:
                lam = min(lam, lambda_max)
        out.append((lam, h))
    return out


def run_script(fmr: FeatureMagnitudeRegularization) -> list[tuple[float, float, float]]:
    """(lambda_t, loss, stats lambda) after each SCRIPT step."""
    out = []
    for step, epoch, a in SCRIPT:
        loss = fmr(make_step(two_channel(a), step=step, epoch=epoch))
        out.append((float(fmr.lambda_t), loss.item(), fmr.stats()["lambda"]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# lambda_t over a scripted sequence


# A hand-worked trace of the official training loop (train.py's FMRTrainer with models/task_fmr.py's FMRTask, read at
# commit 5dd5e26). Its loop counter runs from 1 - N to the planned iterations (N = batches of the loader): the
# statistics epoch is the N - 1 batches before the counter reaches 0, then the counter is 0 at the first update and
# the epoch 0 begins; lambda is recomputed at every iteration of epoch 0 and afterwards when iteration % 5 == 1.
# The running entropy window is shared by the statistics epoch and training and includes the current batch.
#
# Entropies of one-sample batches with D = 2 features (0, ln r), p = (1 / (1 + r), r / (1 + r)):
#   a: r = 3  H = -(1/4 ln 1/4 + 3/4 ln 3/4)  = 0.346574 + 0.215762 = 0.562335
#   b: r = 4  H = -(1/5 ln 1/5 + 4/5 ln 4/5)  = 0.321888 + 0.178515 = 0.500402
#   c: r = 2  H = -(1/3 ln 1/3 + 2/3 ln 2/3)  = 0.366204 + 0.270310 = 0.636514
#   d: r = 9  H = -(1/10 ln 1/10 + 9/10 ln 9/10) = 0.230259 + 0.094824 = 0.325083
#   u: r = 1  H = ln 2 = H_max = 0.693147
HAND_A = [math.log(3.0), math.log(4.0), math.log(2.0), math.log(9.0), 0.0]
HAND_H = [0.562335, 0.500402, 0.636514, 0.325083, 0.693147]
A, B, C, D, U = range(5)


def test_meta_lambda_sequence_follows_the_official_loop_by_hand() -> None:
    # beta = 50, window = 3, update_every = 3; the loader holds N = 4 batches [a, b, c, d].
    # Statistics pass: a, b, c (the official statistics epoch stops one batch short of the loader, d is not read).
    #   H_init = (a + b + c) / 3 = (0.562335 + 0.500402 + 0.636514) / 3 = 0.566417
    #   lambda = 50 (H_max - H_t) / (H_max - H_init) = 50 (0.693147 - H_t) / 0.126730
    # Training, epoch = step // 4; lambda updated at steps 0-3 (epoch 0) and then where step % 3 == 1 (4 and 7):
    #   step 0, e0, d: window [b c d] H_t = (0.500402 + 0.636514 + 0.325083) / 3 = 0.487333  update -> 81.2018
    #   step 1, e0, a: window [c d a] H_t = (0.636514 + 0.325083 + 0.562335) / 3 = 0.507977  update -> 73.0568
    #   step 2, e0, c: window [d a c] H_t = 0.507977                                         update -> 73.0568
    #   step 3, e0, b: window [a c b] H_t = 0.566417 = H_init                                 update -> 50 (= beta)
    #   step 4, e1, d: window [c b d] H_t = 0.487333                              4 % 3 == 1: update -> 81.2018
    #   step 5, e1, a: window [b d a] H_t = 0.462607                                           kept -> 81.2018
    #   step 6, e1, u: window [d a u] H_t = 0.526855                                           kept -> 81.2018
    #   step 7, e1, c: window [a u c] H_t = (0.562335 + 0.693147 + 0.636514) / 3 = 0.630665 update -> 24.6515
    #   step 8, e2, d: window [u c d] H_t = 0.551581                                           kept -> 24.6515
    #   step 9, e2, b: window [c d b] H_t = 0.487333                                           kept -> 24.6515
    # (regtune before this change read all four batches, H_init = (b + c + d) / 3 = 0.487333, and updated at steps 6
    # and 9 instead of 4 and 7: 64.2, 70.2, 45.0, 30.8, 30.8, 30.8, 40.4, 40.4, 40.4, 50.0.)
    for letter, a in enumerate(HAND_A):
        assert np_entropy(two_channel([a]))[0] == pytest.approx(HAND_H[letter], abs=1e-6)
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=3, update_every=3)
    fmr.setup(FeatureNet(2), loader_of([two_channel([HAND_A[x]]) for x in (A, B, C, D)]))
    h_init = (HAND_H[A] + HAND_H[B] + HAND_H[C]) / 3
    assert float(fmr.h_init) == pytest.approx(h_init, abs=1e-6)
    trace = [D, A, C, B, D, A, U, C, D, B]
    expected = [81.2018, 73.0568, 73.0568, 50.0, 81.2018, 81.2018, 81.2018, 24.6515, 24.6515, 24.6515]
    got = []
    for step, letter in enumerate(trace):
        fmr(make_step(two_channel([HAND_A[letter]]), step=step, epoch=step // 4))
        got.append(float(fmr.lambda_t))
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert got[3] == pytest.approx(50.0, rel=1e-12)  # H_t equals H_init exactly: lambda = beta


def test_update_every_one_updates_at_every_step() -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=1, update_every=1)
    fmr.h_init.fill_(0.5)
    fmr.h_max.fill_(LOG2)
    for step, a in enumerate(HAND_A[:4]):
        fmr(make_step(two_channel([a]), step=10 + step, epoch=3))  # window 1: H_t is this batch's entropy
        h = float(np_entropy(two_channel([a]))[0])
        assert float(fmr.lambda_t) == pytest.approx(50.0 * (LOG2 - h) / (LOG2 - 0.5), rel=1e-12)


def test_single_batch_loader_is_read_whole(caplog: pytest.LogCaptureFixture) -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", window=3)
    with caplog.at_level("WARNING"):
        fmr.setup(FeatureNet(2), loader_of([two_channel([HAND_A[A], HAND_A[D]])]))
    assert float(fmr.h_init) == pytest.approx((HAND_H[A] + HAND_H[D]) / 2, abs=1e-6)
    assert "single batch" in caplog.text


def test_statistics_pass_needs_a_length_or_init_batches() -> None:
    batches = iter([(torch.tensor(two_channel([a])), torch.zeros(1).long()) for a in HAND_A[:3]])
    with pytest.raises(ValueError, match="init_batches"):
        FeatureMagnitudeRegularization(mode="meta").setup(FeatureNet(2), batches)
    fmr = FeatureMagnitudeRegularization(mode="meta", window=5, init_batches=2)
    fmr.setup(FeatureNet(2), iter([(torch.tensor(two_channel([a])), torch.zeros(1).long()) for a in HAND_A[:3]]))
    assert float(fmr.h_init) == pytest.approx((HAND_H[A] + HAND_H[B]) / 2, abs=1e-6)


def test_meta_first_step_hand_value() -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=3)
    fmr.h_init.fill_(0.5)
    fmr.h_max.fill_(LOG2)
    loss = fmr(make_step(two_channel([math.log(3.0), math.log(3.0)])))
    # f = (0, ln 3): p = (1/4, 3/4), H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351; H_t = H (one batch);
    # lambda = 50 (0.6931472 - 0.5623351) / (0.6931472 - 0.5) = 50 * 0.1308120 / 0.1931472 = 33.863305
    assert float(fmr.lambda_t) == pytest.approx(33.863305, abs=1e-5)
    assert loss.item() == pytest.approx(-33.863305 * 0.5623351, abs=1e-4)  # = -19.0425


def test_meta_lambda_over_scripted_steps() -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=3, update_every=2)
    fmr.h_init.fill_(0.5)
    fmr.h_max.fill_(LOG2)
    expected = reference_lambdas(lambda h_t: 50.0 * (LOG2 - h_t) / (LOG2 - 0.5))
    got = run_script(fmr)
    for (lam, loss, logged), (ref_lam, ref_h) in zip(got, expected):
        assert lam == pytest.approx(ref_lam, rel=1e-12)
        assert logged == pytest.approx(ref_lam, rel=1e-12)
        assert loss == pytest.approx(-ref_lam * ref_h, rel=1e-12)  # L = -lambda_t * mean_b H
    # The script does exercise the cadence: lambda is kept at steps 4 and 6 though the entropy moved.
    assert got[4][0] == got[3][0] and got[6][0] == got[5][0]
    assert got[3][0] != got[2][0] and got[5][0] != got[4][0] and got[7][0] != got[6][0]
    assert len({round(g[0], 9) for g in got}) >= 5
    # No clamp by default: lambda exceeds beta once H_t < H_init.
    assert max(g[0] for g in got) > 50.0


def test_lambda_max_clamps() -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=3, update_every=2, lambda_max=40.0)
    fmr.h_init.fill_(0.5)
    fmr.h_max.fill_(LOG2)
    expected = reference_lambdas(lambda h_t: 50.0 * (LOG2 - h_t) / (LOG2 - 0.5), lambda_max=40.0)
    assert any(lam == 40.0 for lam, _ in expected) and any(lam < 40.0 for lam, _ in expected)
    for (lam, loss, _), (ref_lam, ref_h) in zip(run_script(fmr), expected):
        assert lam == pytest.approx(ref_lam, rel=1e-12)
        assert loss == pytest.approx(-ref_lam * ref_h, rel=1e-12)


def test_dynamic_mode() -> None:
    fmr = FeatureMagnitudeRegularization(mode="dynamic", max_coef=200.0, window=3, update_every=2)
    assert fmr.needs_setup_pass
    fmr.h_init.fill_(0.0)  # as if set up by a statistics pass that left the window empty
    expected = reference_lambdas(lambda h_t: 200.0 * (LOG2 - h_t) / LOG2)  # max_coef (H_max - H_t) / H_max
    for (lam, loss, _), (ref_lam, ref_h) in zip(run_script(fmr), expected):
        assert lam == pytest.approx(ref_lam, rel=1e-12)
        assert loss == pytest.approx(-ref_lam * ref_h, rel=1e-12)
    assert float(fmr.h_max) == pytest.approx(LOG2, rel=1e-15)


def test_dynamic_window_starts_filled_by_the_statistics_pass() -> None:
    # The official loop pushes the statistics epoch's entropies into the same 50-batch window that drives the dynamic
    # weight. Loader [a, b, c, d] (the HAND_H entropies below): the pass reads a, b, c; the first training batch d
    # gives H_t = (b + c + d) / 3 = (0.500402 + 0.636514 + 0.325083) / 3 = 0.487333 and
    # lambda = 200 (0.693147 - 0.487333) / 0.693147 = 59.385; from an empty window it would be
    # 200 (0.693147 - 0.325083) / 0.693147 = 106.20.
    fmr = FeatureMagnitudeRegularization(mode="dynamic", max_coef=200.0, window=3)
    fmr.setup(FeatureNet(2), loader_of([two_channel([a]) for a in HAND_A[:4]]))
    fmr(make_step(two_channel([HAND_A[3]])))
    h_t = float(np.mean([np_entropy(two_channel([a]))[0] for a in HAND_A[1:4]]))
    assert float(fmr.lambda_t) == pytest.approx(200.0 * (LOG2 - h_t) / LOG2, rel=1e-12)
    assert float(fmr.lambda_t) == pytest.approx(59.385, abs=1e-3)


def test_dynamic_without_setup_raises() -> None:
    fmr = FeatureMagnitudeRegularization(mode="dynamic")
    with pytest.raises(RuntimeError, match="setup"):
        fmr(make_step(two_channel([1.0, 2.0])))


def test_provided_mode_is_fixed() -> None:
    fmr = FeatureMagnitudeRegularization(mode="provided", lambda_=7.5, window=3, update_every=2)
    for (lam, loss, logged), (_, ref_h) in zip(run_script(fmr), reference_lambdas(lambda h: 0.0)):
        assert lam == 7.5 and logged == 7.5
        assert loss == pytest.approx(-7.5 * ref_h, rel=1e-12)
    assert not fmr.needs_setup_pass


def test_static_mode_uses_training_set_size() -> None:
    data = TensorDataset(torch.zeros(37, 2), torch.zeros(37, dtype=torch.long))
    fmr = FeatureMagnitudeRegularization(mode="static")
    assert fmr.needs_setup_pass
    fmr.setup(FeatureNet(2), DataLoader(data, batch_size=8))
    expected = 10.0 ** (-6.6515e-05 * 37 + 0.67514)  # 10^0.67268 = 4.70629
    assert float(fmr.lambda_t) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(4.70629, abs=1e-5)
    for lam, _, _ in run_script(fmr):
        assert lam == pytest.approx(expected, rel=1e-12)

    custom = FeatureMagnitudeRegularization(mode="static", static_a=0.01, static_b=0.0)
    custom.setup(FeatureNet(2), DataLoader(TensorDataset(torch.zeros(100, 2), torch.zeros(100).long())))
    assert float(custom.lambda_t) == pytest.approx(10.0, rel=1e-12)  # 10^(0.01 * 100 + 0) = 10


def test_static_without_setup_raises() -> None:
    fmr = FeatureMagnitudeRegularization(mode="static")
    with pytest.raises(RuntimeError, match="setup"):
        fmr(make_step(two_channel([1.0, 2.0])))


def test_meta_without_setup_raises() -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta")
    with pytest.raises(RuntimeError, match="setup"):
        fmr(make_step(two_channel([1.0, 2.0])))


def test_eval_mode_keeps_state() -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", window=3)
    fmr.h_init.fill_(0.5)
    fmr.h_max.fill_(LOG2)
    fmr(make_step(two_channel([1.0, 2.0])))
    state = copy.deepcopy(fmr.state_dict())
    fmr.eval()
    f = two_channel([4.0, 0.0])
    loss = fmr(make_step(f, step=1))
    for key, value in fmr.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert loss.item() == pytest.approx(-float(state["lambda_t"]) * np_entropy(f).mean(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Statistics pass


ENTROPY_BATCHES = [two_channel(a) for a in ([0.0, 1.0], [2.0, 3.0], [0.5, 4.0], [6.0, 1.0], [3.0, 3.0])]
BATCH_H = [float(np_entropy(b).mean()) for b in ENTROPY_BATCHES]


@pytest.mark.parametrize(("window", "init_batches", "expected"), [
    (3, None, float(np.mean(BATCH_H[1:4]))),  # 5 batches, the last unread: the last min(window, 4) = 3 of 4
    (10, None, float(np.mean(BATCH_H[:4]))),  # window > batches read: all 4
    (3, 2, float(np.mean(BATCH_H[:2]))),  # only the first 2 batches are read
    (10, 5, float(np.mean(BATCH_H))),  # every batch, when asked
], ids=["window3", "window10", "init_batches2", "init_batches5"])
def test_setup_h_init(window: int, init_batches: int | None, expected: float) -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", window=window, init_batches=init_batches)
    fmr.setup(FeatureNet(2), loader_of(ENTROPY_BATCHES))
    assert float(fmr.h_init) == pytest.approx(expected, rel=1e-12)
    assert float(fmr.h_max) == pytest.approx(LOG2, rel=1e-15)
    assert fmr.stats()["h_init"] == pytest.approx(expected, rel=1e-12)


def test_window_continues_from_setup_into_training() -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=3)
    fmr.setup(FeatureNet(2), loader_of(ENTROPY_BATCHES))
    f = two_channel([2.0, 2.0])
    fmr(make_step(f))
    h_t = np.mean([BATCH_H[2], BATCH_H[3], np_entropy(f).mean()])  # the pass read batches 0-3
    h_init = np.mean(BATCH_H[1:4])
    assert fmr.stats()["h_t"] == pytest.approx(h_t, rel=1e-12)
    assert float(fmr.lambda_t) == pytest.approx(50.0 * (LOG2 - h_t) / (LOG2 - h_init), rel=1e-12)


@pytest.mark.parametrize("weight_uses_tau", [False, True])
def test_setup_entropy_temperature(weight_uses_tau: bool) -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", window=10, tau=2.0, weight_uses_tau=weight_uses_tau)
    fmr.setup(FeatureNet(2), loader_of(ENTROPY_BATCHES))
    tau = 2.0 if weight_uses_tau else 1.0
    expected = np.mean([np_entropy(b, tau).mean() for b in ENTROPY_BATCHES[:4]])
    assert float(fmr.h_init) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("was_training", [True, False])
@pytest.mark.parametrize("init_mode", ["train", "eval"])
def test_setup_mode_and_batchnorm(init_mode: str, was_training: bool) -> None:
    torch.manual_seed(0)
    model = FeatureNet(3, bn=True).double().train(was_training)
    batches = [np.random.default_rng(i).normal(2.0, 3.0, size=(4, 3)) for i in range(3)]
    before = copy.deepcopy(model.norm.state_dict())
    fmr = FeatureMagnitudeRegularization(mode="meta", window=5, init_mode=init_mode)
    fmr.setup(model, loader_of(batches))
    assert model.training is was_training
    after = model.norm.state_dict()
    moved = not torch.equal(after["running_mean"], before["running_mean"])
    assert moved is (init_mode == "train")
    assert int(after["num_batches_tracked"]) == (2 if init_mode == "train" else 0)  # 3 batches, the last unread


def test_setup_restores_mode_on_error() -> None:
    class Broken(FeatureNet):
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = Broken(2).eval()
    with pytest.raises(RuntimeError, match="boom"):
        FeatureMagnitudeRegularization(mode="meta").setup(model, loader_of(ENTROPY_BATCHES))
    assert not model.training


def test_setup_h_init_equal_h_max_raises() -> None:
    # All-zero features: p uniform, H = log D exactly for D = 2 in float64 (-(2 * 0.5 ln 0.5) = ln 2).
    fmr = FeatureMagnitudeRegularization(mode="meta")
    with pytest.raises(ValueError, match="H_max"):
        fmr.setup(FeatureNet(2), loader_of([np.zeros((3, 2))]))


def test_setup_uniform_features_raise_for_every_dim_and_dtype() -> None:
    slipped = []
    for dtype in (torch.float32, torch.float64):
        for dim in range(2, 17):
            fmr = FeatureMagnitudeRegularization(mode="meta")
            try:
                fmr.setup(FeatureNet(dim).to(dtype), loader_of([np.zeros((3, dim))], dtype))
            except ValueError:
                continue
            slipped.append((str(dtype), dim, float(fmr.h_max - fmr.h_init)))
    assert not slipped, slipped


def test_setup_needs_a_loader() -> None:
    with pytest.raises(ValueError, match="loader"):
        FeatureMagnitudeRegularization(mode="meta").setup(FeatureNet(2), None)
    with pytest.raises(ValueError, match="empty"):
        FeatureMagnitudeRegularization(mode="meta").setup(FeatureNet(2), [])


# ----------------------------------------------------------------------------------------------------------------
# Loss, gradient and temperatures


@DTYPES
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gradient_does_not_flow_through_lambda(dtype: torch.dtype, tau: float) -> None:
    f = np.random.default_rng(3).normal(0.0, 2.0, size=(4, 5))
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=3, tau=tau, weight_uses_tau=True)
    fmr.h_init.fill_(1.0)
    fmr.h_max.fill_(math.log(5.0))
    step = make_step(f, dtype=dtype)
    loss = fmr(step)
    loss.backward()
    lam = float(fmr.lambda_t)
    # lambda depends on this batch's entropy (H_t includes it); a gradient through it would add a second term.
    assert lam == pytest.approx(50.0 * (math.log(5.0) - np_entropy(f, tau).mean()) / (math.log(5.0) - 1.0),
                                rel=1e-5 if dtype == torch.float32 else 1e-12)
    expected = -lam * np_entropy_grad(f, tau)
    scale = float(np.abs(expected).max())  # float32: entries p_i (log p_i + H) cancel; compare on the gradient's scale
    np.testing.assert_allclose(step.features.grad.double().numpy(), expected, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["rtol"] * scale)
    assert loss.dtype == dtype
    np.testing.assert_allclose(loss.item(), -lam * np_entropy(f, tau).mean(), **TOL[dtype])


@pytest.mark.parametrize("weight_uses_tau", [False, True])
def test_weight_temperature(weight_uses_tau: bool) -> None:
    f = np.random.default_rng(4).normal(1.0, 2.0, size=(3, 4))
    fmr = FeatureMagnitudeRegularization(mode="dynamic", max_coef=10.0, tau=2.0, weight_uses_tau=weight_uses_tau)
    fmr.h_init.fill_(0.0)  # as if set up by a statistics pass that left the window empty
    loss = fmr(make_step(f))
    h_weight = np_entropy(f, 2.0 if weight_uses_tau else 1.0).mean()
    lam = 10.0 * (math.log(4.0) - h_weight) / math.log(4.0)
    assert float(fmr.lambda_t) == pytest.approx(lam, rel=1e-12)
    assert loss.item() == pytest.approx(-lam * np_entropy(f, 2.0).mean(), rel=1e-12)  # the loss always uses tau
    assert fmr.stats()["entropy"] == pytest.approx(np_entropy(f, 2.0).mean(), rel=1e-12)
    assert fmr.stats()["h_t"] == pytest.approx(h_weight, rel=1e-12)


def test_logits_target() -> None:
    f = np.random.default_rng(5).normal(size=(4, 6))
    model = FeatureNet(6, num_classes=3).double()
    step = make_step(f, model=model)
    fmr = FeatureMagnitudeRegularization(mode="provided", lambda_=0.5, target="logits")
    loss = fmr(step)
    logits = f @ model.classifier.weight.detach().numpy().T + model.classifier.bias.detach().numpy()
    assert loss.item() == pytest.approx(-0.5 * np_entropy(logits).mean(), rel=1e-12)
    assert float(fmr.h_max) == pytest.approx(math.log(3.0), rel=1e-15)  # H_max = log C


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and arguments


def test_buffers_survive_state_dict_round_trip() -> None:
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=3, update_every=2)
    fmr.setup(FeatureNet(2), loader_of(ENTROPY_BATCHES))
    for step, epoch, a in SCRIPT[:5]:
        fmr(make_step(two_channel(a), step=step, epoch=epoch))
    saved = copy.deepcopy(fmr.state_dict())
    assert {"window", "window_count", "h_init", "h_max", "lambda_t"} <= set(saved)

    fresh = create_regularizer("fmr", mode="meta", beta=50.0, window=3, update_every=2)
    fresh.load_state_dict(saved)
    for key in ("window", "window_count", "h_init", "h_max", "lambda_t"):
        assert torch.equal(fresh.state_dict()[key], saved[key]), key
    assert fresh.stats() == {k: v for k, v in fmr.stats().items() if k != "entropy"}
    for step, epoch, a in SCRIPT[5:]:  # a kept step, an update, a kept step: identical in both
        expected = fmr(make_step(two_channel(a), step=step, epoch=epoch))
        actual = fresh(make_step(two_channel(a), step=step, epoch=epoch))
        assert actual.item() == expected.item()
        assert float(fresh.lambda_t) == float(fmr.lambda_t)


def test_stats_are_not_views_of_the_buffers_the_next_step_changes() -> None:
    # The trainer keeps each step's stats() tensors and reads them at the epoch's end: lambda_t and the window change
    # in place at the next step, and must not change a dict already returned.
    fmr = FeatureMagnitudeRegularization(mode="meta", beta=50.0, window=3, update_every=2)
    fmr.setup(FeatureNet(2), loader_of(ENTROPY_BATCHES))
    step, epoch, a = SCRIPT[0]
    fmr(make_step(two_channel(a), step=step, epoch=epoch))
    earlier = fmr.stats()
    assert {"lambda", "entropy", "h_t", "h_init"} <= set(earlier)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in earlier.values())
    values = {k: float(v) for k, v in earlier.items()}
    lambda_before, window_before = fmr.lambda_t.clone(), fmr.window.clone()
    step, epoch, a = SCRIPT[2]  # another epoch-0 step: lambda_t and the window move
    fmr(make_step(two_channel(a), step=step, epoch=epoch))
    assert not torch.equal(fmr.lambda_t, lambda_before) and not torch.equal(fmr.window, window_before)
    assert float(fmr.stats()["lambda"]) != values["lambda"]
    assert {k: float(v) for k, v in earlier.items()} == values


@pytest.mark.parametrize("mode", ["meta", "dynamic", "static", "provided"])
def test_a_step_and_its_stats_read_no_tensor_on_the_host(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU each such read waits for the device. Once set up and past its first step, a training step branches
    # on host-side state only: H_init and lambda_t known, the window's filling counted.
    fmr = FeatureMagnitudeRegularization(mode=mode, beta=50.0, window=3, update_every=2)
    fmr.setup(FeatureNet(2), loader_of(ENTROPY_BATCHES))
    fmr(make_step(two_channel(SCRIPT[3][2]), step=3, epoch=1))
    steps = [make_step(two_channel(a), step=step, epoch=epoch) for step, epoch, a in SCRIPT[4:6]]  # kept, update

    def read(*args: Any) -> None:
        raise AssertionError("a tensor's value was read on the host")

    with monkeypatch.context() as patch:
        for method in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
            patch.setattr(torch.Tensor, method, read)
        for step in steps:
            fmr(step)
            stats = fmr.stats()
    assert set(stats) == {"lambda", "entropy", "h_t"} | ({"h_init"} if mode in ("meta", "dynamic") else set())


@pytest.mark.parametrize("kwargs", [
    {"mode": "adaptive"}, {"target": "maps"}, {"init_mode": "test"}, {"tau": 0.0}, {"tau": -1.0},
    {"window": 0}, {"update_every": 0}, {"init_batches": 0},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_bad_arguments_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        FeatureMagnitudeRegularization(**kwargs)
