"""StochNorm: BatchNorm that mixes moving and batch statistics per channel at random (docs/methods/stochnorm.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer

__all__ = ["StochNorm", "StochNormMixin", "convert_stochnorm", "stochastic_batch_norm"]


def stochastic_batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                          weight: torch.Tensor | None, bias: torch.Tensor | None, mask: torch.Tensor,
                          momentum: float, eps: float) -> torch.Tensor:
    r"""StochNorm's training-mode normalisation (Kou, You, Long, Wang, NeurIPS 2020).

    $$
    z_0 = \frac{x - \mu_{run}}{\sqrt{\sigma^2_{run} + \epsilon}},\quad
    z_1 = \frac{x - \mu_{batch}}{\sqrt{\sigma^2_{batch} + \epsilon}},\quad
    y = \gamma \big((1 - s) z_0 + s z_1\big) + \beta
    $$

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


class StochNormMixin:
    """Training-mode forward of a BatchNorm with StochNorm's per-channel branch choice (eval mode: plain BN).

    Mixed into the class of an existing BatchNorm instance by [`convert_stochnorm`][], so parameter and buffer
    names, the state dict and the module tree stay those of the original model (a StochNorm checkpoint loads into
    the plain model). timm's ``BatchNormAct2d`` keeps its dropout and activation after the normalisation.
    """

    stochnorm_p: float = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats or self.running_mean is None:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mask = torch.bernoulli(torch.full((x.shape[1],), self.stochnorm_p, device=x.device))
        y = stochastic_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, mask, momentum,
                                  self.eps)
        if hasattr(self, "act"):  # timm's BatchNormAct2d: norm -> drop -> act
            y = self.act(self.drop(y))
        return y


_CLASSES: dict[type, type] = {}


def _stoch_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Stoch{cls.__name__}", (StochNormMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def convert_stochnorm(model: nn.Module, p: float = 0.5) -> int:
    """Turn every BatchNorm of ``model`` into StochNorm with branch probability ``p``, in place.

    Returns:
        The number of converted layers (already converted ones get the new ``p`` and count too).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not isinstance(module, StochNormMixin):
                module.__class__ = _stoch_class(type(module))
            module.stochnorm_p = p
            count += 1
    return count


@register_regularizer("stochnorm")
class StochNorm(Regularizer):
    """StochNorm (Kou, You, Long, Wang, NeurIPS 2020): every BatchNorm of the model becomes stochastic.

    In training mode each channel picks, independently per forward pass with probability ``p``, the batch statistics
    (which also update the moving averages) or the moving statistics of the pretrained model
    ([`stochastic_batch_norm`][], with the mask s_c ~ Bernoulli(p)). Eval mode is ordinary BatchNorm. The mask is
    drawn with torch's seeded generator on the layer's device (TLlib draws it with numpy, unseeded, and moves it with
    ``.cuda()``). It changes the model and adds no loss: the term's value is 0.

    Gradients differ from TLlib's, and regtune's are the exact ones (a test compares them with autograd through
    plain BatchNorm): TLlib computes the moving-statistics branch first and the batch-statistics branch second, and
    the second call updates the moving statistics in place; the backward pass of the first branch then reads the
    already updated statistics, so its gradient is off by one momentum update (1-5 % for realistic gaps between the
    batch and the moving statistics). The forward values agree. This alone can move results away from TLlib's
    numbers.

    Args:
        p: Probability of the batch-statistics branch (TLlib ``--prob`` 0.5).
    """

    gradient_reaches = "none"
    accepts_soft_targets = True  # adds no loss and never reads the labels
    changes_architecture = True  # the swapped layers are the model a finished run is rebuilt as

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p
        self._converted = 0

    def adapt_model(self, model: nn.Module) -> None:
        self._converted = convert_stochnorm(model, self.p)
        if self._converted == 0:
            raise ValueError(f"StochNorm found no BatchNorm layer in {type(model).__name__}")

    def forward(self, step: TrainStep) -> torch.Tensor:
        return step.features.new_zeros(())

    def stats(self) -> dict[str, float | torch.Tensor]:
        return {"layers": float(self._converted), "p": float(self.p)}
