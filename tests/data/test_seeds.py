"""The seeds a run derives from its seed: pinned numbers, so that no change of code changes a run's draws."""

from __future__ import annotations

import pytest

from regtune.data.seeds import epoch_seed, order_seed, sample_seed


@pytest.mark.parametrize("seed, epoch, expected", [
    (0, 0, 17),  # 0 + 0 + 17
    (1, 2, 1_015_858),  # 1_000_003 + 2 * 7_919 + 17
    (5_000, 3, 705_071_478),  # 5_000_015_000 + 23_757 + 17 = 5_000_038_774; minus 2**32 = 4_294_967_296
    (4_294, 1_000_000, 3_623_078_307),  # 4_294_012_882 + 7_919_000_000 + 17 = 12_213_012_899; minus 2 * 2**32
])
def test_epoch_seed_by_hand(seed: int, epoch: int, expected: int) -> None:
    assert epoch_seed(seed, epoch) == expected


def test_order_seed_is_the_epoch_seed_plus_one_without_wrapping() -> None:
    assert order_seed(0, 0) == 18 and order_seed(1, 2) == 1_015_859
    # 2_263_032_954 * 1_000_003 + 17 = 2_263_039_743_098_879 = 526_904 * 2**32 + (2**32 - 1): the largest epoch seed,
    # whose order seed is 2**32 itself (not 0), as it always was
    assert epoch_seed(2_263_032_954, 0) == 2**32 - 1
    assert order_seed(2_263_032_954, 0) == 2**32


@pytest.mark.parametrize("seed, epoch, index, expected", [
    # The first uint32 word of numpy.random.SeedSequence([seed, epoch, index]).generate_state(1), as regtune has
    # drawn augmentations since per-sample seeding began (the values of regtune/data/transforms.py:sample_seed
    # before the seeds moved to regtune/data/seeds.py).
    (0, 0, 0, 2_968_811_710),
    (0, 1, 0, 3_964_924_996),
    (0, 0, 1, 3_831_201_730),
    (7, 3, 12, 1_779_874_799),
])
def test_sample_seed_pinned(seed: int, epoch: int, index: int, expected: int) -> None:
    assert sample_seed(seed, epoch, index) == expected


def test_seeds_module_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, regtune.data.seeds; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
