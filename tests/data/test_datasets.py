"""Dataset readers against tiny fixtures in each dataset's native layout (see ``tests/data/fixtures.py``)."""

from __future__ import annotations

import gzip
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from regtune.data import datasets
from regtune.data.base import CorruptImageError, DatasetNotFoundError, ImageDataset
from regtune.data.datasets import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_GZ_ENV,
    DatasetLayoutError,
    UnknownDatasetError,
    build_dataset,
    dataset_source_hint,
    list_datasets,
)
from tests.data.fixtures import (
    CUB_IMAGES,
    FASHION_SPLITS,
    MAKERS,
    cub_relative_path,
    make_cub200,
    make_dtd,
    make_fashion_mnist_gz,
    make_flowers102,
    make_imagefolder,
    make_pets,
)

ALL_NAMES = ["aircraft", "cars", "cub200", "dtd", "fashion_mnist", "flowers102", "imagefolder", "pets"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No reader may reach the network, nor read the machine's Debian Fashion-MNIST unless a test asks for it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network access attempted in a dataset test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv(FASHION_MNIST_GZ_ENV, str(tmp_path / "no-fashion-mnist-gz-here"))


def _check_against_spec(dataset: ImageDataset, items: list, classes: list[str] | None, name: str, split: str) -> None:
    assert (dataset.name, dataset.split) == (name, split)
    assert list(dataset.ids) == [item.id for item in items]
    assert list(dataset.targets) == [item.target for item in items]
    if classes is not None:
        assert list(dataset.classes) == classes
    for item_id in dataset.ids:
        assert not os.path.isabs(item_id) and "\\" not in item_id
        assert (Path(dataset.root) / item_id).is_file()
    for index in (0, len(dataset) - 1):
        image, target = dataset[index]
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB" and len(image.getbands()) == 3
        assert image.size == items[index].size  # sizes are unique per file: the right file was opened
        assert target == items[index].target and type(target) is int


# ---------------------------------------------------------------------------------------------------------------------
# Registry and arguments


def test_list_datasets_names_every_reader() -> None:
    assert list_datasets() == ALL_NAMES


@pytest.mark.parametrize("name", ALL_NAMES)
def test_source_hint_is_a_sentence(name: str) -> None:
    hint = dataset_source_hint(name)
    assert len(hint) > 40 and ("<root>" in hint or "apt-get" in hint)


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownDatasetError) as info:
        build_dataset("cub", tmp_path, "train")
    assert isinstance(info.value, ValueError)
    assert "'cub'" in str(info.value)
    for name in ALL_NAMES:
        assert name in str(info.value)
    with pytest.raises(UnknownDatasetError):
        dataset_source_hint("cub")


@pytest.mark.parametrize("split", ["val", "trainval", "Train", ""])
def test_bad_split_is_a_value_error_listing_valid_ones(tmp_path: Path, split: str) -> None:
    with pytest.raises(ValueError, match=r"'train', 'test'") as info:
        build_dataset("imagefolder", tmp_path, split)
    assert repr(split) in str(info.value)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        datasets._register("cub200", source="x", downloadable=False)(lambda root, split, download: None)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_missing_folder_is_dataset_not_found(tmp_path: Path, name: str) -> None:
    root = tmp_path / "nothing-here"
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(name, root, "train")
    message = str(info.value)
    assert str(root) in message
    assert dataset_source_hint(name) in message
    assert isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------------------
# Every file dataset: lengths, targets, classes, ids, RGB images


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_reader_matches_fixture(tmp_path: Path, name: str, split: str) -> None:
    spec = MAKERS[name](tmp_path)
    dataset = build_dataset(name, tmp_path, split)
    classes = spec.classes or None  # flowers102: torchvision's 102 names, checked below
    _check_against_spec(dataset, spec.splits[split], classes, name, split)
    assert len(dataset) == len(spec.splits[split])
    if name != "cub200":
        assert dataset.root == tmp_path
        assert dataset.boxes is None


