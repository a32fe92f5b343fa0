"""Class activation maps: the classic CAM of GAP + linear heads with its sign split, and Grad-CAM & co. through the
``grad-cam`` package for architectures where CAM does not apply. Definitions and conventions:
docs/methods/analysis-metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["CamMaps", "NotAGapLinearHead", "class_activation_maps", "grad_cam", "vit_reshape_transform"]


class NotAGapLinearHead(ValueError):
    """The model's head is not global average pooling followed by one linear layer, so the classic CAM is not its
    class score map; use [`grad_cam`][regtune.analysis.cam.grad_cam] instead."""


@dataclass(frozen=True)
class CamMaps:
    """CAMs of one batch for one class per image, at the feature-map resolution.

    Attributes:
        cam: CAM_c = sum_k w_ck A_k, (B, h, w).
        positive: CAM_c^+ = sum over w_ck > 0 (>= 0 for non-negative A), (B, h, w).
        negative: CAM_c^- = sum over w_ck < 0 (<= 0 for non-negative A), (B, h, w); cam = positive + negative.
        classes: The class of each map, (B,).
        logits: The model's logits, (B, C).
    """

    cam: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def class_activation_maps(model: nn.Module, images: torch.Tensor, classes: torch.Tensor | None = None,
                          check: bool = True) -> CamMaps:
    """The classic CAM (Zhou et al., CVPR 2016) of any timm CNN whose head is GAP + linear, with its sign split.

    Args:
        model: timm CNN (``forward_features`` gives the last feature map; ``get_classifier()`` the linear head).
        images: Input batch.
        classes: Class per image (e.g. the ground truth for GT-known localization); ``None`` takes the prediction.
        check: Verify that ``classifier(mean over positions of A) == logits``; a head with anything else between
            pooling and the linear layer (a norm, an MLP) raises
            [`NotAGapLinearHead`][regtune.analysis.cam.NotAGapLinearHead].

    Returns:
        [`CamMaps`][regtune.analysis.cam.CamMaps] (sum over channels, not the mean of the reference evaluator: the
        same map up to 1/D, which min-max normalisation removes).

    Raises:
        NotAGapLinearHead: ``forward_features`` does not give a (B, D, h, w) map, the classifier is not a Linear
            layer on its D channels, or (with ``check``) the logits are not that layer on the pooled map.
    """
    mode = model.training
    model.eval()
    try:
        maps = model.forward_features(images)
        logits = model.forward_head(maps)
    finally:
        model.train(mode)
    if maps.dim() != 4:
        raise NotAGapLinearHead(f"{type(model).__name__}.forward_features gives shape {tuple(maps.shape)}, not a "
                                "(B, D, h, w) map; use grad_cam (e.g. for a ViT)")
    head = model.get_classifier()
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None or weight.shape[1] != maps.shape[1]:
        raise NotAGapLinearHead(f"the classifier {type(head).__name__} is not a Linear layer on the {maps.shape[1]} "
                                "channels of the last feature map; use grad_cam")
    if check:
        pooled = head(maps.float().mean(dim=(2, 3)))
        if not torch.allclose(pooled, logits.float(), rtol=1e-3, atol=1e-3 * float(logits.abs().max()) + 1e-5):
            raise NotAGapLinearHead(f"{type(model).__name__}'s head is not GAP + linear (its logits differ from the "
                                    "linear layer on the mean feature); use grad_cam")
    if classes is None:
        classes = logits.argmax(1)
    w = weight.float()[classes]  # (B, D)
    a = maps.float()
    cam = torch.einsum("bd,bdhw->bhw", w, a)
    positive = torch.einsum("bd,bdhw->bhw", w.clamp(min=0), a)
    negative = torch.einsum("bd,bdhw->bhw", w.clamp(max=0), a)
    return CamMaps(cam=cam, positive=positive, negative=negative, classes=classes, logits=logits)


def vit_reshape_transform(model: nn.Module, image_size: Sequence[int] | None = None
                          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tokens (B, N, C) -> (B, C, h, w) for ``grad-cam``, with the model's own patch grid and prefix tokens.

    Args:
        model: timm ViT (``patch_embed.grid_size``, ``num_prefix_tokens``).
        image_size: ``(H, W)`` of the input: the grid is the patch embedding's grid for that size (timm's
            ``dynamic_feat_size``; a model run at another resolution than it was built for). ``None``: the built grid.

    Returns:
        The transform; it drops the prefix tokens and raises ``ValueError`` when the rest do not fill the grid.

    Raises:
        ValueError: the model has no ``patch_embed.grid_size``.
    """
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.grid_size; pass a reshape_transform")
    if image_size is not None and hasattr(embed, "dynamic_feat_size"):
        grid = embed.dynamic_feat_size(tuple(int(v) for v in image_size))
    height, width = int(grid[0]), int(grid[1])
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)

    def transform(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        if patches.shape[1] != height * width:
            raise ValueError(f"{patches.shape[1]} patch tokens do not fill the {height}x{width} grid")
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    return transform


def grad_cam(model: nn.Module, images: torch.Tensor, classes: Sequence[int] | torch.Tensor,
             method: str = "gradcam", target_layer: nn.Module | None = None, reshape_transform: Any = None
             ) -> np.ndarray:
    """Grad-CAM (or another method of the ``grad-cam`` package) for any timm model, ViTs included.

    Args:
        model: timm model.
        images: Input batch.
        classes: Class per image.
        method: ``"gradcam"``, ``"gradcam++"``, ``"hirescam"``, ``"xgradcam"``, ``"eigencam"``, ``"layercam"``.
        target_layer: Layer whose activations are used; default: a ViT's last block's first norm, else the last
            ``feature_info`` stage.
        reshape_transform: Tokens -> map; default for a ViT:
            [`vit_reshape_transform`][regtune.analysis.cam.vit_reshape_transform].

    Returns:
        (B, H, W) maps at the input resolution in [0, 1] (the package's own upsampling and normalisation). The
        package's hooks are released on return (it is used as a context manager).

    Raises:
        ValueError: unknown ``method``, or no ``target_layer`` given for a CNN without ``feature_info``.
    """
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    methods = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM,
               "xgradcam": pgc.XGradCAM, "eigencam": pgc.EigenCAM, "layercam": pgc.LayerCAM}
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(methods)}")
    is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
    if target_layer is None:
        if is_vit:
            target_layer = model.blocks[-1].norm1
        else:
            info = getattr(model, "feature_info", None)
            if not info:
                raise ValueError(f"{type(model).__name__} has no feature_info; pass target_layer")
            target_layer = model.get_submodule(info[-1]["module"])
    if reshape_transform is None and is_vit:
        reshape_transform = vit_reshape_transform(model, images.shape[-2:])
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    mode = model.training
    model.eval()
    try:
        with methods[method](model=model, target_layers=[target_layer], reshape_transform=reshape_transform) as cam:
            return cam(input_tensor=images, targets=targets)
    finally:
        model.train(mode)
