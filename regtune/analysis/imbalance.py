"""Metrics for imbalanced classes: per-class recall, balanced accuracy, macro-F1 and many / medium / few-shot groups.

Everything is computed from counts: the per-class hits and items of a split, or its confusion matrix ``confusion[i][j]``
= items of true class ``i`` predicted as class ``j``. Pure Python: a run's ``metrics.json`` and the reports of
``regtune bench`` / ``regtune report`` read these numbers without importing torch.

Shot groups (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR 2019, arXiv:1904.05160): a class
is *many*-shot with more than ``hi`` training images, *few*-shot with fewer than ``lo``, *medium*-shot in between
(``lo <= n <= hi``). The standard thresholds ``(hi, lo) = (100, 20)`` assume a largest class of hundreds of images;
`group_thresholds` scales them to smaller data. A group's accuracy is the mean of its classes' test accuracies, as in
the reference code (``shot_acc`` of OLTR), so a large class does not outweigh a small one inside its group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "GROUPS",
    "RUN_METRICS",
    "STANDARD_THRESHOLDS",
    "balanced_accuracy",
    "class_recall",
    "confusion_matrix",
    "group_accuracy",
    "group_thresholds",
    "imbalance_metrics",
    "macro_f1",
    "run_metric",
    "shot_groups",
]

GROUPS = ("many", "medium", "few")
STANDARD_THRESHOLDS = (100, 20)  # (hi, lo): many > 100, medium 20-100, few < 20 training images
_STANDARD_LARGEST = 300  # the largest class from which on the standard thresholds apply unscaled

RUN_METRICS = {  # metrics.json quantity -> what it is; the reports rank by any of them (higher is better)
    "test_acc": "test accuracy",
    "test_bal_acc": "balanced test accuracy (mean per-class recall)",
    "test_mean_class_acc": "mean per-class test accuracy (the same as test_bal_acc; older runs' name)",
    "test_macro_f1": "macro-F1 on the test set (unweighted mean of the classes' F1)",
    "test_many_acc": "test accuracy of the many-shot classes (mean over the group's classes)",
    "test_medium_acc": "test accuracy of the medium-shot classes (mean over the group's classes)",
    "test_few_acc": "test accuracy of the few-shot classes (mean over the group's classes)",
    "val_acc": "validation accuracy of the tested weights",
    "val_bal_acc": "balanced validation accuracy of the tested weights",
}


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> list[list[int]]:
    """``confusion[i][j]``: the items of true class ``i`` predicted as class ``j``.

    Raises:
        ValueError: the two sequences differ in length, or a class lies outside ``[0, num_classes)``.
    """
    if len(labels) != len(predictions):
        raise ValueError(f"labels and predictions differ in length: {len(labels)} and {len(predictions)}")
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for true, predicted in zip(labels, predictions):
        if not (0 <= true < num_classes and 0 <= predicted < num_classes):
            raise ValueError(f"class {true} -> {predicted} outside [0, {num_classes})")
        confusion[true][predicted] += 1
    return confusion


def class_recall(hits: Sequence[float], counts: Sequence[float]) -> list[float | None]:
    """Per-class recall (the class's test accuracy) ``hits[c] / counts[c]``; ``None`` for a class without items."""
    return [float(h) / float(n) if n > 0 else None for h, n in zip(hits, counts, strict=True)]


def balanced_accuracy(hits: Sequence[float], counts: Sequence[float]) -> float | None:
    """Balanced accuracy: the mean per-class recall over the classes that have items.

    ``(1 / |K|) * sum_{c in K} hits_c / n_c`` with ``K = {c : n_c > 0}``: scikit-learn's ``balanced_accuracy_score``,
    which also leaves out classes absent from the labels. ``None`` when no class has items.

    Example:
        >>> balanced_accuracy([3, 1, 1], [4, 3, 2])  # (3/4 + 1/3 + 1/2) / 3
        0.5277777777777778
    """
    recalls = [r for r in class_recall(hits, counts) if r is not None]
    return math.fsum(recalls) / len(recalls) if recalls else None


def macro_f1(confusion: Sequence[Sequence[int]]) -> float | None:
    """Macro-F1: the unweighted mean of the classes' F1 over the classes that occur among the labels or the
    predictions (scikit-learn's ``f1_score(average="macro")``, which takes the same classes by default).

    ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, the harmonic mean of precision and recall, with ``TP_c`` the diagonal
    entry, ``FN_c`` the rest of row ``c`` (items of ``c`` predicted as another class), ``FP_c`` the rest of column
    ``c`` (other items predicted as ``c``). A class that occurs but is never predicted right has F1 0. ``None`` for an
    empty matrix.

    Example:
        >>> macro_f1([[1, 1], [0, 2]])  # F1 = 2/3 and 4/5
        0.7333333333333334
    """
    rows = [sum(row) for row in confusion]
    columns = [sum(column) for column in zip(*confusion)] if confusion else []
    scores = [2.0 * confusion[c][c] / (rows[c] + columns[c]) for c in range(len(rows)) if rows[c] + columns[c] > 0]
    return math.fsum(scores) / len(scores) if scores else None


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)  # not round(): Python rounds halves to even (round(2.5) == 2)


