"""Feature statistics (norms, entropies, I(F;Y), overlap, head weights, margins) against hand values and NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regtune.analysis.features import (
    feature_norms,
    fmr_entropy,
    head_weight_stats,
    margin_stats,
    meannn_entropy,
    mutual_information,
    topk_overlap,
)


def test_feature_norms_hand_values() -> None:
    norms = feature_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert norms == {"per_sample_l2": 2.5, "batch_mean_l2": 2.5, "mean_abs": 1.75}


def test_meannn_hand_case_and_numpy() -> None:
    # N = 2, D = 1, f = (0, 2): 1 / (2 * 1) * (log 2 + log 2) = log 2 (eps shifts the two differences oppositely)
    assert meannn_entropy(torch.tensor([[0.0], [2.0]])) == pytest.approx(math.log(2.0), abs=1e-6)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(7, 3))
    expected = 3 / (7 * 6) * sum(np.log(np.linalg.norm(f[i] - f[j] + 1e-6)) for i in range(7) for j in range(7)
                                 if i != j)
    assert meannn_entropy(torch.tensor(f)) == pytest.approx(expected, rel=1e-12)
    assert meannn_entropy(torch.tensor(f), chunk=2) == pytest.approx(expected, rel=1e-12)  # chunking changes nothing
    # a memory budget below one row of differences still works, one row at a time
    assert meannn_entropy(torch.tensor(f), max_bytes=1) == pytest.approx(expected, rel=1e-12)
    assert math.isfinite(meannn_entropy(torch.zeros(3, 2)))  # duplicates: eps, not log 0
    with pytest.raises(ValueError, match="at least 2"):
        meannn_entropy(torch.zeros(1, 4))


def test_mutual_information_matches_numpy_and_skips_singletons() -> None:
    rng = np.random.default_rng(1)
    f = np.concatenate([rng.normal(0, 1, (5, 2)), rng.normal(3, 1, (4, 2)), rng.normal(0, 1, (1, 2))])
    y = np.array([0] * 5 + [1] * 4 + [2])

    def h(x):
        n, d = x.shape
        return d / (n * (n - 1)) * sum(np.log(np.linalg.norm(x[i] - x[j] + 1e-6)) for i in range(n) for j in range(n)
                                       if i != j)

    kept = y != 2
    marginal = h(f[kept])
    conditional = 5 / 9 * h(f[y == 0]) + 4 / 9 * h(f[y == 1])
    result = mutual_information(torch.tensor(f), torch.tensor(y))
    assert result["skipped_classes"] == [2] and result["n"] == 9 and result["d"] == 2 and result["classes"] == 2
    assert result["marginal"] == pytest.approx(marginal, rel=1e-12)
    assert result["conditional"] == pytest.approx(conditional, rel=1e-12)
    assert result["mi"] == pytest.approx(marginal - conditional, rel=1e-12) and result["mi"] > 0  # separated classes


def test_fmr_entropy_uniform_and_hand_case() -> None:
    assert fmr_entropy(torch.zeros(4, 16)) == {"entropy": pytest.approx(math.log(16)), "normalized": pytest.approx(1.0),
                                               "h_max": pytest.approx(math.log(16))}
    # f = (0, log 3): p = (1/4, 3/4), H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    assert fmr_entropy(torch.tensor([[0.0, math.log(3.0)]]))["entropy"] == pytest.approx(0.562335, abs=1e-6)


def test_fmr_entropy_of_one_channel_raises_clearly() -> None:
    with pytest.raises(ValueError, match="at least 2 channels.*log 1 = 0"):
        fmr_entropy(torch.ones(3, 1))


def test_topk_overlap_hand_case() -> None:
    weight = torch.ones(1, 4)
    train = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    test = torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    labels = torch.tensor([0])
    result = topk_overlap(train, labels, test, labels, weight, k=2)
    assert result["overlap"] == 0.5  # top-2 {0, 1} vs {3, 1}
    assert result["weighted_overlap"] == pytest.approx(3 / 7)  # shared channel 1: 3 of the top-2 train sum 4 + 3
    assert topk_overlap(train, labels, train, labels, weight, k=3)["overlap"] == 1.0
    # the weight factor changes the ranking: a large weight on channel 3 brings it into both top-2 sets
    weighted = topk_overlap(train, labels, test, labels, torch.tensor([[1.0, 1.0, 1.0, 10.0]]), k=2)
    assert weighted["overlap"] == 0.5 and weighted["weighted_overlap"] == pytest.approx(10 / 14)
    with pytest.raises(ValueError, match="weighting"):
        topk_overlap(train, labels, test, labels, weight, weighting="abs")


def test_head_weight_stats_hand_values() -> None:
    stats = head_weight_stats(torch.tensor([[0.5, -0.5, 0.0], [1.0, 0.0, 0.0005]]), zero_threshold=1e-3, bins=4)
    assert stats["sparsity"] == 0.5 and stats["negative_share"] == pytest.approx(1 / 6)
    assert stats["positive_l1_share"] == pytest.approx(0.75)  # (0.5 / 1.0 + 1.0005 / 1.0005) / 2
    assert stats["l1"] == pytest.approx(2.0005) and stats["l2"] == pytest.approx(1.5 + 0.0005 ** 2)
    assert sum(stats["histogram"]["counts"]) == 6 and len(stats["histogram"]["edges"]) == 5


def test_margin_stats_match_numpy() -> None:
    rng = np.random.default_rng(2)
    f, w, y = rng.normal(size=(6, 4)), rng.normal(size=(3, 4)), np.array([0, 1, 2, 0, 1, 2])
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    margins = [cos[b, y[b]] - max(cos[b, j] for j in range(3) if j != y[b]) for b in range(6)]
    result = margin_stats(torch.tensor(f), torch.tensor(y), torch.tensor(w))
    np.testing.assert_allclose(result["margins"], margins, rtol=1e-12)
    assert result["margin_min"] == pytest.approx(min(margins))
    assert result["margin_mean"] == pytest.approx(np.mean(margins))
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    angles = [np.degrees(np.arccos(np.clip(wn[i] @ wn[j], -1, 1))) for i in range(3) for j in range(3) if i != j]
    assert result["class_margin_deg"] == pytest.approx(min(angles))
    assert result["centroid_norm"] == pytest.approx(np.linalg.norm(wn.mean(0)))
