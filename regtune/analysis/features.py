"""Feature statistics that explain a regularizer: norms, entropies, mutual information, margins, overlap.

Every function takes features already extracted (``(N, D)`` tensors, e.g. the pre-logits of a whole split with the
evaluation transform) and returns plain Python numbers, computed in float64. Importable without Lightning. Each
quantity's equation, reading and sources: docs/methods/analysis-metrics.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from regtune.regularizers.functional import channel_entropy, class_margin, cosine_logits, sample_margins

__all__ = [
    "feature_norms",
    "fmr_entropy",
    "head_weight_stats",
    "margin_stats",
    "meannn_entropy",
    "mutual_information",
    "topk_overlap",
]


def _matrix(features: torch.Tensor) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be an (N, D) tensor, got {getattr(features, 'shape', type(features))}")
    return features.detach().to(torch.float64)


def feature_norms(features: torch.Tensor) -> dict[str, float]:
    """The three feature-norm variants of the papers' code, each under its own name.

    Args:
        features: Features f, one row per sample.

    Shape:
        features: (N, D).

    Returns:
        ``per_sample_l2``: mean_b ||f_b||_2 (the usual "feature norm"); ``batch_mean_l2``: ||mean_b f_b||_2
        (AdaRand's code); ``mean_abs``: mean_{b,d} |f_bd| (FMR's code, "f_mag").
    """
    f = _matrix(features)
    return {"per_sample_l2": float(f.norm(dim=1).mean()), "batch_mean_l2": float(f.mean(0).norm()),
            "mean_abs": float(f.abs().mean())}


def meannn_entropy(features: torch.Tensor, eps: float = 1e-6, chunk: int = 1024, max_bytes: int = 2**28) -> float:
    r"""MeanNN differential entropy without its additive constant (Faivishevsky & Goldberger, NIPS 2008).

    $$
    \hat H(F) = \frac{D}{N(N-1)} \sum_{i \ne j} \log \lVert f_i - f_j + \epsilon \rVert_2
    $$

    in float64, by chunks of rows: each chunk's differences (rows x N x D) stay under ``max_bytes`` (256 MiB; the
    chunk shrinks below ``chunk`` rows for large N x D). ``eps`` is added to each coordinate of each difference (as
    ``torch.nn.functional.pairwise_distance``, AdaRand's code) so duplicates do not give log 0. The dropped constant,
    1 + log V_D with V_D the volume of the unit D-ball, depends on D only; the estimator's bias depends on N and on
    the distribution, so values compare only at the same N and D (docs/methods/analysis-metrics.md).

    Args:
        features: Features f, one row per sample.
        eps: Added to every coordinate of a difference before its norm.
        chunk: Most rows of differences held at once.
        max_bytes: Memory bound of one chunk of differences.

    Shape:
        features: (N, D) with N >= 2.

    Returns:
        The estimate in nats, without the constant.

    Raises:
        ValueError: fewer than 2 samples.
    """
    f = _matrix(features)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"MeanNN entropy needs at least 2 samples, got {n}")
    rows_per_chunk = max(1, min(chunk, max_bytes // (n * d * f.element_size())))
    total = 0.0
    for start in range(0, n, rows_per_chunk):
        block = f[start:start + rows_per_chunk]
        diff = block[:, None, :] - f[None, :, :] + eps
        logs = torch.log(diff.norm(dim=2))
        rows = torch.arange(block.shape[0])
        logs[rows, rows + start] = 0.0  # i == j
        total += float(logs.sum())
    return d * total / (n * (n - 1))


def mutual_information(features: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6,
                       chunk: int = 1024) -> dict[str, Any]:
    r"""I(F; Y) = H(F) - sum_c (N_c / N) H(F_c) with the MeanNN estimator.

    H is [`meannn_entropy`][regtune.analysis.features.meannn_entropy]. Classes with fewer than 2 samples cannot
    have an entropy: they are left out of both terms (the marginal is taken over the kept samples, so the two terms
    see the same data) and listed under ``skipped_classes``. The dropped constant is the same in every term and
    cancels. The value ranks runs measured on the same samples; it is not bounded by log C as a true mutual
    information with C classes is (docs/methods/analysis-metrics.md).

    Args:
        features: Features f, one row per sample.
        labels: Integer class of each sample.
        eps: See [`meannn_entropy`][regtune.analysis.features.meannn_entropy].
        chunk: See [`meannn_entropy`][regtune.analysis.features.meannn_entropy].

    Shape:
        features: (N, D). labels: (N,).

    Returns:
        ``{"marginal", "conditional", "mi", "n", "d", "classes", "skipped_classes"}``.
    """
    f = _matrix(features)
    if labels.shape != (f.shape[0],):
        raise ValueError(f"labels must have shape ({f.shape[0]},), got {tuple(labels.shape)}")
    labels = labels.detach().cpu()
    classes, counts = torch.unique(labels, return_counts=True)
    skipped = [int(c) for c, k in zip(classes, counts) if k < 2]
    kept = [int(c) for c, k in zip(classes, counts) if k >= 2]
    keep = torch.isin(labels, torch.tensor(kept, dtype=labels.dtype))
    f, labels = f[keep.to(f.device)], labels[keep]
    marginal = meannn_entropy(f, eps, chunk)
    n = f.shape[0]
    conditional = sum((int((labels == c).sum()) / n) * meannn_entropy(f[(labels == c).to(f.device)], eps, chunk)
                      for c in kept)
    return {"marginal": marginal, "conditional": conditional, "mi": marginal - conditional, "n": n,
            "d": int(f.shape[1]), "classes": len(kept), "skipped_classes": skipped}


def fmr_entropy(features: torch.Tensor, tau: float = 1.0) -> dict[str, float]:
    """FMR's channel-softmax entropy, mean over samples, and its value over H_max = log D.

    Chapman, Xu, Liu, "Feature Magnitude Regularization", DICTA 2024, arXiv 2409.01672: the per-sample entropy of
    softmax(f / tau) across the D channels (``regtune.regularizers.functional.channel_entropy``).

    Args:
        features: Features f, one row per sample.
        tau: Softmax temperature (FMR's code measures with 1).

    Shape:
        features: (N, D) with D >= 2.

    Returns:
        ``{"entropy", "normalized", "h_max"}``: the mean entropy in nats, its value over log D, and log D.

    Raises:
        ValueError: D = 1: the softmax over one channel is 1, its entropy 0 and H_max = log 1 = 0, so the normalised
            value is undefined.
    """
    f = _matrix(features)
    if f.shape[1] < 2:
        raise ValueError(f"fmr_entropy needs features with at least 2 channels, got shape {tuple(f.shape)}: over one "
                         "channel the softmax is 1, its entropy 0 and H_max = log 1 = 0, so entropy / H_max is "
                         "undefined")
    value = float(channel_entropy(f, tau).mean())
    return {"entropy": value, "normalized": value / math.log(f.shape[1]), "h_max": math.log(f.shape[1])}


def _channel_scores(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, per_class: bool,
                    weighting: str) -> torch.Tensor:
    """(C, D) scores s_c(k) = w-factor * mean_{y = c} f_k (per class) or mean over all samples (global)."""
    classes = weight.shape[0]
    if per_class:
        means = torch.stack([features[labels == c].mean(0) if (labels == c).any()
                             else torch.full((features.shape[1],), math.nan, dtype=features.dtype)
                             for c in range(classes)])
    else:
        means = features.mean(0, keepdim=True).expand(classes, -1)
    if weighting == "none":
        return means.clone()
    factor = weight.abs() if weighting == "abs_weight" else weight
    return factor * means


def topk_overlap(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, weight: torch.Tensor, k: int = 10, per_class: bool = True,
                 weighting: str = "abs_weight") -> dict[str, float]:
    r"""Top-k train/test feature overlap: regtune's reading of an FMR-paper analysis that has no published definition.

    For each class c, channel d is scored on a split S by s_{S,c}(d) = |w_{c,d}| * mean_{x in S, y = c} f_d(x);
    T_{S,c} are the k best channels; overlap_c = |T_train,c ∩ T_test,c| / k. The weighted variant sums the
    train scores of the shared channels, each divided by the sum of the k best train scores. Both are averaged
    over the classes present in both splits. ``weighting`` and ``per_class`` change the reading
    (docs/methods/analysis-metrics.md).

    Args:
        train_features: Training features, (N, D).
        train_labels: Their classes, (N,).
        test_features: Test features, (M, D).
        test_labels: Their classes, (M,).
        weight: The head's (C, D) weight.
        k: Channels per class.
        per_class: Score with the class's own samples (``False``: the mean over all samples, one ranking shared by
            the classes up to the weight factor).
        weighting: ``"abs_weight"`` (|w|), ``"signed_weight"`` (w) or ``"none"`` (features only).

    Returns:
        ``{"overlap", "weighted_overlap", "k", "classes"}``.
    """
    if weighting not in ("abs_weight", "signed_weight", "none"):
        raise ValueError(f"weighting must be 'abs_weight', 'signed_weight' or 'none', got {weighting!r}")
    w = weight.detach().to(torch.float64).cpu()
    if not 1 <= k <= w.shape[1]:
        raise ValueError(f"k must be in [1, D = {w.shape[1]}], got {k}")
    train = _channel_scores(_matrix(train_features).cpu(), train_labels.cpu(), w, per_class, weighting)
    test = _channel_scores(_matrix(test_features).cpu(), test_labels.cpu(), w, per_class, weighting)
    overlaps, weighted = [], []
    for c in range(w.shape[0]):
        if torch.isnan(train[c]).any() or torch.isnan(test[c]).any():
            continue
        top_train = torch.topk(train[c], k).indices
        top_test = set(torch.topk(test[c], k).indices.tolist())
        shared = [i for i in top_train.tolist() if i in top_test]
        overlaps.append(len(shared) / k)
        scores = train[c][top_train]
        total = float(scores.sum())
        weighted.append(float(train[c][shared].sum()) / total if shared and total != 0 else 0.0)
    if not overlaps:
        raise ValueError("no class has samples in both splits")
    return {"overlap": sum(overlaps) / len(overlaps), "weighted_overlap": sum(weighted) / len(weighted), "k": k,
            "classes": len(overlaps)}


def head_weight_stats(weight: torch.Tensor, zero_threshold: float = 1e-3, bins: int = 50) -> dict[str, Any]:
    """Statistics of the head's weights that relate to its CAMs: sparsity, sign, L1 / L2, histogram.

    Args:
        weight: The head's weight W, one row per class.
        zero_threshold: A weight with ``|w| < zero_threshold`` counts as zero (absolute, not relative to W's scale).
        bins: Bins of the histogram, equal, from the smallest to the largest weight.

    Shape:
        weight: (C, D).

    Returns:
        ``sparsity`` (share of |w| < ``zero_threshold``), ``negative_share`` (share of w < 0), ``positive_l1_share``
        (mean over classes of ||w_c^+||_1 / ||w_c||_1), ``l1``, ``l2``, and ``histogram``: ``{"edges", "counts"}``.
    """
    w = weight.detach().to(torch.float64).cpu()
    if w.dim() != 2:
        raise ValueError(f"weight must be (C, D), got {tuple(w.shape)}")
    l1_rows = w.abs().sum(1)
    positive = w.clamp(min=0).sum(1)
    share = torch.where(l1_rows > 0, positive / l1_rows, torch.zeros_like(l1_rows))
    low, high = float(w.min()), float(w.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(w.flatten(), bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return {"sparsity": float((w.abs() < zero_threshold).double().mean()),
            "negative_share": float((w < 0).double().mean()), "positive_l1_share": float(share.mean()),
            "l1": float(w.abs().sum()), "l2": float(w.pow(2).sum()), "zero_threshold": zero_threshold,
            "histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}}


def margin_stats(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> dict[str, Any]:
    """Sample margins (cosine form) and the head's class margin.

    Zhou, Liu, Zhai, Jiang, Gao, Ji, "Learning Towards the Largest Margins", ICLR 2022, arXiv 2206.11589: with
    cosines between normalised features and normalised head rows (no bias), the sample margin is
    cos_y - max_{j != y} cos_j and the class margin the smallest angle between two normalised rows.

    Args:
        features: Features f, one row per sample.
        labels: Integer class of each sample.
        weight: The head's weight W, one row per class (C >= 2).

    Shape:
        features: (N, D). labels: (N,). weight: (C, D).

    Returns:
        ``margin_mean``, ``margin_min``, ``margin_median``, ``class_margin_deg``, ``centroid_norm`` (norm of the mean
        normalised prototype) and ``margins`` (per sample, for histograms).
    """
    f = _matrix(features)
    w = weight.detach().to(torch.float64).to(f.device)
    margins = sample_margins(cosine_logits(f, w), labels.to(f.device))
    unit = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return {"margin_mean": float(margins.mean()), "margin_min": float(margins.min()),
            "margin_median": float(margins.median()), "class_margin_deg": math.degrees(float(class_margin(w))),
            "centroid_norm": float(unit.mean(0).norm()), "margins": margins.cpu().tolist()}