def test_grayscale_source_becomes_rgb(tmp_path: Path) -> None:
    spec = make_imagefolder(tmp_path)
    dataset = build_dataset("imagefolder", tmp_path, "train")
    with Image.open(tmp_path / spec.splits["train"][0].id) as source:
        assert source.mode == "L"
    image, _ = dataset[0]
    assert image.mode == "RGB"
    red, green, blue = (np.asarray(band) for band in image.split())
    assert np.array_equal(red, green) and np.array_equal(green, blue)


def test_dataset_is_picklable_for_dataloader_workers(tmp_path: Path) -> None:
    import pickle

    make_imagefolder(tmp_path)
    dataset = build_dataset("imagefolder", tmp_path, "test")
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy[1][0].size == dataset[1][0].size and copy.ids == dataset.ids


# ---------------------------------------------------------------------------------------------------------------------
# imagefolder


def test_imagefolder_corrupt_image_names_the_file(tmp_path: Path) -> None:
    spec = make_imagefolder(tmp_path)
    broken = spec.splits["train"][4]  # dog/img_1.jpg
    (tmp_path / broken.id).write_bytes(b"this is not a jpeg \x00\x01\x02" * 10)
    dataset = build_dataset("imagefolder", tmp_path, "train")  # building opens no image
    assert dataset.ids[4] == "train/dog/img_1.jpg"
    with pytest.raises(CorruptImageError, match="train/dog/img_1.jpg"):
        dataset[4]
    assert dataset[3][0].mode == "RGB"  # its neighbours still load


def test_imagefolder_class_lists_must_agree(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    (tmp_path / "test" / "fox").rename(tmp_path / "test" / "wolf")
    for split in ("train", "test"):
        with pytest.raises(DatasetLayoutError, match=r"only in .*\['fox'\].*only in .*\['wolf'\]|"
                                                     r"only in .*\['wolf'\].*only in .*\['fox'\]"):
            build_dataset("imagefolder", tmp_path, split)


def test_imagefolder_empty_class_folder_is_named(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "test" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetLayoutError, match="emu"):
        build_dataset("imagefolder", tmp_path, "train")


def test_imagefolder_split_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no class folders"):
        build_dataset("imagefolder", tmp_path, "train")


# ---------------------------------------------------------------------------------------------------------------------
# cub200


def test_cub_split_follows_train_test_split_file(tmp_path: Path) -> None:
    make_cub200(tmp_path)
    test = build_dataset("cub200", tmp_path, "test")
    # train_test_split.txt marks images 2, 4, 5 and 9 with 0.
    assert list(test.ids) == [cub_relative_path(i) for i in (2, 4, 5, 9)]
    assert list(test.targets) == [0, 0, 1, 2]
    train = build_dataset("cub200", tmp_path, "train")
    assert len(train) == 6 and not set(train.ids) & set(test.ids)
    assert train.ids[0] == "001.Black_footed_Albatross/Black_footed_Albatross_0001_700001.jpg"


def test_cub_boxes_are_inclusive_corners(tmp_path: Path) -> None:
    make_cub200(tmp_path)
    train = build_dataset("cub200", tmp_path, "train")
    assert train.boxes is not None and len(train.boxes) == len(train)
    # Image 1: "1 3.0 4.0 10.0 6.0" -> x1 = 3 + 10 - 1 = 12, y1 = 4 + 6 - 1 = 9.
    assert train.boxes[0] == [(3.0, 4.0, 12.0, 9.0)]
    # Image 3: "3 1.5 2.0 4.0 3.0" -> (1.5, 2.0, 1.5 + 4 - 1, 2 + 3 - 1) = (1.5, 2.0, 4.5, 4.0).
    assert train.boxes[1] == [(1.5, 2.0, 4.5, 4.0)]
    # Image 10: a 1 x 1 box at the origin is the single pixel (0, 0).
    assert train.boxes[-1] == [(0.0, 0.0, 0.0, 0.0)]
    test = build_dataset("cub200", tmp_path, "test")
    assert test.boxes[0] == [(0.0, 0.0, 7.0, 5.0)]  # image 2: "0 0 8 6"


def test_cub_root_may_be_the_cub_folder_itself(tmp_path: Path) -> None:
    spec = make_cub200(tmp_path)
    dataset = build_dataset("cub200", tmp_path / "CUB_200_2011", "test")
    assert list(dataset.ids) == [item.id for item in spec.splits["test"]]
    assert dataset.root == tmp_path / "CUB_200_2011" / "images"


@pytest.mark.parametrize("missing", ["bounding_boxes.txt", "train_test_split.txt", "classes.txt"])
def test_cub_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    make_cub200(tmp_path)
    (tmp_path / "CUB_200_2011" / missing).unlink()
    with pytest.raises(DatasetNotFoundError, match=missing) as info:
        build_dataset("cub200", tmp_path, "train")
    assert "https://www.vision.caltech.edu/datasets/cub_200_2011/" in str(info.value)
    assert "CUB_200_2011/images.txt" in str(info.value)


def test_cub_image_without_label_line_is_a_layout_error(tmp_path: Path) -> None:
    make_cub200(tmp_path)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines() if not line.startswith("7 ")))
    with pytest.raises(DatasetLayoutError, match=r"image_class_labels.txt.*\[7\]"):
        build_dataset("cub200", tmp_path, "test")