def group_thresholds(counts: Sequence[int]) -> tuple[int, int]:
    """The many / few-shot thresholds ``(hi, lo)`` for a training set with ``counts[c]`` images of class ``c``.

    A class is many-shot with ``n > hi`` training images, few-shot with ``n < lo``, medium-shot with
    ``lo <= n <= hi``. When the largest class has ``n_max >= 300`` images the standard thresholds apply,
    ``(hi, lo) = (100, 20)`` (ImageNet-LT, Places-LT). Smaller data scales them by ``s = n_max / 300``:
    ``lo = max(1, round(20 s))`` and ``hi = max(lo + 1, round(100 s))``, halves rounded up, so that the groups keep
    their proportions to the largest class (a fine-tuning subset of 30 images in its largest class gets
    ``(10, 2)``: many > 10, medium 2-10, few = one image), ``lo`` stays at least 1 and the many-shot threshold above
    the few-shot one.

    Args:
        counts: Training images per class (the run's training split, without its validation carve-out).

    Returns:
        ``(hi, lo)``.

    Raises:
        ValueError: ``counts`` is empty.

    Example:
        >>> group_thresholds([500, 120, 7]), group_thresholds([30, 12, 1]), group_thresholds([150, 2])
        ((100, 20), (10, 2), (50, 10))
    """
    if not counts:
        raise ValueError("group_thresholds needs the training images of at least one class")
    largest = max(counts)
    if largest >= _STANDARD_LARGEST:
        return STANDARD_THRESHOLDS
    scale = largest / _STANDARD_LARGEST
    lo = max(1, _round_half_up(STANDARD_THRESHOLDS[1] * scale))
    hi = max(lo + 1, _round_half_up(STANDARD_THRESHOLDS[0] * scale))
    return hi, lo


def shot_groups(counts: Sequence[int], thresholds: tuple[int, int]) -> dict[str, list[int]]:
    """The classes (indices) of each group: ``many`` (``n > hi``), ``medium`` (``lo <= n <= hi``), ``few``
    (``n < lo``), for ``thresholds = (hi, lo)``."""
    hi, lo = thresholds
    if not lo <= hi:
        raise ValueError(f"thresholds (hi, lo) need lo <= hi, got {thresholds}")
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for c, n in enumerate(counts):
        groups["many" if n > hi else "few" if n < lo else "medium"].append(c)
    return groups


def group_accuracy(class_acc: Sequence[float | None], counts: Sequence[int],
                   class_names: Sequence[str] | None = None,
                   thresholds: tuple[int, int] | None = None) -> dict[str, Any]:
    """Test accuracy of the many / medium / few-shot classes.

    A group's accuracy is the mean of the test accuracies of its classes (classes without test images left out);
    ``None`` when the group has no class, or none with test images.

    Args:
        class_acc: Per-class test accuracy, ``None`` for a class without test images.
        counts: Training images per class, in the same order.
        class_names: The classes' names (default: their indices as strings).
        thresholds: ``(hi, lo)``; default `group_thresholds` of ``counts``.

    Returns:
        ``{"many": acc, "medium": acc, "few": acc, "thresholds": [hi, lo], "classes": {group: [names]}}``.

    Raises:
        ValueError: the sequences differ in length.

    Example:
        >>> group_accuracy([0.9, 0.5, 0.25, None], [40, 10, 1, 1], thresholds=(10, 2))["few"]  # class 3: no test image
        0.25
    """
    if len(class_acc) != len(counts) or (class_names is not None and len(class_names) != len(counts)):
        raise ValueError(f"class_acc, counts and class_names must have one entry per class, got {len(class_acc)}, "
                         f"{len(counts)} and {len(class_names) if class_names is not None else '-'}")
    names = [str(c) for c in (class_names if class_names is not None else range(len(counts)))]
    hi, lo = thresholds if thresholds is not None else group_thresholds(counts)
    groups = shot_groups(counts, (hi, lo))
    result: dict[str, Any] = {}
    for group, members in groups.items():
        scored = [class_acc[c] for c in members if class_acc[c] is not None]
        result[group] = math.fsum(scored) / len(scored) if scored else None
    result["thresholds"] = [hi, lo]
    result["classes"] = {group: [names[c] for c in members] for group, members in groups.items()}
    return result


def imbalance_metrics(confusion: Sequence[Sequence[int]], train_counts: Sequence[int],
                      class_names: Sequence[str]) -> dict[str, Any]:
    """The imbalance keys of a tested run's ``metrics.json``, from its test confusion matrix.

    Args:
        confusion: ``confusion[i][j]``: test items of class ``i`` predicted as ``j``.
        train_counts: Training images per class.
        class_names: The classes in the head's output order.

    Returns:
        ``test_bal_acc`` (`balanced_accuracy`), ``test_macro_f1`` (`macro_f1`), ``test_class_acc_by_name``
        (``{name: accuracy or None}``) and ``test_groups`` (`group_accuracy`).
    """
    counts = [sum(row) for row in confusion]
    hits = [confusion[c][c] for c in range(len(confusion))]
    recall = class_recall(hits, counts)
    return {
        "test_bal_acc": balanced_accuracy(hits, counts),
        "test_macro_f1": macro_f1(confusion),
        "test_class_acc_by_name": {str(name): acc for name, acc in zip(class_names, recall, strict=True)},
        "test_groups": group_accuracy(recall, list(train_counts), class_names),
    }


def run_metric(metrics: Mapping[str, Any], name: str) -> float | None:
    """A metric of `RUN_METRICS` read from a run's ``metrics.json``: its key, or a group's accuracy
    (``test_few_acc`` is ``test_groups["few"]``); ``None`` where the run does not have it (older runs, a group
    without classes).

    Raises:
        ValueError: ``name`` is not one of `RUN_METRICS`.
    """
    if name not in RUN_METRICS:
        raise ValueError(f"unknown metric {name!r}; one of {', '.join(RUN_METRICS)}")
    group = name.removeprefix("test_").removesuffix("_acc")
    value = (metrics.get("test_groups") or {}).get(group) if group in GROUPS else metrics.get(name)
    return None if value is None else float(value)
