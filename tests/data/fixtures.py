"""Tiny copies of each dataset in its native on-disk layout, for the reader tests.

Each ``make_<name>(root)`` writes 3 classes with 2-4 small images per class and split under ``root`` and returns a
:class:`FixtureSpec` describing, in the order the reader must return them, every item's id, target and image size.
Image ``k`` of a fixture is ``(8 + k) x (6 + k)`` pixels, so an image's size tells which file was opened. The first
image written (train item 0 for every dataset) is grayscale, to check the conversion to RGB.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


@dataclass(frozen=True)
class Item:
    id: str
    target: int
    size: tuple[int, int]  # (width, height), as PIL reports it


@dataclass
class FixtureSpec:
    root: Path
    classes: list[str]
    splits: dict[str, list[Item]] = field(default_factory=lambda: {"train": [], "test": []})


class _ImageWriter:
    """Writes small random JPEGs of distinct sizes; the first one is grayscale."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def __call__(self, path: Path) -> tuple[int, int]:
        width, height = 8 + self.count, 6 + self.count
        mode = "L" if self.count == 0 else "RGB"
        shape = (height, width) if mode == "L" else (height, width, 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path, format="JPEG")
        self.count += 1
        return width, height


# ---------------------------------------------------------------------------------------------------------------------


def make_imagefolder(root: Path) -> FixtureSpec:
    """``root/{train,test}/<class>/img_<j>.jpg``; 3 train and 2 test images per class."""
    classes = ["cat", "dog", "fox"]  # already sorted, as ImageFolder sorts them
    spec = FixtureSpec(root, classes)
    write = _ImageWriter()
    for split, count in (("train", 3), ("test", 2)):
        for target, name in enumerate(classes):
            for j in range(count):
                relative = f"{split}/{name}/img_{j}.jpg"
                spec.splits[split].append(Item(relative, target, write(root / relative)))
    return spec


# CUB: image id -> (class id 1-based, is_training_image, (x, y, width, height)); listed in images.txt by id.
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
CUB_IMAGES = {
    1: (1, 1, (3.0, 4.0, 10.0, 6.0)),
    2: (1, 0, (0.0, 0.0, 8.0, 6.0)),
    3: (1, 1, (1.5, 2.0, 4.0, 3.0)),
    4: (1, 0, (2.0, 2.0, 5.0, 5.0)),
    5: (2, 0, (1.0, 1.0, 2.0, 2.0)),
    6: (2, 1, (0.0, 1.0, 9.0, 9.0)),
    7: (2, 1, (4.0, 4.0, 4.0, 4.0)),
    8: (3, 1, (1.0, 0.0, 3.0, 7.0)),
    9: (3, 0, (2.0, 3.0, 6.0, 2.0)),
    10: (3, 1, (0.0, 0.0, 1.0, 1.0)),
}


def cub_relative_path(image_id: int) -> str:
    class_id = CUB_IMAGES[image_id][0]
    bird = CUB_CLASSES[class_id - 1].split(".", 1)[1]
    return f"{CUB_CLASSES[class_id - 1]}/{bird}_{image_id:04d}_{700000 + image_id}.jpg"


def make_cub200(root: Path) -> FixtureSpec:
    """``root/CUB_200_2011/`` with the five index files and ``images/<class>/<file>.jpg`` (10 images, 3 classes)."""
    base = root / "CUB_200_2011"
    spec = FixtureSpec(root, list(CUB_CLASSES))
    write = _ImageWriter()
    lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes")}
    for image_id, (class_id, is_train, (x, y, w, h)) in CUB_IMAGES.items():
        relative = cub_relative_path(image_id)
        size = write(base / "images" / relative)
        lines["images"].append(f"{image_id} {relative}")
        lines["labels"].append(f"{image_id} {class_id}")
        lines["split"].append(f"{image_id} {is_train}")
        lines["boxes"].append(f"{image_id} {x} {y} {w} {h}")
        spec.splits["train" if is_train else "test"].append(Item(relative, class_id - 1, size))
    (base / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(lines["boxes"]) + "\n")
    (base / "classes.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(CUB_CLASSES, 1)))
    return spec


def make_aircraft(root: Path) -> FixtureSpec:
    """``root/fgvc-aircraft-2013b/data/{variants.txt, images_variant_{trainval,test}.txt, images/<id>.jpg}``."""
    classes = ["707-320", "A300B4", "F/A-18"]  # variants.txt order; "F/A-18" has a slash, as in the real file
    data = root / "fgvc-aircraft-2013b" / "data"
    spec = FixtureSpec(root, classes)
    write = _ImageWriter()
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{c}\n" for c in classes))
    # A few other files of the real release that torchvision does not read for variant labels.
    (data / "families.txt").write_text("Boeing 707\nA300\nF/A-18\n")
    number = 1000000
    for split, tv_split, per_class in (("train", "trainval", 3), ("test", "test", 2)):
        rows = []
        for j in range(per_class):  # interleave classes, as the real files do
            for target, name in enumerate(classes):
                number += 7
                image = f"{number:07d}"
                size = write(data / "images" / f"{image}.jpg")
                rows.append(f"{image} {name}")
                spec.splits[split].append(Item(f"fgvc-aircraft-2013b/data/images/{image}.jpg", target, size))
        (data / f"images_variant_{tv_split}.txt").write_text("\n".join(rows) + "\n")
    return spec


def _cars_annotations(rows: list[tuple[str, int]]) -> np.ndarray:
    """A 1 x N MATLAB struct array with the fields of ``cars_*_annos.mat``."""
    dtype = [(f, object) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    records = [(np.uint8(1), np.uint8(1), np.uint8(5), np.uint8(4), np.uint8(c), fname) for fname, c in rows]
    return np.array(records, dtype=dtype).reshape(1, -1)


def make_cars(root: Path) -> FixtureSpec:
    """``root/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat,
    cars_train/, cars_test/}``; ``.mat`` structures as torchvision reads them (class ids 1-based)."""
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    base = root / "stanford_cars"
    spec = FixtureSpec(root, classes)
    write = _ImageWriter()
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object).reshape(1, -1)})
    for split, folder, annos, per_class in (
        ("train", "cars_train", base / "devkit" / "cars_train_annos.mat", 3),
        ("test", "cars_test", base / "cars_test_annos_withlabels.mat", 2),
    ):
        rows = []
        for j in range(per_class):
            for target in (2, 0, 1):  # file order is not class order
                fname = f"{len(rows) + 1:05d}.jpg"
                size = write(base / folder / fname)
                rows.append((fname, target + 1))
                spec.splits[split].append(Item(f"stanford_cars/{folder}/{fname}", target, size))
        savemat(annos, {"annotations": _cars_annotations(rows)})
    return spec


