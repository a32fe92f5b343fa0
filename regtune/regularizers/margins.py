"""Margin losses of "Learning Towards the Largest Margins" (Zhou et al., ICLR 2022, arXiv 2206.11589).

The authors' own code could not be read; the forms follow a third-party copy of the authors' loss classes
(``LMSoftmaxLoss``, ``SampleMarginLoss``) and the paper's abstract (see docs/methods/margins.md, 'Readings we chose').
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from regtune.regularizers._utils import (
    check_at_least_two_classes,
    check_choice,
    check_float_matrix,
    check_labels,
    check_positive,
    classifier_of,
    normalize_rows,
    off_diagonal,
    replace_classifier,
    without_target,
)
from regtune.regularizers.base import Criterion, Regularizer, TrainStep, register_criterion, register_regularizer

__all__ = [
    "CosineClassifier",
    "LMSoftmax",
    "SampleMarginRegularizer",
    "ZeroCentroidRegularizer",
    "class_margin",
    "cosine_logits",
    "lm_softmax_loss",
    "sample_margin_loss",
    "sample_margins",
    "zero_centroid_loss",
]

_log = logging.getLogger(__name__)


_CENTROID_REDUCTIONS = ("sum", "mean")


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Cosines between normalised features and normalised class prototypes (see docs/methods/margins.md).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    $$
    \cos_{b,c} = \langle \tilde f_b, \tilde w_c \rangle, \qquad
    \tilde f_b = f_b / \lVert f_b \rVert_2, \quad \tilde w_c = w_c / \lVert w_c \rVert_2
    $$

    with f_b the feature of sample b and w_c the row of the head for class c (no bias). Norms are bounded below by
    ``eps``, so a zero feature or row gives cosine 0 instead of NaN. Multiply by a scale s for the logits.

    Args:
        features: Features f.
        weight: Class prototypes W (head weight rows).
        eps: Lower bound on a norm.

    Shape:
        features: (B, D). weight: (C, D). Output: (B, C).

    Reduction:
        None.

    Returns:
        The cosine matrix, entries in ``[-1, 1]``.

    Raises:
        ValueError: Inputs are not 2-D or their D differ.
        TypeError: A non-floating input.

    Example:
        >>> cosine_logits(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])).tolist()
        [[1.0, 0.7071067690849304, 0.0]]
    """
    check_float_matrix("features", features, "(B, D)")
    check_float_matrix("weight", weight, "(C, D)")
    if features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features (B, D) and weight (C, D) must share D, got {tuple(features.shape)} and {tuple(weight.shape)}"
        )
    return normalize_rows(features, eps) @ normalize_rows(weight, eps).T


def lm_softmax_loss(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0) -> torch.Tensor:
    r"""Largest-margin softmax (LM-Softmax) loss on cosine logits (see docs/methods/margins.md).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    $$
    L_{LM} = \frac{1}{s} \cdot \frac{1}{B} \sum_b \log \sum_{j \ne y_b}
    \exp\bigl(s (\cos_{b,j} - \cos_{b,y_b})\bigr)
    $$

    with cos_{b,j} the cosine of sample b to class j ([`cosine_logits`][]), y_b its label and s the scale: a
    softmax cross-entropy whose denominator omits the target, divided by s. As s grows it tends to the negative
    sample margin ([`sample_margin_loss`][]). Computed with ``logsumexp`` over the differences with the target
    masked to -inf (stable for s = 64; the third-party copy exponentiates directly). The default s = 64 is copied from
    that code; the paper's per-task values were not checked (see docs/methods/margins.md, 'Readings we chose').
    Per-class weights are not applied.

    Args:
        cos: Cosine logits (unscaled).
        labels: Integer targets y.
        s: Scale, > 0.

    Shape:
        cos: (B, C) with C >= 2. labels: (B,). Output: scalar.

    Reduction:
        Log-sum-exp over the C - 1 non-target classes, averaged over the batch.

    Returns:
        The 0-dim loss (may be negative).

    Raises:
        ValueError: Wrong shapes, C < 2, labels out of range, or ``s`` not positive.
        TypeError: Non-floating cos or non-integer labels.

    Example:
        >>> round(lm_softmax_loss(torch.tensor([[0.9, 0.1, 0.0]]), torch.tensor([0]), s=1.0).item(), 4)
        -0.1556
    """
    check_float_matrix("cos", cos, "(B, C)")
    check_at_least_two_classes(cos, "lm_softmax_loss")
    check_labels(labels, cos.shape[0], cos.shape[1], "cos")
    if not s > 0:
        raise ValueError(f"s must be positive, got {s}")
    target_cos = cos.gather(1, labels.unsqueeze(1))  # (B, 1)
    scaled_gap = without_target(s * (cos - target_cos), labels)  # (B, C), target entry -inf
    return torch.logsumexp(scaled_gap, dim=1).mean() / s


