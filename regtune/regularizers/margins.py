"""Margin losses of "Learning Towards the Largest Margins" (Zhou et al., ICLR 2022, arXiv 2206.11589; methods.md §5).

The paper's official code could not be read (UNVERIFIED); the forms follow a third-party copy of the authors' loss
classes and the abstract, as the specification says.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from regtune.regularizers._utils import check_choice, check_positive, classifier_of, replace_classifier
from regtune.regularizers.base import Criterion, Regularizer, TrainStep, register_criterion, register_regularizer
from regtune.regularizers.functional import (
    class_margin,
    cosine_logits,
    lm_softmax_loss,
    sample_margin_loss,
    sample_margins,
    zero_centroid_loss,
)

__all__ = ["CosineClassifier", "LMSoftmax", "SampleMarginRegularizer", "ZeroCentroidRegularizer"]

_log = logging.getLogger(__name__)


class CosineClassifier(nn.Module):
    """Bias-free classifier on normalised features and prototypes: logits = s * cos(w_c, f) (methods.md §5.1).

    Args:
        in_features: D.
        num_classes: C.
        s: Scale.
        weight: Initial prototypes (C, D); ``None`` draws N(0, 0.01).

    Shape:
        (B, D) -> (B, C).
    """

    def __init__(self, in_features: int, num_classes: int, s: float, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.s = s
        self.in_features, self.out_features = in_features, num_classes
        init = weight.detach().clone() if weight is not None else torch.randn(num_classes, in_features) * 0.01
        self.weight = nn.Parameter(init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.s * cosine_logits(features, self.weight)


@register_criterion("lm_softmax")
class LMSoftmax(Criterion):
    """Largest-margin softmax (methods.md §5.4); replaces cross-entropy and the head.

    L_LM = (1/s) * mean_b log sum_{j != y_b} exp(s (cos_bj - cos_b,y_b)),  cos_bj = <w~_j, f~_b>

    The model's classifier is replaced by a :class:`CosineClassifier` with the same prototypes (bias dropped), so
    that predictions at test time are the argmax of the cosines the loss trains.

    Args:
        s: Scale; 64 in the third-party copy, the paper's per-task values are UNVERIFIED (methods.md §10 #13).

    Shape:
        step.features (B, D), labels (B,) -> scalar.

    Reduction:
        Mean over the batch.
    """

    def __init__(self, s: float = 64.0) -> None:
        super().__init__()
        check_positive("s", s, allow_zero=False)
        self.s = s
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def adapt_model(self, model: nn.Module) -> None:
        head = classifier_of(model)
        if isinstance(head, CosineClassifier):
            head.s = self.s
            return
        replace_classifier(model, CosineClassifier(head.weight.shape[1], head.weight.shape[0], self.s, head.weight))

    def forward(self, step: TrainStep) -> torch.Tensor:
        weight = classifier_of(step.model).weight
        cos = cosine_logits(step.features, weight)
        self._last = (sample_margins(cos.detach(), step.labels), class_margin(weight.detach()))
        return lm_softmax_loss(cos, step.labels, s=self.s)

    def stats(self) -> dict[str, float]:
        """Sample margins of the batch (mean, min) and the head's class margin in degrees."""
        if self._last is None:
            return {}
        margins, cls = self._last
        return {"margin_mean": float(margins.mean()), "margin_min": float(margins.min()),
                "class_margin_deg": float(torch.rad2deg(cls))}


@register_regularizer("sample_margin")
class SampleMarginRegularizer(Regularizer):
    """Sample-margin regularization (methods.md §5.3): lambda * mean_b (max_{j != y} cos_j - cos_y).

    Cosines are between the normalised penultimate feature and the normalised rows of the head's weight, whatever
    the head (plain linear or cosine).

    Args:
        weight: lambda_sm (UNVERIFIED; the spec suggests 0.5, grid 0.1, 0.5, 1).

    Reduction:
        Mean over the batch.
    """

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        check_positive("weight", weight)
        self.weight = weight
        self._margins: torch.Tensor | None = None

    def forward(self, step: TrainStep) -> torch.Tensor:
        cos = cosine_logits(step.features, classifier_of(step.model).weight)
        self._margins = sample_margins(cos.detach(), step.labels)
        return self.weight * sample_margin_loss(cos, step.labels)

    def stats(self) -> dict[str, float]:
        if self._margins is None:
            return {}
        return {"margin_mean": float(self._margins.mean()), "margin_min": float(self._margins.min())}


@register_regularizer("zero_centroid")
class ZeroCentroidRegularizer(Regularizer):
    """Zero-centroid regularization (methods.md §5.5): lambda * :func:`~regtune.regularizers.functional.
    zero_centroid_loss` of the head's weight.

    Pulls the centroid of the normalised prototypes to the origin (the max-class-margin simplex has zero centroid).
    By default the squared norm of the SUM of the normalised prototypes, as the only public code found for the term
    computes it; ``reduce="mean"`` (C^2 times smaller) and ``squared=False`` are the other readings.

    Args:
        weight: lambda_zc (UNVERIFIED). The default 1.0 was chosen when the term averaged over classes; with the sum
            the same weight pulls C^2 times harder, so it is to be chosen again on validation data
            (``benchmarks/zero_centroid_tuning.yaml``).
        reduce: ``"sum"`` or ``"mean"`` over classes.
        squared: Square the norm.

    Reduction:
        One value for the head.
    """

    def __init__(self, weight: float = 1.0, reduce: str = "sum", squared: bool = True) -> None:
        super().__init__()
        check_positive("weight", weight)
        check_choice("reduce", reduce, ("sum", "mean"))
        self.weight, self.reduce, self.squared = weight, reduce, squared
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, step: TrainStep) -> torch.Tensor:
        head_weight = classifier_of(step.model).weight
        value = zero_centroid_loss(head_weight, reduce=self.reduce, squared=self.squared)
        self._last = (value.detach(), class_margin(head_weight.detach()))
        return self.weight * value

    def stats(self) -> dict[str, float]:
        if self._last is None:
            return {}
        return {"centroid": float(self._last[0]), "class_margin_deg": float(torch.rad2deg(self._last[1]))}
