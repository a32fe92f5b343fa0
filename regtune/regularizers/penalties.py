"""Penalties without running state: feature norm (FNP / SGM), MaxEnt, and L1 / L2 / negative-weight head penalties."""

from __future__ import annotations

import torch

from regtune.regularizers._utils import check_choice, check_positive, classifier_of
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer
from regtune.regularizers.functional import (
    feature_norm_penalty,
    head_l1,
    head_l2,
    negative_weight_penalty,
    prediction_entropy,
)

__all__ = ["FeatureNormPenalty", "MaxEntropy", "HeadL1", "HeadL2", "HeadNegativePenalty"]


class _Logged(Regularizer):
    """Keeps the unweighted value of the last forward for :meth:`stats` (detached, no host sync until read)."""

    def __init__(self) -> None:
        super().__init__()
        self._value: torch.Tensor | None = None

    def _keep(self, value: torch.Tensor) -> torch.Tensor:
        self._value = value.detach()
        return value

    def stats(self) -> dict[str, float]:
        return {} if self._value is None else {"value": float(self._value)}


@register_regularizer("fnp")
class FeatureNormPenalty(_Logged):
    """Feature-norm penalty (Hariharan & Girshick, ICCV 2017, arXiv 1606.02819; methods.md §3.2).

    ``weighting="none"``: L = lambda * mean_b ||f_b||_2^2. ``weighting="sgm"`` (squared gradient magnitude):
    L = lambda * mean_b alpha_b ||f_b||_2^2 with alpha_b = sum_c (p_bc - 1[c = y_b])^2 treated as a constant weight
    (UNVERIFIED whether the paper lets gradients through alpha; detached here).

    Args:
        weight: lambda. The published value for fine-grained fine-tuning is UNVERIFIED; 1e-3 keeps the term of the
            order of the cross-entropy for EfficientNet-Lite0 features (||f||^2 ~ 100-1000).
        weighting: ``"none"`` or ``"sgm"``.

    Shape:
        step.features (B, D), step.logits (B, C) -> scalar.

    Reduction:
        Mean over the batch.
    """

    def __init__(self, weight: float = 1e-3, weighting: str = "none") -> None:
        super().__init__()
        check_positive("weight", weight)
        check_choice("weighting", weighting, ("none", "sgm"))
        self.weight = weight
        self.weighting = weighting

    def forward(self, step: TrainStep) -> torch.Tensor:
        value = feature_norm_penalty(step.features, step.logits, step.labels, weighting=self.weighting)
        return self.weight * self._keep(value)


@register_regularizer("maxent")
class MaxEntropy(_Logged):
    """Maximum-entropy confidence penalty (Dubey et al., NeurIPS 2018, arXiv 1809.05934; methods.md §4).

    L = -gamma * mean_b H(softmax(logits_b)), H(p) = -sum_c p_c log p_c; gradients flow through p.

    Args:
        gamma: Weight; the paper's values are UNVERIFIED, 0.1 is the spec's suggestion (grid 0.01, 0.1, 0.5, 1).

    Shape:
        step.logits (B, C) -> scalar.

    Reduction:
        Mean over the batch.
    """

    def __init__(self, gamma: float = 0.1) -> None:
        super().__init__()
        check_positive("gamma", gamma)
        self.gamma = gamma

    def forward(self, step: TrainStep) -> torch.Tensor:
        entropy = self._keep(prediction_entropy(step.logits).mean())
        return -self.gamma * entropy

    def stats(self) -> dict[str, float]:
        return {} if self._value is None else {"entropy": float(self._value)}


class _HeadPenalty(_Logged):
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
    """L1 penalty on the classifier weights (the CAM study's sparse head; methods.md §7.5).

    R_1 = lambda_1 * sum_{c,k} |w_{c,k}| over the head's (C, D) weight (bias excluded).

    Args:
        weight: lambda_1 (UNVERIFIED in the study; 1e-4 is a mild default for D = 1280).

    Reduction:
        Sum over all weights.
    """

    def __init__(self, weight: float = 1e-4) -> None:
        super().__init__(weight)

    def _penalty(self, head_weight: torch.Tensor) -> torch.Tensor:
        return head_l1(head_weight)


@register_regularizer("head_l2")
class HeadL2(_HeadPenalty):
    """L2 penalty on the classifier weights (methods.md §7.5; TLlib's head term of §6.1 is this with 0.5 * 0.01).

    R_2 = lambda_2 * sum_{c,k} w_{c,k}^2 (bias excluded).

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
    """Penalty on negative classifier weights: lambda * sum_{c,k} relu(-w_{c,k}) (methods.md §7.5).

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