def sample_margins(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Per-sample margin gamma(x, y) = cos_y - max_{j != y} cos_j (see docs/methods/margins.md).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    $$
    \gamma_b = \cos_{b,y_b} - \max_{j \ne y_b} \cos_{b,j}
    $$

    with cos_{b,j} the cosine of sample b to class j and y_b its label; positive iff the sample is classified
    correctly by the cosine head. The target is excluded by masking it to -inf (the third-party copy sets it to -1,
    the same for cosines); the gradient goes to the target entry and to the arg-max non-target entry (split evenly
    between tied maxima).

    Args:
        cos: Cosine logits (any scores work).
        labels: Integer targets y.

    Shape:
        cos: (B, C) with C >= 2. labels: (B,). Output: (B,).

    Reduction:
        None (one margin per sample).

    Returns:
        The margins, in ``[-2, 2]`` for cosines.

    Raises:
        ValueError: Wrong shapes, C < 2, or labels out of range.
        TypeError: Non-floating cos or non-integer labels.

    Example:
        >>> round(sample_margins(torch.tensor([[0.9, 0.1, 0.0]]), torch.tensor([1])).item(), 4)
        -0.8
    """
    check_float_matrix("cos", cos, "(B, C)")
    check_at_least_two_classes(cos, "sample_margins")
    check_labels(labels, cos.shape[0], cos.shape[1], "cos")
    target_cos = cos.gather(1, labels.unsqueeze(1)).squeeze(1)  # (B,)
    best_other = without_target(cos, labels).amax(dim=1)  # (B,)
    return target_cos - best_other


def sample_margin_loss(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Sample-margin regularization R_sm = mean_b (max_{j != y_b} cos_{b,j} - cos_{b,y_b}).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    $$
    R_{sm} = \frac{1}{B} \sum_b \bigl(\max_{j \ne y_b} \cos_{b,j} - \cos_{b,y_b}\bigr)
           = -\frac{1}{B} \sum_b \gamma_b
    $$

    with gamma_b the sample margin of [`sample_margins`][]; no scale s. The weight lambda_sm (whose default is not
    from the paper) is applied by the caller.

    Args:
        cos: Cosine logits.
        labels: Integer targets y.

    Shape:
        cos: (B, C) with C >= 2. labels: (B,). Output: scalar.

    Reduction:
        Averaged over the batch.

    Returns:
        The 0-dim loss (negative when every sample has a positive margin).

    Raises:
        ValueError: Wrong shapes, C < 2, or labels out of range.
        TypeError: Non-floating cos or non-integer labels.

    Example:
        >>> round(sample_margin_loss(torch.tensor([[0.9, 0.1, 0.0]]), torch.tensor([1])).item(), 4)
        0.8
    """
    return -sample_margins(cos, labels).mean()


def zero_centroid_loss(weight: torch.Tensor, reduce: str = "sum", squared: bool = True,
                       eps: float = 1e-8) -> torch.Tensor:
    r"""Zero-centroid regularization of normalised class prototypes (see docs/methods/margins.md).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    $$
    R_{zc} = \Bigl\lVert \sum_{c=1}^{C} \tilde w_c \Bigr\rVert_2^2 \ \text{('sum')}
    \quad\text{or}\quad \Bigl\lVert \frac{1}{C} \sum_{c=1}^{C} \tilde w_c \Bigr\rVert_2^2 \ \text{('mean')}
    $$

    with w~_c = w_c / max(||w_c||_2, eps) the normalised prototype of class c and C the number of classes; 0 for a
    regular simplex (the max-class-margin configuration). The default sums: the only public code found for the term
    (a training script's ``norm_weights`` step, next to the paper's loss classes) penalises the squared norm of the
    sum of the normalised prototypes. The paper's own form was not checked; ``'mean'`` is C^2 times smaller, and
    ``squared=False`` returns the norm (its gradient at a zero centroid is taken as 0).

    Args:
        weight: Head weight W, one prototype per row.
        reduce: ``'sum'`` (the code found) or ``'mean'`` over classes.
        squared: Return the squared norm (True) or the norm (False).
        eps: Lower bound on a row norm.

    Shape:
        weight: (C, D). Output: scalar.

    Reduction:
        Summed (or averaged) over classes, then a norm over D.

    Returns:
        The 0-dim penalty.

    Raises:
        ValueError: ``weight`` is not 2-D, C = 0, or ``reduce`` is unknown.
        TypeError: ``weight`` is not a floating tensor.

    Example:
        >>> w = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unit rows (1, 0), (0, 1): sum (1, 1), mean (1/2, 1/2)
        >>> zero_centroid_loss(w).item(), zero_centroid_loss(w, reduce="mean").item()
        (2.0, 0.5)
    """
    check_float_matrix("weight", weight, "(C, D)")
    if weight.shape[0] == 0:
        raise ValueError("weight must hold at least one class prototype, got C = 0")
    check_choice("reduce", reduce, _CENTROID_REDUCTIONS)
    unit = normalize_rows(weight, eps)
    centroid = unit.mean(dim=0) if reduce == "mean" else unit.sum(dim=0)  # (D,)
    if squared:
        return centroid.pow(2).sum()
    return torch.linalg.vector_norm(centroid)


def class_margin(weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Class margin: the smallest angle between two normalised class prototypes (see docs/methods/margins.md).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    $$
    m_{cls} = \min_{i \ne j} \arccos \langle \tilde w_i, \tilde w_j \rangle
    $$

    with w~_c = w_c / max(||w_c||_2, eps) the normalised prototype of class c. Its maximum for C <= D + 1 is
    arccos(-1/(C-1)), reached by a regular simplex. The cosine is clamped to ``[-1, 1]`` before arccos (rounding can
    push it just outside). Meant as an analysis metric: the gradient of arccos is infinite at +-1.

    Args:
        weight: Head weight W, one prototype per row.
        eps: Lower bound on a row norm.

    Shape:
        weight: (C, D) with C >= 2. Output: scalar.

    Reduction:
        Minimum over the C(C-1) ordered pairs.

    Returns:
        The 0-dim angle in radians, in ``[0, pi]``.

    Raises:
        ValueError: ``weight`` is not 2-D or has fewer than 2 rows.
        TypeError: ``weight`` is not a floating tensor.

    Example:
        >>> round(class_margin(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])).item(), 6)  # pi / 4
        0.785398
    """
    check_float_matrix("weight", weight, "(C, D)")
    if weight.shape[0] < 2:
        raise ValueError(f"class_margin needs at least 2 class prototypes, got C = {weight.shape[0]}")
    unit = normalize_rows(weight, eps)
    largest_cos = off_diagonal(unit @ unit.T).amax()  # arccos is decreasing: the smallest angle
    return torch.arccos(largest_cos.clamp(-1.0, 1.0))


class CosineClassifier(nn.Module):
    """Bias-free classifier on normalised features and prototypes: s * [`cosine_logits`][].

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
    """Largest-margin softmax (see docs/methods/margins.md); replaces cross-entropy and the head.

    L = [`lm_softmax_loss`][] of the [`cosine_logits`][] between the penultimate features and the head's rows.

    The model's classifier is replaced by a [`CosineClassifier`][] with the same prototypes (bias dropped), so
    that predictions at test time are the argmax of the cosines the loss trains.

    Args:
        s: Scale; 64 in the third-party copy of the authors' loss, the paper's per-task values were not checked.

    Shape:
        step.features (B, D), labels (B,) -> scalar.

    Reduction:
        Mean over the batch.
    """

    accepts_soft_targets = False
    soft_targets_note = (
        "the largest-margin softmax compares the cosine to each sample's one target class with the other classes' "
        "(the target left out of the log-sum-exp), and a mixed image has two target classes in proportion")

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

    def stats(self) -> dict[str, float | torch.Tensor]:
        """Sample margins of the batch (mean, min) and the head's class margin in degrees."""
        if self._last is None:
            return {}
        margins, cls = self._last
        return {"margin_mean": margins.mean(), "margin_min": margins.min(), "class_margin_deg": torch.rad2deg(cls)}


