"""Co-Tuning: keep the pretrained source head predicting what the target labels imply (methods.md §6.4)."""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from regtune.regularizers._utils import (
    LazyShapeMixin,
    all_reduce_sum,
    check_positive,
    classifier_of,
    model_device,
    penultimate,
)
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer
from regtune.regularizers.functional import co_tuning_loss, relationship_from_sums

__all__ = ["CoTuning", "trainable_source_head"]


def trainable_source_head(head: nn.Module | None, method: str) -> nn.Module:
    """A trainable copy of the pretrained source classifier, or a clear error when there is none."""
    if head is None:
        raise ValueError(
            f"{method} needs the backbone's pretrained source classifier (e.g. the 1000-way ImageNet head). This "
            "backbone has none: it was built without pretrained weights, or its weights carry no classifier. Use a "
            "backbone with pretrained weights, or pass source_head=<nn.Module mapping features to source logits>."
        )
    head = copy.deepcopy(head)
    head.requires_grad_(True)
    return head


@register_regularizer("co_tuning")
class CoTuning(LazyShapeMixin, Regularizer):
    r"""Co-Tuning: soft cross-entropy of the source head to the target-to-source class relationship.

    .. math::

        L = \lambda \frac{1}{B} \sum_b \Big[ -\sum_{s=1}^{C_s} R[y_b, s] \log \mathrm{softmax}(g(f_b))_s \Big],
        \qquad R[t] = \mathrm{mean}_{i: y_i = t}\ \mathrm{softmax}(g_0(f^0_i))

    You, Kou, Long, Wang, "Co-Tuning for Transfer Learning", NeurIPS 2020. g is a trainable copy of the backbone's
    pretrained source classifier (trained with the backbone's learning rate, as TLlib); R is computed once by
    :meth:`setup` from the pretrained model (eval mode) over the training subset with the deterministic evaluation
    transform ("direct approach"; the paper's calibrated "reverse approach" is not in TLlib either) and written to
    the run directory as an artifact.

    Args:
        weight: lambda (TLlib ``--trade-off`` 2.3).
        source_head: The source classifier on the penultimate features; ``None`` takes the backbone's pretrained
            one (the trainer attaches it).
        relationship_file: Load R (a ``torch.save``-d (C_t, C_s) tensor, or the ``setup/<name>.pt`` file an earlier
            run on the same data wrote) instead of computing it.

    Shape:
        step.features (B, D), step.labels (B,) -> scalar.
    """

    needs_source_head = True
    needs_setup_pass = True

    def __init__(self, weight: float = 2.3, source_head: nn.Module | None = None,
                 relationship_file: str | None = None) -> None:
        super().__init__()
        check_positive("weight", weight)
        self.weight = weight
        self._given_head = source_head
        self.relationship_file = relationship_file
        self.source_head: nn.Module | None = None
        self.register_buffer("relationship", torch.zeros(0, 0))
        self._value: torch.Tensor | None = None

    def attach_source_head(self, head: nn.Module | None) -> None:
        if self._given_head is None:
            self._given_head = head

    def adapt_model(self, model: nn.Module) -> None:
        self.source_head = trainable_source_head(self._given_head, "co_tuning")

    def setup(self, model: nn.Module, loader: Iterable[Any] | None) -> None:
        if self.source_head is None:
            raise RuntimeError("CoTuning.adapt_model(model) must run before setup (the trainer does it)")
        if self.relationship_file is not None:
            relationship = torch.load(self.relationship_file, map_location="cpu", weights_only=True)
            if isinstance(relationship, dict):  # a run directory's setup/<name>.pt artifact
                relationship = relationship["relationship"]
            head_weight = getattr(self.source_head, "weight", None)
            source_classes = head_weight.shape[0] if isinstance(head_weight, torch.Tensor) else relationship.shape[1]
            expected = (int(classifier_of(model).weight.shape[0]), int(source_classes))
            if tuple(relationship.shape) != expected:
                raise ValueError(f"{self.relationship_file}: relationship of shape {tuple(relationship.shape)}, "
                                 f"expected (target classes, source classes) = {expected}")
        else:
            if loader is None:
                raise ValueError("Co-Tuning's relationship needs the training loader")
            device = model_device(model)
            num_classes = int(classifier_of(model).weight.shape[0])
            sums = counts = None
            mode = model.training
            model.eval()
            self.source_head.eval()
            with torch.no_grad():
                for images, targets, *_ in loader:
                    features, _ = penultimate(model, images.to(device))
                    probs = torch.softmax(self.source_head(features).double(), dim=1)
                    targets = targets.to(device)
                    if sums is None:
                        sums = probs.new_zeros(num_classes, probs.shape[1])
                        counts = torch.zeros(num_classes, dtype=torch.long, device=device)
                    sums.index_add_(0, targets, probs)
                    counts += torch.bincount(targets, minlength=num_classes)
            model.train(mode)
            self.source_head.train(mode)
            if sums is None:
                raise ValueError("Co-Tuning's set-up loader is empty")
            # sums and counts, reduced over processes that each saw a share of the training set
            relationship = relationship_from_sums(all_reduce_sum(sums), all_reduce_sum(counts))
        self.relationship = relationship.to(self.relationship.device, self.relationship.dtype)

    def artifacts(self) -> dict[str, torch.Tensor]:
        return {"relationship": self.relationship.cpu()} if self.relationship.numel() else {}

    def forward(self, step: TrainStep) -> torch.Tensor:
        if self.source_head is None or self.relationship.numel() == 0:
            raise RuntimeError("Co-Tuning is not set up: call adapt_model(model) and setup(model, loader) first")
        source_logits = self.source_head(step.features)
        value = co_tuning_loss(source_logits, step.labels, self.relationship)
        self._value = value.detach()
        return self.weight * value

    def stats(self) -> dict[str, float]:
        return {} if self._value is None else {"soft_ce": float(self._value)}

