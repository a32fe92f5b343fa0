"""L2-SP, DELTA, BSS, Co-Tuning, LwF, StochNorm (docs/methods/): NumPy / hand references, gradient checks, state."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.autograd import gradcheck

from regtune.regularizers import (
    DELTA,
    L2SP,
    BatchSpectralShrinkage,
    CoTuning,
    LearningWithoutForgetting,
    StochNorm,
    TrainStep,
    capture_outputs,
    convert_stochnorm,
)
from regtune.regularizers import functional as Fn
from regtune.regularizers.delta import layer_loss_increase
from tests.conftest import TINY_BACKBONE


def _step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, maps: tuple[str, ...] = (),
          indices: torch.Tensor | None = None) -> TrainStep:
    with capture_outputs(model, maps) as captured:
        feature_map = model.forward_features(images)
        features = model.forward_head(feature_map, pre_logits=True)
        logits = model.get_classifier()(features)
    return TrainStep(features=features, logits=logits, labels=labels, model=model, images=images,
                     feature_maps={"last": feature_map, **captured}, indices=indices)


# ----------------------------------------------------------------------------------------------------------------
# BSS


def test_bss_diagonal_hand_value() -> None:
    assert Fn.batch_spectral_shrinkage(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), k=1).item() == pytest.approx(1.0)
    assert Fn.batch_spectral_shrinkage(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), k=2).item() == pytest.approx(10.0)


@pytest.mark.parametrize(("batch", "dim", "k"), [(6, 10, 1), (6, 10, 3), (10, 4, 1), (10, 4, 2)])
def test_bss_matches_numpy_svd(batch: int, dim: int, k: int) -> None:
    features = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch * dim + k), dtype=torch.float64)
    sigma = np.linalg.svd(features.numpy(), compute_uv=False)  # descending, min(B, D) values
    expected = float(np.sum(np.sort(sigma)[:k] ** 2))
    np.testing.assert_allclose(Fn.batch_spectral_shrinkage(features, k).item(), expected, rtol=1e-9)
    np.testing.assert_allclose(Fn.batch_spectral_shrinkage(features.float(), k).item(), expected, rtol=1e-4)


def test_bss_gradcheck_and_bad_k() -> None:
    features = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert gradcheck(lambda f: Fn.batch_spectral_shrinkage(f, 2), (features,))
    with pytest.raises(ValueError, match="min\\(batch, D\\)"):
        Fn.batch_spectral_shrinkage(features.detach(), k=6)


def test_bss_module_weights_and_logs() -> None:
    features = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    step = TrainStep(features=features, logits=features, labels=torch.tensor([0, 1]), model=nn.Identity())
    term = BatchSpectralShrinkage(eta=0.5)
    assert term(step).item() == pytest.approx(0.5)
    assert term.stats() == {"sigma_min_sq": pytest.approx(1.0)}


# ----------------------------------------------------------------------------------------------------------------
# L2-SP


class TwoParam(nn.Module):
    """w (backbone, 1 number) and a 1x1 head: the smallest model with a backbone and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0]))
        self.norm = nn.BatchNorm1d(1)
        self.classifier = nn.Linear(1, 1)
        with torch.no_grad():
            self.classifier.weight.fill_(3.0)
            self.classifier.bias.fill_(-1.0)

    def get_classifier(self) -> nn.Module:
        return self.classifier


def test_l2sp_two_parameter_hand_value_and_gradient() -> None:
    model = TwoParam()
    term = L2SP(alpha=0.1, beta=0.01)
    term.adapt_model(model)
    with torch.no_grad():
        model.w.fill_(5.0)  # moved by 3 from the starting point 2
        model.norm.weight.fill_(0.0)  # moved by 1 from 1
    step = TrainStep(features=torch.zeros(1, 1), logits=torch.zeros(1, 1), labels=torch.zeros(1, dtype=torch.long),
                     model=model)
    value = term(step)
    # 0.1 * 1/2 (3^2 + 1^2 + 0 (norm bias)) + 0.01 * 1/2 (3^2 + (-1)^2)
    assert value.item() == pytest.approx(0.1 * 0.5 * 10 + 0.01 * 0.5 * 10)
    value.backward()
    assert model.w.grad.item() == pytest.approx(0.1 * 3.0)
    assert model.classifier.weight.grad.item() == pytest.approx(0.01 * 3.0)
    assert term.stats() == {"sp": pytest.approx(5.0), "head": pytest.approx(5.0)}


