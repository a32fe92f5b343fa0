"""The regularizer contract, the training-step record every term reads, and the registries of terms and criteria.

Imports nothing but ``torch`` (and the package's private ``_utils``): a user of another training loop can take a
regularizer without regtune's trainer.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from regtune.regularizers._utils import LazyShapeMixin, check_matching_matrices

__all__ = [
    "Criterion",
    "CrossEntropy",
    "Regularizer",
    "SourceHeadRegularizer",
    "TrainStep",
    "UnknownNameError",
    "create_criterion",
    "create_regularizer",
    "in_float32",
    "list_criteria",
    "list_regularizers",
    "register_criterion",
    "register_regularizer",
    "regularizer_class",
    "soft_cross_entropy",
    "soft_target_refusals",
]


@dataclass(frozen=True)
class TrainStep:
    """What one training step exposes to a criterion or regularizer.

    Args:
        features: Penultimate features ``forward_head(forward_features(x), pre_logits=True)``.
        logits: Classifier outputs.
        labels: Integer targets: each sample's own class. In a batch mixed by mixup / CutMix, each sample's own
            (unmixed) label; the truth is then ``targets``.
        model: The model being trained (backbone with its head).
        global_step: Global optimisation step (0-based) this batch will produce, counted over the whole run (the
            first update is 0). ``step`` is its former name, still accepted (deprecated).
        epoch: Current epoch (0-based).
        total_steps: Planned number of optimisation steps of the run, when known (for schedules inside a term).
        feature_maps: Last feature map ``forward_features(x)`` under ``"last"`` and, for the module names that terms
            list in ``needs_feature_maps``, those modules' outputs of this forward pass (see
            `regtune.regularizers.capture_outputs`).
        images: The input batch, for terms that run another network on it (DELTA's frozen source network).
        indices: Position of each sample in the training subset (``0..N-1``, the order of the set-up loader), for
            terms with per-sample state (LwF's cached teacher outputs); ``None`` unless a term sets ``needs_indices``.
        targets: Soft targets, set when the batch was mixed (mixup / CutMix): row b is sample b's class distribution
            (non-negative, summing to 1; not checked, as that would wait for the device every step), e.g.
            lambda one_hot(y_b) + (1 - lambda) one_hot(y_b'). ``None`` for an unmixed batch. Only terms that declare
            ``accepts_soft_targets`` run on a mixed batch, and they read ``targets``, not ``labels``, when it is set.

    Shape:
        features: (B, D). logits: (B, C). labels: (B,). images: (B, ...). indices: (B,). targets: (B, C).
    """

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    model: nn.Module
    global_step: int = 0
    epoch: int = 0
    total_steps: int | None = None
    feature_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    images: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    @property
    def step(self) -> int:
        """Deprecated name of `global_step`."""
        warnings.warn("TrainStep.step is deprecated: read TrainStep.global_step", DeprecationWarning, stacklevel=2)
        return self.global_step


_dataclass_init = TrainStep.__init__


@functools.wraps(_dataclass_init)
def _init_accepting_step(self: TrainStep, *args: Any, step: int | None = None, **kwargs: Any) -> None:
    # Code written before the rename passes step=; it keeps working, with a warning, until it says global_step=.
    if step is not None:
        if "global_step" in kwargs:
            raise TypeError("TrainStep got both step= and global_step=; pass global_step= only")
        warnings.warn("TrainStep(step=...) is deprecated: pass global_step=...", DeprecationWarning, stacklevel=2)
        kwargs["global_step"] = step
    _dataclass_init(self, *args, **kwargs)


TrainStep.__init__ = _init_accepting_step  # type: ignore[method-assign]


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _full(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in _LOW_PRECISION else value


def in_float32(step: TrainStep) -> TrainStep:
    """The step with its half / bfloat16 tensors (features, logits, maps, images, targets) upcast to float32
    (differentiably; float64 stays float64)."""
    return dataclasses.replace(step, features=_full(step.features), logits=_full(step.logits),
                               feature_maps={k: _full(v) for k, v in step.feature_maps.items()},
                               images=_full(step.images), targets=_full(step.targets))


def _call_in_float32(call: Callable[..., torch.Tensor], step: TrainStep, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Run a term in float32 under mixed precision: autocast off, low-precision inputs upcast.

    Entropies, softmaxes over channels, SVDs, distances to stored weights and running statistics lose most of their
    digits in bfloat16 (FMR's entropy term came out 8 % off without this: ``tests/regularizers/
    test_mixed_precision.py``); the terms are a few small operations next to the network, so float32 costs little.
    A term that runs a network itself (DELTA's frozen copy, LwF's online teacher) runs it in float32 too.
    """
    device = step.features.device.type
    low = any(isinstance(t, torch.Tensor) and t.dtype in _LOW_PRECISION
              for t in (step.features, step.logits, step.images, step.targets, *step.feature_maps.values()))
    if not low and not torch.is_autocast_enabled(device):
        return call(step, *args, **kwargs)
    with torch.autocast(device_type=device, enabled=False):
        return call(in_float32(step), *args, **kwargs)


class Regularizer(nn.Module):
    """Base class of every regularization term.

    A subclass implements `forward` and, when it needs them, `setup` and `stats`. Running state
    goes in ``register_buffer`` (saved in checkpoints, moved by ``.to()``); learnable state in ``nn.Parameter``s,
    which the trainer puts in their own optimizer group with `param_group_options`.

    The life of a term in a run: built from its arguments; `adapt_model` once, before the optimizer exists
    (snapshots of the starting weights, copies of the pretrained source head, layer swaps); `setup` once,
    before the first update (passes over the training data); then `forward` every step. A resumed run calls
    `adapt_model` again on the freshly built (pretrained) model and then loads the checkpoint into the term,
    without `setup`.

    Attributes:
        needs_feature_maps: Module names (``model.get_submodule`` paths) whose outputs the term reads from
            ``TrainStep.feature_maps``; may be set by `adapt_model` once the model is known.
        needs_indices: Whether the term reads ``TrainStep.indices`` (the trainer then yields them).
        needs_source_head: Whether the term needs the backbone's pretrained source classifier (e.g. ImageNet's
            1000-way head); the trainer hands it over with `attach_source_head` before `adapt_model`.
            Such terms subclass [`SourceHeadRegularizer`][], which does both.
        needs_setup_pass: Whether `setup` iterates the training loader (the trainer then runs it before the
            first update).
        setup_transform: Which loader `setup` receives: ``"eval"`` (training subset, deterministic
            evaluation transform, in order) or ``"train"`` (the training loader itself: shuffled, augmented).
        changes_architecture: Whether `adapt_model` changes the model itself (its modules or their
            behaviour, e.g. StochNorm's layer swap), not only the term's own copies of it. A finished run's model is
            rebuilt for later use (``RunDir.load_model``) by calling `adapt_model` of exactly these terms.
        gradient_reaches: For the contract test, which the trainer does not read: where the term's gradient goes,
            ``"features"`` (the penultimate features, the default), ``"head"`` (the classifier's weight only),
            ``"model"`` (the backbone's parameters: weight penalties, intermediate feature maps) or ``"none"`` (the
            term changes the model and adds no loss).
        contract_kwargs: For the contract test: the constructor arguments it builds the term with on a tiny model
            (a conv-BN-ReLU backbone whose ``feature_info`` lists ``conv`` and ``bn``). The first entry is the main
            case (small windows and sample counts), the others are variants worth checking (priors, modes).
        accepts_soft_targets: Whether the term is correct on a batch mixed by mixup / CutMix, whose truth is the
            soft ``TrainStep.targets`` (``labels`` then hold each sample's own, unmixed, label). A term that never
            reads ``labels`` (nor per-sample state of the unmixed images) is; one that reads ``labels`` must read
            ``targets`` when it is set, or declare ``False``. ``False`` by default, on purpose: a term that does not
            say is refused under mixup ([`soft_target_refusals`][]) rather than run on labels that are not the
            truth. Set on the instance when it depends on the arguments (RandReg's class prior).
        soft_targets_note: Why the term cannot take mixed targets (one sentence, shown to the user when a run with
            mixup is refused); required when ``accepts_soft_targets`` is ``False``.
    """

    needs_feature_maps: tuple[str, ...] = ()
    needs_indices: bool = False
    needs_source_head: bool = False
    needs_setup_pass: bool = False
    setup_transform: str = "eval"
    changes_architecture: bool = False
    gradient_reaches: str = "features"
    contract_kwargs: tuple[dict[str, Any], ...] = ({},)
    accepts_soft_targets: bool = False
    soft_targets_note: str = ""

    def adapt_model(self, model: nn.Module) -> None:
        """Called once when the trainer is built, before the optimizer sees the model (see the class docstring).

        A user of another training loop calls it before building the optimizer.
        """

    def attach_source_head(self, head: nn.Module | None) -> None:
        """Receive the backbone's pretrained source classifier (see [`SourceHeadRegularizer`][])."""

    def setup(self, model: nn.Module, loader: Iterable[Any] | None) -> None:
        """Called once before the first optimisation step (pretrained statistics, snapshots, ...)."""

    def __call__(self, step: TrainStep, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Under autocast or with half-precision inputs the term computes in float32 (see _call_in_float32).
        return _call_in_float32(super().__call__, step, *args, **kwargs)

    def forward(self, step: TrainStep) -> torch.Tensor:  # pragma: no cover - abstract
        """Return the weighted scalar loss term of one training step."""
        raise NotImplementedError

    def stats(self) -> dict[str, float | torch.Tensor]:
        """Return what the term wants logged after the last `forward` (weights, entropies, ...).

        A value computed on the device is returned as a detached 0-dim floating tensor where it lives, not as a
        Python float: reading a GPU value on the host makes the host wait for every queued kernel, and the trainer
        calls `stats` at every step (it reads the values on the host once per epoch). A tensor must not be a view of
        a buffer or parameter that is changed in place later (return ``.detach().clone()`` or the result of an
        operation); plain Python numbers (counts, constants) stay floats.
        """
        return {}

    def artifacts(self) -> dict[str, torch.Tensor]:
        """What `setup` computed that a person may want to inspect or reuse (written to the run directory)."""
        return {}

    def param_group_options(self) -> dict[str, Any] | None:
        """Optimizer options (e.g. ``{"lr": 1e-2}``) for this term's own parameters; empty means the trainer's.

        ``None`` means the term updates its parameters itself (e.g. AdaRand's Adam step on its prior means inside
        `forward`), and the trainer keeps them out of its optimizer.
        """
        return {}


def _drop_given_head(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before the given head was kept out of the term's state hold it as ``_given_head.*``:
    drop those keys, so that such runs still resume and load."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}_given_head.")]:
        del state_dict[key]


class SourceHeadRegularizer(Regularizer):
    """Base class of the terms that train a copy of the backbone's pretrained source classifier (Co-Tuning, LwF).

    The head comes from one of two places: the ``source_head`` argument, or the trainer, which hands over the
    backbone's own pretrained classifier (e.g. ImageNet's 1000-way head) with `attach_source_head` before
    `adapt_model` (a given head wins). `adapt_model` then installs ``self.source_head``, a trainable copy
    that the trainer optimises with the backbone's learning rate; a subclass that overrides it calls
    ``super().adapt_model(model)`` first.

    Args:
        source_head: The source classifier on the penultimate features, or ``None`` for the backbone's.
    """

    needs_source_head = True

    def __init__(self, source_head: nn.Module | None = None) -> None:
        super().__init__()
        self._keep_given(source_head)
        self.source_head: nn.Module | None = None
        self.register_load_state_dict_pre_hook(_drop_given_head)

    def _keep_given(self, head: nn.Module | None) -> None:
        # Held, not registered: only its copy (``source_head``) is the term's, so the given head is in neither
        # ``parameters()`` (an optimizer built from them) nor ``state_dict()`` (checkpoints).
        object.__setattr__(self, "_given_head", head)

    def attach_source_head(self, head: nn.Module | None) -> None:
        """Receive the backbone's pretrained source classifier (ignored when one was given to the constructor)."""
        if self._given_head is None:
            self._keep_given(head)

    def adapt_model(self, model: nn.Module) -> None:
        """Install ``self.source_head``, a trainable copy of the source classifier.

        Raises:
            ValueError: no source classifier was given nor attached (the backbone has no pretrained one).
        """
        if self._given_head is None:
            raise ValueError(
                f"{getattr(self, 'registry_name', type(self).__name__)} needs the backbone's pretrained source "
                "classifier (e.g. the 1000-way ImageNet head). This backbone has none: it was built without "
                "pretrained weights, or its weights carry no classifier. Use a backbone with pretrained weights, or "
                "pass source_head=<nn.Module mapping features to source logits>."
            )
        self.source_head = copy.deepcopy(self._given_head).requires_grad_(True)


class Criterion(nn.Module):
    """Base class of the classification loss that a run optimises (exactly one per run).

    Attributes:
        accepts_soft_targets: Whether the loss reads the soft ``TrainStep.targets`` of a batch mixed by mixup /
            CutMix (see [`Regularizer`][]); ``False`` by default, so that a criterion that does not say is
            refused under mixup rather than trained on labels that are not the truth.
        soft_targets_note: Why the criterion cannot take mixed targets (one sentence); required when
            ``accepts_soft_targets`` is ``False``.
    """

    accepts_soft_targets: bool = False
    soft_targets_note: str = ""

    def adapt_model(self, model: nn.Module) -> None:
        """Called once before training; a criterion that needs another head (e.g. cosine) installs it here."""

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """Receive the training subset's number of images per class, once before training (the trainer calls it).

        For criteria whose loss depends on the class frequencies (class-balanced weights); the default ignores it.

        Args:
            counts: Images of each class in the training subset, int64.

        Shape:
            counts: (C,).
        """

    def stats(self) -> dict[str, float | torch.Tensor]:
        """What the criterion wants logged after the last forward (margins, ...).

        As for ``Regularizer.stats``: device values as detached 0-dim floating tensors (a float read from a GPU
        tensor makes the host wait at every step), not views of state changed in place; Python numbers as floats.
        """
        return {}

    def __call__(self, step: TrainStep, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _call_in_float32(super().__call__, step, *args, **kwargs)

    def forward(self, step: TrainStep) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def soft_target_refusals(terms: Iterable[Regularizer | Criterion]) -> list[str]:
    """One message per term that does not accept mixed (soft) targets; empty when all do.

    A trainer that mixes batches (mixup / CutMix) calls it with its criterion and regularizers before training and
    refuses to start when it is not empty.

    Args:
        terms: The criterion and the regularizers of a run.

    Returns:
        ``"<name> does not accept mixed (soft) targets: <why>"`` for each term whose ``accepts_soft_targets`` is
        false, in the order given (name: its registry name, else its class name).

    Example:
        >>> soft_target_refusals([CrossEntropy()])
        []
    """
    refusals = []
    for term in terms:
        if getattr(term, "accepts_soft_targets", False):
            continue
        name = getattr(term, "registry_name", type(term).__name__)
        note = getattr(term, "soft_targets_note", "") or (
            "it does not declare accepts_soft_targets = True (a term that reads TrainStep.labels must read "
            "TrainStep.targets when it is set; one that reads neither can declare True)")
        refusals.append(f"{name} does not accept mixed (soft) targets: {note}")
    return refusals


class UnknownNameError(KeyError):
    """A registry was asked for a name (or argument) it does not know; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the sentence as written.
        return str(self.args[0])


_T = TypeVar("_T", bound=type)
_REGULARIZERS: dict[str, type[Regularizer]] = {}
_CRITERIA: dict[str, type[Criterion]] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[_T], _T]:
    if name != name.lower() or not name:
        raise ValueError(f"{kind} names are lowercase and non-empty, got {name!r}")

    def decorator(cls: _T) -> _T:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__qualname__})")
        table[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def _lookup(table: dict[str, type], kind: str, name: str) -> type:
    if name not in table:
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table)) or '(none registered)'}")
    return table[name]


def _create(table: dict[str, type], kind: str, name: str, kwargs: dict[str, Any]) -> Any:
    cls = _lookup(table, kind, name)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                          inspect.Parameter.VAR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UnknownNameError(
            f"{kind} {name!r} has no argument(s) {', '.join(unknown)}; valid: {', '.join(valid) or '(none)'}"
        )
    return cls(**kwargs)


def register_regularizer(name: str) -> Callable[[_T], _T]:
    """Class decorator adding a [`Regularizer`][] to the registry under ``name`` (a duplicate name raises)."""
    return _register(_REGULARIZERS, "regularizer", name)


def create_regularizer(name: str, **kwargs: Any) -> Regularizer:
    """Build a registered regularizer from its name and keyword arguments.

    Raises:
        UnknownNameError: unknown name or argument; the message lists the valid ones.
    """
    return _create(_REGULARIZERS, "regularizer", name, kwargs)


def regularizer_class(name: str) -> type[Regularizer]:
    """The class registered under ``name``, to read its class-level declarations without building it.

    Raises:
        UnknownNameError: unknown name; the message lists the registered ones.
    """
    return _lookup(_REGULARIZERS, "regularizer", name)


def list_regularizers() -> list[str]:
    """Registered regularizer names, sorted."""
    return sorted(_REGULARIZERS)


def register_criterion(name: str) -> Callable[[_T], _T]:
    """Class decorator adding a [`Criterion`][] to the registry under ``name`` (a duplicate name raises)."""
    return _register(_CRITERIA, "criterion", name)


def create_criterion(name: str, **kwargs: Any) -> Criterion:
    """Build a registered criterion from its name and keyword arguments (see [`create_regularizer`][])."""
    return _create(_CRITERIA, "criterion", name, kwargs)


def list_criteria() -> list[str]:
    """Registered criterion names, sorted."""
    return sorted(_CRITERIA)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    r"""Cross-entropy to soft (mixed) targets, class-weighted and label-smoothed as torch's hard-label one.

    $$
    L = \frac{\sum_b \sum_c w_c\, t'_{b,c} \,(-\log p_{b,c})}{\sum_b \sum_c w_c\, t_{b,c}}, \qquad
    t' = (1 - \varepsilon)\, t + \varepsilon / C
    $$

    with p_b = softmax(logits_b), t_b the soft target of sample b (a distribution over the classes, e.g. a mixup
    of two one-hot labels), t' the label-smoothed targets, w_c the weight of class c (1 without weights), epsilon
    the label smoothing and C the number of classes. For one-hot t it is exactly ``F.cross_entropy(logits, labels,
    weight=w, label_smoothing=epsilon)`` (whose denominator is sum_b w_{y_b}); without weights, the batch mean of
    -sum_c t'_{b,c} log p_{b,c} (timm's ``SoftTargetCrossEntropy`` of the smoothed targets).

    Args:
        logits: Classifier outputs.
        targets: Soft targets t, rows non-negative and summing to 1 (not checked: it would wait for the device).
        weight: Class weights w, positive; ``None`` for all 1.
        label_smoothing: epsilon, in ``[0, 1)``.

    Shape:
        logits: (B, C). targets: (B, C). weight: (C,). Output: scalar.

    Reduction:
        Weighted mean over the batch: divided by the total class weight of the targets (B without weights).

    Raises:
        ValueError: shapes that do not match, or ``label_smoothing`` outside ``[0, 1)``.
        TypeError: non-floating logits or targets.

    Example:
        >>> round(soft_cross_entropy(torch.zeros(1, 2), torch.tensor([[0.3, 0.7]])).item(), 6)  # log 2
        0.693147
    """
    check_matching_matrices(("logits", "targets"), logits, targets, "(B, C)")
    if weight is not None and tuple(weight.shape) != (logits.shape[1],):
        raise ValueError(f"weight must hold one value per class, shape ({logits.shape[1]},), got {tuple(weight.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    targets = targets.to(logits.dtype)
    smoothed = (1.0 - label_smoothing) * targets + label_smoothing / logits.shape[1]
    w = torch.ones_like(logits[0]) if weight is None else weight.to(logits.dtype)
    loss = -(smoothed * w * nn.functional.log_softmax(logits, dim=1)).sum()
    return loss / (targets * w).sum()


def _explicit_class_weights(class_weights: Sequence[float]) -> torch.Tensor:
    """The (C,) tensor of a list of class weights; raises unless they are finite and positive."""
    try:
        values = [float(value) for value in class_weights]
    except (TypeError, ValueError) as err:
        raise ValueError(f"class_weights must be None, 'balanced', 'effective' or a list of C positive numbers (one "
                         f"per class), got {class_weights!r}") from err
    bad = [(i, v) for i, v in enumerate(values) if not (math.isfinite(v) and v > 0)]
    if not values or bad:
        raise ValueError(f"class_weights must be positive and finite, one per class; got {values} "
                         f"(offending entries as (class, weight): {bad})")
    return torch.tensor(values)


def _checked_counts(counts: torch.Tensor) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("counts must be a 1-D tensor of the number of training images of each class, shape (C,), "
                         f"got {tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__}")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"counts must be integer image counts (int64), got dtype {counts.dtype}")
    if int(counts.min()) < 0:
        raise ValueError(f"counts must be >= 0, got {counts.tolist()}")
    return counts


@register_criterion("ce")
class CrossEntropy(LazyShapeMixin, Criterion):
    r"""Softmax cross-entropy on the logits, optionally label-smoothed and class-weighted, on hard or soft targets.

    On integer labels y (an unmixed batch), torch's weighted, label-smoothed cross-entropy:

    $$
    L = \frac{\sum_b \big[(1 - \varepsilon)\, w_{y_b} (-\log p_{b,y_b})
        + \frac{\varepsilon}{C} \sum_c w_c (-\log p_{b,c})\big]}{\sum_b w_{y_b}}
    $$

    with p_b = softmax(logits_b), w_c the weight of class c (1 without class weights), epsilon the label smoothing
    and C the number of classes. On a batch mixed by mixup / CutMix (``TrainStep.targets`` set), the same loss on
    the soft targets, [`soft_cross_entropy`][], which is the above for one-hot targets; ``labels`` are then not read.

    ``class_weights="balanced"`` sets w_c = n / (C n_c), with n_c the number of training images of class c and n
    their total (scikit-learn's ``compute_class_weight("balanced")``): a class with half the mean count weighs 2.
    ``class_weights="effective"`` weighs each class by the inverse of its effective number of samples,
    (1 - beta^{n_c}) / (1 - beta), normalised so that the weights sum to C (Cui et al., CVPR 2019, arXiv
    1901.05555; `regtune.regularizers.imbalance.effective_number_weights`): equal weights for beta = 0, nearly
    inverse frequency when every count is well below 1 / (1 - beta) (then 1 - beta^{n_c} is about n_c (1 - beta)).
    The counts come from `set_class_counts`, which the trainer calls with the training subset's counts before
    training. The weights are a buffer (``weight``, as ``nn.CrossEntropyLoss`` names it): a checkpoint carries them
    and a resumed run uses the same.

    Args:
        label_smoothing: epsilon, mass moved uniformly to all classes, in ``[0, 1)``.
        class_weights: ``None`` (all 1), ``"balanced"``, ``"effective"``, or C positive weights in class order.
        effective_beta: beta of ``"effective"``, in ``[0, 1)``; ``None`` means 0.999 (the official scripts' value
            for ImageNet and iNaturalist, there with the focal loss; their CIFAR script uses 0.9999). Only with
            ``class_weights="effective"``.

    Shape:
        step.logits (B, C), step.labels (B,) or step.targets (B, C) -> scalar.

    Reduction:
        Weighted mean over the batch: divided by the total class weight of the samples' targets, sum_b w_{y_b}
        (B without class weights), as torch's ``reduction="mean"``.

    Raises:
        ValueError: at construction, ``label_smoothing`` outside ``[0, 1)``, ``class_weights`` an unknown string,
            empty, or with an entry that is not positive and finite, or ``effective_beta`` outside ``[0, 1)`` or
            given without ``"effective"``; at `set_class_counts`, a class without training images under
            ``"balanced"`` or ``"effective"``, or a weight list whose length is not the number of classes (at the
            first forward if no counts were given).
        RuntimeError: ``"balanced"`` or ``"effective"`` at the first forward with no counts given (nor loaded from
            a checkpoint).

    Example:
        >>> step = TrainStep(features=torch.zeros(1, 2), logits=torch.zeros(1, 2), labels=torch.tensor([0]),
        ...                  model=nn.Identity())
        >>> round(CrossEntropy()(step).item(), 6)  # log 2
        0.693147
    """

    accepts_soft_targets = True

    def __init__(self, label_smoothing: float = 0.0, class_weights: None | str | Sequence[float] = None,
                 effective_beta: float | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        if effective_beta is not None and class_weights != "effective":
            raise ValueError(f"effective_beta applies to class_weights='effective' only, got class_weights="
                             f"{class_weights!r}: drop effective_beta or set class_weights='effective'")
        self.effective_beta = None
        if class_weights == "effective":
            beta = 0.999 if effective_beta is None else effective_beta
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"effective_beta must be in [0, 1) (0: equal weights; towards 1: inverse frequency, "
                                 f"which class_weights='balanced' gives exactly), got {beta!r}")
            self.effective_beta = float(beta)
        if class_weights is None:
            weight = None
        elif isinstance(class_weights, str):
            if class_weights not in ("balanced", "effective"):
                raise ValueError(f"class_weights must be None, 'balanced', 'effective' or a list of C positive "
                                 f"numbers, got {class_weights!r}")
            weight = torch.zeros(0)  # (C,) once set_class_counts() or a checkpoint gives it
        else:
            weight = _explicit_class_weights(class_weights)
            class_weights = tuple(weight.tolist())
        self.class_weights = class_weights
        self.register_buffer("weight", weight)

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """Compute the ``"balanced"`` or ``"effective"`` weights from the training subset's images per class; check a
        weight list's length against the number of classes; nothing without class weights.

        Args:
            counts: Images of each class in the training subset, int64.

        Shape:
            counts: (C,).

        Raises:
            ValueError: a class has no image (``"balanced"``, ``"effective"``), or the weight list does not hold C
                values.
        """
        counts = _checked_counts(counts)
        if self.weight is None:
            return
        if self.class_weights not in ("balanced", "effective"):
            self._check_length(counts.numel(), "the class counts")
            return
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            formula = "n / (C n_c)" if self.class_weights == "balanced" else "(1 - beta) / (1 - beta^n_c)"
            raise ValueError(
                f"class_weights={self.class_weights!r} needs a training image of every class, but class(es) {empty} "
                f"have none (their weight {formula} would be infinite). Give explicit class_weights=[...] (one "
                "positive weight per class), or train on more data (a larger fraction or per-class count) so every "
                "class is present.")
        if self.class_weights == "balanced":
            n = counts.double()
            weight = n.sum() / (n.numel() * n)
        else:
            # Imported here: the imbalance module builds its criteria on this one's base class.
            from regtune.regularizers.imbalance import effective_number_weights

            weight = effective_number_weights(counts, self.effective_beta)
        self.weight = weight.to(self.weight.device, self.weight.dtype)

    def _check_length(self, num_classes: int, against: str) -> None:
        if self.weight.shape[0] != num_classes:
            raise ValueError(f"class_weights holds {self.weight.shape[0]} weights but {against} have {num_classes} "
                             f"classes: give one weight per class, in class order")

    def forward(self, step: TrainStep) -> torch.Tensor:
        weight = self.weight
        if weight is not None:
            if weight.numel() == 0:
                raise RuntimeError(f"CrossEntropy(class_weights={self.class_weights!r}) has no class counts: call "
                                   "set_class_counts(counts) with the training subset's images per class before the "
                                   "first step (the trainer does), or load the checkpoint of a run that had them")
            self._check_length(step.logits.shape[1], "the logits")
            weight = weight.to(step.logits.dtype)
        if step.targets is not None:
            return soft_cross_entropy(step.logits, step.targets, weight, self.label_smoothing)
        return nn.functional.cross_entropy(step.logits, step.labels, weight=weight,
                                           label_smoothing=self.label_smoothing)
