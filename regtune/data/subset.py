"""Low-data subsets: stratified, seeded selection of a fraction (or N images) per class and a validation carve-out.

The chosen item ids are written to a manifest (JSON) in the run directory, so that a run can be repeated on the exact
same images and two methods can be compared on the same split.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from regtune._io import atomic_write_text

__all__ = ["EmptyClassError", "Split", "read_manifest", "split_from_manifest", "stratified_split", "write_manifest"]

_log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class EmptyClassError(ValueError):
    """A subset request would leave a class without training images."""


@dataclass(frozen=True)
class Split:
    """Indices into a dataset's training split (and a record of how they were chosen).

    Attributes:
        train: Indices used for training, sorted.
        val: Indices held out for model selection, sorted (disjoint from ``train``).
        settings: How the split was made (dataset, fraction, per_class, val_fraction, seed).
    """

    train: list[int]
    val: list[int]
    settings: dict = field(default_factory=dict)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def stratified_split(
        targets: Sequence[int],
        num_classes: int,
        fraction: float | None = None,
        per_class: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
) -> Split:
    """Choose a class-balanced, seeded training subset and carve a validation split out of it.

    For each class c with n_c images: keep ``round(fraction * n_c)`` (half up) images, or ``min(per_class, n_c)``;
    then move ``floor(val_fraction * k_c)`` of the k_c kept images to validation, never the last one, so every class
    keeps at least one training image. Sampling uses one ``numpy.random.Generator(PCG64(seed))`` over the classes in
    order, so the split depends only on the targets and the seed.

    Args:
        targets: Class of each item of the full training split.
        num_classes: Number of classes (a class with no item is an error).
        fraction: Share of each class to keep, in (0, 1]. Exclusive with ``per_class``; neither keeps everything.
        per_class: Images to keep per class (classes with fewer keep all of theirs, with a warning).
        val_fraction: Share of the kept images of each class moved to validation, in [0, 1).
        seed: Seed of the selection.
        class_names: For messages.

    Returns:
        The `Split`.

    Raises:
        EmptyClassError: a class has no image, or ``fraction`` rounds a class to zero images (the message gives the
            smallest fraction that works).
        ValueError: bad arguments.
    """
    if fraction is not None and per_class is not None:
        raise ValueError("give either fraction or per_class, not both")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    train: list[int] = []
    val: list[int] = []
    short: list[str] = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        n_c = len(members)
        if n_c == 0:
            raise EmptyClassError(f"class {c} ({names[c]!r}) has no image in the training split")
        if fraction is not None:
            k_c = _round_half_up(fraction * n_c)
            if k_c == 0:
                raise EmptyClassError(
                    f"fraction {fraction} keeps no image of class {c} ({names[c]!r}, {n_c} images); use "
                    f"fraction >= {0.5 / n_c:.4g} or per_class >= 1"
                )
        elif per_class is not None:
            k_c = min(per_class, n_c)
            if k_c < per_class:
                short.append(f"{names[c]!r} ({n_c})")
        else:
            k_c = n_c
        chosen = rng.permutation(members)[:k_c]
        n_val = min(math.floor(val_fraction * k_c), k_c - 1)
        val.extend(chosen[:n_val].tolist())
        train.extend(chosen[n_val:].tolist())
    if short:
        _log.warning("per_class=%d: %d class(es) have fewer images and keep all: %s", per_class, len(short),
                     ", ".join(short[:10]) + (" ..." if len(short) > 10 else ""))
    settings = {"fraction": fraction, "per_class": per_class, "val_fraction": val_fraction, "seed": seed}
    return Split(train=sorted(train), val=sorted(val), settings=settings)


def write_manifest(path: str | Path, split: Split, ids: Sequence[str], dataset: str) -> None:
    """Write the split as item ids (JSON), atomically (temporary file, then rename)."""
    path = Path(path)
    payload = {
        "version": MANIFEST_VERSION,
        "dataset": dataset,
        "settings": split.settings,
        "num_train": len(split.train),
        "num_val": len(split.val),
        "train": [ids[i] for i in split.train],
        "val": [ids[i] for i in split.val],
    }
    atomic_write_text(path, json.dumps(payload, indent=1))


def read_manifest(path: str | Path) -> dict:
    """Read a manifest written by `write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split manifest {path} does not exist")
    payload = json.loads(path.read_text())
    for key in ("dataset", "train", "val"):
        if key not in payload:
            raise ValueError(f"{path} is not a regtune split manifest (no {key!r} entry)")
    return payload


def split_from_manifest(path: str | Path, ids: Sequence[str], dataset: str) -> Split:
    """Rebuild a `Split` from a manifest and the dataset's item ids.

    Raises:
        ValueError: the manifest is for another dataset, or names ids the dataset does not have.
    """
    payload = read_manifest(path)
    if payload["dataset"] != dataset:
        raise ValueError(f"{path} is a split of {payload['dataset']!r}, not of {dataset!r}")
    index = {item: i for i, item in enumerate(ids)}
    missing = [item for item in payload["train"] + payload["val"] if item not in index]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} id(s) are not in the {dataset!r} training split (e.g. {missing[0]!r}); "
            "is the dataset the same version?"
        )
    settings = dict(payload.get("settings", {}), manifest=str(path))
    return Split(train=sorted(index[i] for i in payload["train"]), val=sorted(index[i] for i in payload["val"]),
                 settings=settings)

