"""The equations of every regularization term and margin quantity as plain functions, in one namespace.

Each function lives next to its method's module (``fmr.py``, ``adarand.py``, ``penalties.py``, ``margins.py``,
``l2sp.py``, ``delta.py``, ``bss.py``, ``cotuning.py``, ``lwf.py``, ``stochnorm.py``, ``imbalance.py``; the soft
cross-entropy next to the criterion in ``base.py``), where it is documented; this module re-exports them for training
loops of your own and for the analysis code. Every function is stateless, takes tensors of any floating dtype (class
counts as integers) on any device, never modifies its inputs, and is differentiable wherever the formula is. No
weight (lambda, beta, gamma) is applied except in [`fmr_weight`][], which computes one.
"""

from __future__ import annotations

from regtune.regularizers.adarand import adarand_prior_losses, random_feature_loss
from regtune.regularizers.base import soft_cross_entropy
from regtune.regularizers.bss import batch_spectral_shrinkage
from regtune.regularizers.cotuning import class_relationship, co_tuning_loss, relationship_from_sums
from regtune.regularizers.delta import channel_attention, delta_penalty
from regtune.regularizers.fmr import channel_entropy, fmr_weight
from regtune.regularizers.imbalance import (
    balanced_softmax_loss,
    effective_number_weights,
    logit_adjusted_cross_entropy,
    posthoc_logit_adjustment,
)
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
    "adarand_prior_losses",
    "balanced_softmax_loss",
    "batch_spectral_shrinkage",
    "channel_attention",
    "channel_entropy",
    "class_margin",
    "class_relationship",
    "co_tuning_loss",
    "cosine_logits",
    "delta_penalty",
    "distillation_loss",
    "effective_number_weights",
    "feature_norm_penalty",
    "fmr_weight",
    "head_l1",
    "head_l2",
    "l2_penalty",
    "l2_sp_penalty",
    "lm_softmax_loss",
    "logit_adjusted_cross_entropy",
    "negative_weight_penalty",
    "posthoc_logit_adjustment",
    "prediction_entropy",
    "random_feature_loss",
    "relationship_from_sums",
    "sample_margin_loss",
    "sample_margins",
    "soft_cross_entropy",
    "stochastic_batch_norm",
    "zero_centroid_loss",
]
