"""Long-tailed (class-imbalanced) subsets: the exponential and step profiles, the validation rule, the errors, the
manifest, the config fields and flags, and the grid's manifests."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from regtune.data.subset import (
    EmptyClassError,
    longtail_counts,
    longtail_split,
    split_from_manifest,
    stratified_split,
    write_manifest,
)
from regtune.train.config import ConfigError, DataConfig, FitConfig, apply_overrides


def _targets(sizes: list[int]) -> list[int]:
    return [c for c, n in enumerate(sizes) for _ in range(n)]


def _counts(indices: list[int], targets: list[int]) -> list[int]:
    counts = Counter(targets[i] for i in indices)
    return [counts[c] for c in range(max(targets) + 1)]


# -- the profiles ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_max", "classes", "ratio", "expected"), [
    # 16 / 16^(i/4) = 16 / (1, 2, 4, 8, 16)
    (16, 5, 16.0, [16, 8, 4, 2, 1]),
    # 16 / 8^(i/4): 8^0.25 = 1.682 -> 9.51, 8^0.5 = 2.828 -> 5.66, 8^0.75 = 4.757 -> 3.36, 8 -> 2
    (16, 5, 8.0, [16, 9, 5, 3, 2]),
    # 100 / 10^(i/2): sqrt(10) = 3.162 -> 31.6
    (100, 3, 10.0, [100, 31, 10]),
    # long-tailed CIFAR-10 at rho 100, as published (12,406 images)
    (5000, 10, 100.0, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]),
    # 16 / 32^(4/5) = 1 exactly, although 32 ** 0.8 is 15.999... in floats
    (16, 6, 32.0, [16, 8, 4, 2, 1, 0]),
    (7, 4, 1.0, [7, 7, 7, 7]),
])
def test_exponential_profile_by_hand(n_max: int, classes: int, ratio: float, expected: list[int]) -> None:
    assert longtail_counts(n_max, classes, ratio) == expected


def test_exponential_profile_against_numpy() -> None:
    # float64 NumPy, away from integers (no value within 1e-6 of one): the same floors
    n_max, classes = 300, 10
    for ratio in (10.0, 50.0, 100.0, 200.0):
        exact = n_max * ratio ** (-np.arange(classes) / (classes - 1))
        assert np.all(np.abs(exact[1:-1] - np.round(exact[1:-1])) > 1e-6)
        assert longtail_counts(n_max, classes, ratio) == np.floor(exact).astype(int).tolist()
    assert sum(longtail_counts(500, 100, 100.0)) == 10847  # long-tailed CIFAR-100 at rho 100, as published


@pytest.mark.parametrize(("classes", "minority", "expected"), [
    (4, 0.5, [30, 30, 3, 3]),
    (5, 0.4, [30, 30, 30, 3, 3]),  # mu = 0.4 x 5 = 2
    (3, 0.5, [30, 3, 3]),  # mu = round(1.5) = 2, half up
    (10, 0.9, [30] + [3] * 9),
])
def test_step_profile_by_hand(classes: int, minority: float, expected: list[int]) -> None:
    assert longtail_counts(30, classes, 10.0, profile="step", minority=minority) == expected


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratio": 0.5}, "must be a finite number >= 1"),
    ({"ratio": float("inf")}, "must be a finite number >= 1"),
    ({"profile": "linear"}, "one of exp, step"),
    ({"minority": 1.0}, r"must be in \(0, 1\)"),
    ({"profile": "step", "minority": 0.04}, "makes 0 minority class"),
    ({"profile": "step", "minority": 0.96}, "makes 10 minority class"),
    ({"classes": 1}, "at least 2 classes"),
])
def test_bad_profile_arguments(kwargs: dict[str, Any], message: str) -> None:
    args = {"n_max": 30, "classes": 10, "ratio": 10.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        longtail_counts(args.pop("n_max"), args.pop("classes"), **args)


# -- the split ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_counts_follow_the_profile_exactly(seed: int) -> None:
    targets = _targets([40] * 5)
    split = longtail_split(targets, 5, ratio=8.0, per_class=16, val_fraction=0.25, seed=seed)
    # kept (16, 9, 5, 3, 2) as above; val = max(1, floor(0.25 k)) = (4, 2, 1, 1, 1)
    assert _counts(split.val, targets) == [4, 2, 1, 1, 1]
    assert _counts(split.train, targets) == [12, 7, 4, 2, 1]
    assert split.settings["train_counts"] == [12, 7, 4, 2, 1] and split.settings["val_counts"] == [4, 2, 1, 1, 1]
    assert not set(split.train) & set(split.val)


def test_step_split_and_fraction_sets_n_max_from_the_largest_class() -> None:
    targets = _targets([100, 80, 60, 70])
    # n_max = round(0.1 x 100) = 10; step, mu = 2: (10, 10, 1, 1)
    split = longtail_split(targets, 4, ratio=10.0, profile="step", fraction=0.1, val_fraction=0.0)
    assert _counts(split.train, targets) == [10, 10, 1, 1] and split.val == []
    assert split.settings["n_max"] == 10


def test_without_an_amount_the_head_keeps_the_largest_class() -> None:
    targets = _targets([12, 20, 9])
    split = longtail_split(targets, 3, ratio=4.0, val_fraction=0.0)
    # n_max = 20: (20, 10, 5), capped by the classes' sizes: (12, 10, 5)
    assert _counts(split.train, targets) == [12, 10, 5]


def test_a_class_smaller_than_its_profile_count_keeps_all_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    targets = _targets([30, 4, 30])
    with caplog.at_level(logging.WARNING, logger="regtune.data.subset"):
        split = longtail_split(targets, 3, ratio=4.0, per_class=20, val_fraction=0.0, class_names=["a", "b", "c"])
    assert _counts(split.train, targets) == [20, 4, 5]  # (20, 10, 5), class b has 4
    assert "'b' (4 < 10)" in caplog.text


def test_same_seed_same_split_other_seed_other_images() -> None:
    targets = _targets([40] * 5)
    a = longtail_split(targets, 5, ratio=8.0, per_class=16, seed=3)
    b = longtail_split(targets, 5, ratio=8.0, per_class=16, seed=3)
    c = longtail_split(targets, 5, ratio=8.0, per_class=16, seed=4)
    assert a == b
    assert a.train != c.train and a.settings["train_counts"] == c.settings["train_counts"]


def test_random_order_puts_the_profile_on_seeded_classes() -> None:
    targets = _targets([40] * 5)
    orders = []
    for seed in range(5):
        split = longtail_split(targets, 5, ratio=8.0, per_class=16, val_fraction=0.0, order="random", seed=seed)
        order = split.settings["class_order"]
        assert sorted(order) == [0, 1, 2, 3, 4]
        counts = _counts(split.train, targets)
        assert [counts[c] for c in order] == [16, 9, 5, 3, 2]  # head to tail along the drawn order
        again = longtail_split(targets, 5, ratio=8.0, per_class=16, val_fraction=0.0, order="random", seed=seed)
        assert again.settings["class_order"] == order
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # the seed decides which classes are the tail


def test_validation_follows_the_training_distribution() -> None:
    targets = _targets([200] * 6)
    split = longtail_split(targets, 6, ratio=50.0, per_class=150, val_fraction=0.2, seed=0)
    kept = longtail_counts(150, 6, 50.0)  # (150, 68, 31, 14, 6, 3)
    val = _counts(split.val, targets)
    assert val == [max(1, int(0.2 * k)) for k in kept] == [30, 13, 6, 2, 1, 1]
    assert all(v >= 1 for v in val)  # every class is validated
    train = _counts(split.train, targets)
    assert [t + v for t, v in zip(train, val)] == kept
    assert np.corrcoef(train, val)[0, 1] > 0.99  # the validation split has the training split's shape


def test_a_class_that_cannot_have_a_training_and_a_validation_image_is_named() -> None:
    targets = _targets([20] * 3)
    # per_class 4 at rho 4: (4, 2, 1); class 2 would keep 1 image. Ratio <= 4 / 2 = 2 keeps 2; n_max >= 2 x 4 = 8.
    with pytest.raises(EmptyClassError, match=r"class\(es\) 2 \('c', rank 2\).*ratio <= 2, or per_class >= 8"):
        longtail_split(targets, 3, ratio=4.0, per_class=4, val_fraction=0.1, class_names=["a", "b", "c"])
    # the advice works, and without validation 1 image is enough
    assert _counts(longtail_split(targets, 3, ratio=2.0, per_class=4).train, targets) == [3, 1, 1]
    assert _counts(longtail_split(targets, 3, ratio=4.0, per_class=8).val, targets) == [1, 1, 1]
    assert _counts(longtail_split(targets, 3, ratio=4.0, per_class=4, val_fraction=0.0).train, targets) == [4, 2, 1]


def test_the_advice_for_a_fraction_is_a_fraction() -> None:
    targets = _targets([40] * 3)
    # n_max = 4 -> (4, 2, 1); n_max 8 needs round(f x 40) >= 8: f >= 7.5 / 40 = 0.1875
    with pytest.raises(EmptyClassError, match=r"ratio <= 2, or fraction >= 0.1875 \(n_max >= 8\)"):
        longtail_split(targets, 3, ratio=4.0, fraction=0.1)
    assert _counts(longtail_split(targets, 3, ratio=4.0, fraction=0.1875).val, targets) == [1, 1, 1]


def test_a_class_with_a_single_image_cannot_be_validated() -> None:
    targets = _targets([10, 10, 1])
    with pytest.raises(EmptyClassError, match=r"2 \('c', 1 image\).*val_fraction 0"):
        longtail_split(targets, 3, ratio=2.0, per_class=4, class_names=["a", "b", "c"])


def test_a_class_without_images_is_named() -> None:
    with pytest.raises(EmptyClassError, match="class 3"):
        longtail_split(_targets([10, 10, 10]), 4, ratio=2.0)


def test_the_counts_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    targets = _targets([40] * 5)
    with caplog.at_level(logging.INFO, logger="regtune.data.subset"):
        longtail_split(targets, 5, ratio=8.0, per_class=16, val_fraction=0.25, class_names=list("abcde"))
    assert "training images per class from 1 ('e') to 12 ('a'), ratio 12" in caplog.text
    assert "test split is the dataset's own" in caplog.text


# -- balanced splits are unchanged ----------------------------------------------------------------------------------

def test_balanced_splits_are_the_ones_drawn_before_long_tails_existed() -> None:
    targets = [0] * 6 + [1] * 6 + [2] * 5
    # indices drawn by stratified_split before this change (same calls)
    a = stratified_split(targets, 3, fraction=0.5, val_fraction=0.34, seed=0)
    assert (a.train, a.val) == ([2, 5, 7, 11, 14, 15], [3, 10, 12])
    b = stratified_split(targets, 3, per_class=4, val_fraction=0.25, seed=7)
    assert (b.train, b.val) == ([0, 2, 4, 6, 7, 10, 13, 14, 15], [5, 11, 16])
    assert b.settings == {"fraction": None, "per_class": 4, "val_fraction": 0.25, "seed": 7}


class _Images:
    """What `make_split` reads of a dataset."""

    def __init__(self, sizes: list[int]) -> None:
        self.targets = _targets(sizes)
        self.num_classes = len(sizes)
        self.classes = [f"class_{c}" for c in range(len(sizes))]
        self.ids = [f"{c}/{i}.png" for i, c in enumerate(self.targets)]
        self.name = "toy"


def test_make_split_draws_balanced_without_a_ratio_and_long_tailed_with_one() -> None:
    from regtune.train.rundir import make_split

    images = _Images([6, 6, 5])
    config = FitConfig(data=DataConfig(dataset="toy", fraction=0.5, val_fraction=0.34))
    assert make_split(config, images) == stratified_split(images.targets, 3, fraction=0.5, val_fraction=0.34)
    images = _Images([40] * 5)
    config = apply_overrides(config, {"data.fraction": None, "data.per_class": 16, "data.val_fraction": 0.25,
                                      "data.imbalance_ratio": 8.0, "trainer.seed": 2})
    split = make_split(config, images)
    assert _counts(split.train, images.targets) == [12, 7, 4, 2, 1]
    assert split == longtail_split(images.targets, 5, 8.0, per_class=16, val_fraction=0.25, seed=2)
    step = make_split(apply_overrides(config, {"data.imbalance_profile": "step", "data.imbalance_minority": 0.4}),
                      images)
    assert _counts(step.train + step.val, images.targets) == [16, 16, 16, 2, 2]


# -- the manifest ---------------------------------------------------------------------------------------------------

def test_manifest_round_trip_keeps_the_split_and_its_settings(tmp_path: Path) -> None:
    targets = _targets([40] * 5)
    ids = [f"img_{i}.jpg" for i in range(len(targets))]
    split = longtail_split(targets, 5, ratio=8.0, profile="exp", order="random", per_class=16, val_fraction=0.25,
                           seed=1)
    write_manifest(tmp_path / "split.json", split, ids, "toy")
    stored = json.loads((tmp_path / "split.json").read_text())["settings"]
    assert stored["imbalance_ratio"] == 8.0 and stored["imbalance_profile"] == "exp"
    assert stored["imbalance_order"] == "random" and stored["imbalance_minority"] == 0.5
    again = split_from_manifest(tmp_path / "split.json", ids, "toy")
    assert again.train == split.train and again.val == split.val
    assert {k: v for k, v in again.settings.items() if k != "manifest"} == split.settings
    assert _counts(again.train, targets) == [again.settings["train_counts"][c] for c in range(5)]


# -- the config, the command line and grids -------------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "message"), [
    ({"imbalance_ratio": 0.9}, "data.imbalance_ratio"),
    ({"imbalance_ratio": float("nan")}, "data.imbalance_ratio"),
    ({"imbalance_profile": "linear"}, "data.imbalance_profile"),
    ({"imbalance_minority": 0.0}, "data.imbalance_minority"),
    ({"imbalance_order": "sorted"}, "data.imbalance_order"),
])
def test_config_refuses_bad_imbalance_settings(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FitConfig(data=DataConfig(**changes))


def test_config_defaults_are_balanced() -> None:
    d = DataConfig()
    assert (d.imbalance_ratio, d.imbalance_profile, d.imbalance_minority, d.imbalance_order) == \
        (None, "exp", 0.5, "index")


def test_cli_flags_set_the_config() -> None:
    from regtune.cli import _fit_config, build_parser

    config = _fit_config(build_parser().parse_args(["fit", "--imbalance-ratio", "100", "--imbalance-profile", "step"]))
    assert config.data.imbalance_ratio == 100.0 and config.data.imbalance_profile == "step"
    assert _fit_config(build_parser().parse_args(["fit"])).data.imbalance_ratio is None
    with pytest.raises(ConfigError, match="data.imbalance_profile"):
        _fit_config(build_parser().parse_args(["fit", "--imbalance-ratio", "10", "--imbalance-profile", "linear"]))


def test_a_grid_with_two_ratios_writes_two_manifests(tmp_path: Path) -> None:
    from regtune.bench.grid import expand, grid_from_dict, run_grid
    from tests.conftest import TINY_BACKBONE, write_imagefolder

    root = write_imagefolder(tmp_path / "data", classes=3, train_per_class=10, test_per_class=1, size=8)
    spec = {"name": "lt", "out": str(tmp_path / "out"),
            "base": {"data": {"dataset": "imagefolder", "root": str(root), "val_fraction": 0.2},
                     "model": {"backbone": TINY_BACKBONE, "pretrained": "none"}},
            "fractions": [1.0], "axes": {"data.imbalance_ratio": [2.0, 4.0]}, "methods": {"ft": {}, "ls": {}}}
    grid = grid_from_dict(spec)
    runs = list(expand(grid))
    assert sorted({r.split_path.name for r in runs}) == ["imagefolder-f1.0-vf0.2-exp2-s0.json",
                                                         "imagefolder-f1.0-vf0.2-exp4-s0.json"]
    used: list[str] = []
    run_grid(grid, fit_fn=lambda config=None, **_: used.append(config.data.split_manifest))
    assert len(used) == 4 and len(set(used)) == 2
    for name, ratio, kept in (("exp2", 2.0, [10, 7, 5]), ("exp4", 4.0, [10, 5, 2])):
        settings = json.loads((tmp_path / "out" / "splits" / f"imagefolder-f1.0-vf0.2-{name}-s0.json").read_text())
        assert settings["settings"]["imbalance_ratio"] == ratio
        got = [t + v for t, v in zip(settings["settings"]["train_counts"], settings["settings"]["val_counts"])]
        assert got == kept  # 10 / 2^(i/2) = (10, 7.07, 5); 10 / 4^(i/2) = (10, 5, 2.5)


def test_balanced_grid_manifests_keep_their_names(tmp_path: Path) -> None:
    from regtune.bench.grid import expand, grid_from_dict
    from tests.conftest import TINY_BACKBONE

    spec = {"name": "b", "out": str(tmp_path / "out"),
            "base": {"data": {"dataset": "imagefolder", "root": str(tmp_path), "val_fraction": 0.2},
                     "model": {"backbone": TINY_BACKBONE, "pretrained": "none"}},
            "fractions": [0.5], "seeds": [3], "methods": {"ft": {}}}
    names = {r.split_path.name for r in expand(grid_from_dict(spec))}
    assert names == {"imagefolder-f0.5-vf0.2-s3.json"}  # as grids wrote them before long tails existed
    spec["base"]["data"].update(imbalance_ratio=10, imbalance_profile="step", imbalance_order="random")
    names = {r.split_path.name for r in expand(grid_from_dict(spec))}
    assert names == {"imagefolder-f0.5-vf0.2-step10m0.5-random-s3.json"}
