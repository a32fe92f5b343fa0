"""Tiny in-file models with the timm contract for regularizer tests: the "images" are the features themselves."""

from __future__ import annotations

import torch
from torch import nn


class FeatureNet(nn.Module):
    """``forward_features`` is the identity (or a BatchNorm1d), so a test controls the penultimate features.

    Args:
        dim: D.
        num_classes: C.
        bn: Put a BatchNorm1d in ``forward_features`` (to see train/eval-mode effects).
        dtype: Parameter dtype.
    """

    def __init__(self, dim: int, num_classes: int = 2, bn: bool = False, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim) if bn else nn.Identity()
        self.classifier = nn.Linear(dim, num_classes)
        self.num_features = dim
        self.pretrained_cfg = {"classifier": "classifier"}
        self.to(dtype)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
