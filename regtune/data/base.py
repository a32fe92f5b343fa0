"""The one in-memory form every dataset reader returns: ids, integer targets, class names and an image loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["Box", "CorruptImageError", "DatasetNotFoundError", "ImageDataset", "as_rgb", "unreadable_images"]

Box = tuple[float, float, float, float]
"""A box as (x0, y0, x1, y1) in pixels of the original image, inclusive corners (CUB's convention after conversion)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they are expected; the message says where and how to get them."""


class CorruptImageError(OSError):
    """An image file cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class ImageDataset(Dataset):
    """One split of a labelled image dataset, before any transform.

    Item ``i`` is ``(image, target)`` with ``image`` a 3-channel RGB `PIL.Image.Image` (grayscale sources are
    converted, so every backbone sees 3 channels) and ``target`` an ``int`` in ``[0, len(classes))``.

    Args:
        name: Dataset name, as in the registry (``"cub200"``).
        split: ``"train"`` or ``"test"``.
        ids: One stable string per item that identifies it across runs (a path relative to the dataset root, or an
            index into the official file for array datasets). Split manifests store these.
        targets: Integer class of each item.
        classes: Class names; ``classes[t]`` names target ``t``.
        load: ``load(i)`` returns item ``i``'s image (any mode). Errors it raises while decoding are re-raised as
            `CorruptImageError` naming ``ids[i]``.
        boxes: Optional ground-truth boxes per item (a list of `Box` per image), for localization metrics.
        root: Where the files were read from (for messages).
    """

    name: str
    split: str
    ids: Sequence[str]
    targets: Sequence[int]
    classes: Sequence[str]
    load: Callable[[int], Image.Image]
    boxes: Sequence[Sequence[Box]] | None = None
    root: Path | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.targets) != n:
            raise ValueError(f"{self.name}/{self.split}: {n} ids but {len(self.targets)} targets")
        if self.boxes is not None and len(self.boxes) != n:
            raise ValueError(f"{self.name}/{self.split}: {n} ids but {len(self.boxes)} box lists")
        if len(set(self.ids)) != n:
            raise ValueError(f"{self.name}/{self.split}: item ids are not unique")
        bad = [t for t in self.targets if not 0 <= t < len(self.classes)]
        if bad:
            raise ValueError(f"{self.name}/{self.split}: target {bad[0]} outside [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        try:
            image = self.load(index)
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            where = f" under {self.root}" if self.root is not None else ""
            raise CorruptImageError(
                f"{self.name}/{self.split}: cannot read image {self.ids[index]!r}{where}: {err}. "
                "Replace it with a readable file (a run that stopped on it then continues with --resume), or delete it "
                "and start again (a deleted training image changes the split a run was drawn with)."
            ) from err
        return as_rgb(image), int(self.targets[index])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def unreadable_images(dataset: ImageDataset, indices: Iterable[int]) -> list[tuple[str, str]]:
    """``(id, reason)`` of every item of ``indices`` that cannot be read now (each image is opened and decoded, as
    training would), in order: all of them at once, not the first a batch happens to load."""
    bad = []
    for i in indices:
        try:
            dataset[int(i)]
        except CorruptImageError as err:
            cause = err.__cause__
            bad.append((str(dataset.ids[int(i)]), f"{type(cause).__name__}: {cause}" if cause else str(err)))
    return bad


def as_rgb(image: Image.Image) -> Image.Image:
    """The image in 3-channel RGB (grey, palette, RGBA converted by Pillow): what every backbone is shown, in training
    and in prediction alike."""
    return image if image.mode == "RGB" else image.convert("RGB")
