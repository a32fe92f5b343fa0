"""The validation loader holds the carve-out of the training split, with the evaluation transform; never test items.

Every image of the fixture is one grey level that names it: training item ``i`` is ``10 + i``, test item ``j`` is
``100 + j``. The test split is larger than the training split, so a validation index taken into the test split by
mistake would still be valid there (no IndexError to catch it), and the grey level tells the two apart.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from regtune.data.base import ImageDataset
from regtune.data.subset import stratified_split
from regtune.train.datamodule import FineTuneData

TRAIN_CODE, TEST_CODE = 10, 100
NUM_TRAIN, NUM_TEST = 12, 20
CLASSES = ["a", "b", "c"]


def _dataset(split: str, size: int, code: int) -> ImageDataset:
    return ImageDataset(
        name="toy", split=split, ids=[f"{split}/{i:02d}.png" for i in range(size)],
        targets=[i % 3 for i in range(size)], classes=CLASSES,
        load=lambda i: Image.new("L", (2, 2), color=code + i),
    )


def _grey(image: Image.Image) -> torch.Tensor:
    return torch.tensor(float(image.getpixel((0, 0))[0]))


def _augment(image: Image.Image) -> torch.Tensor:
    return _grey(image) + 0.5  # marks an image that went through the training transform


def _codes(loader: torch.utils.data.DataLoader) -> list[float]:
    return [float(v) for images, _ in loader for v in images]


@pytest.fixture
def data() -> FineTuneData:
    train_set, test_set = _dataset("train", NUM_TRAIN, TRAIN_CODE), _dataset("test", NUM_TEST, TEST_CODE)
    # 4 images per class, all kept; floor(0.25 x 4) = 1 per class to validation
    split = stratified_split(train_set.targets, 3, fraction=1.0, val_fraction=0.25, seed=0)
    assert len(split.val) == 3 and len(split.train) == 9  # 3 full training batches of 3: none dropped
    return FineTuneData(train_set, test_set, split, train_transform=_augment, eval_transform=_grey, batch_size=3,
                        eval_batch_size=2)


def test_validation_items_are_the_training_carve_out_with_the_eval_transform(data: FineTuneData) -> None:
    loader = data.val_dataloader()
    subset = loader.dataset
    assert subset.dataset is data.train_set and subset.transform is _grey
    assert subset.indices == data.split.val
    assert all(0 <= i < NUM_TRAIN for i in subset.indices) and not set(subset.indices) & set(data.split.train)
    codes = _codes(loader)
    # exactly the validation items of the training split, in order, not augmented (integer grey levels)
    assert codes == [float(TRAIN_CODE + i) for i in data.split.val]
    assert not [c for c in codes if c >= TEST_CODE]  # no test image
    assert [int(t) for _, targets in loader for t in targets] == [i % 3 for i in data.split.val]


def test_test_and_training_loaders_read_their_own_splits(data: FineTuneData) -> None:
    assert _codes(data.test_dataloader()) == [float(TEST_CODE + j) for j in range(NUM_TEST)]
    train = data.train_dataloader()
    assert train.dataset.dataset is data.train_set
    assert sorted(_codes(train)) == [TRAIN_CODE + i + 0.5 for i in data.split.train]  # augmented, training items
    assert _codes(data.setup_dataloader()) == [float(TRAIN_CODE + i) for i in data.split.train]


def test_validate_on_test_is_the_only_way_to_validate_on_test_items(data: FineTuneData) -> None:
    data.validate_on_test = True
    assert _codes(data.val_dataloader()) == [float(TEST_CODE + j) for j in range(NUM_TEST)]