def test_cub_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    make_cub200(tmp_path)
    split_file = tmp_path / "CUB_200_2011" / "train_test_split.txt"
    split_file.write_text(split_file.read_text() + "11\n")
    with pytest.raises(DatasetLayoutError, match=r"train_test_split.txt:11:"):
        build_dataset("cub200", tmp_path, "train")


def test_cub_fixture_covers_both_splits_of_every_class() -> None:
    classes_in = {flag: {c for c, f, _ in CUB_IMAGES.values() if f == flag} for flag in (0, 1)}
    assert classes_in[0] == classes_in[1] == {1, 2, 3}


# ---------------------------------------------------------------------------------------------------------------------
# torchvision-backed readers


def test_flowers_uses_torchvision_classes_and_ignores_md5(tmp_path: Path) -> None:
    spec = make_flowers102(tmp_path)
    train = build_dataset("flowers102", tmp_path, "train")
    assert len(train.classes) == 102 and train.classes[:3] == ["pink primrose", "hard-leaved pocket orchid",
                                                              "canterbury bells"]
    # train = torchvision "train" (trnid) then "val" (valid): 2 + 2 + 2 then 1 + 1 + 1 images.
    assert list(train.targets) == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert train.ids[0] == "flowers-102/jpg/image_00001.jpg" and train.ids[6] == "flowers-102/jpg/image_00003.jpg"
    assert list(train.ids) == [item.id for item in spec.splits["train"]]


def test_flowers_missing_mat_file_is_dataset_not_found(tmp_path: Path) -> None:
    make_flowers102(tmp_path)
    (tmp_path / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match="flowers-102") as info:
        build_dataset("flowers102", tmp_path, "test")
    assert "--download" in str(info.value)


def test_pets_and_dtd_class_names(tmp_path: Path) -> None:
    make_pets(tmp_path / "pets")
    make_dtd(tmp_path / "dtd")
    assert build_dataset("pets", tmp_path / "pets", "test").classes == [
        "Abyssinian", "American Bulldog", "American Pit Bull Terrier"
    ]
    dtd = build_dataset("dtd", tmp_path / "dtd", "train")
    assert dtd.classes == ["banded", "blotchy", "braided"]
    assert len(dtd) == 9  # train1 (2 per class) + val1 (1 per class)


