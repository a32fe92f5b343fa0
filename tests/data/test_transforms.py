"""Transforms come from the backbone's data config; grayscale sources reach the model with 3 channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from regtune.data.base import ImageDataset
from regtune.data.transforms import TransformedSubset, build_transforms

CONFIG = {"input_size": (3, 40, 40), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "crop_pct": 0.875, "crop_mode": "center"}


def _gray_dataset() -> ImageDataset:
    pixels = np.full((28, 28), 255, dtype=np.uint8)
    return ImageDataset(name="toy", split="train", ids=["a", "b"], targets=[0, 1], classes=["x", "y"],
                        load=lambda i: Image.fromarray(pixels, mode="L"))


@pytest.mark.parametrize("train", [True, False])
def test_grayscale_becomes_three_channels_at_the_configured_size(train: bool) -> None:
    train_tf, eval_tf = build_transforms(CONFIG)
    data = TransformedSubset(_gray_dataset(), [1, 0], train_tf if train else eval_tf)
    image, target = data[0]
    assert image.shape == (3, 40, 40) and target == 1
    # white (255) with mean = std = 0.5 normalises to (1 - 0.5) / 0.5 = 1 in every channel
    torch.testing.assert_close(image[:, 20, 20], torch.ones(3), atol=1e-3, rtol=0)


def test_eval_transform_resizes_then_centre_crops() -> None:
    _, eval_tf = build_transforms(CONFIG)
    names = [type(t).__name__ for t in eval_tf.transforms]
    assert names[:2] == ["Resize", "CenterCrop"]
    assert eval_tf.transforms[0].size == int(40 / 0.875)


def test_train_transform_uses_requested_crop_scale() -> None:
    train_tf, _ = build_transforms(CONFIG, scale=(0.5, 1.0), hflip=0.0)
    crop = train_tf.transforms[0]
    assert tuple(crop.scale) == (0.5, 1.0) and crop.size == (40, 40)
    assert not any("Flip" in type(t).__name__ for t in train_tf.transforms)


def test_randaugment_posterize_to_zero_bits_gives_black_under_any_pillow() -> None:
    """timm's RandAugment asks Pillow to keep 0 bits at its top magnitudes; Pillow 13 refuses, Pillow 12 gave zeros."""
    from PIL import Image
    from timm.data import auto_augment

    from regtune.data.transforms import _posterize

    build_transforms({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3},
                     auto_augment="rand-m10-n1-mstd0")
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is _posterize
    image = Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8))
    assert np.asarray(_posterize(image, 0)).max() == 0
    assert np.asarray(_posterize(image, 2)).max() == 192  # 200 = 0b11001000 keeps its two top bits
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # 4 - int(10 / 10 * 4) = 0 bits
    assert np.asarray(op(image)).max() == 0


def _stripes(width: int = 90, height: int = 30) -> Image.Image:
    """A 3:1 photo: red, green and blue thirds, left to right."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for i in range(3):
        pixels[:, i * width // 3:(i + 1) * width // 3, i] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("mode", "seen", "padded"), [
    ("center", {1}, False),  # the short side fills the square: only the green middle third is left
    ("squash", {0, 1, 2}, False),  # the whole frame, stretched
    ("border", {0, 1, 2}, True),  # the whole frame, aspect kept, above and below padded
])
def test_the_evaluation_frame_is_the_runs_crop_mode(mode: str, seen: set[int], padded: bool) -> None:
    _, eval_tf = build_transforms({**CONFIG, "crop_pct": 1.0, "crop_mode": mode})
    image = eval_tf(_stripes())  # normalised: channel on = 1, off = -1
    middle = image[:, 20, :]  # the middle row, left to right
    dominant = {int(middle[:, x].argmax()) for x in range(40) if float(middle[:, x].max()) > 0.9}
    assert dominant == seen
    top = image[:, 1, 20]  # near the top of the middle column: padding (timm fills the mean grey: 0) or green
    assert bool((top.abs() < 0.05).all()) == padded and (float(top[1]) > 0.9) != padded
