"""Regularization terms and criteria (pure PyTorch; importing this package needs nothing but ``torch``).

Every term follows one contract ([`Regularizer`][]: ``setup(model, loader)``, ``forward(step) -> Tensor``,
``stats()``) and is built by name with [`create_regularizer`][]. Importing the package imports each of its public
modules (every ``*.py`` here whose name does not start with ``_``), so a new module's ``@register_regularizer``
runs without being listed anywhere.
"""

import importlib
import pkgutil

from regtune.regularizers.base import (
    Criterion,
    CrossEntropy,
    Regularizer,
    SourceHeadRegularizer,
    TrainStep,
    UnknownNameError,
    create_criterion,
    create_regularizer,
    list_criteria,
    list_regularizers,
    register_criterion,
    register_regularizer,
    regularizer_class,
    soft_cross_entropy,
    soft_target_refusals,
)


def import_modules() -> list[str]:
    """Import every public module of this package (registering its terms); return their names.

    Private modules (``_utils``) are skipped. Called once when the package is imported; calling it again imports
    modules that appeared on the package's ``__path__`` since (already imported ones are not re-run).
    """
    names = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


import_modules()

# The public classes and helpers, re-exported for convenience (registration does not depend on this list).
from regtune.regularizers.adarand import AdaRand, RandomFeatureRegularizer
from regtune.regularizers.bss import BatchSpectralShrinkage
from regtune.regularizers.cotuning import CoTuning
from regtune.regularizers.delta import DELTA
from regtune.regularizers.fmr import FeatureMagnitudeRegularization
from regtune.regularizers.hooks import as_channel_maps, capture_outputs, feature_layers
from regtune.regularizers.l2sp import L2SP
from regtune.regularizers.lwf import LearningWithoutForgetting
from regtune.regularizers.margins import (
    CosineClassifier,
    LMSoftmax,
    SampleMarginRegularizer,
    ZeroCentroidRegularizer,
)
from regtune.regularizers.penalties import (
    FeatureNormPenalty,
    HeadL1,
    HeadL2,
    HeadNegativePenalty,
    MaxEntropy,
)
from regtune.regularizers.stochnorm import StochNorm, convert_stochnorm

__all__ = [
    "DELTA",
    "L2SP",
    "AdaRand",
    "BatchSpectralShrinkage",
    "CoTuning",
    "CosineClassifier",
    "Criterion",
    "CrossEntropy",
    "FeatureMagnitudeRegularization",
    "FeatureNormPenalty",
    "HeadL1",
    "HeadL2",
    "HeadNegativePenalty",
    "LMSoftmax",
    "LearningWithoutForgetting",
    "MaxEntropy",
    "RandomFeatureRegularizer",
    "Regularizer",
    "SampleMarginRegularizer",
    "SourceHeadRegularizer",
    "StochNorm",
    "TrainStep",
    "UnknownNameError",
    "ZeroCentroidRegularizer",
    "as_channel_maps",
    "capture_outputs",
    "convert_stochnorm",
    "create_criterion",
    "create_regularizer",
    "feature_layers",
    "import_modules",
    "list_criteria",
    "list_regularizers",
    "register_criterion",
    "register_regularizer",
    "regularizer_class",
    "soft_cross_entropy",
    "soft_target_refusals",
]