FLOWERS_CLASSES_USED = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]  # labels 1, 2, 3


def make_flowers102(root: Path) -> FixtureSpec:
    """``root/flowers-102/{jpg/image_<5 digits>.jpg, imagelabels.mat, setid.mat}``; per class 2 trn, 1 val, 2 tst.

    The class list stays torchvision's 102 names; only labels 1-3 are used. The ``.mat`` files do not match the
    official MD5s, which the reader must not require.
    """
    base = root / "flowers-102"
    spec = FixtureSpec(root, [])  # classes: torchvision's list, checked separately
    write = _ImageWriter()
    labels: list[int] = []
    sets: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    plan = [("trnid", 2), ("valid", 1), ("tstid", 2)]
    for label in (1, 2, 3):
        for key, count in plan:
            for _ in range(count):
                labels.append(label)
                sets[key].append(len(labels))
    # Write the images in id order so sizes follow ids, then record items in the reader's order: trn, val / tst.
    sizes = {i: write(base / "jpg" / f"image_{i:05d}.jpg") for i in range(1, len(labels) + 1)}
    for split, keys in (("train", ("trnid", "valid")), ("test", ("tstid",))):
        for key in keys:
            for i in sets[key]:
                spec.splits[split].append(Item(f"flowers-102/jpg/image_{i:05d}.jpg", labels[i - 1] - 1, sizes[i]))
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in sets.items()})
    return spec


# Oxford-IIIT Pet: (image name prefix, class id, species: 1 cat / 2 dog)
PETS_BREEDS = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("american_pit_bull_terrier", 3, 2)]


def make_pets(root: Path) -> FixtureSpec:
    """``root/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}``."""
    base = root / "oxford-iiit-pet"
    spec = FixtureSpec(root, ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"])
    write = _ImageWriter()
    (base / "annotations").mkdir(parents=True)
    number = 0
    for split, tv_split, per_class in (("train", "trainval", 3), ("test", "test", 2)):
        rows = []
        for prefix, class_id, species in PETS_BREEDS:
            for _ in range(per_class):
                number += 1
                image = f"{prefix}_{number}"
                size = write(base / "images" / f"{image}.jpg")
                rows.append(f"{image} {class_id} {species} {number}")
                spec.splits[split].append(Item(f"oxford-iiit-pet/images/{image}.jpg", class_id - 1, size))
        (base / "annotations" / f"{tv_split}.txt").write_text("\n".join(rows) + "\n")
    return spec


def make_dtd(root: Path) -> FixtureSpec:
    """``root/dtd/dtd/{images/<class>/<class>_<4 digits>.jpg, labels/{train,val,test}1.txt}``; 2/1/2 per class."""
    classes = ["banded", "blotchy", "braided"]
    data = root / "dtd" / "dtd"
    spec = FixtureSpec(root, classes)
    write = _ImageWriter()
    (data / "labels").mkdir(parents=True)
    for part, split, per_class in (("train", "train", 2), ("val", "train", 1), ("test", "test", 2)):
        rows = []
        for target, name in enumerate(classes):
            for _ in range(per_class):
                image = f"{name}_{write.count + 1:04d}.jpg"
                size = write(data / "images" / name / image)
                rows.append(f"{name}/{image}")
                spec.splits[split].append(Item(f"dtd/dtd/images/{name}/{image}", target, size))
        (data / "labels" / f"{part}1.txt").write_text("\n".join(rows) + "\n")
    # Other partitions exist in the real release; the reader must use partition 1 only.
    (data / "labels" / "train2.txt").write_text("banded/does_not_exist.jpg\n")
    return spec


# Fashion-MNIST: idx files as in the official release (big-endian header, uint8 payload).
FASHION_SPLITS = {"train": ("train", [9, 0, 0, 3, 0, 2]), "test": ("t10k", [9, 2, 1, 1])}


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim  # 0x08: unsigned byte
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def make_fashion_mnist_gz(folder: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write the four ``*-ubyte.gz`` files (tiny: 6 train and 4 test 28x28 images) into ``folder``.

    Returns:
        ``{split: (images (N, 28, 28) uint8, labels)}``.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (prefix, labels) in FASHION_SPLITS.items():
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(images))
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(np.array(labels)))
        written[split] = (images, labels)
    return written


MAKERS = {
    "aircraft": make_aircraft,
    "cars": make_cars,
    "cub200": make_cub200,
    "dtd": make_dtd,
    "flowers102": make_flowers102,
    "imagefolder": make_imagefolder,
    "pets": make_pets,
}
"""Builders of the file datasets (Fashion-MNIST has its own, :func:`make_fashion_mnist_gz`)."""