@register_regularizer("sample_margin")
class SampleMarginRegularizer(Regularizer):
    """Sample-margin regularization: lambda * [`sample_margin_loss`][] of the cosines (see docs/methods/margins.md).

    Cosines are between the normalised penultimate feature and the normalised rows of the head's weight, whatever
    the head (plain linear or cosine).

    Args:
        weight: lambda_sm (no source we could read gives one; 0.5 is the middle of the range 0.1 to 1 worth trying
            on validation).

    Reduction:
        Mean over the batch.
    """

    accepts_soft_targets = False
    soft_targets_note = (
        "the sample margin is the cosine to the sample's one true class minus the largest other cosine, which a mixed "
        "image, with two true classes in proportion, does not have")

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        check_positive("weight", weight)
        self.weight = weight
        self._margins: torch.Tensor | None = None

    def forward(self, step: TrainStep) -> torch.Tensor:
        cos = cosine_logits(step.features, classifier_of(step.model).weight)
        self._margins = sample_margins(cos.detach(), step.labels)
        return self.weight * sample_margin_loss(cos, step.labels)

    def stats(self) -> dict[str, float | torch.Tensor]:
        if self._margins is None:
            return {}
        return {"margin_mean": self._margins.mean(), "margin_min": self._margins.min()}


@register_regularizer("zero_centroid")
class ZeroCentroidRegularizer(Regularizer):
    """Zero-centroid regularization: lambda * [`zero_centroid_loss`][] of the head's weight.

    Pulls the centroid of the normalised prototypes to the origin (the max-class-margin simplex has zero centroid).
    By default the squared norm of the SUM of the normalised prototypes, as the only public code found for the term
    computes it; ``reduce="mean"`` (C^2 times smaller) and ``squared=False`` are the other readings.

    Args:
        weight: lambda_zc (the papers give none). Chosen on the validation split of Fashion-MNIST at 1 % (C = 10,
            64 px, seeds 0-2; the shipped grids ``zero_centroid_tuning`` and ``zero_centroid_low_tuning``): 0.002,
            0.005 and 0.01 tie within half a point of mean validation accuracy (73.9, 73.3, 73.9 %), 0.05 / 0.2 / 1
            fall to 66.7 / 62.8 / 35.6 %. As validation does not separate the three, the default keeps the
            strength of the earlier default at C = 10 (1.0 on the mean): 0.01. On the sum the pull grows with C^2:
            for many classes (CUB's 200) choose it again on validation. No weight beat plain fine-tuning's 76.1 % on
            that validation split.
        reduce: ``"sum"`` or ``"mean"`` over classes.
        squared: Square the norm.

    Reduction:
        One value for the head.
    """

    gradient_reaches = "head"
    accepts_soft_targets = True  # reads only the head's weight
    contract_kwargs = ({}, {"reduce": "mean", "squared": False})

    def __init__(self, weight: float = 0.01, reduce: str = "sum", squared: bool = True) -> None:
        super().__init__()
        check_positive("weight", weight)
        check_choice("reduce", reduce, _CENTROID_REDUCTIONS)
        self.weight, self.reduce, self.squared = weight, reduce, squared
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, step: TrainStep) -> torch.Tensor:
        head_weight = classifier_of(step.model).weight
        value = zero_centroid_loss(head_weight, reduce=self.reduce, squared=self.squared)
        self._last = (value.detach(), class_margin(head_weight.detach()))
        return self.weight * value

    def stats(self) -> dict[str, float | torch.Tensor]:
        if self._last is None:
            return {}
        return {"centroid": self._last[0], "class_margin_deg": torch.rad2deg(self._last[1])}
