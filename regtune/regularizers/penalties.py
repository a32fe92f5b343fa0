"""Penalties without running state: feature norm (FNP / SGM), MaxEnt, and L1 / L2 / negative-weight head penalties."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from regtune.regularizers._utils import (
    check_choice,
    check_float_matrix,
    check_float_tensor,
    check_labels,
    check_positive,
    check_soft_targets,
    classifier_of,
)
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer

__all__ = [
    "FeatureNormPenalty",
    "HeadL1",
    "HeadL2",
    "HeadNegativePenalty",
    "MaxEntropy",
    "feature_norm_penalty",
    "head_l1",
    "head_l2",
    "negative_weight_penalty",
    "prediction_entropy",
]


_FEATURE_NORM_WEIGHTINGS = ("none", "sgm")


def feature_norm_penalty(features: torch.Tensor, logits: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, weighting: str = "none",
                         targets: torch.Tensor | None = None, detach_alpha: bool = True) -> torch.Tensor:
    r"""Feature-norm penalty, plain or SGM-weighted (see docs/methods/fnp.md).

    Hariharan & Girshick, "Low-shot Visual Recognition by Shrinking and Hallucinating Features", ICCV 2017,
    arXiv 1606.02819.

    $$
    \text{none:}\ \frac{1}{B} \sum_b \lVert f_b \rVert_2^2, \qquad
    \text{sgm:}\ \frac{1}{B} \sum_b \alpha_b \lVert f_b \rVert_2^2, \quad
    \alpha_b = \sum_c \bigl(p_{b,c} - [c = y_b]\bigr)^2
    $$

    with f_b the penultimate feature, p_b = softmax(logits_b) and y_b the label of sample b. For softmax regression
    alpha_b ||f_b||^2 is the squared norm of the gradient of the cross-entropy w.r.t. the classifier weights (SGM).
    On a mixed batch (mixup / CutMix) with soft targets t, [c = y_b] becomes t_{b,c}: alpha_b = ||p_b - t_b||^2 is then
    the same squared gradient norm for the cross-entropy to the soft targets (whose gradient w.r.t. the logits is
    p_b - t_b).
    By default alpha_b is detached (treated as a per-sample weight), so only ``features`` receives gradient; with
    ``detach_alpha=False`` the gradient also flows through alpha_b into ``logits``, as in the authors' code
    (facebookresearch/low-shot-shrink-hallucinate; see docs/methods/fnp.md, 'Readings we chose').

    Args:
        features: Penultimate features f.
        logits: Classifier outputs; required for ``'sgm'``, ignored for ``'none'``.
        labels: Integer targets y; required for ``'sgm'`` unless ``targets`` are given, ignored for ``'none'``.
        weighting: ``'none'`` (feature penalty) or ``'sgm'``.
        targets: Soft targets t of a mixed batch (rows summing to 1); when given, ``'sgm'`` reads them instead of
            ``labels``.
        detach_alpha: ``'sgm'`` only: alpha_b as a constant weight (True, regtune's reading) or differentiated
            through the softmax (False, the authors' code). The value is the same either way.

    Shape:
        features: (B, D). logits: (B, C). labels: (B,). targets: (B, C). Output: scalar.

    Reduction:
        Summed over channels, averaged over the batch.

    Returns:
        The 0-dim penalty (no lambda applied).

    Raises:
        ValueError: Wrong shapes, labels out of range, ``'sgm'`` without logits or without labels and targets, or an
            unknown ``weighting``.
        TypeError: Non-floating features/logits/targets or non-integer labels.

    Example:
        >>> f = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> feature_norm_penalty(f).item()  # (25 + 1) / 2
        13.0
        >>> feature_norm_penalty(f, torch.zeros(2, 2), torch.tensor([0, 1]), weighting="sgm").item()  # alpha = 1/2
        6.5
    """
    check_float_matrix("features", features, "(B, D)")
    check_choice("weighting", weighting, _FEATURE_NORM_WEIGHTINGS)
    squared_norms = features.pow(2).sum(dim=1)  # (B,)
    if weighting == "none":
        return squared_norms.mean()
    if logits is None or (labels is None and targets is None):
        raise ValueError("weighting='sgm' needs logits (B, C) and labels (B,) (or soft targets (B, C)); got "
                         f"logits={'None' if logits is None else 'a tensor'}, "
                         f"labels={'None' if labels is None else 'a tensor'}")
    check_float_matrix("logits", logits, "(B, C)")
    if logits.shape[0] != features.shape[0]:
        raise ValueError(f"logits must have B = {features.shape[0]} rows like features, got {tuple(logits.shape)}")
    if targets is None:
        check_labels(labels, logits.shape[0], logits.shape[1], "logits")
        truth = F.one_hot(labels, num_classes=logits.shape[1])
    else:
        check_soft_targets(targets, logits.shape[0], logits.shape[1], "logits")
        truth = targets
    with torch.no_grad() if detach_alpha else contextlib.nullcontext():
        residual = logits.softmax(dim=1) - truth.to(logits.dtype)
        alpha = residual.pow(2).sum(dim=1).to(features.dtype)  # (B,)
    return (alpha * squared_norms).mean()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Per-sample entropy of the predicted class distribution (MaxEnt; see docs/methods/maxent.md).

    Dubey, Gupta, Raskar, Naik, "Maximum-Entropy Fine-Grained Classification", NeurIPS 2018, arXiv 1809.05934.
    The MaxEnt loss is ``CE - gamma * prediction_entropy(logits).mean()``.

    $$
    H_b = -\sum_{c=1}^{C} p_{b,c} \log p_{b,c}, \qquad p_b = \mathrm{softmax}(\text{logits}_b)
    $$

    with C the number of classes and log the natural logarithm, computed from ``log_softmax`` (no eps inside the log,
    unlike TLlib's ``entropy``). Gradient flows through p.

    Args:
        logits: Classifier outputs.

    Shape:
        logits: (B, C). Output: (B,).

    Reduction:
        Summed over classes; none over the batch.

    Returns:
        H_b in nats, between 0 and log C.

    Raises:
        ValueError: ``logits`` is not 2-D.
        TypeError: ``logits`` is not a floating tensor.

    Example:
        >>> round(prediction_entropy(torch.tensor([[0.0, 0.0, 0.0]])).item(), 6)  # log 3
        1.098612
    """
    check_float_matrix("logits", logits, "(B, C)")
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def head_l1(weight: torch.Tensor) -> torch.Tensor:
    r"""L1 penalty on classifier weights, sum_{c,k} |w_{c,k}| (sparsifies the head; see docs/methods/head-penalties.md).

    Studied for its effect on class activation maps (Zhou et al., "Learning Deep Features for Discriminative
    Localization", CVPR 2016, arXiv 1512.04150, define the CAM).

    $$
    R_1 = \sum_{c,k} \lvert w_{c,k} \rvert
    $$

    with w_{c,k} the head weight from channel k to class c. The weight lambda_1 is applied by the caller.

    Args:
        weight: Head weight W (any shape is accepted; every entry counts).

    Shape:
        weight: (C, D) typically. Output: scalar.

    Reduction:
        Summed over all entries.

    Returns:
        The 0-dim penalty; its gradient is sign(w) (0 at w = 0).

    Raises:
        TypeError: ``weight`` is not a floating tensor.

    Example:
        >>> head_l1(torch.tensor([[1.0, -2.0], [0.5, 0.0]])).item()
        3.5
    """
    check_float_tensor("weight", weight)
    return weight.abs().sum()


def head_l2(weight: torch.Tensor) -> torch.Tensor:
    r"""L2 penalty on classifier weights, sum_{c,k} w_{c,k}^2 (head weight decay; see docs/methods/head-penalties.md).

    Studied for its effect on class activation maps (Zhou et al., CVPR 2016, arXiv 1512.04150). The head term of
    TLlib's L2-SP is half of this.

    $$
    R_2 = \sum_{c,k} w_{c,k}^2
    $$

    with w_{c,k} the head weight from channel k to class c. The weight lambda_2 is applied by the caller.

    Args:
        weight: Head weight W (any shape is accepted; every entry counts).

    Shape:
        weight: (C, D) typically. Output: scalar.

    Reduction:
        Summed over all entries.

    Returns:
        The 0-dim penalty.

    Raises:
        TypeError: ``weight`` is not a floating tensor.

    Example:
        >>> head_l2(torch.tensor([[1.0, -2.0], [0.5, 0.0]])).item()
        5.25
    """
    check_float_tensor("weight", weight)
    return weight.pow(2).sum()


def negative_weight_penalty(weight: torch.Tensor) -> torch.Tensor:
    r"""Penalty on negative classifier weights, sum_{c,k} max(0, -w_{c,k}) (regtune's reading of the CAM study).

    Motivated by the CAM study's finding that negative head weights falling on the foreground hurt localisation, and
    by "negative weight clamping" (Bae, Noh, Kim, "Rethinking Class Activation Mapping for Weakly Supervised Object
    Localization", ECCV 2020). Neither paper states this penalty: it is regtune's own reading of that finding, offered
    as an option for the CAM study, not a published method (see docs/methods/head-penalties.md, 'Readings we chose').

    $$
    R_- = \sum_{c,k} \max(0, -w_{c,k})
    $$

    with w_{c,k} the head weight from channel k to class c; it equals the L1 norm of the negative part W^-.

    Args:
        weight: Head weight W (any shape is accepted; every entry counts).

    Shape:
        weight: (C, D) typically. Output: scalar.

    Reduction:
        Summed over all entries.

    Returns:
        The 0-dim penalty (0 for a non-negative head).

    Raises:
        TypeError: ``weight`` is not a floating tensor.

    Example:
        >>> negative_weight_penalty(torch.tensor([[1.0, -2.0], [-0.5, 0.0]])).item()
        2.5
    """
    check_float_tensor("weight", weight)
    return F.relu(-weight).sum()


class _Logged(Regularizer):
    """Keeps the unweighted value of the last forward for `stats` (detached, no host sync until read)."""

    def __init__(self) -> None:
        super().__init__()
        self._value: torch.Tensor | None = None

    def _keep(self, value: torch.Tensor) -> torch.Tensor:
        self._value = value.detach()
        return value

    def stats(self) -> dict[str, float | torch.Tensor]:
        return {} if self._value is None else {"value": self._value}


@register_regularizer("fnp")
class FeatureNormPenalty(_Logged):
    """Feature-norm penalty (Hariharan & Girshick, ICCV 2017, arXiv 1606.02819; see docs/methods/fnp.md).

    L = lambda * [`feature_norm_penalty`][] of the penultimate features, plain or SGM-weighted (squared gradient
    magnitude; its per-sample weight detached unless ``detach_alpha=False``).

    Args:
        weight: lambda. No published value is for fine-tuning (the authors' code trains networks from scratch, with
            0.02 or 0.005 for SGM); 1e-3 keeps the term of the order of the cross-entropy for EfficientNet-Lite0
            features (||f||^2 ~ 100-1000).
        weighting: ``"none"`` or ``"sgm"``.
        detach_alpha: With ``"sgm"``: True (default) treats alpha_b as a constant weight, so the term only shrinks
            features; False lets its gradient flow through the softmax into the logits, classifier and backbone, as
            the authors' code does.

    Shape:
        step.features (B, D), step.logits (B, C) -> scalar.

    Reduction:
        Mean over the batch.
    """

    accepts_soft_targets = True  # 'sgm' reads step.targets on a mixed batch
    contract_kwargs = ({}, {"weighting": "sgm"}, {"weighting": "sgm", "detach_alpha": False})

    def __init__(self, weight: float = 1e-3, weighting: str = "none", detach_alpha: bool = True) -> None:
        super().__init__()
        check_positive("weight", weight)
        check_choice("weighting", weighting, _FEATURE_NORM_WEIGHTINGS)
        if not isinstance(detach_alpha, bool):
            raise TypeError(f"detach_alpha must be true or false, got {detach_alpha!r}")
        if not detach_alpha and weighting != "sgm":
            raise ValueError("detach_alpha=False changes only weighting='sgm' (the plain penalty has no alpha); "
                             "add weighting=sgm or drop detach_alpha")
        self.weight = weight
        self.weighting = weighting
        self.detach_alpha = detach_alpha

    def forward(self, step: TrainStep) -> torch.Tensor:
        value = feature_norm_penalty(step.features, step.logits, step.labels, weighting=self.weighting,
                                     targets=step.targets, detach_alpha=self.detach_alpha)
        return self.weight * self._keep(value)


@register_regularizer("maxent")
class MaxEntropy(_Logged):
    """Maximum-entropy confidence penalty (Dubey et al., NeurIPS 2018, arXiv 1809.05934; see docs/methods/maxent.md).

    L = -gamma * mean_b [`prediction_entropy`][] (logits_b); gradients flow through the softmax.

    Args:
        gamma: Weight; the paper's per-dataset values were not checked, 0.1 is our starting point (try 0.01, 0.1,
            0.5, 1 on validation).

    Shape:
        step.logits (B, C) -> scalar.

    Reduction:
        Mean over the batch.
    """

    accepts_soft_targets = True  # reads only the logits

    def __init__(self, gamma: float = 0.1) -> None:
        super().__init__()
        check_positive("gamma", gamma)
        self.gamma = gamma

    def forward(self, step: TrainStep) -> torch.Tensor:
        entropy = self._keep(prediction_entropy(step.logits).mean())
        return -self.gamma * entropy

    def stats(self) -> dict[str, float | torch.Tensor]:
        return {} if self._value is None else {"entropy": self._value}


class _HeadPenalty(_Logged):
    gradient_reaches = "head"
    accepts_soft_targets = True  # reads only the head's weight

    def __init__(self, weight: float) -> None:
        super().__init__()
        check_positive("weight", weight)
        self.weight = weight

    def _penalty(self, head_weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, step: TrainStep) -> torch.Tensor:
        return self.weight * self._keep(self._penalty(classifier_of(step.model).weight))


@register_regularizer("head_l1")
class HeadL1(_HeadPenalty):
    """L1 penalty on the classifier weights (the CAM study's sparse head; see docs/methods/head-penalties.md).

    lambda_1 * [`head_l1`][] of the head's (C, D) weight (bias excluded).

    Args:
        weight: lambda_1 (the study's values were not checked; 1e-4 is a mild default for D = 1280).

    Reduction:
        Sum over all weights.
    """

    def __init__(self, weight: float = 1e-4) -> None:
        super().__init__(weight)

    def _penalty(self, head_weight: torch.Tensor) -> torch.Tensor:
        return head_l1(head_weight)


@register_regularizer("head_l2")
class HeadL2(_HeadPenalty):
    """L2 penalty on the classifier weights (TLlib's L2-SP head term is this with 0.5 * 0.01).

    lambda_2 * [`head_l2`][] of the head's (C, D) weight (bias excluded).

    Args:
        weight: lambda_2 (default 5e-3 = TLlib's 1/2 * 0.01).

    Reduction:
        Sum over all weights.
    """

    def __init__(self, weight: float = 5e-3) -> None:
        super().__init__(weight)

    def _penalty(self, head_weight: torch.Tensor) -> torch.Tensor:
        return head_l2(head_weight)


@register_regularizer("head_neg")
class HeadNegativePenalty(_HeadPenalty):
    """Penalty on negative classifier weights: lambda * [`negative_weight_penalty`][] of the head.

    The CAM study finds that negative weights falling on the foreground hurt localization; this term discourages
    them. It is the library's reading (no public code defines it), offered as an option next to L1 / L2.

    Args:
        weight: lambda.

    Reduction:
        Sum over all weights.
    """

    def __init__(self, weight: float = 1e-3) -> None:
        super().__init__(weight)

    def _penalty(self, head_weight: torch.Tensor) -> torch.Tensor:
        return negative_weight_penalty(head_weight)
