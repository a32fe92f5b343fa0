"""The regularizer / criterion contract, checked over every registered name (as timm does over ``list_models()``).

A method registered in ``regtune.regularizers`` is covered without touching this file: the cases come from its
class's ``contract_kwargs`` (the main construction, then variants) and the gradient check from its
``gradient_reaches`` (see :class:`regtune.regularizers.Regularizer`). Each check is a plain function
(``CHECKS``) that the parametrized tests here, and the worked example of ``docs/extend/regularizers.md``, call.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regtune.regularizers import (
    CosineClassifier,
    LMSoftmax,
    TrainStep,
    UnknownNameError,
    capture_outputs,
    create_criterion,
    create_regularizer,
    list_criteria,
    list_regularizers,
    regularizer_class,
    soft_target_refusals,
)
from tests.conftest import TINY_BACKBONE
from tests.regularizers.tolerance import DTYPES, TOL

NUM_CLASSES = 3
IMG = 8
SOURCE_CLASSES = 5
GRADIENT_TARGETS = ("features", "head", "model", "none")


def _case_id(name: str, kwargs: dict[str, Any]) -> str:
    return name if not kwargs else name + "[" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + "]"


def contract_cases(name: str) -> list[dict[str, Any]]:
    """The constructor kwargs the class registered under ``name`` declares for the contract test."""
    return [dict(kwargs) for kwargs in regularizer_class(name).contract_kwargs]


def _cases(test: str) -> list[Any]:
    return [pytest.param(name, kwargs, id=_case_id(name, kwargs))
            for name in list_regularizers() for kwargs in contract_cases(name)]


def cases(test: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("name", "kwargs"), _cases(test))


# ----------------------------------------------------------------------------------------------------------------
# Set-up: a tiny model with the timm contract, a loader with every class present, one training step


class TinyBackbone(nn.Module):
    """conv-BN-ReLU-GAP-linear with timm's contract (get_classifier, forward_features, forward_head(pre_logits),
    pretrained_cfg['classifier']); much faster than timm's test model in float64 on CPU."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.classifier = nn.Linear(width, num_classes)
        self.num_features = width
        self.pretrained_cfg = {"classifier": "classifier"}
        self.feature_info = [{"module": "conv", "num_chs": width, "reduction": 1},
                             {"module": "bn", "num_chs": width, "reduction": 1}]

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return TinyBackbone().to(dtype)


def make_loader(dtype: torch.dtype = torch.float32, batches: int = 2, batch_size: int = 6) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    n = batches * batch_size
    images = torch.randn(n, 3, IMG, IMG, generator=generator, dtype=dtype)
    labels = torch.arange(n) % NUM_CLASSES  # every batch holds every class
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def make_step(model: torch.nn.Module, dtype: torch.dtype, batch: int = 6, step: int = 0, epoch: int = 0,
              seed: int = 2, maps: tuple[str, ...] = ()) -> TrainStep:
    """Penultimate features of random images (a leaf that requires grad) and logits from the model's head.

    The images, their positions ``0..B-1`` in the loader of :func:`make_loader`, and the outputs of the modules named
    in ``maps`` (attached to the model's parameters) come with it.
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMG, IMG, generator=generator, dtype=dtype)
    mode = model.training
    model.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    with capture_outputs(model, maps) as feature_maps:
        model.forward_features(images)
    model.train(mode)
    features = features.detach().clone().requires_grad_(True)
    logits = model.get_classifier()(features)
    labels = torch.arange(batch) % NUM_CLASSES
    return TrainStep(features=features, logits=logits, labels=labels, model=model, global_step=step, epoch=epoch,
                     total_steps=20, feature_maps=dict(feature_maps), images=images, indices=torch.arange(batch))


def step_for(term: torch.nn.Module, model: torch.nn.Module, dtype: torch.dtype, **kwargs: Any) -> TrainStep:
    """:func:`make_step` with the feature maps that ``term`` asks for."""
    return make_step(model, dtype, maps=term.needs_feature_maps, **kwargs)


def build(name: str, kwargs: dict[str, Any], model: torch.nn.Module, dtype: torch.dtype,
          setup: bool = True) -> torch.nn.Module:
    term = create_regularizer(name, **kwargs)
    if term.needs_source_head:
        torch.manual_seed(3)
        term.attach_source_head(nn.Linear(model.num_features, SOURCE_CLASSES))
    term.adapt_model(model)  # as the trainer does when it is built
    if dtype != torch.float32:
        term.to(dtype)  # as the trainer does when the LightningModule is moved to the model's dtype
    if setup:
        loader = make_loader(next(model.parameters()).dtype) if term.needs_setup_pass else None
        term.setup(model, loader)
    return term


def mixed_targets(labels: torch.Tensor, lam: float = 0.7) -> torch.Tensor:
    """Soft targets as mixup makes them: lam one_hot(y_b) + (1 - lam) one_hot(y_{B-1-b}) (timm's flipped batch)."""
    one_hot = nn.functional.one_hot(labels, NUM_CLASSES).double()
    return (lam * one_hot + (1 - lam) * one_hot.flip(0)).float()


def other_labels(labels: torch.Tensor) -> list[torch.Tensor]:
    """Labels that disagree with ``labels``: each class moved by one, and a permutation of the batch."""
    return [(labels + 1) % NUM_CLASSES, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(8))]]


