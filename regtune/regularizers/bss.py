"""BSS: batch spectral shrinkage of the penultimate features (Chen et al., NeurIPS 2019; methods.md §6.3)."""

from __future__ import annotations

import torch

from regtune.regularizers._utils import check_positive
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer
from regtune.regularizers.functional import batch_spectral_shrinkage

__all__ = ["BatchSpectralShrinkage"]


@register_regularizer("bss")
class BatchSpectralShrinkage(Regularizer):
    r"""Batch Spectral Shrinkage: penalise the k smallest singular values of the batch feature matrix.

    .. math::

        L = \eta \sum_{i=1}^{k} \sigma_{m+1-i}^2(F), \qquad F \in \mathbb{R}^{B \times D},\ m = \min(B, D)

    Chen, Wang, Fu, Long, Wang, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe
    Transfer Learning", NeurIPS 2019. The small singular directions carry the features that do not transfer; TLlib
    defaults k = 1, eta = 0.001. Computed from the eigenvalues of the B x B Gram matrix in float64 (see
    :func:`~regtune.regularizers.functional.batch_spectral_shrinkage`), not with an SVD per step.

    Args:
        eta: Weight (TLlib ``--trade-off`` 0.001).
        k: Number of smallest singular values (needs k <= min(B, D); a last batch smaller than k raises).

    Shape:
        step.features (B, D) -> scalar.
    """

    def __init__(self, eta: float = 1e-3, k: int = 1) -> None:
        super().__init__()
        check_positive("eta", eta)
        check_positive("k", k, allow_zero=False)
        self.eta = eta
        self.k = int(k)
        self._value: torch.Tensor | None = None

    def forward(self, step: TrainStep) -> torch.Tensor:
        value = batch_spectral_shrinkage(step.features, self.k)
        self._value = value.detach()
        return self.eta * value

    def stats(self) -> dict[str, float]:
        return {} if self._value is None else {"sigma_min_sq": float(self._value)}