def test_l2sp_exclusions_and_anchor_buffers() -> None:
    model = TwoParam()
    term = L2SP(exclude_norm=True)
    term.adapt_model(model)
    assert term._names == ["w"]
    term = L2SP(exclude_bias=True)
    term.adapt_model(model)
    assert term._names == ["w", "norm.weight"]
    # the starting point is state (checkpointed) and follows .to()
    assert set(term.state_dict()) == {"anchor__w", "anchor__norm__weight"}
    assert term.to(torch.float64).anchor__w.dtype == torch.float64
    with torch.no_grad():
        model.w.add_(1.0)
    assert term.anchor__w.item() == 2.0  # a snapshot, not a view


def test_l2sp_functional_example() -> None:
    w, w0 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    assert Fn.l2_sp_penalty([w], [w0]).item() == pytest.approx(0.5 * (1 + 9))
    assert Fn.l2_penalty([w]).item() == pytest.approx(0.5 * (1 + 4 + 0.25))
    with pytest.raises(ValueError, match="shape"):
        Fn.l2_sp_penalty([w], [w0[:2]])


# ----------------------------------------------------------------------------------------------------------------
# DELTA


def test_delta_penalty_matches_numpy_with_known_attention() -> None:
    rng = np.random.default_rng(0)
    fm = rng.normal(size=(2, 3, 4))  # B=2, C=3, S=4
    fm0 = rng.normal(size=(2, 3, 4))
    a = np.array([0.5, 0.3, 0.2])
    expected = 0.5 * sum(3 * a[c] * np.sum((fm[b, c] - fm0[b, c]) ** 2) / 4 for b in range(2) for c in range(3))
    value = Fn.delta_penalty(torch.tensor(fm), torch.tensor(fm0), torch.tensor(a))
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)
    mean = Fn.delta_penalty(torch.tensor(fm), torch.tensor(fm0), torch.tensor(a), batch_reduction="mean")
    np.testing.assert_allclose(mean.item(), expected / 2, rtol=1e-12)
    uniform = Fn.delta_penalty(torch.tensor(fm), torch.tensor(fm0))  # a = 1/C: mean over positions
    np.testing.assert_allclose(uniform.item(), 0.5 * np.sum((fm - fm0) ** 2) / 4, rtol=1e-12)
    plain = Fn.delta_penalty(torch.tensor(fm), torch.tensor(fm0), normalize=False)  # TLlib's feature_map
    np.testing.assert_allclose(plain.item(), 0.5 * np.sum((fm - fm0) ** 2), rtol=1e-12)


def test_delta_penalty_gradcheck_and_source_gets_no_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    fm = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    fm0 = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.softmax(torch.randn(3, dtype=torch.float64, generator=g), 0)
    assert gradcheck(lambda x: Fn.delta_penalty(x, fm0, a), (fm,))
    Fn.delta_penalty(fm, fm0, a).backward()
    assert fm0.grad is None


def test_channel_attention_matches_numpy() -> None:
    increase = np.array([0.1, 0.5, -0.2, 0.0])
    z = (increase - increase.mean()) / increase.std()  # population std, as TLlib
    expected = np.exp(z / 5) / np.exp(z / 5).sum()
    np.testing.assert_allclose(Fn.channel_attention(torch.tensor(increase)).numpy(), expected, rtol=1e-12)
    flat = Fn.channel_attention(torch.zeros(4, dtype=torch.float64))
    np.testing.assert_allclose(flat.numpy(), np.full(4, 0.25))


def _tiny(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()


@pytest.mark.parametrize("name", ["resnet18", TINY_BACKBONE, "test_vit"])
def test_layer_loss_increase_batched_equals_one_channel_at_a_time(name: str) -> None:
    model = _tiny(name)
    size = model.pretrained_cfg["input_size"][-1] if name == "test_vit" else 32
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2])
    head = model.get_classifier()
    layer = [e["module"] for e in model.feature_info][-2]
    batched = layer_loss_increase(model, head, layer, images, labels, chunk=7)
    single = layer_loss_increase(model, head, layer, images, labels, chunk=1)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)

    # channel 0 by hand: zero it in the layer's output and compare the loss
    def zero_first(module, args, output):
        out = output.clone()
        if out.dim() == 3:
            out[:, getattr(model, "num_prefix_tokens", 0):, 0] = 0
        else:
            out[:, 0] = 0
        return out

    with torch.no_grad():
        base = nn.functional.cross_entropy(model(images), labels)
        handle = model.get_submodule(layer).register_forward_hook(zero_first)
        ablated = nn.functional.cross_entropy(model(images), labels)
        handle.remove()
    assert batched[0].item() == pytest.approx((ablated - base).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "test_vit"])
