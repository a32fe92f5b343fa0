"""Stratified low-data subsets, the validation carve-out and split manifests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from regtune.data.subset import EmptyClassError, split_from_manifest, stratified_split, write_manifest

TARGETS = [0] * 100 + [1] * 50 + [2] * 7


def _counts(indices: list[int]) -> dict[int, int]:
    return dict(Counter(TARGETS[i] for i in indices))


def test_fraction_is_per_class_and_half_up() -> None:
    split = stratified_split(TARGETS, 3, fraction=0.1, val_fraction=0.2, seed=0)
    # kept: round(10) = 10, round(5) = 5, round(0.7) = 1; val: floor(0.2 k) = 2, 1, 0
    assert _counts(split.train) == {0: 8, 1: 4, 2: 1}
    assert _counts(split.val) == {0: 2, 1: 1}
    assert not set(split.train) & set(split.val)


def test_per_class_caps_at_class_size() -> None:
    split = stratified_split(TARGETS, 3, per_class=10, val_fraction=0.0, seed=0)
    assert _counts(split.train) == {0: 10, 1: 10, 2: 7}


def test_every_class_keeps_a_training_image() -> None:
    split = stratified_split([0, 1, 1], 2, fraction=1.0, val_fraction=0.9, seed=3)
    assert _counts_of(split.train, [0, 1, 1]) == {0: 1, 1: 1}


def _counts_of(indices: list[int], targets: list[int]) -> dict[int, int]:
    return dict(Counter(targets[i] for i in indices))


def test_same_seed_same_split_other_seed_other_split() -> None:
    a = stratified_split(TARGETS, 3, fraction=0.2, seed=1)
    b = stratified_split(TARGETS, 3, fraction=0.2, seed=1)
    c = stratified_split(TARGETS, 3, fraction=0.2, seed=2)
    assert a.train == b.train and a.val == b.val
    assert a.train != c.train


def test_fraction_leaving_a_class_empty_is_an_error() -> None:
    with pytest.raises(EmptyClassError, match=r"keeps no image of class 2 \('c'.*fraction >= 0.07143"):
        stratified_split(TARGETS, 3, fraction=0.05, class_names=["a", "b", "c"])


def test_class_without_images_is_an_error() -> None:
    with pytest.raises(EmptyClassError, match="class 3"):
        stratified_split(TARGETS, 4, fraction=0.5)


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": 1.5}, {"per_class": 0},
                                    {"fraction": 0.1, "per_class": 3}, {"val_fraction": 1.0}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        stratified_split(TARGETS, 3, **kwargs)


def test_manifest_round_trip(tmp_path: Path) -> None:
    ids = [f"img_{i}.jpg" for i in range(len(TARGETS))]
    split = stratified_split(TARGETS, 3, fraction=0.3, seed=5)
    write_manifest(tmp_path / "split.json", split, ids, "toy")
    again = split_from_manifest(tmp_path / "split.json", ids, "toy")
    assert again.train == split.train and again.val == split.val
    # Ids, not positions: the same images are found when the dataset lists them in another order.
    reordered = list(reversed(ids))
    moved = split_from_manifest(tmp_path / "split.json", reordered, "toy")
    assert sorted(reordered[i] for i in moved.train) == sorted(ids[i] for i in split.train)


def test_manifest_of_another_dataset_or_version(tmp_path: Path) -> None:
    ids = [f"img_{i}.jpg" for i in range(len(TARGETS))]
    write_manifest(tmp_path / "split.json", stratified_split(TARGETS, 3, fraction=0.3), ids, "toy")
    with pytest.raises(ValueError, match="not of 'other'"):
        split_from_manifest(tmp_path / "split.json", ids, "other")
    with pytest.raises(ValueError, match="not in the 'toy' training split"):
        split_from_manifest(tmp_path / "split.json", ids[:50], "toy")
