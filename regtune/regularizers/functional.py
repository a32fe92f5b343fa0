"""Pure tensor forms of every regularization term and margin quantity in ``methods.md`` (§1-§5, §7.5).

The ``nn.Module`` regularizers call these functions; analysis code calls them on stored features. Every function is
stateless, takes tensors of any floating dtype on any device, never modifies its inputs, and is differentiable
wherever the formula is. No weight (lambda, beta, gamma) is applied here except in :func:`fmr_weight`, which computes
one. Imports nothing but ``torch`` and the standard library.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "channel_entropy",
    "fmr_weight",
    "random_feature_loss",
    "adarand_prior_losses",
    "feature_norm_penalty",
    "prediction_entropy",
    "head_l1",
    "head_l2",
    "negative_weight_penalty",
    "cosine_logits",
    "lm_softmax_loss",
    "sample_margins",
    "sample_margin_loss",
    "zero_centroid_loss",
    "class_margin",
    "l2_sp_penalty",
    "l2_penalty",
    "delta_penalty",
    "channel_attention",
    "batch_spectral_shrinkage",
    "class_relationship",
    "relationship_from_sums",
    "co_tuning_loss",
    "distillation_loss",
    "stochastic_batch_norm",
]

_RANDOM_FEATURE_REDUCTIONS = ("mean", "sum_dim")
_INTRA_DISTANCES = ("cosine_sq", "l2")
_INTER_SIMILARITIES = ("cosine_sq", "cosine")
_FEATURE_NORM_WEIGHTINGS = ("none", "sgm")
_CENTROID_REDUCTIONS = ("sum", "mean")


# --------------------------------------------------------------------------------------------------------------------
# Input checks (private; the messages name what was received and what was expected)


def _check_float_tensor(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")


def _check_float_matrix(name: str, tensor: torch.Tensor, expected: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape {expected}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}; cast it with .float()")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(repr(v) for v in valid)}")


def _check_labels(labels: torch.Tensor, batch: int, classes: int, scores_name: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape (B,), got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape (B,) = ({batch},) to match {scores_name}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    # Checked here because an out-of-range index in gather/one_hot is a device-side assert on CUDA (unrecoverable).
    if batch > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(
                f"labels must lie in [0, {classes - 1}] for {classes} classes, got values in [{low}, {high}]"
            )


def _check_at_least_two_classes(cos: torch.Tensor, what: str) -> None:
    if cos.shape[1] < 2:
        raise ValueError(f"{what} needs at least 2 classes (a non-target class must exist), got C = {cos.shape[1]}")


def _normalize_rows(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    # x / max(||x||, eps): a zero row stays zero (cosine 0 with everything) instead of producing NaN.
    return matrix / torch.linalg.vector_norm(matrix, dim=1, keepdim=True).clamp_min(eps)


def _off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """The C(C-1) off-diagonal entries of a (C, C) matrix, row-major, as a 1-D tensor (empty for C = 1)."""
    mask = ~torch.eye(square.shape[0], dtype=torch.bool, device=square.device)
    return square[mask]


def _without_target(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``scores`` with each row's target entry set to -inf (out of place), so max/logsumexp skip it."""
    target = F.one_hot(labels, num_classes=scores.shape[1]).bool()
    return scores.masked_fill(target, float("-inf"))


# --------------------------------------------------------------------------------------------------------------------
# §1 FMR