def test_delta_builds_on_timm_cnn_and_vit(name: str) -> None:
    model = _tiny(name).train()
    size = model.pretrained_cfg["input_size"][-1] if name == "test_vit" else 32
    term = DELTA(beta=0.0, attention="ablation", attention_samples=4, attention_chunk=64)
    term.adapt_model(model)
    assert list(term.needs_feature_maps) == [e["module"] for e in model.feature_info][-4:]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0])
    term.setup(model, [(images, labels)])
    sizes = term.attention_sizes.tolist()
    assert sizes == [e["num_chs"] for e in model.feature_info][-4:]
    for part in torch.split(term.attention_weights, sizes):
        assert part.sum().item() == pytest.approx(1.0, abs=1e-5) and (part > 0).all()
    model.eval()  # same weights and mode as the frozen source: nothing to penalise
    assert term(_step(model, images, labels, term.needs_feature_maps)).item() == pytest.approx(0.0, abs=1e-6)
    model.train()
    with torch.no_grad():  # move the trained network away from the source: the term grows and has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    value = term(_step(model, images, labels, term.needs_feature_maps))
    assert value.item() > 0
    value.backward()
    first_conv = next(p for n, p in model.named_parameters() if p.dim() == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in term.source.parameters()), "the frozen copy received a gradient"
    assert not any(p.requires_grad for p in term.source.parameters())


def test_delta_value_matches_manual_computation() -> None:
    model = _tiny("resnet18").train()
    term = DELTA(alpha=1.0, beta=0.0, layers=["layer3", "layer4"], attention="uniform")
    term.adapt_model(model)
    source = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    step = _step(model, images, torch.tensor([0, 1]), term.needs_feature_maps)
    with torch.no_grad(), capture_outputs(source, ["layer3", "layer4"]) as ref:
        source.forward_features(images)
    expected = 0.0
    for name in ["layer3", "layer4"]:
        diff = (step.feature_maps[name] - ref[name]).detach().double().numpy()
        expected += 0.5 * np.sum(diff ** 2) / (diff.shape[2] * diff.shape[3])
    np.testing.assert_allclose(term(step).item(), expected, rtol=1e-5)


def test_delta_source_stays_in_eval_mode_and_needs_maps() -> None:
    model = _tiny("resnet18")
    term = DELTA(layers=["layer4"], attention="uniform")
    term.adapt_model(model)
    term.train()
    assert term.training and not term.source.training
    step = _step(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))  # no maps captured
    with pytest.raises(ValueError, match="capture_outputs"):
        term(step)


def test_delta_attention_file_round_trip(tmp_path) -> None:
    model = _tiny("resnet18")
    images, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 0])
    term = DELTA(layers=["layer3", "layer4"], attention_samples=4, attention_chunk=128)
    term.adapt_model(model)
    term.setup(model, [(images, labels)])
    torch.save(term.artifacts(), tmp_path / "delta.pt")
    loaded = DELTA(layers=["layer3", "layer4"], attention_file=str(tmp_path / "delta.pt"))
    assert not loaded.needs_setup_pass
    loaded.adapt_model(model)
    loaded.setup(model, None)
    torch.testing.assert_close(loaded.attention_weights, term.attention_weights)
    wrong = DELTA(layers=["layer4"], attention_file=str(tmp_path / "delta.pt"))
    wrong.adapt_model(model)
    with pytest.raises(ValueError, match="does not match"):
        wrong.setup(model, None)


# ----------------------------------------------------------------------------------------------------------------
# Co-Tuning


