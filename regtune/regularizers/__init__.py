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
from regtune.regularizers import adarand, fmr, margins, penalties  # noqa: E402,F401
from regtune.regularizers.adarand import AdaRand, RandomFeatureRegularizer  # noqa: E402
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
