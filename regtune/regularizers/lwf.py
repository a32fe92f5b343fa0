"""LwF: distil the pretrained source head's predictions into the fine-tuned network (docs/methods/lwf.md)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regtune.regularizers._utils import (
    LazyShapeMixin,
    check_choice,
    check_float_matrix,
    check_positive,
    gather_shards,
    model_device,
    penultimate,
)
from regtune.regularizers.base import SourceHeadRegularizer, TrainStep, register_regularizer

__all__ = ["LearningWithoutForgetting", "distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 3.0) -> torch.Tensor:
    r"""KL divergence of the student's tempered distribution from the teacher's (LwF).

    Li & Hoiem, "Learning without Forgetting", ECCV 2016, arXiv 1606.09282.

    $$
    L = \frac{1}{B} \sum_b \mathrm{KL}\big(\mathrm{softmax}(t_b / T) \,\Vert\, \mathrm{softmax}(s_b / T)\big)
    $$

    (KLDivLoss 'batchmean', no T^2 factor, as TLlib).

    Shape:
        student_logits, teacher_logits: (B, C). Output: scalar.

    Example:
        >>> distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2)).item()
        0.0
    """
    check_float_matrix("student_logits", student_logits, "(B, C)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} differ in shape")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits.detach().to(student_logits.dtype) / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean")


@register_regularizer("lwf")
class LearningWithoutForgetting(LazyShapeMixin, SourceHeadRegularizer):
    """Learning without Forgetting: keep the source head's tempered predictions close to the pretrained model's.

    L = lambda * [`distillation_loss`][] (g(f(x)), g0(f0(x)), T). Li & Hoiem, "Learning without Forgetting", ECCV
    2016, arXiv 1606.09282; TLlib's re-implementation: lambda = 4, T = 3. g is a trainable copy of the pretrained source
    head on the fine-tuned features (backbone learning rate); the teacher g0(f0(x)) is the pretrained model's source
    output.

    Teacher (``teacher``):

    - ``"cached"`` (default; TLlib's protocol, cost-free per step): computed once by `setup` for every
      training image and looked up by its index. TLlib records them under ONE random training augmentation per
      image; regtune uses the deterministic evaluation view, so the stored target does not depend on a random draw
      (see docs/methods/lwf.md, "Readings we chose").
    - ``"online"``: a frozen copy of the pretrained network runs on each augmented batch, so teacher and student see
      the same view (exact; one extra forward pass per step).

    Args:
        weight: lambda (TLlib 4).
        temperature: T (TLlib 3).
        teacher: ``"cached"`` or ``"online"``.
        source_head: The source classifier; ``None`` takes the backbone's pretrained one (the trainer attaches it).

    Shape:
        step.features (B, D), step.indices (B,) (cached) or step.images (online) -> scalar.

    Mixed batches (mixup / CutMix): ``"online"`` accepts them (its teacher sees the mixed images too); ``"cached"``
    does not (``accepts_soft_targets`` is set per instance).
    """

    accepts_soft_targets = False  # the default teacher="cached"; True for teacher="online" (set in __init__)
    soft_targets_note = (
        "teacher='cached' distils the teacher's output on each sample's own unmixed image while the student sees the "
        "mixed image; use teacher='online', which runs the teacher on the mixed batch")
    contract_kwargs = ({}, {"teacher": "online"})

    def __init__(self, weight: float = 4.0, temperature: float = 3.0, teacher: str = "cached",
                 source_head: nn.Module | None = None) -> None:
        super().__init__(source_head)
        check_positive("weight", weight)
        check_positive("temperature", temperature, allow_zero=False)
        check_choice("teacher", teacher, ("cached", "online"))
        self.weight = weight
        self.temperature = temperature
        self.teacher = teacher
        self.needs_indices = teacher == "cached"
        self.needs_setup_pass = teacher == "cached"
        if teacher == "online":
            self.accepts_soft_targets, self.soft_targets_note = True, ""
        self.frozen: nn.Module | None = None  # online teacher: pretrained model, its head swapped for the source head
        self.register_buffer("teacher_logits", torch.zeros(0, 0))
        self._value: torch.Tensor | None = None

    def adapt_model(self, model: nn.Module) -> None:
        super().adapt_model(model)  # self.source_head: the trainable copy
        if self.teacher == "online":
            frozen = nn.ModuleDict({"model": copy.deepcopy(model), "head": copy.deepcopy(self.source_head)})
            self.frozen = frozen.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LearningWithoutForgetting:
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()
        return self

    def _teacher(self, model: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features, _ = penultimate(model, images)
            return head(features)

    def setup(self, model: nn.Module, loader: Iterable[Any] | None) -> None:
        if self.source_head is None:
            raise RuntimeError("LwF.adapt_model(model) must run before setup (the trainer does it)")
        if self.teacher != "cached":
            return
        if loader is None:
            raise ValueError("LwF's cached teacher needs the training loader")
        device = model_device(model)
        mode = model.training
        model.eval()
        try:
            logits = [self._teacher(model, self.source_head, images.to(device)) for images, *_ in loader]
        finally:
            model.train(mode)
        local = torch.cat(logits)
        # Under DDP each process ran its share of the set-up pass; every process needs every item's outputs.
        total = len(loader.dataset) if hasattr(loader, "dataset") else local.shape[0]
        self.teacher_logits = gather_shards(local, total).to(self.teacher_logits.device, self.teacher_logits.dtype)

    def forward(self, step: TrainStep) -> torch.Tensor:
        if self.source_head is None:
            raise RuntimeError("LwF.adapt_model(model) must run before the first forward (the trainer does it)")
        if self.teacher == "cached":
            if self.teacher_logits.numel() == 0:
                raise RuntimeError("LwF's teacher outputs are not computed: call setup(model, loader) first")
            if step.indices is None:
                raise ValueError("LwF (teacher='cached') needs step.indices, the position of each sample in the "
                                 "training subset")
            teacher = self.teacher_logits[step.indices.to(self.teacher_logits.device)]
        else:
            if step.images is None:
                raise ValueError("LwF (teacher='online') needs step.images")
            assert self.frozen is not None
            teacher = self._teacher(self.frozen["model"], self.frozen["head"], step.images)
        value = distillation_loss(self.source_head(step.features), teacher.to(step.features.device),
                                  self.temperature)
        self._value = value.detach()
        return self.weight * value

    def stats(self) -> dict[str, float | torch.Tensor]:
        return {} if self._value is None else {"kl": self._value}

