"""Low-data subsets: stratified, seeded selection of a fraction (or N images) per class and a validation carve-out.

`stratified_split` keeps the same budget for every class (class-balanced); `longtail_split` keeps a long-tailed
subset instead, its per-class counts following an exponential or a step profile (`longtail_counts`).

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

__all__ = ["IMBALANCE_ORDERS", "IMBALANCE_PROFILES", "EmptyClassError", "Split", "longtail_counts", "longtail_split",
           "read_manifest", "split_from_manifest", "stratified_split", "write_manifest"]

_log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
IMBALANCE_PROFILES = ("exp", "step")
IMBALANCE_ORDERS = ("index", "random")


class EmptyClassError(ValueError):
    """A subset request would leave a class without training images (or, for a long-tailed split with a validation
    share, without a validation image)."""


@dataclass(frozen=True)
class Split:
    """Indices into a dataset's training split (and a record of how they were chosen).

    Attributes:
        train: Indices used for training, sorted.
        val: Indices held out for model selection, sorted (disjoint from ``train``).
        settings: How the split was made (fraction, per_class, val_fraction, seed; for a long-tailed split also the
            imbalance settings, the class order and the per-class counts, see `longtail_split`).
    """

    train: list[int]
    val: list[int]
    settings: dict = field(default_factory=dict)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _check_budget(fraction: float | None, per_class: int | None, val_fraction: float) -> None:
    if fraction is not None and per_class is not None:
        raise ValueError("give either fraction or per_class, not both")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


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
    _check_budget(fraction, per_class, val_fraction)
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


def _profile_count(n_max: int, ratio: float, exponent: float) -> int:
    """``floor(n_max * ratio ** -exponent)``, exact where the true value is an integer."""
    x = n_max / ratio**exponent
    # ratio ** exponent is not exact in floats (32 ** 0.8 = 15.999..., so 16 / that would floor to 0 instead of 1):
    # a value within rounding error of an integer is that integer.
    nearest = round(x)
    return nearest if abs(x - nearest) <= 1e-9 * max(1.0, x) else math.floor(x)


def _exponents(num_classes: int, profile: str, minority: float) -> list[float]:
    """The exponent e_i of ``n_i = floor(n_max * ratio ** -e_i)`` for each rank i (0 = head)."""
    if profile == "exp":
        return [i / (num_classes - 1) for i in range(num_classes)]
    tail = _round_half_up(minority * num_classes)
    if not 1 <= tail <= num_classes - 1:
        raise ValueError(f"imbalance minority {minority} of {num_classes} classes makes {tail} minority class(es); "
                         f"a step profile needs 1 to {num_classes - 1}: choose a minority share in "
                         f"[{0.5 / num_classes:.4g}, {1 - 0.5 / num_classes:.4g})")
    return [0.0] * (num_classes - tail) + [1.0] * tail


def _check_profile(num_classes: int, ratio: float, profile: str, minority: float) -> None:
    if profile not in IMBALANCE_PROFILES:
        raise ValueError(f"imbalance profile must be one of {', '.join(IMBALANCE_PROFILES)}, got {profile!r}")
    if not (math.isfinite(ratio) and ratio >= 1.0):
        raise ValueError(f"imbalance ratio rho = n_max / n_min must be a finite number >= 1, got {ratio}")
    if not 0.0 < minority < 1.0:
        raise ValueError(f"imbalance minority (the share of minority classes of a step profile) must be in (0, 1), "
                         f"got {minority}")
    if num_classes < 2:
        raise ValueError(f"a long-tailed split needs at least 2 classes, got {num_classes}")


def longtail_counts(n_max: int, num_classes: int, ratio: float, profile: str = "exp",
                    minority: float = 0.5) -> list[int]:
    """Images per class of a long-tailed profile, by rank (rank 0 is the head), before any cap by class size.

    ``exp``, the exponential profile of long-tailed CIFAR (Cui et al., CVPR 2019, arXiv:1901.05555):

        n_i = floor(n_max * rho ** (-i / (C - 1))),  i = 0, ..., C - 1,

    so ``n_0 = n_max`` and ``n_{C-1} = floor(n_max / rho)``. ``step`` (Buda et al., Neural Networks 2018,
    arXiv:1710.05381; LDAM, Cao et al., NeurIPS 2019, arXiv:1906.07413): the last ``mu = round(minority * C)`` (half
    up) ranks are minority classes,

        n_i = n_max for i < C - mu,  n_i = floor(n_max / rho) otherwise.

    C is the number of classes, rho >= 1 the imbalance ratio n_max / n_min. A value that is an integer up to float
    rounding counts as that integer (``16 * 32 ** -0.8`` is 1, not 0).

    Args:
        n_max: Images of the head class.
        num_classes: C (at least 2).
        ratio: rho.
        profile: ``"exp"`` or ``"step"``.
        minority: Share of minority classes of the step profile, in (0, 1) (unused by ``exp``).

    Returns:
        ``[n_0, ..., n_{C-1}]``.

    Raises:
        ValueError: bad arguments, or a step profile whose minority share gives no minority class or no head class.

    Example:
        >>> longtail_counts(5000, 10, 100)
        [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
        >>> longtail_counts(300, 4, 10, profile="step")
        [300, 300, 30, 30]
    """
    _check_profile(num_classes, ratio, profile, minority)
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    return [_profile_count(n_max, ratio, e) for e in _exponents(num_classes, profile, minority)]


def _class_ranks(num_classes: int, order: str, seed: int) -> list[int]:
    """The classes from head to tail: in index order, or in a seeded permutation."""
    if order == "index":
        return list(range(num_classes))
    # Its own stream (a child of the seed's), so that the order does not shift the images drawn per class.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,))))
    return [int(c) for c in rng.permutation(num_classes)]


def longtail_split(
        targets: Sequence[int],
        num_classes: int,
        ratio: float,
        profile: str = "exp",
        minority: float = 0.5,
        order: str = "index",
        fraction: float | None = None,
        per_class: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
) -> Split:
    """Choose a long-tailed (class-imbalanced), seeded subset and carve a validation split out of it.

    The head's budget n_max is the balanced rule's: ``per_class``, or ``round(fraction * n_largest)`` (half up)
    with n_largest the number of images of the largest class (the per-class budget of a balanced dataset: fraction
    0.05 of Fashion-MNIST's 6,000 images per class is 300), or n_largest when neither is given. The class at rank i
    keeps ``k_c = min(n_i, n_c)`` of its n_c images, n_i from `longtail_counts`; the ranks follow the class indices
    (``order="index"``: class 0 is the head, as long-tailed CIFAR) or a seeded permutation (``"random"``). Then
    ``max(1, floor(val_fraction * k_c))`` of them go to validation (none with ``val_fraction`` 0), so the
    validation split follows the training distribution and validates every class; each class therefore needs
    ``k_c >= 2`` (``>= 1`` without validation). Images are drawn as `stratified_split` draws them (one
    ``numpy.random.Generator(PCG64(seed))`` over the classes in index order), so the split depends only on the
    targets, the settings and the seed. The test split is not touched: it stays as the dataset gives it.

    ``Split.settings`` records, besides the balanced settings, ``imbalance_ratio``, ``imbalance_profile``,
    ``imbalance_minority``, ``imbalance_order``, ``n_max``, ``class_order`` (the classes from head to tail) and
    ``train_counts`` / ``val_counts`` (per class index), so the manifest holds them.

    Args:
        targets: Class of each item of the full training split.
        num_classes: Number of classes (at least 2; a class with no item is an error).
        ratio: Imbalance ratio rho = n_max / n_min, >= 1.
        profile: ``"exp"`` (exponential) or ``"step"``.
        minority: Share of the classes that are minority classes in the step profile, in (0, 1).
        order: ``"index"`` or ``"random"`` (seeded): which classes are head and tail.
        fraction: Sets n_max from the largest class (see above). Exclusive with ``per_class``.
        per_class: n_max itself.
        val_fraction: Share of each class's kept images moved to validation (at least one), in [0, 1).
        seed: Seed of the selection (and of a random class order).
        class_names: For messages.

    Returns:
        The `Split`.

    Raises:
        EmptyClassError: a class has no image, or keeps fewer than 2 (1 training + 1 validation; 1 without
            validation): the message names the class and gives the largest ratio and the smallest n_max that work.
        ValueError: bad arguments.

    Example:
        >>> split = longtail_split([0] * 20 + [1] * 20 + [2] * 20, 3, ratio=4, per_class=8, val_fraction=0.25)
        >>> split.settings["train_counts"], split.settings["val_counts"]
        ([6, 3, 1], [2, 1, 1])
    """
    _check_budget(fraction, per_class, val_fraction)
    _check_profile(num_classes, ratio, profile, minority)
    if order not in IMBALANCE_ORDERS:
        raise ValueError(f"imbalance order must be one of {', '.join(IMBALANCE_ORDERS)}, got {order!r}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    targets = np.asarray(targets, dtype=np.int64)
    sizes = [int(n) for n in np.bincount(targets[targets < num_classes], minlength=num_classes)]
    for c, n_c in enumerate(sizes):
        if n_c == 0:
            raise EmptyClassError(f"class {c} ({names[c]!r}) has no image in the training split")
    n_max = per_class if per_class is not None else \
        _round_half_up(fraction * max(sizes)) if fraction is not None else max(sizes)
    if n_max < 1:
        raise EmptyClassError(f"fraction {fraction} of the largest class ({max(sizes)} images) keeps no image; use "
                              f"fraction >= {0.5 / max(sizes):.4g}")
    ranks = _class_ranks(num_classes, order, seed)
    profile_counts = longtail_counts(n_max, num_classes, ratio, profile, minority)
    need = 2 if val_fraction > 0 else 1
    short = [(i, ranks[i]) for i in range(num_classes) if profile_counts[i] < need]
    if short:
        raise EmptyClassError(_short_profile_message(short, names, n_max, ratio, profile, minority, need, fraction,
                                                     per_class, max(sizes)))
    kept = [0] * num_classes
    for i, c in enumerate(ranks):
        kept[c] = min(profile_counts[i], sizes[c])
    too_small = [c for c in range(num_classes) if kept[c] < need]
    if too_small:
        listed = ", ".join(f"{c} ({names[c]!r}, {sizes[c]} image)" for c in too_small[:10])
        raise EmptyClassError(f"class(es) {listed} cannot have 1 training and 1 validation image; set "
                              "val_fraction 0, or leave the class out of the dataset")
    capped = [f"{names[c]!r} ({sizes[c]} < {profile_counts[i]})" for i, c in enumerate(ranks)
              if sizes[c] < profile_counts[i]]
    if capped:
        _log.warning("long-tailed split: %d class(es) have fewer images than the profile asks and keep all: %s",
                     len(capped), ", ".join(capped[:10]) + (" ..." if len(capped) > 10 else ""))
    rng = np.random.Generator(np.random.PCG64(seed))
    train: list[int] = []
    val: list[int] = []
    val_counts = [max(1, math.floor(val_fraction * k)) if val_fraction > 0 else 0 for k in kept]
    for c in range(num_classes):
        chosen = rng.permutation(np.flatnonzero(targets == c))[:kept[c]]
        val.extend(chosen[:val_counts[c]].tolist())
        train.extend(chosen[val_counts[c]:].tolist())
    train_counts = [k - v for k, v in zip(kept, val_counts)]
    settings = {"fraction": fraction, "per_class": per_class, "val_fraction": val_fraction, "seed": seed,
                "imbalance_ratio": float(ratio), "imbalance_profile": profile, "imbalance_minority": float(minority),
                "imbalance_order": order, "n_max": int(n_max), "class_order": ranks, "train_counts": train_counts,
                "val_counts": val_counts}
    _log_counts(settings, names)
    return Split(train=sorted(train), val=sorted(val), settings=settings)


def _short_profile_message(short: list[tuple[int, int]], names: list[str], n_max: int, ratio: float, profile: str,
                           minority: float, need: int, fraction: float | None, per_class: int | None,
                           largest: int) -> str:
    """Which classes the profile leaves with fewer than ``need`` images, and the ratio / n_max that would do."""
    exponent = _exponents(len(names), profile, minority)[short[-1][0]]  # the last short rank is the worst
    listed = ", ".join(f"{c} ({names[c]!r}, rank {i})" for i, c in short[:10]) + (" ..." if len(short) > 10 else "")
    what = "1 training + 1 validation" if need == 2 else "1 training"
    message = (f"the {profile} profile with imbalance ratio {ratio:g} and n_max {n_max} keeps fewer than {need} "
               f"image(s) ({what}) of class(es) {listed}")
    if exponent == 0.0 or n_max < need:
        return message + f"; n_max must be >= {need} whatever the ratio"
    rho_max = math.floor((n_max / need) ** (1.0 / exponent) * 100) / 100
    while rho_max >= 1.0 and _profile_count(n_max, rho_max, exponent) < need:
        rho_max = round(rho_max - 0.01, 2)
    n_needed = max(need, math.ceil(need * ratio**exponent) - 1)
    while _profile_count(n_needed, ratio, exponent) < need:
        n_needed += 1
    message += f"; use imbalance ratio <= {rho_max:g}"
    if per_class is not None:
        return message + f", or per_class >= {n_needed}"
    if fraction is not None:
        least = math.ceil((n_needed - 0.5) / largest * 1e4) / 1e4  # round_half_up(f * largest) >= n_needed
        if least <= 1.0:
            return message + f", or fraction >= {least:g} (n_max >= {n_needed})"
    return message + f" (n_max >= {n_needed} would need more images than the largest class has, {largest})"


def _log_counts(settings: dict, names: list[str]) -> None:
    counts = settings["train_counts"]
    low, high = int(np.argmin(counts)), int(np.argmax(counts))
    _log.info("long-tailed split (%s profile, ratio %g, order %s, n_max %d): training images per class from %d "
              "(%r) to %d (%r), ratio %.3g; validation images per class from %d to %d; the test split is the "
              "dataset's own, not long-tailed", settings["imbalance_profile"], settings["imbalance_ratio"],
              settings["imbalance_order"], settings["n_max"], counts[low], names[low], counts[high], names[high],
              counts[high] / counts[low], min(settings["val_counts"]), max(settings["val_counts"]))


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

