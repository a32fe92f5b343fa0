"""Train and evaluation transforms from the backbone's own data config (timm), never from constants."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from timm.data import create_transform
from torch.utils.data import Dataset

__all__ = ["build_transforms", "TransformedSubset"]


def build_transforms(
        data_config: dict[str, Any],
        scale: tuple[float, float] = (0.2, 1.0),
        hflip: float = 0.5,
        color_jitter: float | None = None,
        auto_augment: str | None = None,
) -> tuple[Callable, Callable]:
    """Build ``(train_transform, eval_transform)`` with :func:`timm.data.create_transform`.

    Train: RandomResizedCrop(input size, ``scale``) + horizontal flip (+ optional colour jitter / auto-augment),
    the recipe of TLlib (scale 0.2-1) and AdaRand (0.08-1). Eval: resize to ``size / crop_pct`` then centre crop.
    Both normalise with the model's mean/std (mean = std = 0.5 for the ``tf_`` EfficientNets).

    Args:
        data_config: timm data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
            ``crop_mode``), e.g. from :func:`regtune.models.data_config`.
        scale: Area range of RandomResizedCrop.
        hflip: Probability of a horizontal flip.
        color_jitter: Strength of colour jitter, ``None`` for none.
        auto_augment: timm auto-augment policy string (e.g. ``"rand-m9-mstd0.5"``), ``None`` for none.
    """
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
    )
    evaluation = create_transform(
        **common,
        is_training=False,
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode"),
    )
    return train, evaluation


class TransformedSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image.

    Args:
        dataset: Yields ``(PIL image, target)``.
        indices: Items to expose, in order.
        transform: Applied to each image.
        with_index: Also yield ``i``, the item's position in this subset: ``(image, target, i)``.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable,
                 with_index: bool = False) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image, target = self.dataset[self.indices[i]]
        return (self.transform(image), target, i) if self.with_index else (self.transform(image), target)