def test_dtd_splits_with_different_classes_raise(tmp_path: Path) -> None:
    make_dtd(tmp_path)
    labels = tmp_path / "dtd" / "dtd" / "labels" / "test1.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines() if "braided" not in line))
    with pytest.raises(DatasetLayoutError, match=r"only in 'train': \['braided'\]"):
        build_dataset("dtd", tmp_path, "train")


def test_dtd_missing_label_file_is_dataset_not_found(tmp_path: Path) -> None:
    make_dtd(tmp_path)
    (tmp_path / "dtd" / "dtd" / "labels" / "val1.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="val1.txt"):
        build_dataset("dtd", tmp_path, "test")


def test_cars_does_not_claim_it_can_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cannot download") as info:
        build_dataset("cars", tmp_path, "test", download=True)
    assert "--download" not in str(info.value)


def test_renamed_torchvision_attribute_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dtd(tmp_path)

    class DTD(torchvision.datasets.DTD):  # same class name: torchvision derives the folder name from it
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            del self._image_files

    monkeypatch.setattr(torchvision.datasets, "DTD", DTD)
    with pytest.raises(RuntimeError, match=rf"torchvision {re.escape(torchvision.__version__)}.*'_image_files'"):
        build_dataset("dtd", tmp_path, "test")


# ---------------------------------------------------------------------------------------------------------------------
# fashion_mnist


def test_fashion_mnist_unpacks_gz_once_then_torchvision_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = make_fashion_mnist_gz(tmp_path / "gz")
    monkeypatch.setenv(FASHION_MNIST_GZ_ENV, str(tmp_path / "gz"))
    root = tmp_path / "data"
    train = build_dataset("fashion_mnist", root, "train")

    raw = root / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(FASHION_MNIST_FILES)  # no temporary file left behind
    images, labels = written["train"]
    assert list(train.targets) == labels and len(train) == 6
    assert list(train.ids) == [f"train:{i}" for i in range(6)]
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    image, target = train[3]
    assert image.mode == "RGB" and image.size == (28, 28) and target == 3
    assert np.array_equal(np.asarray(image)[..., 0], images[3])

    stamps = {f: (raw / f).stat().st_mtime_ns for f in FASHION_MNIST_FILES}

    def no_second_unpack(*args: object, **kwargs: object) -> None:
        raise AssertionError("the .gz files were decompressed a second time")

    monkeypatch.setattr(gzip, "open", no_second_unpack)
    test = build_dataset("fashion_mnist", root, "test")
    assert list(test.targets) == FASHION_SPLITS["test"][1]
    assert {f: (raw / f).stat().st_mtime_ns for f in FASHION_MNIST_FILES} == stamps


def test_fashion_mnist_without_files_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("fashion_mnist", tmp_path, "test")
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "--download" in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message


def test_fashion_mnist_truncated_gz_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fashion_mnist_gz(tmp_path / "gz")
    broken = tmp_path / "gz" / "t10k-images-idx3-ubyte.gz"  # the third file unpacked; the first two succeed
    broken.write_bytes(broken.read_bytes()[:-200])
    monkeypatch.setenv(FASHION_MNIST_GZ_ENV, str(tmp_path / "gz"))
    with pytest.raises(DatasetLayoutError, match="t10k-images-idx3-ubyte.gz"):
        build_dataset("fashion_mnist", tmp_path / "data", "train")
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


@pytest.mark.skipif(
    not all((datasets.DEBIAN_FASHION_MNIST / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES),
    reason=f"Debian's Fashion-MNIST is not installed in {datasets.DEBIAN_FASHION_MNIST} "
    "(apt-get install -y dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_GZ_ENV)
    train = build_dataset("fashion_mnist", tmp_path, "train")
    test = build_dataset("fashion_mnist", tmp_path, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert len(train.classes) == 10 and sorted(set(test.targets)) == list(range(10))
    image, target = train[0]
    assert image.mode == "RGB" and image.size == (28, 28) and 0 <= target < 10
