"""Backbones (timm), feature taps and offline weight sources."""

from regtune.models.factory import (
    WEIGHT_SOURCES,
    Backbone,
    UnknownBackboneError,
    check_backbone_name,
    create_backbone,
    data_config,
    forward_parts,
)
from regtune.models.weights import OFFLINE_SOURCES, WeightsMismatchError, has_offline_weights, offline_weights_path

__all__ = [
    "OFFLINE_SOURCES",
    "WEIGHT_SOURCES",
    "Backbone",
    "UnknownBackboneError",
    "WeightsMismatchError",
    "check_backbone_name",
    "create_backbone",
    "data_config",
    "forward_parts",
    "has_offline_weights",
    "offline_weights_path",
]
