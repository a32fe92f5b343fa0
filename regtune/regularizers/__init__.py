"""Regularization terms and criteria (pure PyTorch; importing this package needs nothing but ``torch``).

Every term follows one contract (:class:`Regularizer`: ``setup(model, loader)``, ``forward(step) -> Tensor``,
``stats()``) and is built by name with :func:`create_regularizer`.
"""

from regtune.regularizers.base import (
    Criterion,
    CrossEntropy,
    Regularizer,
    TrainStep,
    UnknownNameError,
    create_criterion,
    create_regularizer,
    list_criteria,
    list_regularizers,
    register_criterion,
    register_regularizer,
)

# Importing the method modules registers them.
from regtune.regularizers import adarand, bss, cotuning, delta, fmr, l2sp, lwf, margins, penalties, stochnorm  # noqa
from regtune.regularizers.adarand import AdaRand, RandomFeatureRegularizer  # noqa: E402
from regtune.regularizers.bss import BatchSpectralShrinkage  # noqa: E402
from regtune.regularizers.cotuning import CoTuning  # noqa: E402
from regtune.regularizers.delta import DELTA  # noqa: E402
from regtune.regularizers.hooks import as_channel_maps, capture_outputs, feature_layers  # noqa: E402
from regtune.regularizers.l2sp import L2SP  # noqa: E402
from regtune.regularizers.lwf import LearningWithoutForgetting  # noqa: E402
from regtune.regularizers.stochnorm import StochNorm, convert_stochnorm  # noqa: E402
from regtune.regularizers.fmr import FeatureMagnitudeRegularization  # noqa: E402
from regtune.regularizers.margins import (  # noqa: E402
    CosineClassifier,
    LMSoftmax,
    SampleMarginRegularizer,
    ZeroCentroidRegularizer,
)
from regtune.regularizers.penalties import FeatureNormPenalty, HeadL1, HeadL2, HeadNegativePenalty, MaxEntropy  # noqa

__all__ = [
    "AdaRand",
    "BatchSpectralShrinkage",
    "CoTuning",
    "DELTA",
    "L2SP",
    "LearningWithoutForgetting",
    "StochNorm",
    "as_channel_maps",
    "capture_outputs",
    "convert_stochnorm",
    "feature_layers",
    "CosineClassifier",
    "FeatureMagnitudeRegularization",
    "FeatureNormPenalty",
    "HeadL1",
    "HeadL2",
    "HeadNegativePenalty",
    "LMSoftmax",
    "MaxEntropy",
    "RandomFeatureRegularizer",
    "SampleMarginRegularizer",
    "ZeroCentroidRegularizer",
    "Criterion",
    "CrossEntropy",
    "Regularizer",
    "TrainStep",
    "UnknownNameError",
    "create_criterion",
    "create_regularizer",
    "list_criteria",
    "list_regularizers",
    "register_criterion",
    "register_regularizer",
]