def test_class_relationship_matches_numpy_and_rows_sum_to_one() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(9, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1])
    expected = np.stack([probs[labels == t].mean(0) for t in range(3)])
    relationship = Fn.class_relationship(torch.tensor(probs), torch.tensor(labels), 3)
    np.testing.assert_allclose(relationship.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(relationship.sum(1).numpy(), np.ones(3), rtol=1e-12)
    with pytest.raises(ValueError, match="no image"):
        Fn.class_relationship(torch.tensor(probs), torch.tensor(labels), 4)


def test_co_tuning_loss_matches_numpy_and_gradcheck() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 5))
    relationship = rng.dirichlet(np.ones(5), size=3)
    labels = np.array([2, 0, 1, 2])
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = np.mean([-np.sum(relationship[labels[b]] * log_p[b]) for b in range(4)])
    value = Fn.co_tuning_loss(torch.tensor(logits), torch.tensor(labels), torch.tensor(relationship))
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)
    x = torch.tensor(logits, requires_grad=True)
    assert gradcheck(lambda s: Fn.co_tuning_loss(s, torch.tensor(labels), torch.tensor(relationship)), (x,))


def test_co_tuning_loss_on_soft_targets_mixes_the_relationship_rows() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 5))
    relationship = rng.dirichlet(np.ones(5), size=3)
    targets = rng.dirichlet(np.ones(3), size=4)  # (B, C_t) soft targets
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    mixed = [sum(targets[b, c] * relationship[c] for c in range(3)) for b in range(4)]  # q_b = sum_c t_bc R[c]
    expected = np.mean([-np.sum(mixed[b] * log_p[b]) for b in range(4)])
    value = Fn.co_tuning_loss(torch.tensor(logits), None, torch.tensor(relationship), targets=torch.tensor(targets))
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)
    # Linear in the target: a mixup of two labels gives the same mix of their losses.
    lam, labels = 0.7, torch.tensor([2, 0, 1, 2])
    one_hot = nn.functional.one_hot(labels, 3).double()
    r, s = torch.tensor(relationship), torch.tensor(logits)
    mix = Fn.co_tuning_loss(s, labels, r, targets=lam * one_hot + (1 - lam) * one_hot.flip(0))
    torch.testing.assert_close(mix, lam * Fn.co_tuning_loss(s, labels, r) + (1 - lam) * Fn.co_tuning_loss(
        s, labels.flip(0), r), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, C\) = \(4, 3\)"):
        Fn.co_tuning_loss(s, labels, r, targets=torch.full((4, 5), 0.2, dtype=torch.float64))


def test_co_tuning_module_relationship_from_pretrained_predictions() -> None:
    model = _tiny("resnet18")
    source = nn.Linear(model.num_features, 7)
    term = CoTuning(weight=2.0)
    term.attach_source_head(source)
    term.adapt_model(model)
    assert term.source_head is not source and all(p.requires_grad for p in term.source_head.parameters())
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model.train()
    term.setup(model, [(images[:3], labels[:3]), (images[3:], labels[3:])])
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        probs = torch.softmax(source(model.forward_head(model.forward_features(images), pre_logits=True)), 1)
    expected = torch.stack([probs[labels == t].mean(0) for t in range(3)])
    torch.testing.assert_close(term.relationship, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(term.relationship.sum(1), torch.ones(3))
    step = _step(model, images, labels)
    expected_loss = 2.0 * Fn.co_tuning_loss(term.source_head(step.features), labels, term.relationship)
    torch.testing.assert_close(term(step), expected_loss)
    targets = 0.6 * nn.functional.one_hot(labels, 3).float() + 0.4 * nn.functional.one_hot(labels.flip(0), 3).float()
    expected_mixed = 2.0 * Fn.co_tuning_loss(term.source_head(step.features), None, term.relationship, targets=targets)
    torch.testing.assert_close(term(dataclasses.replace(step, targets=targets)), expected_mixed)


@pytest.mark.parametrize("cls", [CoTuning, LearningWithoutForgetting])
def test_the_given_source_head_is_not_the_terms_state(cls: type) -> None:
    model = _tiny("resnet18")
    source = nn.Linear(model.num_features, 7)  # trainable, as a plain loop's model.get_classifier() is
    term = cls()
    term.attach_source_head(source)
    term.adapt_model(model)
    assert not any(p is q for p in term.parameters() for q in source.parameters())  # only the copy is optimised
    state = term.state_dict()
    assert not [k for k in state if k.startswith("_given_head")] and "source_head.weight" in state
    # checkpoints written when the given head was registered hold it too: they still load, strictly
    old = {**state, "_given_head.weight": source.weight.detach(), "_given_head.bias": source.bias.detach()}
    again = cls()
    again.attach_source_head(source)
    again.adapt_model(model)
    again.load_state_dict(old)
    torch.testing.assert_close(again.source_head.weight, term.source_head.weight)


def test_co_tuning_without_source_head_says_what_to_do() -> None:
    term = CoTuning()
    term.attach_source_head(None)
    with pytest.raises(ValueError, match="source_head="):
        term.adapt_model(_tiny("resnet18"))


# ----------------------------------------------------------------------------------------------------------------
# LwF


def test_distillation_loss_matches_numpy_kl_and_gradcheck() -> None:
    rng = np.random.default_rng(3)
    student, teacher, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), 3.0

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(teacher / t), softmax(student / t)
    expected = np.sum(p * (np.log(p) - np.log(q))) / 4
    value = Fn.distillation_loss(torch.tensor(student), torch.tensor(teacher), t)
    np.testing.assert_allclose(value.item(), expected, rtol=1e-12)
    x = torch.tensor(student, requires_grad=True)
    assert gradcheck(lambda s: Fn.distillation_loss(s, torch.tensor(teacher), t), (x,))