def channel_entropy(features: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    r"""Per-sample entropy of the softmax across feature channels (FMR, methods.md §1.1).

    Chapman, Xu, Liu, "Feature Magnitude Regularization", DICTA 2024, arXiv 2409.01672. The FMR loss is
    ``-lambda_t * channel_entropy(features, tau).mean()``; the weight comes from :func:`fmr_weight`.

    .. math::

        p_{b,i} = \frac{\exp(f_{b,i} / \tau)}{\sum_{j=1}^{D} \exp(f_{b,j} / \tau)}, \qquad
        H_b = -\sum_{i=1}^{D} p_{b,i} \log p_{b,i}

    with f_b the raw (unnormalised, post-ReLU GAP) penultimate feature of sample b, D its number of channels, tau the
    softmax temperature and log the natural logarithm. Computed from ``log_softmax`` (no overflow for large f, no
    ``log 0``). The gradient is the exact gradient of H (nothing is detached), as in the official code.

    Args:
        features: Penultimate features f.
        tau: Softmax temperature, > 0.

    Shape:
        features: (B, D). Output: (B,).

    Reduction:
        Summed over the D channels; none over the batch (one value per sample).

    Returns:
        H_b in nats, between 0 and log D.

    Raises:
        ValueError: ``features`` is not 2-D, or ``tau`` is not positive.
        TypeError: ``features`` is not a floating tensor.

    Example:
        >>> f = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
        >>> [round(h, 6) for h in channel_entropy(f).tolist()]  # p = (1/4, 3/4); uniform -> log 2
        [0.562335, 0.693147]
    """
    _check_float_matrix("features", features, "(B, D)")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    log_p = F.log_softmax(features / tau, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def fmr_weight(h_t: torch.Tensor | float, h_init: torch.Tensor | float, h_max: torch.Tensor | float,
               beta: float) -> torch.Tensor | float:
    r"""The dynamic FMR weight lambda_t, "META_CALCULATED" mode (methods.md §1.1).

    Chapman, Xu, Liu, "Feature Magnitude Regularization", DICTA 2024, arXiv 2409.01672.

    .. math::

        \lambda_t = \beta \, \frac{H_{max} - H_t}{H_{max} - H_{init}}

    with H_max = log D (entropy of the uniform channel distribution), H_t the running mean of recent batch-mean
    channel entropies, H_init that running mean at the end of the statistics pass, and beta the desired initial
    weight (50 in the published configs). The official code writes it as c_max (H_max - H_t) / H_max with
    c_max = beta H_max / (H_max - H_init); its DYNAMICALLY_CALCULATED mode is the same expression with a given c_max,
    i.e. this function with ``h_init = 0`` and ``beta = c_max``. No clamp is applied (the official code has none,
    methods.md §10 #1): the weight exceeds beta once H_t < H_init. A clamp, if wanted, belongs to the caller
    (``lambda_max``).

    Args:
        h_t: Current running entropy H_t (nats).
        h_init: Initial running entropy H_init (nats).
        h_max: Maximum entropy H_max = log D (nats).
        beta: Desired initial weight beta.

    Shape:
        Scalars: Python numbers, or 0-dim tensors (then the result is a 0-dim tensor, computed without reading its
        value on the host).

    Reduction:
        None.

    Returns:
        lambda_t (no gradient flows through the weight in the FMR term: it is computed from detached entropies).

    Raises:
        ValueError: ``h_max == h_init`` for Python numbers (features already uniform at initialisation: the weight is
            undefined). With tensors the check is the caller's (:class:`~regtune.regularizers.fmr.
            FeatureMagnitudeRegularization` checks H_init once, after its statistics pass).

    Example:
        >>> round(fmr_weight(h_t=7.3, h_init=7.0, h_max=math.log(2048), beta=50.0), 3)
        25.985
    """
    if not any(isinstance(v, torch.Tensor) for v in (h_t, h_init, h_max)):
        h_t, h_init, h_max, beta = float(h_t), float(h_init), float(h_max), float(beta)
        if h_max == h_init:
            raise ValueError(
                f"fmr_weight is undefined when h_max == h_init (both {h_max}): the initial features are already "
                "uniform over the channels, so (H_max - H_init) = 0 divides by zero; use a fixed weight instead"
            )
    return beta * (h_max - h_t) / (h_max - h_init)


# --------------------------------------------------------------------------------------------------------------------
# §2 AdaRand, §3.1 RandReg


def random_feature_loss(features: torch.Tensor, reference: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    r"""Squared distance between features and random targets (AdaRand / RandReg, methods.md §2.1, §3.1).

    Yamaguchi, Kanai, Adachi, Chijiwa, "Adaptive Random Feature Regularization on Fine-tuning Deep Neural
    Networks", CVPR 2024, arXiv 2403.10097; Zhong & Maki, "Regularizing CNN Transfer Learning with Randomised
    Regression", CVPR 2020, arXiv 1908.05997.

    .. math::

        \text{mean:}\ \frac{1}{BD} \sum_{b,d} (f_{b,d} - z_{b,d})^2, \qquad
        \text{sum\_dim:}\ \frac{1}{B} \sum_b \lVert f_b - z_b \rVert_2^2

    with f the penultimate features and z the targets (a sample from the class prior for AdaRand, from U(0,1) or
    N(0,1) for RandReg). AMBIGUITY (methods.md §2.1, §10 #5): the official code uses ``F.mse_loss`` (mean over all
    B*D entries, the default here, for which lambda = 1 was tuned); a paper written with ||f - z||^2 sums over D
    ('sum_dim' = D times 'mean'). Gradients flow into ``features`` and, if it requires them, ``reference``.

    Args:
        features: Penultimate features f.
        reference: Targets z, same shape (detach them first if they must not receive gradients).
        reduction: ``'mean'`` (code) or ``'sum_dim'`` (paper's norm).

    Shape:
        features, reference: (B, D). Output: scalar.

    Reduction:
        'mean': averaged over batch and channels. 'sum_dim': summed over channels, averaged over the batch.

    Returns:
        The 0-dim loss.

    Raises:
        ValueError: Shapes differ or are not 2-D, or ``reduction`` is unknown.
        TypeError: A non-floating input.

    Example:
        >>> f, z = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
        >>> random_feature_loss(f, z).item(), random_feature_loss(f, z, reduction="sum_dim").item()
        (2.5, 5.0)
    """
    _check_float_matrix("features", features, "(B, D)")
    _check_float_matrix("reference", reference, "(B, D)")
    if features.shape != reference.shape:
        raise ValueError(
            f"features and reference must have the same shape (B, D), got {tuple(features.shape)} and "
            f"{tuple(reference.shape)}"
        )
    _check_choice("reduction", reduction, _RANDOM_FEATURE_REDUCTIONS)
    squared = (features - reference).pow(2)
    if reduction == "mean":
        return squared.mean()
    return squared.sum(dim=1).mean()


def adarand_prior_losses(mu: torch.Tensor, running_mean: torch.Tensor, intra: str = "cosine_sq",
                         inter: str = "cosine_sq", eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The two terms of AdaRand's prior-update objective, minimised over the class means mu (methods.md §2.1).

    Yamaguchi, Kanai, Adachi, Chijiwa, "Adaptive Random Feature Regularization on Fine-tuning Deep Neural
    Networks", CVPR 2024, arXiv 2403.10097.

    .. math::

        L_{intra} = \frac{1}{C} \sum_c \bigl(1 - \cos(\mu_c, \bar m_c)\bigr)^2 \ \text{('cosine\_sq')}
        \quad\text{or}\quad \frac{1}{C} \sum_c \lVert \mu_c - \bar m_c \rVert_2^2 \ \text{('l2')}

        L_{inter} = \frac{1}{C(C-1)} \sum_{c \ne c'} \cos(\mu_c, \mu_{c'})^2 \ \text{('cosine\_sq')}
        \quad\text{or}\quad \frac{1}{C(C-1)} \sum_{c \ne c'} \cos(\mu_c, \mu_{c'}) \ \text{('cosine')}

    with mu_c the prior mean of class c, mbar_c the running (EMA) mean of class c's features and C the number of
    classes; the inter sum runs over the C(C-1) ordered pairs. AMBIGUITY (methods.md §2.1, §10 #6, #7): the paper
    speaks of a "distance" and a cosine; the defaults are the released code's squared forms. Cosines use safe
    normalisation: each row is divided by max(||row||_2, eps), so a zero row has cosine 0 with everything instead
    of NaN (its gradient is then of order 1/eps, as with ``F.normalize``). With C = 1 there is no pair and
    L_inter = 0 (still attached to the graph). The caller should pass ``running_mean`` detached (it is a statistic,
    not a parameter).

    Args:
        mu: Prior class means mu.
        running_mean: Running class means mbar.
        intra: ``'cosine_sq'`` (code) or ``'l2'``.
        inter: ``'cosine_sq'`` (code) or ``'cosine'``.
        eps: Lower bound on a row norm in the cosine.

    Shape:
        mu, running_mean: (C, D). Outputs: two scalars.

    Reduction:
        L_intra averaged over classes; L_inter averaged over the C(C-1) ordered off-diagonal pairs.

    Returns:
        ``(l_intra, l_inter)``, both 0-dim; the objective is their sum.

    Raises:
        ValueError: Shapes differ or are not 2-D, C = 0, or an option string is unknown.
        TypeError: A non-floating input.

    Example:
        >>> mu = torch.tensor([[1.0, 0.0], [1.0, 1.0]]) / torch.tensor([[1.0], [math.sqrt(2.0)]])
        >>> l_intra, l_inter = adarand_prior_losses(mu, torch.eye(2))
        >>> round(l_intra.item(), 6), round(l_inter.item(), 6)
        (0.042893, 0.5)
    """
    _check_float_matrix("mu", mu, "(C, D)")
    _check_float_matrix("running_mean", running_mean, "(C, D)")
    if mu.shape != running_mean.shape:
        raise ValueError(
            f"mu and running_mean must have the same shape (C, D), got {tuple(mu.shape)} and "
            f"{tuple(running_mean.shape)}"
        )
    if mu.shape[0] == 0:
        raise ValueError("mu must hold at least one class, got C = 0")
    _check_choice("intra", intra, _INTRA_DISTANCES)
    _check_choice("inter", inter, _INTER_SIMILARITIES)

    mu_unit = _normalize_rows(mu, eps)
    if intra == "cosine_sq":
        cos_intra = (mu_unit * _normalize_rows(running_mean, eps)).sum(dim=1)  # (C,)
        l_intra = (1.0 - cos_intra).pow(2).mean()
    else:
        l_intra = (mu - running_mean).pow(2).sum(dim=1).mean()

    pair_cos = _off_diagonal(mu_unit @ mu_unit.T)  # (C(C-1),)
    pair_terms = pair_cos.pow(2) if inter == "cosine_sq" else pair_cos
    # Sum / count rather than .mean(): for C = 1 the empty sum gives 0 (mean of nothing would be NaN).
    l_inter = pair_terms.sum() / max(pair_terms.numel(), 1)
    return l_intra, l_inter


# --------------------------------------------------------------------------------------------------------------------
# §3.2 FNP / SGM


def feature_norm_penalty(features: torch.Tensor, logits: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, weighting: str = "none") -> torch.Tensor:
    r"""Feature-norm penalty, plain or SGM-weighted (methods.md §3.2).

    Hariharan & Girshick, "Low-shot Visual Recognition by Shrinking and Hallucinating Features", ICCV 2017,
    arXiv 1606.02819.

    .. math::

        \text{none:}\ \frac{1}{B} \sum_b \lVert f_b \rVert_2^2, \qquad
        \text{sgm:}\ \frac{1}{B} \sum_b \alpha_b \lVert f_b \rVert_2^2, \quad
        \alpha_b = \sum_c \bigl(p_{b,c} - [c = y_b]\bigr)^2

    with f_b the penultimate feature, p_b = softmax(logits_b) and y_b the label of sample b. For softmax regression
    alpha_b ||f_b||^2 is the squared norm of the gradient of the cross-entropy w.r.t. the classifier weights (SGM).
    UNVERIFIED (methods.md §3.2): whether gradients flow through alpha_b in the paper; here alpha_b is detached
    (treated as a per-sample weight), so only ``features`` receives gradient.

    Args:
        features: Penultimate features f.
        logits: Classifier outputs; required for ``'sgm'``, ignored for ``'none'``.
        labels: Integer targets y; required for ``'sgm'``, ignored for ``'none'``.
        weighting: ``'none'`` (feature penalty) or ``'sgm'``.

    Shape:
        features: (B, D). logits: (B, C). labels: (B,). Output: scalar.

    Reduction:
        Summed over channels, averaged over the batch.

    Returns:
        The 0-dim penalty (no lambda applied).

    Raises:
        ValueError: Wrong shapes, labels out of range, ``'sgm'`` without logits/labels, or an unknown ``weighting``.
        TypeError: Non-floating features/logits or non-integer labels.

    Example:
        >>> f = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
        >>> feature_norm_penalty(f).item()  # (25 + 1) / 2
        13.0
        >>> feature_norm_penalty(f, torch.zeros(2, 2), torch.tensor([0, 1]), weighting="sgm").item()  # alpha = 1/2
        6.5
    """
    _check_float_matrix("features", features, "(B, D)")
    _check_choice("weighting", weighting, _FEATURE_NORM_WEIGHTINGS)
    squared_norms = features.pow(2).sum(dim=1)  # (B,)
    if weighting == "none":
        return squared_norms.mean()
    if logits is None or labels is None:
        raise ValueError("weighting='sgm' needs logits (B, C) and labels (B,); got "
                         f"logits={'None' if logits is None else 'a tensor'}, "
                         f"labels={'None' if labels is None else 'a tensor'}")
    _check_float_matrix("logits", logits, "(B, C)")
    if logits.shape[0] != features.shape[0]:
        raise ValueError(f"logits must have B = {features.shape[0]} rows like features, got {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[0], logits.shape[1], "logits")
    with torch.no_grad():
        residual = logits.softmax(dim=1) - F.one_hot(labels, num_classes=logits.shape[1]).to(logits.dtype)
        alpha = residual.pow(2).sum(dim=1).to(features.dtype)  # (B,)
    return (alpha * squared_norms).mean()


# --------------------------------------------------------------------------------------------------------------------
# §4 MaxEnt


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Per-sample entropy of the predicted class distribution (MaxEnt, methods.md §4.1).

    Dubey, Gupta, Raskar, Naik, "Maximum-Entropy Fine-Grained Classification", NeurIPS 2018, arXiv 1809.05934.
    The MaxEnt loss is ``CE - gamma * prediction_entropy(logits).mean()``.

    .. math::

        H_b = -\sum_{c=1}^{C} p_{b,c} \log p_{b,c}, \qquad p_b = \mathrm{softmax}(\text{logits}_b)

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
        >>> [round(h, 6) for h in prediction_entropy(torch.tensor([[0.0, 0.0, 0.0]])).tolist()]  # log 3
        [1.098612]
    """
    _check_float_matrix("logits", logits, "(B, C)")
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# §7.5 Classifier-weight penalties


def head_l1(weight: torch.Tensor) -> torch.Tensor:
    r"""L1 penalty on classifier weights, sum_{c,k} |w_{c,k}| (methods.md §7.5; sparsifies the head).

    Studied for its effect on class activation maps (Zhou et al., "Learning Deep Features for Discriminative
    Localization", CVPR 2016, arXiv 1512.04150, define the CAM).

    .. math::

        R_1 = \sum_{c,k} \lvert w_{c,k} \rvert

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
    _check_float_tensor("weight", weight)
    return weight.abs().sum()


def head_l2(weight: torch.Tensor) -> torch.Tensor:
    r"""L2 penalty on classifier weights, sum_{c,k} w_{c,k}^2 (methods.md §7.5; head weight decay).

    Studied for its effect on class activation maps (Zhou et al., CVPR 2016, arXiv 1512.04150). TLlib's head term
    (methods.md §6.1) is half of this.

    .. math::

        R_2 = \sum_{c,k} w_{c,k}^2

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
    _check_float_tensor("weight", weight)
    return weight.pow(2).sum()


def negative_weight_penalty(weight: torch.Tensor) -> torch.Tensor:
    r"""Penalty on negative classifier weights, sum_{c,k} max(0, -w_{c,k}) (methods.md §7.5, library's reading).

    Motivated by the CAM study's finding that negative head weights falling on the foreground hurt localisation, and
    by "negative weight clamping" (Bae, Noh, Kim, "Rethinking Class Activation Mapping for Weakly Supervised Object
    Localization", ECCV 2020). Neither paper states this penalty: it is the library's reading of §7.5, offered as an
    option for the CAM study (UNVERIFIED as a published method).

    .. math::

        R_- = \sum_{c,k} \max(0, -w_{c,k})

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
    _check_float_tensor("weight", weight)
    return F.relu(-weight).sum()


# --------------------------------------------------------------------------------------------------------------------
# §5 Largest margins


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Cosines between normalised features and normalised class prototypes (methods.md §5.1).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    .. math::

        \cos_{b,c} = \langle \tilde f_b, \tilde w_c \rangle, \qquad
        \tilde f_b = f_b / \lVert f_b \rVert_2, \quad \tilde w_c = w_c / \lVert w_c \rVert_2

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
        The cosine matrix, entries in [-1, 1].

    Raises:
        ValueError: Inputs are not 2-D or their D differ.
        TypeError: A non-floating input.

    Example:
        >>> cosine_logits(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])).tolist()
        [[1.0, 0.7071067690849304, 0.0]]
    """
    _check_float_matrix("features", features, "(B, D)")
    _check_float_matrix("weight", weight, "(C, D)")
    if features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features (B, D) and weight (C, D) must share D, got {tuple(features.shape)} and {tuple(weight.shape)}"
        )
    return _normalize_rows(features, eps) @ _normalize_rows(weight, eps).T


def lm_softmax_loss(cos: torch.Tensor, labels: torch.Tensor, s: float = 64.0) -> torch.Tensor:
    r"""Largest-margin softmax (LM-Softmax) loss on cosine logits (methods.md §5.4).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    .. math::

        L_{LM} = \frac{1}{s} \cdot \frac{1}{B} \sum_b \log \sum_{j \ne y_b}
        \exp\bigl(s (\cos_{b,j} - \cos_{b,y_b})\bigr)

    with cos_{b,j} the cosine of sample b to class j (:func:`cosine_logits`), y_b its label and s the scale: a
    softmax cross-entropy whose denominator omits the target, divided by s. As s grows it tends to the negative
    sample margin (:func:`sample_margin_loss`). Computed with ``logsumexp`` over the differences with the target
    masked to -inf (stable for s = 64; the third-party copy exponentiates directly). The default s = 64 is copied from
    that code; the paper's per-task values are UNVERIFIED (methods.md §10 #13). Per-class weights are not applied.

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
    _check_float_matrix("cos", cos, "(B, C)")
    _check_at_least_two_classes(cos, "lm_softmax_loss")
    _check_labels(labels, cos.shape[0], cos.shape[1], "cos")
    if not s > 0:
        raise ValueError(f"s must be positive, got {s}")
    target_cos = cos.gather(1, labels.unsqueeze(1))  # (B, 1)
    scaled_gap = _without_target(s * (cos - target_cos), labels)  # (B, C), target entry -inf
    return torch.logsumexp(scaled_gap, dim=1).mean() / s


def sample_margins(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Per-sample margin gamma(x, y) = cos_y - max_{j != y} cos_j (methods.md §5.2).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    .. math::

        \gamma_b = \cos_{b,y_b} - \max_{j \ne y_b} \cos_{b,j}

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
        The margins, in [-2, 2] for cosines.

    Raises:
        ValueError: Wrong shapes, C < 2, or labels out of range.
        TypeError: Non-floating cos or non-integer labels.

    Example:
        >>> [round(m, 4) for m in sample_margins(torch.tensor([[0.9, 0.1, 0.0]]), torch.tensor([1])).tolist()]
        [-0.8]
    """
    _check_float_matrix("cos", cos, "(B, C)")
    _check_at_least_two_classes(cos, "sample_margins")
    _check_labels(labels, cos.shape[0], cos.shape[1], "cos")
    target_cos = cos.gather(1, labels.unsqueeze(1)).squeeze(1)  # (B,)
    best_other = _without_target(cos, labels).amax(dim=1)  # (B,)
    return target_cos - best_other


def sample_margin_loss(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Sample-margin regularization R_sm = mean_b (max_{j != y_b} cos_{b,j} - cos_{b,y_b}) (methods.md §5.3).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    .. math::

        R_{sm} = \frac{1}{B} \sum_b \bigl(\max_{j \ne y_b} \cos_{b,j} - \cos_{b,y_b}\bigr)
               = -\frac{1}{B} \sum_b \gamma_b

    with gamma_b the sample margin of :func:`sample_margins`; no scale s. The weight lambda_sm (UNVERIFIED default)
    is applied by the caller.

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
    r"""Zero-centroid regularization of normalised class prototypes (methods.md §5.5).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    .. math::

        R_{zc} = \Bigl\lVert \sum_{c=1}^{C} \tilde w_c \Bigr\rVert_2^2 \ \text{('sum')}
        \quad\text{or}\quad \Bigl\lVert \frac{1}{C} \sum_{c=1}^{C} \tilde w_c \Bigr\rVert_2^2 \ \text{('mean')}

    with w~_c = w_c / max(||w_c||_2, eps) the normalised prototype of class c and C the number of classes; 0 for a
    regular simplex (the max-class-margin configuration). The default sums: the only public code found for the term
    (a training script's ``norm_weights`` step, next to the paper's loss classes) penalises the squared norm of the
    sum of the normalised prototypes. The paper's own form is UNVERIFIED (methods.md §5.5); ``'mean'`` is C^2 times
    smaller, and ``squared=False`` returns the norm (its gradient at a zero centroid is taken as 0).

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
    _check_float_matrix("weight", weight, "(C, D)")
    if weight.shape[0] == 0:
        raise ValueError("weight must hold at least one class prototype, got C = 0")
    _check_choice("reduce", reduce, _CENTROID_REDUCTIONS)
    unit = _normalize_rows(weight, eps)
    centroid = unit.mean(dim=0) if reduce == "mean" else unit.sum(dim=0)  # (D,)
    if squared:
        return centroid.pow(2).sum()
    return torch.linalg.vector_norm(centroid)


def class_margin(weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Class margin: the smallest angle between two normalised class prototypes (methods.md §5.2).

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589.

    .. math::

        m_{cls} = \min_{i \ne j} \arccos \langle \tilde w_i, \tilde w_j \rangle

    with w~_c = w_c / max(||w_c||_2, eps) the normalised prototype of class c. Its maximum for C <= D + 1 is
    arccos(-1/(C-1)), reached by a regular simplex. The cosine is clamped to [-1, 1] before arccos (rounding can push
    it just outside). Meant as an analysis metric: the gradient of arccos is infinite at +-1.

    Args:
        weight: Head weight W, one prototype per row.
        eps: Lower bound on a row norm.

    Shape:
        weight: (C, D) with C >= 2. Output: scalar.

    Reduction:
        Minimum over the C(C-1) ordered pairs.

    Returns:
        The 0-dim angle in radians, in [0, pi].

    Raises:
        ValueError: ``weight`` is not 2-D or has fewer than 2 rows.
        TypeError: ``weight`` is not a floating tensor.

    Example:
        >>> round(class_margin(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])).item(), 6)  # pi / 4
        0.785398
    """
    _check_float_matrix("weight", weight, "(C, D)")
    if weight.shape[0] < 2:
        raise ValueError(f"class_margin needs at least 2 class prototypes, got C = {weight.shape[0]}")
    unit = _normalize_rows(weight, eps)
    largest_cos = _off_diagonal(unit @ unit.T).amax()  # arccos is decreasing: the smallest angle
    return torch.arccos(largest_cos.clamp(-1.0, 1.0))


# --------------------------------------------------------------------------------------------------------------------
# §6 Transfer regularizers of TLlib: L2-SP, DELTA, BSS, Co-Tuning, LwF, StochNorm

_DELTA_BATCH_REDUCTIONS = ("sum", "mean")


def _check_pairs(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> None:
    if len(params) != len(anchors):
        raise ValueError(f"got {len(params)} parameters but {len(anchors)} anchors")
    for i, (p, a) in enumerate(zip(params, anchors)):
        if p.shape != a.shape:
            raise ValueError(f"parameter {i} has shape {tuple(p.shape)} but its anchor {tuple(a.shape)}")


def l2_sp_penalty(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Squared distance to the starting point, 1/2 sum_i ||w_i - w0_i||^2 (L2-SP, methods.md §6.1).

    Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018,
    arXiv 1802.01483.

    .. math::

        \Omega_{SP}(w) = \tfrac12 \sum_i \lVert w_i - w^0_i \rVert_2^2

    Args:
        params: Current parameters w_i (any shapes).
        anchors: Their pretrained values w0_i (same shapes; no gradient flows into them).

    Reduction:
        Summed over every entry of every parameter.

    Returns:
        The 0-dim penalty; its gradient with respect to w_i is w_i - w0_i.

    Example:
        >>> l2_sp_penalty([torch.tensor([3.0, 0.0])], [torch.tensor([1.0, 0.0])]).item()
        2.0
    """
    _check_pairs(params, anchors)
    if not params:
        raise ValueError("l2_sp_penalty needs at least one parameter")
    return 0.5 * sum((p - a.detach()).pow(2).sum() for p, a in zip(params, anchors))


def l2_penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""1/2 sum_i ||w_i||^2: the head term of L2-SP and DELTA (methods.md §6.1, Omega_head).

    Reduction:
        Summed over every entry of every parameter.

    Example:
        >>> l2_penalty([torch.tensor([1.0, 2.0]), torch.tensor([2.0])]).item()
        4.5
    """
    if not params:
        raise ValueError("l2_penalty needs at least one parameter")
    return 0.5 * sum(p.pow(2).sum() for p in params)


def delta_penalty(maps: torch.Tensor, source_maps: torch.Tensor, attention: torch.Tensor | None = None,
                  normalize: bool = True, batch_reduction: str = "sum") -> torch.Tensor:
    r"""Behavioural distance of one layer's feature maps to the frozen source network's (DELTA, methods.md §6.2).

    Li, Xiong, Wang, Huan, Chen, Dou, "DELTA: Deep Learning Transfer using Feature Map with Attention for
    Convolutional Networks", ICLR 2019, arXiv 1901.09229.

    .. math::

        \Omega_j = \tfrac12 \sum_b \sum_{c=1}^{C} C\,a_c\,\frac{\lVert FM(x_b)_c - FM^0(x_b)_c \rVert_2^2}{S}

    with S = H W spatial positions (or tokens) and a the channel attention (uniform a_c = 1/C when ``None``, which
    makes the term the per-position mean squared distance summed over channels). ``normalize=False`` is TLlib's
    unweighted ``feature_map`` variant, 1/2 sum_b ||FM(x_b) - FM0(x_b)||^2 (no attention, no division by S).

    Args:
        maps: Feature maps of the network being trained, as ``(B, C, S)`` (see
            :func:`regtune.regularizers.hooks.as_channel_maps`).
        source_maps: The frozen source network's maps of the same images (detached here).
        attention: Channel attention a (non-negative, summing to 1), or ``None``.
        normalize: Weight by C a_c and divide by S (DELTA); ``False`` gives the plain squared distance.
        batch_reduction: ``"sum"`` over the batch (TLlib: the term grows with the batch size) or ``"mean"``.

    Shape:
        maps, source_maps: (B, C, S). attention: (C,). Output: scalar.

    Returns:
        The 0-dim penalty of this layer.

    Example:
        >>> fm, fm0 = torch.ones(1, 2, 4), torch.zeros(1, 2, 4)  # every position differs by 1 in both channels
        >>> delta_penalty(fm, fm0).item()  # 1/2 * (1 + 1)
        1.0
    """
    _check_choice("batch_reduction", batch_reduction, _DELTA_BATCH_REDUCTIONS)
    _check_float_tensor("maps", maps)
    if maps.dim() != 3 or maps.shape != source_maps.shape:
        raise ValueError(f"maps and source_maps must both be (B, C, S), got {tuple(maps.shape)} and "
                         f"{tuple(source_maps.shape)}")
    squared = (maps - source_maps.detach()).pow(2).sum(-1)  # (B, C)
    if normalize:
        channels, positions = maps.shape[1], maps.shape[2]
        if attention is None:
            weights = squared.new_full((channels,), 1.0 / channels)
        else:
            if attention.shape != (channels,):
                raise ValueError(f"attention must have shape ({channels},), got {tuple(attention.shape)}")
            weights = attention.to(squared.dtype)
        squared = squared * (channels * weights) / positions
    elif attention is not None:
        raise ValueError("attention needs normalize=True (TLlib's unweighted feature_map variant has none)")
    per_sample = 0.5 * squared.sum(-1)
    return per_sample.sum() if batch_reduction == "sum" else per_sample.mean()


def channel_attention(loss_increase: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    r"""DELTA's channel attention from the loss increase when each channel is zeroed (methods.md §6.2).

    .. math::

        a = \mathrm{softmax}\!\left(\frac{z}{T}\right), \qquad z_c = \frac{\Delta_c - \mathrm{mean}(\Delta)}
        {\mathrm{std}(\Delta)}

    with the population standard deviation (numpy's ``std``, as TLlib). A layer whose channels all give the same
    increase (std 0) gets uniform attention.

    Args:
        loss_increase: Delta_c, mean increase of the loss when channel c is zeroed.
        temperature: T (5 in TLlib).

    Shape:
        loss_increase: (C,). Output: (C,), summing to 1.
    """
    _check_float_tensor("loss_increase", loss_increase)
    if loss_increase.dim() != 1 or loss_increase.numel() == 0:
        raise ValueError(f"loss_increase must be a non-empty vector, got shape {tuple(loss_increase.shape)}")
    std = loss_increase.std(unbiased=False)
    if not std > 0:
        return torch.full_like(loss_increase, 1.0 / loss_increase.numel())
    z = (loss_increase - loss_increase.mean()) / std
    return torch.softmax(z / temperature, dim=0)


def batch_spectral_shrinkage(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    r"""Sum of the k smallest squared singular values of the batch feature matrix (BSS, methods.md §6.3).

    Chen, Wang, Fu, Long, Wang, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe
    Transfer Learning", NeurIPS 2019.

    .. math::

        L_{BSS} = \sum_{i=1}^{k} \sigma_{m+1-i}^2, \qquad \sigma_1 \ge \dots \ge \sigma_m \text{ the singular values
        of } F,\ m = \min(B, D)

    Computed as the smallest eigenvalues of the m x m Gram matrix (F F^T, or F^T F when D < B) in float64: the
    eigenvalue gradient V diag(g) V^T needs no eigen-gaps, unlike the SVD's, and float64 keeps the small end of the
    spectrum accurate. The result is cast back to the features' dtype.

    Args:
        features: Batch feature matrix F.
        k: How many of the smallest singular values (1 <= k <= min(B, D)).

    Shape:
        features: (B, D). Output: scalar.

    Example:
        >>> batch_spectral_shrinkage(torch.tensor([[3.0, 0.0], [0.0, 1.0]])).item()  # F = diag(3, 1)
        1.0
    """
    _check_float_matrix("features", features, "(B, D)")
    batch, dim = features.shape
    if not 1 <= k <= min(batch, dim):
        raise ValueError(f"k must be in [1, min(batch, D)] = [1, {min(batch, dim)}] for a batch of {batch} features "
                         f"of dimension {dim}, got k = {k}")
    f = features.double()
    gram = f @ f.T if batch <= dim else f.T @ f
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    return eigenvalues[:k].sum().to(features.dtype)


def class_relationship(source_probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    r"""Co-Tuning's target-to-source relationship: the mean source-class distribution per target class (§6.4).

    You, Kou, Long, Wang, "Co-Tuning for Transfer Learning", NeurIPS 2020.

    .. math::

        R[t] = \frac{1}{|\{b : y_b = t\}|} \sum_{b : y_b = t} \mathrm{softmax}(g(f_b))

    ("direct approach"; every row sums to 1).

    Args:
        source_probs: Source-head probabilities of the training images (rows sum to 1).
        labels: Their target classes.
        num_classes: C_t.

    Shape:
        source_probs: (N, C_s). labels: (N,). Output: (C_t, C_s).

    Raises:
        ValueError: a target class has no image (its row would be undefined).
    """
    _check_float_matrix("source_probs", source_probs, "(N, C_s)")
    _check_labels(labels, source_probs.shape[0], num_classes, "source_probs rows / num_classes")
    sums = source_probs.new_zeros(num_classes, source_probs.shape[1]).index_add_(0, labels, source_probs)
    counts = torch.bincount(labels, minlength=num_classes)
    return relationship_from_sums(sums, counts)


def relationship_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """:func:`class_relationship` from per-class sums of source probabilities (C_t, C_s) and counts (C_t,), e.g.
    accumulated batch by batch, or all-reduced over processes that each saw a share of the data.

    Raises:
        ValueError: a target class has no image.
    """
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"target classes {missing} have no image; the relationship needs every class")
    return sums / counts.unsqueeze(1).to(sums.dtype)


def co_tuning_loss(source_logits: torch.Tensor, labels: torch.Tensor, relationship: torch.Tensor) -> torch.Tensor:
    r"""Soft cross-entropy of the source head to the relationship row of each label (Co-Tuning, §6.4).

    .. math::

        L = \frac{1}{B} \sum_b \Big[ -\sum_{s} R[y_b, s] \log \mathrm{softmax}(g(f_b))_s \Big]

    Shape:
        source_logits: (B, C_s). labels: (B,). relationship: (C_t, C_s). Output: scalar.

    Reduction:
        Mean over the batch.

    Example:
        >>> round(co_tuning_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([[0.5, 0.5]])).item(), 6)  # log 2
        0.693147
    """
    _check_float_matrix("source_logits", source_logits, "(B, C_s)")
    _check_float_matrix("relationship", relationship, "(C_t, C_s)")
    if relationship.shape[1] != source_logits.shape[1]:
        raise ValueError(f"relationship has {relationship.shape[1]} source classes, the logits "
                         f"{source_logits.shape[1]}")
    _check_labels(labels, source_logits.shape[0], relationship.shape[0], "source_logits / relationship rows")
    targets = relationship.detach()[labels].to(source_logits.dtype)
    return -(targets * F.log_softmax(source_logits, dim=1)).sum(1).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 3.0) -> torch.Tensor:
    r"""KL divergence of the student's tempered distribution from the teacher's (LwF, methods.md §6.7).

    Li & Hoiem, "Learning without Forgetting", ECCV 2016, arXiv 1606.09282.

    .. math::

        L = \frac{1}{B} \sum_b \mathrm{KL}\big(\mathrm{softmax}(t_b / T) \,\Vert\, \mathrm{softmax}(s_b / T)\big)

    (KLDivLoss 'batchmean', no T^2 factor, as TLlib).

    Shape:
        student_logits, teacher_logits: (B, C). Output: scalar.

    Example:
        >>> distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2)).item()
        0.0
    """
    _check_float_matrix("student_logits", student_logits, "(B, C)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} differ in shape")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits.detach().to(student_logits.dtype) / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean")


def stochastic_batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                          weight: torch.Tensor | None, bias: torch.Tensor | None, mask: torch.Tensor,
                          momentum: float, eps: float) -> torch.Tensor:
    r"""StochNorm's training-mode normalisation (Kou, You, Long, Wang, NeurIPS 2020; methods.md §6.5).

    .. math::

        z_0 = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}},\quad
        z_1 = \frac{x - \mu_{batch}}{\sqrt{\sigma^2_{batch} + \epsilon}},\quad
        y = \gamma \big((1 - s) z_0 + s z_1\big) + \beta

    with s the per-channel 0/1 ``mask`` (drawn ~ Bernoulli(p) by the caller). z0 uses the running statistics from
    before this batch, which are then updated in place exactly as BatchNorm does (``momentum``, unbiased batch
    variance). Computed as one per-channel affine map of x; gradients flow through the batch statistics of the
    channels with s = 1.

    Shape:
        x: (B, C, ...). running_mean, running_var, weight, bias, mask: (C,). Output: like x.
    """
    # s is per channel: the channels with s = 1 go through the native (fast) batch-norm kernel, whose weight and bias
    # are zeroed on the others, and the channels with s = 0 are a per-channel affine map of x with the moving
    # statistics (taken before the kernel updates them). One kernel and one fused elementwise pass.
    if x.numel() // x.shape[1] < 2:
        raise ValueError(f"StochNorm in training mode needs more than one value per channel (batch of {x.shape[0]})")
    s = mask.to(x.dtype)
    gamma = weight if weight is not None else torch.ones_like(s)
    beta = bias if bias is not None else torch.zeros_like(s)
    with torch.no_grad():
        moving_scale = torch.rsqrt(running_var.to(x.dtype) + eps)
        moving_shift = -running_mean.to(x.dtype) * moving_scale
    scale = (1 - s) * moving_scale * gamma
    shift = (1 - s) * (moving_shift * gamma + beta)
    batch_branch = F.batch_norm(x, running_mean, running_var, s * gamma, s * beta, True, momentum, eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(batch_branch + shift.reshape(shape), x, scale.reshape(shape))
