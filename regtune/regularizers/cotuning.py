"""Co-Tuning: keep the pretrained source head predicting what the target labels imply (docs/methods/co-tuning.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regtune.regularizers._utils import (
    LazyShapeMixin,
    all_reduce_sum,
    check_float_matrix,
    check_labels,
    check_positive,
    check_soft_targets,
    classifier_of,
    model_device,
    penultimate,
)
from regtune.regularizers.base import SourceHeadRegularizer, TrainStep, register_regularizer

__all__ = ["CoTuning", "class_relationship", "co_tuning_loss", "relationship_from_sums"]


def class_relationship(source_probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    r"""Co-Tuning's target-to-source relationship: the mean source-class distribution per target class.

    You, Kou, Long, Wang, "Co-Tuning for Transfer Learning", NeurIPS 2020.

    $$
    R[t] = \frac{1}{|\{b : y_b = t\}|} \sum_{b : y_b = t} \mathrm{softmax}(g(f_b))
    $$

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
    check_float_matrix("source_probs", source_probs, "(N, C_s)")
    check_labels(labels, source_probs.shape[0], num_classes, "source_probs rows / num_classes")
    sums = source_probs.new_zeros(num_classes, source_probs.shape[1]).index_add_(0, labels, source_probs)
    counts = torch.bincount(labels, minlength=num_classes)
    return relationship_from_sums(sums, counts)


def relationship_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[`class_relationship`][] from per-class sums of source probabilities (C_t, C_s) and counts (C_t,), e.g.
    accumulated batch by batch, or all-reduced over processes that each saw a share of the data.

    Raises:
        ValueError: a target class has no image.
    """
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"target classes {missing} have no image; the relationship needs every class")
    return sums / counts.unsqueeze(1).to(sums.dtype)


def co_tuning_loss(source_logits: torch.Tensor, labels: torch.Tensor | None, relationship: torch.Tensor,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
    r"""Soft cross-entropy of the source head to the relationship row of each label (Co-Tuning).

    $$
    L = \frac{1}{B} \sum_b \Big[ -\sum_{s} q_{b,s} \log \mathrm{softmax}(g(f_b))_s \Big], \qquad
    q_b = R[y_b] \ \text{(labels)}, \quad q_b = \sum_c t_{b,c} R[c] \ \text{(soft targets)}
    $$

    with g(f_b) the source logits of sample b, y_b its label and R the (C_t, C_s) relationship. On a mixed batch
    (mixup / CutMix) with soft targets t, q_b mixes the rows of the sample's classes in its proportions; as the loss
    is linear in q_b, it equals the same mix of the classes' losses (what mixup does to the main cross-entropy).

    Args:
        source_logits: Source-head outputs g(f).
        labels: Integer target classes y; not read when ``targets`` are given (may then be ``None``).
        relationship: Target-to-source relationship R ([`class_relationship`][]), rows summing to 1.
        targets: Soft targets t of a mixed batch (rows summing to 1), or ``None``.

    Shape:
        source_logits: (B, C_s). labels: (B,). relationship: (C_t, C_s). targets: (B, C_t). Output: scalar.

    Reduction:
        Mean over the batch.

    Example:
        >>> round(co_tuning_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([[0.5, 0.5]])).item(), 6)  # log 2
        0.693147
    """
    check_float_matrix("source_logits", source_logits, "(B, C_s)")
    check_float_matrix("relationship", relationship, "(C_t, C_s)")
    if relationship.shape[1] != source_logits.shape[1]:
        raise ValueError(f"relationship has {relationship.shape[1]} source classes, the logits "
                         f"{source_logits.shape[1]}")
    if targets is None:
        check_labels(labels, source_logits.shape[0], relationship.shape[0], "source_logits / relationship rows")
        source_targets = relationship.detach()[labels]
    else:
        check_soft_targets(targets, source_logits.shape[0], relationship.shape[0], "source_logits / relationship rows")
        source_targets = targets.detach().to(relationship.dtype) @ relationship.detach()  # (B, C_s)
    return -(source_targets.to(source_logits.dtype) * F.log_softmax(source_logits, dim=1)).sum(1).mean()


@register_regularizer("co_tuning")
class CoTuning(LazyShapeMixin, SourceHeadRegularizer):
    """Co-Tuning: soft cross-entropy of the source head to the target-to-source class relationship.

    L = lambda * [`co_tuning_loss`][] (g(f), y, R), with R the [`class_relationship`][] of the pretrained model's
    source predictions g0(f0) on the training subset. You, Kou, Long, Wang, "Co-Tuning for Transfer Learning", NeurIPS
    2020. g is a trainable copy of the backbone's pretrained source classifier (trained with the backbone's learning
    rate, as TLlib); R is computed once by `setup` from the pretrained model (eval mode) over the training subset
    with the deterministic evaluation transform ("direct approach"; the paper's calibrated "reverse approach" is not in
    TLlib either) and written to the run directory as an artifact.

    Args:
        weight: lambda (TLlib ``--trade-off`` 2.3).
        source_head: The source classifier on the penultimate features; ``None`` takes the backbone's pretrained
            one (the trainer attaches it).
        relationship_file: Load R (a ``torch.save``-d (C_t, C_s) tensor, or the ``setup/<name>.pt`` file an earlier
            run on the same data wrote) instead of computing it.

    Shape:
        step.features (B, D), step.labels (B,) or step.targets (B, C_t) -> scalar.
    """

    needs_setup_pass = True
    accepts_soft_targets = True  # a mixed batch's target mixes the relationship rows (see co_tuning_loss)

    def __init__(self, weight: float = 2.3, source_head: nn.Module | None = None,
                 relationship_file: str | None = None) -> None:
        super().__init__(source_head)
        check_positive("weight", weight)
        self.weight = weight
        self.relationship_file = relationship_file
        self.register_buffer("relationship", torch.zeros(0, 0))
        self._value: torch.Tensor | None = None

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
        value = co_tuning_loss(source_logits, step.labels, self.relationship, targets=step.targets)
        self._value = value.detach()
        return self.weight * value

    def stats(self) -> dict[str, float | torch.Tensor]:
        return {} if self._value is None else {"soft_ce": self._value}

