"""Losses for class-imbalanced training sets: effective-number class weights (Cui et al., CVPR 2019), the
logit-adjusted loss and post-hoc logit adjustment (Menon et al., ICLR 2021), balanced softmax (Ren et al., NeurIPS
2020). See docs/methods/imbalance-losses.md.

The effective-number weights are a ``class_weights`` option of the ``ce`` criterion (``base.CrossEntropy``); the two
prior-shifted cross-entropies are criteria of their own. Each takes the training subset's images per class from
``set_class_counts``, which the trainer calls before training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from regtune.regularizers._utils import LazyShapeMixin, check_float_matrix, check_float_tensor, check_labels
from regtune.regularizers.base import (
    Criterion,
    TrainStep,
    _checked_counts,
    register_criterion,
    soft_cross_entropy,
)

__all__ = [
    "BalancedSoftmax",
    "LogitAdjusted",
    "balanced_softmax_loss",
    "effective_number_weights",
    "logit_adjusted_cross_entropy",
    "posthoc_logit_adjustment",
]


def _check_tau(tau: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0 (0: no adjustment, 1: the paper's), got {tau!r}")


def _check_class_vector(name: str, vector: torch.Tensor, classes: int) -> None:
    """Raise unless ``vector`` is a floating (C,) tensor matching the ``classes`` columns of the logits."""
    check_float_tensor(name, vector)
    if tuple(vector.shape) != (classes,):
        raise ValueError(f"{name} must hold one value per class, shape (C,) = ({classes},) to match the logits, got "
                         f"{tuple(vector.shape)}")


def _missing_classes_error(empty: list[int], what: str, why: str) -> ValueError:
    return ValueError(
        f"{what} needs a training image of every class, but class(es) {empty} have none ({why}). Train on more data "
        "(a larger fraction or per-class count) so that every class is present, or use the plain 'ce' criterion.")


def effective_number_weights(counts: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    r"""Class weights inversely proportional to the effective number of samples, summing to C.

    Cui, Jia, Lin, Song, Belongie, "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019,
    arXiv 1901.05555.

    $$
    E_c = \frac{1 - \beta^{n_c}}{1 - \beta}, \qquad
    w_c = C\, \frac{1 / E_c}{\sum_{j=1}^{C} 1 / E_j}
    $$

    with n_c the number of training images of class c, C the number of classes and beta in [0, 1). E_c grows like
    n_c while n_c is small against 1 / (1 - beta) and saturates at 1 / (1 - beta) beyond: beta = 0 gives equal
    weights, beta -> 1 weights proportional to 1 / n_c (inverse frequency). The weights are normalised to sum to C,
    as the official code does. 1 - beta^n is computed as ``-expm1(n log beta)``, exact for beta close to 1.

    Args:
        counts: n, the images of each class, integers >= 1.
        beta: beta, in ``[0, 1)``.

    Shape:
        counts: (C,). Output: (C,), float64, on the device of ``counts``.

    Reduction:
        None (one weight per class).

    Returns:
        The weights w, positive, summing to C.

    Raises:
        ValueError: ``counts`` not 1-D or with a class of no image (its weight would be infinite), or ``beta``
            outside ``[0, 1)``.
        TypeError: ``counts`` not integer.

    Example:
        With beta = 1/2 and n = (1, 3): E = (1, 1.75), 1/E = (1, 4/7), w = 2 (1, 4/7) / (11/7) = (14/11, 8/11):

        >>> [round(w, 4) for w in effective_number_weights(torch.tensor([1, 3]), beta=0.5).tolist()]  # 14/11, 8/11
        [1.2727, 0.7273]
    """
    counts = _checked_counts(counts)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1) (0: equal weights; towards 1: inverse frequency, which "
                         f"class_weights='balanced' gives exactly), got {beta!r}")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise _missing_classes_error(empty, "effective_number_weights", "their weight would be infinite")
    n = counts.double()
    log_beta = torch.log1p(torch.tensor(beta - 1.0, dtype=torch.float64, device=n.device))  # -inf for beta = 0
    effective = -torch.expm1(n * log_beta) / (1.0 - beta)  # (1 - beta^n) / (1 - beta)
    inverse = 1.0 / effective
    return inverse * (n.numel() / inverse.sum())


def logit_adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor,
                                 tau: float = 1.0) -> torch.Tensor:
    r"""Softmax cross-entropy of the logits shifted by tau times the log class prior (logit-adjusted loss).

    Menon, Jayasumana, Rawat, Jain, Veit, Kumar, "Long-tail learning via logit adjustment", ICLR 2021,
    arXiv 2007.07314.

    $$
    L = -\frac{1}{B} \sum_b \log \frac{\exp(z_{b,y_b} + \tau \log \pi_{y_b})}
        {\sum_{c=1}^{C} \exp(z_{b,c} + \tau \log \pi_c)}
    $$

    with z_b the logits of sample b, y_b its label, pi_c the prior of class c (its share of the training images),
    tau the strength and B the batch size. A rare class's logit is lowered during training, so the network must
    score it higher to fit it: the trained z (used unshifted at test time) favours rare classes by tau log(1 / pi).
    tau = 0, or a uniform prior (a constant shift, which the softmax ignores), is plain cross-entropy.

    Args:
        logits: Classifier outputs z.
        labels: Integer targets y.
        log_prior: log pi, natural logarithm of the class priors (any constant added to it changes nothing).
        tau: tau, >= 0.

    Shape:
        logits: (B, C). labels: (B,). log_prior: (C,). Output: scalar.

    Reduction:
        Averaged over the batch.

    Returns:
        The 0-dim loss, in the dtype of ``logits``.

    Raises:
        ValueError: wrong shapes, labels out of range, or ``tau`` negative or not finite.
        TypeError: non-floating logits or log_prior, or non-integer labels.

    Example:
        With z = 0, pi = (1/4, 3/4) and tau = 1: softmax(log pi) = pi, so L = -log(1/4) for label 0:

        >>> round(logit_adjusted_cross_entropy(torch.zeros(1, 2), torch.tensor([0]),
        ...                                    torch.tensor([0.25, 0.75]).log()).item(), 6)
        1.386294
    """
    check_float_matrix("logits", logits, "(B, C)")
    check_labels(labels, logits.shape[0], logits.shape[1], "logits")
    _check_class_vector("log_prior", log_prior, logits.shape[1])
    _check_tau(tau)
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), labels)


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    r"""Balanced softmax: the cross-entropy of a softmax that weighs each class by its number of training images.

    Ren, Yu, Sheng, Ma, Zhao, Yi, Li, "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020,
    arXiv 2007.10740.

    $$
    \hat p_{b,y} = \frac{n_y \exp(z_{b,y})}{\sum_{c=1}^{C} n_c \exp(z_{b,c})}, \qquad
    L = -\frac{1}{B} \sum_b \log \hat p_{b,y_b}
    $$

    with n_c the training images of class c, z_b the logits of sample b and y_b its label: the cross-entropy of
    z + log n. Since log n = log pi + log(sum_c n_c) differs from the log prior by a constant, which the softmax
    ignores, it equals [`logit_adjusted_cross_entropy`][] with tau = 1.

    Args:
        logits: Classifier outputs z.
        labels: Integer targets y.
        counts: n, the images of each class (integer or floating), all > 0.

    Shape:
        logits: (B, C). labels: (B,). counts: (C,). Output: scalar.

    Reduction:
        Averaged over the batch.

    Returns:
        The 0-dim loss, in the dtype of ``logits``.

    Raises:
        ValueError: wrong shapes, labels out of range, or a count that is not positive.
        TypeError: non-floating logits or non-integer labels.

    Example:
        With z = 0 and n = (1, 3): p_hat = (1/4, 3/4), so L = -log(3/4) for label 1:

        >>> round(balanced_softmax_loss(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([1, 3])).item(), 6)
        0.287682
    """
    check_float_matrix("logits", logits, "(B, C)")
    check_labels(labels, logits.shape[0], logits.shape[1], "logits")
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (logits.shape[1],):
        raise ValueError(f"counts must hold the images of each class, shape (C,) = ({logits.shape[1]},) to match the "
                         f"logits, got {tuple(counts.shape) if isinstance(counts, torch.Tensor) else counts!r}")
    if not bool((counts > 0).all()):
        raise _missing_classes_error((counts <= 0).nonzero().flatten().tolist(), "balanced_softmax_loss",
                                     "log n_c would be -inf")
    return F.cross_entropy(logits + counts.to(logits.dtype).log(), labels)


def posthoc_logit_adjustment(logits: torch.Tensor, log_prior: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    r"""Logits of a trained model with tau times the log class prior subtracted (post-hoc logit adjustment).

    Menon, Jayasumana, Rawat, Jain, Veit, Kumar, "Long-tail learning via logit adjustment", ICLR 2021,
    arXiv 2007.07314.

    $$
    \tilde z_{b,c} = z_{b,c} - \tau \log \pi_c
    $$

    with z_b the logits of sample b from a model trained with plain cross-entropy, pi_c the training prior of class
    c and tau the strength: the arg-max of z~ favours rare classes by tau log(1 / pi). It undoes the shift of
    [`logit_adjusted_cross_entropy`][]: softmax(z~) of the adjusted logits z + tau log pi is softmax(z).

    Args:
        logits: Classifier outputs z (at test time).
        log_prior: log pi, natural logarithm of the training class priors.
        tau: tau, >= 0.

    Shape:
        logits: (..., C). log_prior: (C,). Output: same as ``logits``.

    Reduction:
        None.

    Returns:
        The adjusted logits, in the dtype of ``logits`` (the inputs are not modified).

    Raises:
        ValueError: ``log_prior`` not (C,), or ``tau`` negative or not finite.
        TypeError: non-floating logits or log_prior.

    Example:
        With pi = (1/4, 3/4): -log pi = (1.386, 0.288); the rare class now wins a tie:

        >>> log_prior = torch.tensor([0.25, 0.75]).log()
        >>> [round(v, 4) for v in posthoc_logit_adjustment(torch.zeros(2), log_prior).tolist()]  # log 4, -log(3/4)
        [1.3863, 0.2877]
    """
    check_float_tensor("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension, the last holding the C classes, got a 0-dim tensor")
    _check_class_vector("log_prior", log_prior, logits.shape[-1])
    _check_tau(tau)
    return logits - tau * log_prior.to(logits.dtype)


class _PriorShiftedCrossEntropy(LazyShapeMixin, Criterion):
    """Cross-entropy on logits shifted by a per-class vector computed from the training subset's class counts.

    The counts are a buffer (``class_counts``, float, empty until `set_class_counts` or a checkpoint gives them), so
    a resumed run uses the same shift.
    """

    accepts_soft_targets = True  # the shift is per class, not per sample: the soft cross-entropy of shifted logits

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("class_counts", torch.zeros(0))
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """Keep the training subset's images per class (their priors set the shift).

        Args:
            counts: Images of each class in the training subset, int64.

        Shape:
            counts: (C,).

        Raises:
            ValueError: a class has no image (its log prior would be -inf), or ``counts`` is not 1-D.
            TypeError: ``counts`` is not integer.
        """
        counts = _checked_counts(counts)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise _missing_classes_error(empty, f"the {self.registry_name} criterion", "its log prior would be -inf")
        self.class_counts = counts.to(self.class_counts.device, self.class_counts.dtype)

    def _counts(self, logits: torch.Tensor) -> torch.Tensor:
        counts = self.class_counts
        if counts.numel() == 0:
            raise RuntimeError(f"the {self.registry_name} criterion has no class counts: call set_class_counts(counts) "
                               "with the training subset's images per class before the first step (the trainer "
                               "does), or load the checkpoint of a run that had them")
        if counts.shape[0] != logits.shape[1]:
            raise ValueError(f"the class counts hold {counts.shape[0]} classes but the logits have {logits.shape[1]}: "
                             "call set_class_counts with the counts of this model's classes")
        return counts.to(logits.dtype)

    def _shift(self, counts: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hard_loss(self, logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, step: TrainStep) -> torch.Tensor:
        counts = self._counts(step.logits)
        if step.targets is not None:
            loss = soft_cross_entropy(step.logits + self._shift(counts), step.targets)
            plain = soft_cross_entropy(step.logits.detach(), step.targets)
        else:
            loss = self._hard_loss(step.logits, step.labels, counts)
            plain = F.cross_entropy(step.logits.detach(), step.labels)
        self._last = (plain.detach(), counts.detach() / counts.sum())
        return loss

    def stats(self) -> dict[str, float | torch.Tensor]:
        """``unadjusted_ce``: the batch's cross-entropy of the logits without the shift (what the model's own
        predictions score); ``prior_min`` / ``prior_max``: the smallest and largest class prior pi_c."""
        if self._last is None:
            return {}
        plain, prior = self._last
        return {"unadjusted_ce": plain, "prior_min": prior.min(), "prior_max": prior.max()}


@register_criterion("logit_adjusted")
class LogitAdjusted(_PriorShiftedCrossEntropy):
    r"""Logit-adjusted loss (Menon et al., ICLR 2021): [`logit_adjusted_cross_entropy`][] with the training priors.

    pi_c = n_c / n, with n_c the training images of class c (from `set_class_counts`) and n their total. On a batch
    mixed by mixup / CutMix (``TrainStep.targets`` set), the soft cross-entropy ([`soft_cross_entropy`][]) of the
    same shifted logits z + tau log pi; ``labels`` are then not read. Predict with the unshifted logits.

    Args:
        tau: tau, the strength of the shift; 1 is the paper's and the official code's default, 0 plain
            cross-entropy.

    Shape:
        step.logits (B, C), step.labels (B,) or step.targets (B, C) -> scalar.

    Reduction:
        Mean over the batch.

    Raises:
        ValueError: at construction, ``tau`` negative or not finite; at `set_class_counts`, a class without
            training images; at a forward, logits whose C differs from the counts'.
        RuntimeError: a forward before any class counts were given (nor loaded from a checkpoint).

    Example:
        >>> criterion = LogitAdjusted(tau=1.0)
        >>> criterion.set_class_counts(torch.tensor([1, 3]))
        >>> step = TrainStep(features=torch.zeros(1, 2), logits=torch.zeros(1, 2), labels=torch.tensor([0]),
        ...                  model=torch.nn.Identity())
        >>> round(criterion(step).item(), 6)  # -log(1/4)
        1.386294
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        _check_tau(tau)
        self.tau = float(tau)

    def _shift(self, counts: torch.Tensor) -> torch.Tensor:
        return self.tau * (counts / counts.sum()).log()

    def _hard_loss(self, logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_cross_entropy(logits, labels, (counts / counts.sum()).log(), self.tau)


@register_criterion("balanced_softmax")
class BalancedSoftmax(_PriorShiftedCrossEntropy):
    r"""Balanced softmax (Ren et al., NeurIPS 2020): [`balanced_softmax_loss`][] with the training counts.

    The cross-entropy of z + log n, n_c the training images of class c (from `set_class_counts`); the same loss as
    ``logit_adjusted`` with tau = 1 (the shifts differ by the constant log n, which the softmax ignores). On a batch
    mixed by mixup / CutMix (``TrainStep.targets`` set), the soft cross-entropy ([`soft_cross_entropy`][]) of
    z + log n; ``labels`` are then not read. Predict with the unshifted logits.

    Shape:
        step.logits (B, C), step.labels (B,) or step.targets (B, C) -> scalar.

    Reduction:
        Mean over the batch.

    Raises:
        ValueError: at `set_class_counts`, a class without training images; at a forward, logits whose C differs
            from the counts'.
        RuntimeError: a forward before any class counts were given (nor loaded from a checkpoint).

    Example:
        >>> criterion = BalancedSoftmax()
        >>> criterion.set_class_counts(torch.tensor([1, 3]))
        >>> step = TrainStep(features=torch.zeros(1, 2), logits=torch.zeros(1, 2), labels=torch.tensor([1]),
        ...                  model=torch.nn.Identity())
        >>> round(criterion(step).item(), 6)  # -log(3/4)
        0.287682
    """

    def _shift(self, counts: torch.Tensor) -> torch.Tensor:
        return counts.log()

    def _hard_loss(self, logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Logit adjustment by log n_c with tau 1, the same sum as balanced_softmax_loss, whose check that every count
        # is positive would read the counts back from the device at every step (set_class_counts checked them).
        return logit_adjusted_cross_entropy(logits, labels, self._shift(counts), tau=1.0)
