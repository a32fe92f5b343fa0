"""BSS: batch spectral shrinkage of the penultimate features (Chen et al., NeurIPS 2019).

User documentation: docs/methods/bss.md.
"""

from __future__ import annotations

import torch

from regtune.regularizers._utils import check_float_matrix, check_positive
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer

__all__ = ["BatchSpectralShrinkage", "batch_spectral_shrinkage"]


def batch_spectral_shrinkage(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    r"""Sum of the k smallest squared singular values of the batch feature matrix (BSS).

    Chen, Wang, Fu, Long, Wang, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe
    Transfer Learning", NeurIPS 2019.

    $$
    L_{BSS} = \sum_{i=1}^{k} \sigma_{m+1-i}^2, \qquad \sigma_1 \ge \dots \ge \sigma_m \text{ the singular values
    of } F,\ m = \min(B, D)
    $$

    Computed as the smallest eigenvalues of the m x m Gram matrix (F F^T, or F^T F when D < B) in float64: the
    eigenvalue gradient V diag(g) V^T needs no eigen-gaps (as for singular values: only the gradients of singular or
    eigen-vectors do), the Gram matrix is small, and float64 keeps the small end of the spectrum accurate. The result
    is cast back to the features' dtype.

    Args:
        features: Batch feature matrix F.
        k: How many of the smallest singular values (1 <= k <= min(B, D)).

    Shape:
        features: (B, D). Output: scalar.

    Example:
        >>> batch_spectral_shrinkage(torch.tensor([[3.0, 0.0], [0.0, 1.0]])).item()  # F = diag(3, 1)
        1.0
    """
    check_float_matrix("features", features, "(B, D)")
    batch, dim = features.shape
    if not 1 <= k <= min(batch, dim):
        raise ValueError(f"k must be in [1, min(batch, D)] = [1, {min(batch, dim)}] for a batch of {batch} features "
                         f"of dimension {dim}, got k = {k}")
    f = features.double()
    gram = f @ f.T if batch <= dim else f.T @ f
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    return eigenvalues[:k].sum().to(features.dtype)


@register_regularizer("bss")
class BatchSpectralShrinkage(Regularizer):
    """Batch Spectral Shrinkage: L = eta * [`batch_spectral_shrinkage`][] of the batch's penultimate features.

    Chen, Wang, Fu, Long, Wang, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe
    Transfer Learning", NeurIPS 2019. The small singular directions carry the features that do not transfer; TLlib
    defaults k = 1, eta = 0.001.

    Args:
        eta: Weight (TLlib ``--trade-off`` 0.001).
        k: Number of smallest singular values (needs k <= min(B, D); a last batch smaller than k raises).

    Shape:
        step.features (B, D) -> scalar.
    """

    accepts_soft_targets = True  # reads only the features
    contract_kwargs = ({}, {"k": 2})

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

    def stats(self) -> dict[str, float | torch.Tensor]:
        return {} if self._value is None else {"sigma_min_sq": self._value}