def assert_scalar(value: torch.Tensor, dtype: torch.dtype) -> None:
    assert isinstance(value, torch.Tensor)
    assert value.dim() == 0, value.shape
    assert value.dtype == dtype
    assert torch.isfinite(value), value


# ----------------------------------------------------------------------------------------------------------------
# Regularizers: the checks (plain functions, reused by tests/regularizers/test_extend_example.py)


def check_declarations(name: str) -> None:
    """The class-level declarations are well-formed: a known gradient target, constructor kwargs it accepts."""
    cls = regularizer_class(name)
    assert cls.gradient_reaches in GRADIENT_TARGETS, (name, cls.gradient_reaches)
    assert isinstance(cls.contract_kwargs, tuple) and cls.contract_kwargs, name
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for kwargs in cls.contract_kwargs:
        assert isinstance(kwargs, dict) and set(kwargs) <= params, (name, kwargs)
    assert cls.setup_transform in ("eval", "train"), name
    assert type(cls.accepts_soft_targets) is bool and isinstance(cls.soft_targets_note, str), name
    assert cls.accepts_soft_targets or cls.soft_targets_note.strip(), f"{name}: a refusal needs a soft_targets_note"


def check_forward_is_finite_scalar_in_input_dtype(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    model = make_model(dtype)
    term = build(name, kwargs, model, dtype)
    for i in range(3):
        assert_scalar(term(step_for(term, model, dtype, step=i, seed=10 + i)), dtype)


def check_gradient_reaches_what_the_term_uses(name: str, kwargs: dict[str, Any]) -> None:
    model = make_model()
    term = build(name, kwargs, model, torch.float32)
    where = term.gradient_reaches
    if where == "none":
        value = term(step_for(term, model, torch.float32))
        assert value.item() == 0.0 and not value.requires_grad
        return
    with torch.no_grad():  # move away from the starting point that L2-SP / DELTA measure against
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    step = step_for(term, model, torch.float32)
    head = model.get_classifier()
    model.zero_grad(set_to_none=True)
    term(step).backward()
    head_ids = {id(p) for p in head.parameters()}
    backbone = [p.grad for p in model.parameters() if id(p) not in head_ids and p.grad is not None]
    grads = {"head": [head.weight.grad] if head.weight.grad is not None else [], "model": backbone,
             "features": [step.features.grad] if step.features.grad is not None else []}[where]
    assert grads, f"{name}: no gradient reached the {where}"
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_state_dict_round_trips_into_fresh_instance(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    model = make_model(dtype)
    term = build(name, kwargs, model, dtype)
    for i in range(2):  # build some running state (FMR window, AdaRand running means and Adam moments, ...)
        term(step_for(term, model, dtype, step=i, seed=20 + i))
    saved = copy.deepcopy(term.state_dict())

    fresh = build(name, kwargs, model, dtype, setup=False)  # not set up: lazy shapes must come from the checkpoint
    fresh.load_state_dict(copy.deepcopy(saved))
    for key, value in _tensors(saved).items():
        loaded = fresh.state_dict()[key]
        assert loaded.shape == value.shape and loaded.dtype == value.dtype, key
        torch.testing.assert_close(loaded, value, rtol=0, atol=0, equal_nan=True, msg=key)

    step = step_for(term, model, dtype, step=2, seed=30)
    torch.manual_seed(1234)
    expected = term(step)
    torch.manual_seed(1234)
    actual = fresh(step_for(term, model, dtype, step=2, seed=30))
    torch.testing.assert_close(actual, expected, **TOL[dtype])
    # ...and both end in the same state (e.g. the same AdaRand Adam step on mu).
    after_term, after_fresh = _tensors(term.state_dict()), _tensors(fresh.state_dict())
    assert after_term.keys() == after_fresh.keys()
    for key in after_term:
        torch.testing.assert_close(after_fresh[key], after_term[key], **TOL[dtype], equal_nan=True, msg=key)
    assert fresh.stats().keys() == term.stats().keys()


def check_to_float64_moves_floating_buffers(name: str, kwargs: dict[str, Any]) -> None:
    model = make_model()
    term = build(name, kwargs, model, torch.float32)
    term(step_for(term, model, torch.float32))
    before = {k: v.dtype for k, v in _tensors(term.state_dict()).items()}
    assert term.to(torch.float64) is term
    for key, tensor in _tensors(term.state_dict()).items():
        if before[key].is_floating_point:
            assert tensor.dtype == torch.float64, key
        else:
            assert tensor.dtype == before[key], key


def check_forward_after_to_float64(name: str, kwargs: dict[str, Any]) -> None:
    model = make_model()
    term = build(name, kwargs, model, torch.float32)
    term(step_for(term, model, torch.float32))  # running state created in float32
    term.to(torch.float64)
    model.to(torch.float64)
    for i in range(2):
        assert_scalar(term(step_for(term, model, torch.float64, step=1 + i, seed=40 + i)), torch.float64)


def assert_stat_value(key: Any, value: Any, device: torch.device) -> None:
    """A ``stats()`` entry: a str key; a finite Python float, or a detached finite 0-dim floating tensor on the
    training device (read on the host once per epoch, not at every step)."""
    assert isinstance(key, str), (key, value)
    if isinstance(value, torch.Tensor):
        assert value.dim() == 0 and value.is_floating_point() and not value.requires_grad, (key, value)
        assert value.device == device and bool(torch.isfinite(value)), (key, value)
    else:
        assert type(value) is float and np.isfinite(value), (key, value)


def check_stats_are_floats_or_scalar_tensors(name: str, kwargs: dict[str, Any]) -> None:
    model = make_model()
    term = build(name, kwargs, model, torch.float32)
    assert isinstance(term.stats(), dict)  # before any forward as well
    step = step_for(term, model, torch.float32)
    term(step)
    stats = term.stats()
    assert isinstance(stats, dict)
    for key, value in stats.items():
        assert_stat_value(key, value, step.features.device)


def check_batch_size_one_works_or_raises_clearly(name: str, kwargs: dict[str, Any]) -> None:
    model = make_model()
    term = build(name, kwargs, model, torch.float32)
    step = step_for(term, model, torch.float32, batch=1)
    try:
        value = term(step)
    except (ValueError, RuntimeError) as err:  # a clear error names the batch
        assert "batch" in str(err).lower(), str(err)
        return
    assert_scalar(value, torch.float32)
    if term.gradient_reaches != "none":
        value.backward()


def check_unknown_argument_lists_valid_ones(name: str, kwargs: dict[str, Any]) -> None:
    valid = [p for p in inspect.signature(regularizer_class(name).__init__).parameters if p != "self"]
    with pytest.raises(UnknownNameError) as info:
        create_regularizer(name, **kwargs, no_such_argument=1)
    message = str(info.value)
    assert "no_such_argument" in message and "valid" in message
    for param in valid:
        assert param in message, (param, message)


def check_param_group_options(name: str, kwargs: dict[str, Any]) -> None:
    options = create_regularizer(name, **kwargs).param_group_options()
    assert options is None or isinstance(options, dict), name


def check_architecture_changes_are_declared(name: str, kwargs: dict[str, Any]) -> None:
    """A term whose adapt_model changes the model (its modules' classes or its outputs in train or eval mode)
    declares ``changes_architecture``: a finished run's model is rebuilt by calling exactly those terms' adapt_model.
    A term that declares it must change something."""
    torch.manual_seed(0)
    model, images = make_model(), torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    before = ([type(m) for m in model.modules()], sorted(model.state_dict()))

    def outputs() -> list[torch.Tensor]:
        result = []
        for mode in (True, False):
            state = {k: v.clone() for k, v in model.state_dict().items()}  # train mode moves BN statistics
            model.train(mode)
            torch.manual_seed(6)
            with torch.no_grad():
                result.append(model(images))
            model.load_state_dict(state)
        return result

    reference = outputs()
    build(name, kwargs, model, torch.float32, setup=False)
    changed = ([type(m) for m in model.modules()], sorted(model.state_dict())) != before or any(
        not torch.equal(a, b) for a, b in zip(reference, outputs()))
    assert changed == create_regularizer(name, **kwargs).changes_architecture, (name, changed)


def check_soft_targets_are_declared_truthfully(name: str, kwargs: dict[str, Any]) -> None:
    """``accepts_soft_targets`` is a bool; a refusal says why; a term that accepts mixed batches does not read the
    labels when the step holds soft targets (its value is the same whatever the labels say)."""
    model = make_model()
    term = build(name, kwargs, model, torch.float32)
    assert type(term.accepts_soft_targets) is bool, name
    if not term.accepts_soft_targets:
        assert term.soft_targets_note.strip(), f"{name}: a refusal needs a soft_targets_note"
        refusal = f"{name} does not accept mixed (soft) targets: {term.soft_targets_note}"
        assert soft_target_refusals([term]) == [refusal]
        return
    assert soft_target_refusals([term]) == []
    step = step_for(term, model, torch.float32, step=1, seed=50)
    mixed = dataclasses.replace(step, targets=mixed_targets(step.labels))
    torch.manual_seed(9)  # the random-feature terms draw their references: the same draws for every call
    expected = copy.deepcopy(term)(mixed)
    assert_scalar(expected, torch.float32)
    for labels in other_labels(step.labels):
        torch.manual_seed(9)
        value = copy.deepcopy(term)(dataclasses.replace(mixed, labels=labels))
        assert torch.equal(value, expected), f"{name} declares accepts_soft_targets but reads labels under mixup"


# Every check of one registered term, as (check, whether it takes a dtype): a term passes the contract when each
# passes for each of its contract_kwargs (and, where it takes one, each dtype of DTYPES).
CHECKS: list[tuple[Callable[..., None], bool]] = [
    (check_forward_is_finite_scalar_in_input_dtype, True),
    (check_gradient_reaches_what_the_term_uses, False),
    (check_state_dict_round_trips_into_fresh_instance, True),
    (check_to_float64_moves_floating_buffers, False),
    (check_forward_after_to_float64, False),
    (check_stats_are_floats_or_scalar_tensors, False),
    (check_batch_size_one_works_or_raises_clearly, False),
    (check_unknown_argument_lists_valid_ones, False),
    (check_param_group_options, False),
    (check_architecture_changes_are_declared, False),
    (check_soft_targets_are_declared_truthfully, False),
]


# ----------------------------------------------------------------------------------------------------------------
# Regularizers: the tests, one per check, over every registered name and its contract_kwargs


def test_every_registered_name_is_covered() -> None:
    names = list_regularizers()
    assert names == sorted(names) and len(names) == len(set(names)) and names
    assert {p.values[0] for p in _cases("any")} == set(names)


@pytest.mark.parametrize("name", list_regularizers())
def test_declarations(name: str) -> None:
    check_declarations(name)


@cases("test_architecture_changes_are_declared")
def test_architecture_changes_are_declared(name: str, kwargs: dict[str, Any]) -> None:
    check_architecture_changes_are_declared(name, kwargs)


@cases("test_forward_is_finite_scalar_in_input_dtype")
@DTYPES
def test_forward_is_finite_scalar_in_input_dtype(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    check_forward_is_finite_scalar_in_input_dtype(name, kwargs, dtype)


@cases("test_gradient_reaches_what_the_term_uses")
def test_gradient_reaches_what_the_term_uses(name: str, kwargs: dict[str, Any]) -> None:
    check_gradient_reaches_what_the_term_uses(name, kwargs)


@cases("test_state_dict_round_trips_into_fresh_instance")
@DTYPES
def test_state_dict_round_trips_into_fresh_instance(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    check_state_dict_round_trips_into_fresh_instance(name, kwargs, dtype)


@cases("test_to_float64_moves_floating_buffers")
def test_to_float64_moves_floating_buffers(name: str, kwargs: dict[str, Any]) -> None:
    check_to_float64_moves_floating_buffers(name, kwargs)


@cases("test_forward_after_to_float64")
def test_forward_after_to_float64(name: str, kwargs: dict[str, Any]) -> None:
    check_forward_after_to_float64(name, kwargs)


@cases("test_stats_are_floats_or_scalar_tensors")
def test_stats_are_floats_or_scalar_tensors(name: str, kwargs: dict[str, Any]) -> None:
    check_stats_are_floats_or_scalar_tensors(name, kwargs)


@cases("test_batch_size_one_works_or_raises_clearly")
def test_batch_size_one_works_or_raises_clearly(name: str, kwargs: dict[str, Any]) -> None:
    check_batch_size_one_works_or_raises_clearly(name, kwargs)


@cases("test_unknown_argument_lists_valid_ones")
def test_unknown_argument_lists_valid_ones(name: str, kwargs: dict[str, Any]) -> None:
    check_unknown_argument_lists_valid_ones(name, kwargs)


@cases("test_param_group_options")
def test_param_group_options(name: str, kwargs: dict[str, Any]) -> None:
    check_param_group_options(name, kwargs)


@cases("test_soft_targets_are_declared_truthfully")
def test_soft_targets_are_declared_truthfully(name: str, kwargs: dict[str, Any]) -> None:
    check_soft_targets_are_declared_truthfully(name, kwargs)


def test_checks_list_every_check() -> None:
    defined = {n for n, f in globals().items() if n.startswith("check_") and callable(f)} - {"check_declarations"}
    assert {check.__name__ for check, _ in CHECKS} == defined


# ----------------------------------------------------------------------------------------------------------------
# Criteria

CLASS_COUNTS = torch.tensor([7, 2, 4])  # training images per class of an imbalanced subset (NUM_CLASSES classes)


def build_criterion(name: str, model: nn.Module) -> nn.Module:
    """The criterion as the trainer prepares it: built, ``adapt_model``, then the training subset's class counts."""
    criterion = create_criterion(name)
    criterion.adapt_model(model)
    criterion.set_class_counts(CLASS_COUNTS)
    return criterion


@pytest.mark.parametrize("name", list_criteria())
@DTYPES
def test_criterion_is_finite_scalar(name: str, dtype: torch.dtype) -> None:
    model = make_model(dtype)
    criterion = build_criterion(name, model)
    step = make_step(model, dtype)
    value = criterion(step)
    assert_scalar(value, dtype)
    value.backward()
    assert step.features.grad is not None and torch.isfinite(step.features.grad).all()


@pytest.mark.parametrize("name", list_criteria())
def test_criterion_soft_targets_are_declared_truthfully(name: str) -> None:
    """A criterion that accepts mixed batches reads the soft targets, not the labels, when the step holds them."""
    model = make_model()
    criterion = build_criterion(name, model)
    assert type(criterion.accepts_soft_targets) is bool and isinstance(criterion.soft_targets_note, str)
    if not criterion.accepts_soft_targets:
        assert criterion.soft_targets_note.strip(), f"{name}: a refusal needs a soft_targets_note"
        refusal = f"{name} does not accept mixed (soft) targets: {criterion.soft_targets_note}"
        assert soft_target_refusals([criterion]) == [refusal]
        return
    step = make_step(model, torch.float32)
    mixed = dataclasses.replace(step, targets=mixed_targets(step.labels))
    expected = criterion(mixed)
    assert_scalar(expected, torch.float32)
    for labels in other_labels(step.labels):
        assert torch.equal(criterion(dataclasses.replace(mixed, labels=labels)), expected), name
    other_mix = criterion(dataclasses.replace(mixed, targets=mixed_targets(step.labels, lam=0.4)))
    assert not torch.allclose(other_mix, expected), f"{name}: the soft targets do not change the loss"


def test_criterion_unknown_argument() -> None:
    for name in list_criteria():
        with pytest.raises(UnknownNameError, match="no_such_argument"):
            create_criterion(name, no_such_argument=1)


def test_lm_softmax_adapt_model_installs_cosine_head_with_same_prototypes() -> None:
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=NUM_CLASSES).eval()
    old_head = model.get_classifier()
    prototypes = old_head.weight.detach().clone()
    criterion = LMSoftmax(s=4.0)
    criterion.adapt_model(model)

    head = model.get_classifier()
    assert isinstance(head, CosineClassifier) and head is not old_head
    assert getattr(model, model.pretrained_cfg["classifier"]) is head
    assert torch.equal(head.weight.detach(), prototypes)
    assert any(p is head.weight for p in model.parameters())

    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True).double().numpy()
        logits = model(images).numpy()
    w = prototypes.double().numpy()
    expected = 4.0 * (features / np.linalg.norm(features, axis=1, keepdims=True)) @ (
        w / np.linalg.norm(w, axis=1, keepdims=True)).T  # s * cos, no bias
    np.testing.assert_allclose(logits, expected, **TOL[torch.float32])

    # Adapting again only updates the scale.
    LMSoftmax(s=2.0).adapt_model(model)
    assert model.get_classifier() is head and head.s == 2.0


def test_lm_softmax_value_matches_numpy() -> None:
    model = make_model(torch.float64)
    criterion = LMSoftmax(s=3.0)
    criterion.adapt_model(model)
    step = make_step(model, torch.float64)
    f = step.features.detach().numpy()
    w = model.get_classifier().weight.detach().numpy()
    y = step.labels.numpy()
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    per_sample = [np.log(sum(np.exp(3.0 * (cos[b, j] - cos[b, y[b]])) for j in range(NUM_CLASSES) if j != y[b]))
                  for b in range(len(y))]
    expected = np.mean(per_sample) / 3.0
    np.testing.assert_allclose(float(criterion(step).detach()), expected, rtol=1e-10)


@pytest.mark.parametrize("name", list_criteria())
def test_criterion_stats_are_floats_or_scalar_tensors(name: str) -> None:
    model = make_model()
    criterion = build_criterion(name, model)
    assert criterion.stats() == {}  # nothing before the first forward
    step = make_step(model, torch.float32)
    criterion(step)
    for key, value in criterion.stats().items():
        assert_stat_value(key, value, step.features.device)


def test_lm_softmax_logs_the_margins_it_trains() -> None:
    model = make_model(torch.float64)
    criterion = LMSoftmax(s=3.0)
    criterion.adapt_model(model)
    step = make_step(model, torch.float64)
    criterion(step)
    f = step.features.detach().numpy()
    w = model.get_classifier().weight.detach().numpy()
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    y = step.labels.numpy()
    margins = [cos[b, y[b]] - max(cos[b, j] for j in range(NUM_CLASSES) if j != y[b]) for b in range(len(y))]
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    angle = min(np.degrees(np.arccos(np.clip(wn[i] @ wn[j], -1, 1))) for i in range(NUM_CLASSES)
                for j in range(NUM_CLASSES) if i != j)
    stats = criterion.stats()
    np.testing.assert_allclose([stats["margin_mean"], stats["margin_min"], stats["class_margin_deg"]],
                               [np.mean(margins), np.min(margins), angle], rtol=1e-9)
