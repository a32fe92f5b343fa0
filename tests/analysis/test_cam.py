"""CAM and its sign split CAM = CAM+ + CAM-; Grad-CAM on a ViT with the model's own token grid."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from regtune.analysis.cam import NotAGapLinearHead, class_activation_maps, grad_cam, vit_reshape_transform


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=4, **kwargs).eval()


def test_cam_matches_numpy_and_the_logits() -> None:
    model = _model("resnet18")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([3, 1])
    maps = class_activation_maps(model, images, classes)
    with torch.no_grad():
        a = model.forward_features(images).numpy()
    w = model.get_classifier().weight.detach().numpy()
    expected = np.einsum("bd,bdhw->bhw", w[classes.numpy()], a)
    np.testing.assert_allclose(maps.cam.numpy(), expected, rtol=1e-4, atol=1e-5)
    # GAP + linear: the mean of the CAM over positions plus the bias is the class logit
    bias = model.get_classifier().bias.detach()
    logit = maps.logits[torch.arange(2), classes]
    torch.testing.assert_close(maps.cam.mean(dim=(1, 2)) + bias[classes], logit, rtol=1e-4, atol=1e-4)
    # predicted classes by default
    assert torch.equal(class_activation_maps(model, images).classes, maps.logits.argmax(1))


def test_sign_split_adds_up_and_has_signs() -> None:
    model = _model("resnet18")
    maps = class_activation_maps(model, torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(maps.positive + maps.negative, maps.cam, rtol=1e-5, atol=1e-5)
    assert (maps.positive >= 0).all() and (maps.negative <= 0).all()  # post-ReLU feature maps
    assert (maps.positive > 0).any() and (maps.negative < 0).any()


def test_cam_refuses_heads_that_are_not_gap_linear() -> None:
    with pytest.raises(NotAGapLinearHead, match="grad_cam"):
        class_activation_maps(_model("test_vit"), torch.randn(1, 3, 160, 160))
    model = _model("resnet18")
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 4))  # not an nn.Linear any more
    model.get_classifier = lambda: model.fc
    with pytest.raises(NotAGapLinearHead, match="not a Linear"):
        class_activation_maps(model, torch.randn(1, 3, 64, 64))


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(getattr(m, "_forward_pre_hooks", {}))
               for m in module.modules())


def test_grad_cam_on_vit_uses_the_models_grid_and_releases_hooks() -> None:
    model = _model("test_vit")
    size = model.pretrained_cfg["input_size"][-1]
    grid = model.patch_embed.grid_size
    tokens = torch.randn(2, model.num_prefix_tokens + grid[0] * grid[1], 64)
    assert vit_reshape_transform(model)(tokens).shape == (2, 64, grid[0], grid[1])
    before = _hooks(model)
    maps = grad_cam(model, torch.randn(2, 3, size, size), [0, 3])
    assert maps.shape == (2, size, size) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert _hooks(model) == before  # every hook released
    # run at another resolution (timm resamples the position embedding): the grid follows the input, 48 px -> 3 x 3
    small = torch.randn(2, model.num_prefix_tokens + 9, 64)
    assert vit_reshape_transform(model, (48, 48))(small).shape == (2, 64, 3, 3)
    maps = grad_cam(model, torch.randn(2, 3, 48, 48), [0, 1])
    assert maps.shape == (2, 48, 48) and _hooks(model) == before


def test_grad_cam_on_a_cnn_and_unknown_method() -> None:
    model = _model("resnet18")
    maps = grad_cam(model, torch.randn(1, 3, 64, 64), [2], method="gradcam++")
    assert maps.shape == (1, 64, 64)
    with pytest.raises(ValueError, match="unknown method"):
        grad_cam(model, torch.randn(1, 3, 64, 64), [2], method="magic")