def test_lwf_cached_teacher_equals_online_teacher_on_the_same_view() -> None:
    model = _tiny("resnet18")
    source = nn.Linear(model.num_features, 5)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    terms = {}
    for teacher in ("cached", "online"):
        term = LearningWithoutForgetting(teacher=teacher)
        term.attach_source_head(source)
        term.adapt_model(model)
        term.setup(model, [(images[:4], labels[:4]), (images[4:], labels[4:])])
        terms[teacher] = term.eval()
    assert terms["cached"].needs_indices and not terms["online"].needs_indices
    assert terms["cached"].teacher_logits.shape == (6, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    order = torch.tensor([4, 1, 5])
    model.eval()
    step = _step(model, images[order], labels[order], indices=order)
    torch.testing.assert_close(terms["cached"](step), terms["online"](step), rtol=1e-5, atol=1e-7)
    assert terms["cached"](step).item() > 0
    with pytest.raises(ValueError, match="indices"):
        terms["cached"](_step(model, images[order], labels[order]))


# ----------------------------------------------------------------------------------------------------------------
# StochNorm


def test_stochastic_batch_norm_matches_numpy_per_channel_mix() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, size=(5, 3, 2, 2))
    mean0, var0 = np.array([1.0, 0.0, -1.0]), np.array([2.0, 1.0, 0.5])
    gamma, beta, mask = np.array([1.0, 2.0, 0.5]), np.array([0.0, 1.0, -1.0]), np.array([1, 0, 1])
    eps, momentum = 1e-5, 0.1
    running_mean, running_var = torch.tensor(mean0), torch.tensor(var0)
    y = Fn.stochastic_batch_norm(torch.tensor(x), running_mean, running_var, torch.tensor(gamma), torch.tensor(beta),
                                 torch.tensor(mask), momentum, eps).numpy()
    axes = (0, 2, 3)
    bm, bv = x.mean(axes), x.var(axes)
    s = mask[None, :, None, None]
    z0 = (x - mean0[None, :, None, None]) / np.sqrt(var0[None, :, None, None] + eps)
    z1 = (x - bm[None, :, None, None]) / np.sqrt(bv[None, :, None, None] + eps)
    expected = gamma[None, :, None, None] * ((1 - s) * z0 + s * z1) + beta[None, :, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-10)
    n = x.size / 3  # running statistics updated from the batch as BatchNorm does (unbiased variance)
    np.testing.assert_allclose(running_mean.numpy(), 0.9 * mean0 + 0.1 * bm, rtol=1e-12)
    np.testing.assert_allclose(running_var.numpy(), 0.9 * var0 + 0.1 * bv * n / (n - 1), rtol=1e-12)


@pytest.mark.parametrize(("p", "reference_mode"), [(1.0, "train"), (0.0, "eval")])
def test_stochnorm_extremes_equal_plain_batchnorm(p: float, reference_mode: str) -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    plain = copy.deepcopy(bn).train(reference_mode == "train")
    updated = copy.deepcopy(bn).train()  # a BatchNorm after one training forward on x
    stoch = copy.deepcopy(bn).train()
    assert convert_stochnorm(stoch, p) == 1
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(stoch(x), plain(x))
    updated(x)
    # the batch branch always runs, so the moving statistics are updated exactly as BatchNorm's (also for p = 0)
    torch.testing.assert_close(stoch.running_mean, updated.running_mean)
    torch.testing.assert_close(stoch.running_var, updated.running_var)
    assert int(stoch.num_batches_tracked) == 1
    torch.testing.assert_close(stoch.eval()(x), updated.eval()(x))


