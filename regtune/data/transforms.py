"""Train and evaluation transforms from the backbone's own data config (timm), never from constants."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from timm.data import auto_augment, create_transform
from torch.utils.data import Dataset

from regtune.data.seeds import sample_seed

_TIMM_POSTERIZE = auto_augment.posterize

__all__ = ["TransformedSubset", "build_transforms", "seeded_rng"]


def _posterize(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's posterize, where keeping 0 bits gives the black image, as Pillow did before 13.0.

    timm's RandAugment asks for 0 bits at the top magnitudes (``4 - int(level / 10 * 4)``), and Pillow 13's
    ``ImageOps.posterize`` refuses 0 ("bits must be between or equal to 1 and 8"), so every run with RandAugment
    stopped within a few epochs. With 0 bits every pixel keeps no bit: zero, as Pillow 12 computed it.
    """
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


def _patch_timm_posterize() -> None:
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is _TIMM_POSTERIZE:
            auto_augment.NAME_TO_OP[name] = _posterize


def build_transforms(
        data_config: dict[str, Any],
        scale: tuple[float, float] = (0.2, 1.0),
        hflip: float = 0.5,
        color_jitter: float | None = None,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
) -> tuple[Callable, Callable]:
    """Build ``(train_transform, eval_transform)`` with `timm.data.create_transform`.

    Train: RandomResizedCrop(input size, ``scale``) + horizontal flip (+ optional colour jitter / auto-augment),
    the recipe of TLlib (scale 0.2-1) and AdaRand (0.08-1). Eval: resize to ``size / crop_pct`` then centre crop.
    Both normalise with the model's mean/std (mean = std = 0.5 for the ``tf_`` EfficientNets).

    Args:
        data_config: timm data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
            ``crop_mode``), e.g. from `regtune.models.data_config`.
        scale: Area range of RandomResizedCrop.
        hflip: Probability of a horizontal flip.
        color_jitter: Strength of colour jitter, ``None`` for none.
        auto_augment: timm auto-augment policy string (e.g. ``"rand-m9-mstd0.5"``), ``None`` for none.
        re_prob: Random erasing probability (timm's ``RandomErasing`` after normalisation, per-pixel normal values,
            one box), 0 for none.
    """
    _patch_timm_posterize()  # RandAugment under Pillow >= 13 (see _posterize)
    common = {
        "input_size": data_config["input_size"],
        "interpolation": data_config.get("interpolation", "bilinear"),
        "mean": data_config["mean"],
        "std": data_config["std"],
    }
    train = create_transform(
        **common,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=color_jitter if color_jitter else None,
        auto_augment=auto_augment,
        re_prob=re_prob,
        re_mode="pixel",
    )
    evaluation = create_transform(
        **common,
        is_training=False,
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode"),
    )
    return train, evaluation


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with Python's ``random``, NumPy's and torch's CPU generators seeded with ``seed``; restore after.

    timm's transforms draw from ``random`` (RandomResizedCrop, flips, RandAugment), torchvision's from torch, some
    user transforms from NumPy: all three are seeded. The CUDA generators are not touched, so the model's random
    stream (dropout on a GPU) is the same whether the data is loaded in the main process or in workers.
    """
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


class TransformedSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image.

    A key is either a position ``i`` or an ``(epoch, i)`` pair (what `EpochShuffle`
    yields). With a pair and a ``seed``, the transform runs under `seeded_rng` with the seed
    `sample_seed` ``(seed, epoch, i)``: the augmentation of a sample depends only on the
    run's seed, the epoch and the sample, not on the order of loading, the number of workers, or what the model drew
    from the global generators. That makes a run independent of ``num_workers`` and lets a run resume exactly in the
    middle of an epoch.

    Args:
        dataset: Yields ``(PIL image, target)``.
        indices: Items to expose, in order.
        transform: Applied to each image.
        with_index: Also yield ``i``, the item's position in this subset: ``(image, target, i)``.
        seed: Seed of the per-sample augmentation (used with ``(epoch, i)`` keys); ``None`` draws from the global
            generators as they are.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable,
                 with_index: bool = False, seed: int | None = None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.with_index = with_index
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        image, target = self.dataset[self.indices[i]]
        if epoch is not None and self.seed is not None:
            with seeded_rng(sample_seed(self.seed, epoch, i)):
                image = self.transform(image)
        else:
            image = self.transform(image)
        return (image, target, i) if self.with_index else (image, target)
