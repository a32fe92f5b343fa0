"""Intermediate feature maps of any timm model: which layers (from ``feature_info``) and their outputs (hooks).

Layers are named by the model itself (timm's ``feature_info``: the stage outputs of a CNN, the blocks of a ViT),
never by hard-coded architecture names. `capture_outputs` registers forward hooks for one forward pass and
always removes them, also when the pass raises. Imports nothing but ``torch``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["as_channel_maps", "capture_outputs", "feature_layers"]


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "get_dicts"):  # timm's FeatureInfo (features_only models)
        return list(info.get_dicts())
    return [dict(entry) for entry in info]


def feature_layers(model: nn.Module, layers: Sequence[int | str] | None = None, last: int = 4) -> list[str]:
    """Module names of intermediate layers of ``model``.

    Args:
        model: A timm model (its ``feature_info`` lists the stage outputs: ``layer1..4`` of a ResNet, ``blocks.i``
            of an EfficientNet or a ViT) or any module when ``layers`` holds names.
        layers: Indices into ``feature_info`` (negative from the end) or module names (``model.get_submodule``
            paths, e.g. ``"layer4.2.conv3"``; one name alone may be a plain string); ``None`` takes the ``last``
            entries of ``feature_info``.
        last: How many of the deepest ``feature_info`` entries ``layers=None`` takes.

    Returns:
        Module names, in the order given (for ``None``: shallow to deep).

    Raises:
        ValueError: an index out of range, a name that is not a submodule, or no ``feature_info`` to choose from.
    """
    info = _feature_info(model)
    if layers is None:
        if not info:
            raise ValueError(f"{type(model).__name__} has no feature_info to choose layers from; pass layers=[module "
                             "names] (e.g. the outputs of its stages)")
        if isinstance(last, bool) or not 1 <= last <= len(info):
            raise ValueError(f"last must be between 1 and the {len(info)} feature_info entries "
                             f"{[e['module'] for e in info]}, got {last}")
        return [entry["module"] for entry in info[-last:]]
    if isinstance(layers, str):
        layers = [layers]
    names: list[str] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)) or layer == "":
            raise ValueError(f"a layer is a feature_info index or a non-empty module name, got {layer!r}")
        if isinstance(layer, int):
            if not info:
                raise ValueError(f"{type(model).__name__} has no feature_info; layers must be module names, got "
                                 f"index {layer}")
            if not -len(info) <= layer < len(info):
                raise ValueError(f"layer index {layer} is out of range for the {len(info)} feature_info entries "
                                 f"{[e['module'] for e in info]}")
            names.append(info[layer]["module"])
        else:
            try:
                model.get_submodule(layer)
            except AttributeError as err:
                raise ValueError(f"{type(model).__name__} has no submodule {layer!r}; feature_info names: "
                                 f"{[e['module'] for e in info] or '(none)'}") from err
            names.append(layer)
    if len(set(names)) != len(names):
        raise ValueError(f"layers repeat a module: {names}")
    return names


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of the named submodules during the forward passes inside the ``with`` block.

    Example::

        with capture_outputs(model, ["layer3", "layer4"]) as maps:
            logits = model(images)
        maps["layer4"]  # (B, C, H, W), part of the autograd graph

    The hooks are removed on leaving the block, also after an exception. A module called twice in one pass keeps
    its last output.
    """
    maps: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str):
        def hook(module: nn.Module, args, output) -> None:
            maps[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(keep(name)))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def as_channel_maps(output: torch.Tensor, num_channels: int | None = None, prefix_tokens: int = 0,
                    channels_last: bool = False) -> torch.Tensor:
    """A layer output as ``(B, C, S)``: channels, then spatial positions (or tokens).

    Args:
        output: ``(B, C, H, W)`` (CNN), ``(B, H, W, C)`` (``channels_last``, e.g. Swin stages) or ``(B, N, C)``
            (ViT tokens; the first ``prefix_tokens`` class / register tokens are dropped).
        num_channels: Expected C, checked when given.
        prefix_tokens: Tokens before the patch grid in a ``(B, N, C)`` output.
        channels_last: The 4-D output is ``(B, H, W, C)``.

    Returns:
        ``(B, C, S)`` view or copy.
    """
    if output.dim() == 4:
        maps = output.permute(0, 3, 1, 2) if channels_last else output
        maps = maps.flatten(2)
    elif output.dim() == 3:
        maps = output[:, prefix_tokens:, :].transpose(1, 2)
    elif output.dim() == 2:
        maps = output.unsqueeze(-1)
    else:
        raise ValueError(f"cannot read channels from a layer output of shape {tuple(output.shape)}")
    if num_channels is not None and maps.shape[1] != num_channels:
        raise ValueError(f"layer output {tuple(output.shape)} has {maps.shape[1]} channels, expected {num_channels}")
    return maps
