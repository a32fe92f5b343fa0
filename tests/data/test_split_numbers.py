"""Exact per-class counts of a subset at fractions that land on .5, and manifests listed out of dataset order."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from regtune.data.subset import split_from_manifest, stratified_split


def _targets(sizes: list[int]) -> list[int]:
    return [c for c, n in enumerate(sizes) for _ in range(n)]


def _counts(indices: list[int], targets: list[int]) -> list[int]:
    counts = Counter(targets[i] for i in indices)
    return [counts[c] for c in range(max(targets) + 1)]


@pytest.mark.parametrize(("fraction", "sizes", "kept"), [
    # 0.5 x (5, 9, 3, 2) = (2.5, 4.5, 1.5, 1.0) -> half up (3, 5, 2, 1); banker's rounding would give (2, 4, 2, 1)
    (0.5, [5, 9, 3, 2], [3, 5, 2, 1]),
    # 0.1 x (25, 15, 10) = (2.5, 1.5, 1.0) -> (3, 2, 1); banker's: (2, 2, 1)
    (0.1, [25, 15, 10], [3, 2, 1]),
    # 0.3 x (15, 5) = (4.5, 1.5) -> (5, 2); banker's: (4, 2)
    (0.3, [15, 5], [5, 2]),
])
def test_fraction_rounds_exact_halves_up(fraction: float, sizes: list[int], kept: list[int]) -> None:
    assert all((fraction * n) % 1 in (0.0, 0.5) for n in sizes)  # the products are exact in float64
    targets = _targets(sizes)
    split = stratified_split(targets, len(sizes), fraction=fraction, val_fraction=0.0, seed=0)
    assert _counts(split.train, targets) == kept
    assert split.val == []


def test_half_an_image_rounds_up_to_one() -> None:
    # 0.5 x 1 = 0.5 -> 1 (banker's rounding gives 0, and the class would be refused as empty)
    targets = _targets([1, 4])
    split = stratified_split(targets, 2, fraction=0.5, val_fraction=0.0, seed=0)
    assert _counts(split.train, targets) == [1, 2]


def test_validation_carve_out_floors_after_rounding() -> None:
    targets = _targets([5, 9])
    split = stratified_split(targets, 2, fraction=0.5, val_fraction=0.5, seed=0)
    # kept k = (3, 5); val = floor(0.5 k) = (1, 2); train = k - val = (2, 3)
    assert _counts(split.val, targets) == [1, 2]
    assert _counts(split.train, targets) == [2, 3]


def test_manifest_listed_out_of_order_reloads_sorted(tmp_path: Path) -> None:
    ids = [f"img_{i:02d}.jpg" for i in range(12)]
    payload = {  # the form write_manifest writes, with both lists in no particular order
        "version": 1,
        "dataset": "toy",
        "settings": {"fraction": 0.5},
        "train": ["img_09.jpg", "img_02.jpg", "img_11.jpg", "img_00.jpg", "img_05.jpg"],
        "val": ["img_07.jpg", "img_03.jpg", "img_10.jpg"],
    }
    (tmp_path / "split.json").write_text(json.dumps(payload))
    split = split_from_manifest(tmp_path / "split.json", ids, "toy")
    assert split.train == [0, 2, 5, 9, 11]
    assert split.val == [3, 7, 10]
    # Positions follow the dataset's order, not the manifest's: listed in reverse, img_00 is at position 11.
    again = split_from_manifest(tmp_path / "split.json", list(reversed(ids)), "toy")
    assert again.train == [0, 2, 6, 9, 11] and again.val == [1, 4, 8]