def test_stochnorm_on_timm_keeps_state_dict_and_activation() -> None:
    model = _tiny(TINY_BACKBONE)
    keys = list(model.state_dict())
    reference = copy.deepcopy(model)
    term = StochNorm(p=0.5)
    term.adapt_model(model)
    assert term.stats()["layers"] == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) > 0
    assert list(model.state_dict()) == keys  # a StochNorm checkpoint loads into the plain model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))  # eval: ordinary BatchNorm (with its act)
        outputs = []
        for seed in (1, 1, 2):  # the same starting statistics each time: a forward in train mode updates them
            torch.manual_seed(seed)
            outputs.append(copy.deepcopy(model).train()(x))
        a, b, c = outputs
    torch.testing.assert_close(a, b)  # the mask comes from torch's seeded generator
    assert not torch.allclose(a, c)
    name, bn_act = next((n, m) for n, m in model.named_modules() if hasattr(m, "act") and isinstance(m, nn.BatchNorm2d))
    assert not isinstance(bn_act.act, nn.Identity)
    assert convert_stochnorm(bn_act, 1.0) == 1
    plain = copy.deepcopy(reference.get_submodule(name))
    y = torch.randn(3, bn_act.num_features, 4, 4)
    torch.testing.assert_close(bn_act.train()(y), plain.train()(y))  # p = 1: BatchNormAct2d's own train forward


def test_stochastic_batch_norm_gradients() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    gamma = torch.rand(3, dtype=torch.float64, generator=g).requires_grad_(True)
    beta = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_(True)
    mask = torch.tensor([1.0, 0.0, 1.0])

    def fn(x, gamma, beta):
        return Fn.stochastic_batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                                        gamma, beta, mask, 0.1, 1e-5)

    assert gradcheck(fn, (x, gamma, beta))
    # all channels on the batch branch: the gradient is BatchNorm's training-mode gradient
    ones = torch.ones(3)
    ours = torch.autograd.grad(Fn.stochastic_batch_norm(x, torch.zeros(3, dtype=torch.float64),
                                                        torch.ones(3, dtype=torch.float64), gamma, beta, ones, 0.1,
                                                        1e-5).pow(2).sum(), x)[0]
    reference = torch.autograd.grad(nn.functional.batch_norm(x, None, None, gamma, beta, True, 0.1, 1e-5).pow(2).sum(),
                                    x)[0]
    torch.testing.assert_close(ours, reference)


def test_stochastic_batch_norm_moving_branch_gradient_uses_the_statistics_before_the_update() -> None:
    # Moving branch only (s = 0): y = gamma (x - mu_run) / sqrt(var_run + eps) + beta with the statistics from before
    # this batch, so dy/dx = gamma / sqrt(var_run + eps) = 2 / sqrt(1 + 1e-5) = 1.99999 per element, although the call
    # moves var_run towards the batch variance (~2.25). Calling batch_norm with the moving statistics and then with
    # the batch statistics (TLlib's order) makes the first branch's backward read the updated var_run instead.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=g) * 1.5 + 0.3).requires_grad_(True)
    gamma, beta = torch.full((3,), 2.0, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = Fn.stochastic_batch_norm(x, running_mean, running_var, gamma, beta, torch.zeros(3), 0.1, 1e-5)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert not torch.allclose(running_var, torch.ones(3, dtype=torch.float64))  # the moving statistics did move
    torch.testing.assert_close(grad, torch.full_like(x, 2.0 / (1.0 + 1e-5) ** 0.5), rtol=1e-12, atol=0)

    mean0, var0 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    z0 = nn.functional.batch_norm(x, mean0, var0, gamma, beta, False, 0.1, 1e-5)
    nn.functional.batch_norm(x, mean0, var0, gamma, beta, True, 0.1, 1e-5)  # updates mean0, var0 in place
    (stale,) = torch.autograd.grad(z0.sum(), x)
    error = (stale[0, :, 0, 0] / grad[0, :, 0, 0] - 1).abs()
    assert (error > 0.01).all()  # the stale gradient is off by several percent at this shift
