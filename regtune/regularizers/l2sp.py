"""L2-SP: keep the backbone near its pretrained weights (Li, Grandvalet, Davoine, ICML 2018).

User documentation: docs/methods/l2-sp.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regtune.regularizers._utils import check_positive, classifier_of
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer

__all__ = ["L2SP", "l2_penalty", "l2_sp_penalty", "split_backbone_head"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _check_pairs(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> None:
    if len(params) != len(anchors):
        raise ValueError(f"got {len(params)} parameters but {len(anchors)} anchors")
    for i, (p, a) in enumerate(zip(params, anchors)):
        if p.shape != a.shape:
            raise ValueError(f"parameter {i} has shape {tuple(p.shape)} but its anchor {tuple(a.shape)}")


def l2_sp_penalty(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Squared distance to the starting point, 1/2 sum_i ||w_i - w0_i||^2 (L2-SP).

    Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018,
    arXiv 1802.01483.

    $$
    \Omega_{SP}(w) = \tfrac12 \sum_i \lVert w_i - w^0_i \rVert_2^2
    $$

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
    r"""1/2 sum_i ||w_i||^2: the head term of L2-SP and DELTA (Omega_head).

    Reduction:
        Summed over every entry of every parameter.

    Example:
        >>> l2_penalty([torch.tensor([1.0, 2.0]), torch.tensor([2.0])]).item()
        4.5
    """
    if not params:
        raise ValueError("l2_penalty needs at least one parameter")
    return 0.5 * sum(p.pow(2).sum() for p in params)


def split_backbone_head(model: nn.Module, exclude_norm: bool = False,
                        exclude_bias: bool = False) -> tuple[list[tuple[str, nn.Parameter]], list[nn.Parameter]]:
    """``([(name, param)] of the backbone, [params] of the classifier)``, trainable ones only.

    Args:
        model: A timm-style model (``get_classifier()`` is the head; everything else is the backbone).
        exclude_norm: Leave out the affine parameters of normalisation layers (BatchNorm, GroupNorm, LayerNorm).
        exclude_bias: Leave out one-dimensional parameters named ``*bias``.
    """
    head_ids = {id(p) for p in classifier_of(model).parameters()}
    norm_ids = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    backbone = []
    for name, param in model.named_parameters():
        if id(param) in head_ids or not param.requires_grad:
            continue
        if exclude_norm and id(param) in norm_ids:
            continue
        if exclude_bias and name.endswith("bias") and param.dim() == 1:
            continue
        backbone.append((name, param))
    head = [p for p in classifier_of(model).parameters() if p.requires_grad]
    return backbone, head


@register_regularizer("l2_sp")
class L2SP(Regularizer):
    """L2-SP: squared distance of the backbone to its starting point, plus L2 on the new head.

    L = alpha * [`l2_sp_penalty`][] (backbone parameters, their starting values w0) + beta * [`l2_penalty`][] (head
    parameters). The starting point w0 is snapshotted by `adapt_model` (the pretrained model, before any update)
    into buffers, so it is saved in checkpoints and follows ``.to()`` (TLlib keeps it in a plain dict: lost on resume,
    left on the CPU). All trainable backbone parameters count by default, BatchNorm affine and biases included (TLlib);
    BatchNorm running statistics are buffers and never count.

    Defaults: the L2-SP paper is usually quoted with alpha = 0.1, beta = 0.01, the values of the TensorFlow script
    that runs its experiments, which penalises convolution and linear kernels only (``exclude_norm=True,
    exclude_bias=True``); the defaults here are TLlib's 0.01 / 0.01 on every backbone parameter (see
    docs/methods/l2-sp.md, 'Readings we chose'). TLlib trains L2-SP with weight decay 0: the optimizer's weight decay
    pulls toward zero, against the starting point, so pass ``--weight-decay 0`` to reproduce it.

    Args:
        alpha: Weight of the starting-point term.
        beta: Weight of the head's L2 term (0 leaves the head to the optimizer's weight decay).
        exclude_norm: Leave normalisation layers' affine parameters out of the starting-point term.
        exclude_bias: Leave biases out of the starting-point term.

    Reduction:
        Sums over all entries (the term does not depend on the batch).
    """

    gradient_reaches = "model"
    accepts_soft_targets = True  # reads only the weights
    contract_kwargs = ({}, {"exclude_norm": True, "exclude_bias": True, "beta": 0.0})

    def __init__(self, alpha: float = 0.01, beta: float = 0.01, exclude_norm: bool = False,
                 exclude_bias: bool = False) -> None:
        super().__init__()
        check_positive("alpha", alpha)
        check_positive("beta", beta)
        self.alpha = alpha
        self.beta = beta
        self.exclude_norm = exclude_norm
        self.exclude_bias = exclude_bias
        self._names: list[str] = []
        self._params: list[nn.Parameter] = []  # plain list: the model owns them, they are not this term's parameters
        self._head: list[nn.Parameter] = []
        self._last: dict[str, torch.Tensor] = {}

    @staticmethod
    def _buffer_name(name: str) -> str:
        return "anchor__" + name.replace(".", "__")

    def adapt_model(self, model: nn.Module) -> None:
        backbone, self._head = split_backbone_head(model, self.exclude_norm, self.exclude_bias)
        if not backbone:
            raise ValueError("L2-SP found no trainable backbone parameter")
        self._names = [name for name, _ in backbone]
        self._params = [param for _, param in backbone]
        for name, param in backbone:
            self.register_buffer(self._buffer_name(name), param.detach().clone())

    def anchors(self) -> list[torch.Tensor]:
        """The starting values w0, in the order of the backbone parameters."""
        return [getattr(self, self._buffer_name(name)) for name in self._names]

    def forward(self, step: TrainStep) -> torch.Tensor:
        if not self._params:
            raise RuntimeError("L2SP.adapt_model(model) must run before the first forward (the trainer does it)")
        sp = l2_sp_penalty(self._params, self.anchors())
        head = l2_penalty(self._head) if self.beta > 0 and self._head else sp.new_zeros(())
        self._last = {"sp": sp.detach(), "head": head.detach()}
        return (self.alpha * sp + self.beta * head).to(step.features.dtype)

    def stats(self) -> dict[str, float | torch.Tensor]:
        return dict(self._last)  # detached results of this step's forward, on its device
