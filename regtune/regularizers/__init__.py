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

__all__ = [
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
