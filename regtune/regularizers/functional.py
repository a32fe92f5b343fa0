"""The equations of every regularization term and margin quantity as plain functions, in one namespace.

Each function lives next to its method's module (``fmr.py``, ``adarand.py``, ``penalties.py``, ``margins.py``,
``l2sp.py``, ``delta.py``, ``bss.py``, ``cotuning.py``, ``lwf.py``, ``stochnorm.py``), where it is documented; this
module re-exports them for training loops of your own and for the analysis code. Every function is stateless, takes
tensors of any floating dtype on any device, never modifies its inputs, and is differentiable wherever the formula
is. No weight (lambda, beta, gamma) is applied except in :func:`fmr_weight`, which computes one.
"""

from __future__ import annotations

from regtune.regularizers.adarand import adarand_prior_losses, random_feature_loss
from regtune.regularizers.bss import batch_spectral_shrinkage
from regtune.regularizers.cotuning import class_relationship, co_tuning_loss, relationship_from_sums
from regtune.regularizers.delta import channel_attention, delta_penalty
from regtune.regularizers.fmr import channel_entropy, fmr_weight
from regtune.regularizers.l2sp import l2_penalty, l2_sp_penalty
from regtune.regularizers.lwf import distillation_loss
from regtune.regularizers.margins import (
    class_margin,
    cosine_logits,
    lm_softmax_loss,
    sample_margin_loss,
    sample_margins,
    zero_centroid_loss,
)
from regtune.regularizers.penalties import (
    feature_norm_penalty,
    head_l1,
    head_l2,
    negative_weight_penalty,
    prediction_entropy,
)
from regtune.regularizers.stochnorm import stochastic_batch_norm

__all__ = [
    "channel_entropy",
    "fmr_weight",
    "random_feature_loss",
    "adarand_prior_losses",
    "feature_norm_penalty",
    "prediction_entropy",
    "head_l1",
    "head_l2",
    "negative_weight_penalty",
    "cosine_logits",
    "lm_softmax_loss",
    "sample_margins",
    "sample_margin_loss",
    "zero_centroid_loss",
    "class_margin",
    "l2_sp_penalty",
    "l2_penalty",
    "delta_penalty",
    "channel_attention",
    "batch_spectral_shrinkage",
    "class_relationship",
    "relationship_from_sums",
    "co_tuning_loss",
    "distillation_loss",
    "stochastic_batch_norm",
]
