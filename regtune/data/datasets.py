"""Dataset readers: each registry name maps one dataset's native on-disk layout to an `ImageDataset`.

Every reader returns one split, ``"train"`` or ``"test"``, and never opens an image while building (only index
files are read), so building is fast even for 60k items. What the two splits mean for each dataset:

============== ============================================ ==================================================
name           ``"train"``                                  ``"test"``
============== ============================================ ==================================================
fashion_mnist  the 60k ``train-*`` idx files                the 10k ``t10k-*`` idx files
imagefolder    ``root/train/<class>/<image>``               ``root/test/<class>/<image>``
cub200         ``is_training_image == 1`` in                ``is_training_image == 0``
               ``train_test_split.txt``
aircraft       torchvision ``FGVCAircraft`` ``"trainval"``  ``"test"`` (``annotation_level="variant"``)
cars           torchvision ``StanfordCars`` ``"train"``     ``"test"``
flowers102     torchvision ``Flowers102`` ``"train"`` +     ``"test"``
               ``"val"``
pets           torchvision ``OxfordIIITPet`` ``"trainval"`` ``"test"`` (``target_types="category"``)
dtd            torchvision ``DTD`` ``"train"`` + ``"val"``  ``"test"`` (both of ``partition=1``)
============== ============================================ ==================================================

Validation subsets are carved out of ``"train"`` elsewhere (split manifests); the test split is never used for
model selection.

Item ids: for file datasets ``root / id`` is the image file (``root`` as set on the returned dataset, which is the
``root`` given to `build_dataset`, except for ``cub200`` where it is ``CUB_200_2011/images`` so that the id is
CUB's own relative path). Fashion-MNIST items are ``"<split>:<index>"`` into the official idx files.

Example:
    >>> from regtune.data.datasets import build_dataset, list_datasets
    >>> "cub200" in list_datasets()
    True
    >>> train = build_dataset("cub200", "/data/cub", "train")  # doctest: +SKIP
    >>> image, target = train[0]  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import logging
import os
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torchvision
from PIL import Image
from torchvision import datasets as tv_datasets

from regtune.data.base import Box, DatasetNotFoundError, ImageDataset

__all__ = [
    "CUB_BOX_END_OFFSET",
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_GZ_ENV",
    "SPLITS",
    "DatasetLayoutError",
    "UnknownDatasetError",
    "build_dataset",
    "check_dataset_name",
    "dataset_source_hint",
    "list_datasets",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
"""The splits every reader knows."""

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the four official ``*-ubyte.gz`` files."""

FASHION_MNIST_GZ_ENV = "REGTUNE_FASHION_MNIST_GZ"
"""Environment variable naming a folder to use instead of `DEBIAN_FASHION_MNIST` (read at build time)."""

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The unzipped files torchvision's ``FashionMNIST`` reads from ``<root>/FashionMNIST/raw/``."""

CUB_BOX_END_OFFSET = -1.0
"""CUB box ``(x, y, width, height)`` becomes ``(x, y, x + width + offset, y + height + offset)``.

With -1 the far corner is the last pixel inside the box, matching `regtune.data.base.Box`'s inclusive corners:
a box 1 pixel wide has ``x1 == x0``. clovaai/wsolevaluation's CUB metadata instead stores ``x + width`` (offset 0;
``bounding_boxes.txt`` line ``1 60.0 27.0 325.0 304.0`` is ``60,27,385,331`` in its ``localization.txt``) while its
IoU also counts corners inclusively (``x1 - x0 + 1``), so its boxes are one pixel wider and taller than CUB's. Set 0.0
to reproduce its box coordinates exactly. Measured on the 5,794 CUB test boxes scaled to 224 pixels, the IoU changes by
0.84 % at the median, 2.15 % at the 95th percentile and 3.46 % at most.
"""


class UnknownDatasetError(ValueError):
    """`build_dataset` was given a name it does not know; the message lists the known ones."""


class DatasetLayoutError(ValueError):
    """A dataset's files are present but their content does not fit the expected layout; the message says where."""


Reader = Callable[[Path, str, bool], ImageDataset]


@dataclass(frozen=True)
class _Entry:
    reader: Reader
    source: str
    downloadable: bool


_READERS: dict[str, _Entry] = {}


def _register(name: str, *, source: str, downloadable: bool) -> Callable[[Reader], Reader]:
    """Function decorator adding a reader under ``name`` with where to get the data (a duplicate name raises)."""
    if not name or name != name.lower():
        raise ValueError(f"dataset names are lowercase and non-empty, got {name!r}")

    def decorator(reader: Reader) -> Reader:
        if name in _READERS:
            raise ValueError(f"dataset {name!r} is already registered (by {_READERS[name].reader.__qualname__})")
        _READERS[name] = _Entry(reader=reader, source=source, downloadable=downloadable)
        return reader

    return decorator


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_READERS)


def _entry(name: str) -> _Entry:
    if name not in _READERS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    return _READERS[name]


def check_dataset_name(name: str) -> None:
    """Raise `UnknownDatasetError` (listing the known names) unless ``name`` is a registered dataset."""
    _entry(name)


def dataset_source_hint(name: str) -> str:
    """Where to get dataset ``name`` and how to lay it out under ``root`` (one sentence or two, for messages).

    Raises:
        UnknownDatasetError: ``name`` is not registered.
    """
    return _entry(name).source


def build_dataset(name: str, root: str | Path, split: str, download: bool = False) -> ImageDataset:
    """Read one split of a registered dataset from its native layout under ``root``.

    Args:
        name: Registry name, one of `list_datasets`.
        root: Folder holding the dataset in its native layout (see `dataset_source_hint`); ``~`` is expanded.
        split: ``"train"`` or ``"test"``; what they mean per dataset is in this module's docstring.
        download: Let torchvision download missing files (``aircraft``, ``flowers102``, ``pets``, ``dtd``,
            ``fashion_mnist``). Other datasets cannot be downloaded; for them this only logs a warning.

    Returns:
        The split, with ``name``, ``split`` and ``root`` set; no image has been opened yet.

    Raises:
        UnknownDatasetError: Unknown ``name``; the message lists the known ones.
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
        DatasetNotFoundError: Files are missing; the message names them and says where to get the dataset.
        DatasetLayoutError: Files are present but inconsistent (malformed line, class lists that differ).

    Example:
        >>> build_dataset("imagefolder", "/data/flowers", "test")  # doctest: +SKIP
    """
    entry = _entry(name)
    if split not in SPLITS:
        raise ValueError(f"{name}: split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    root = Path(root).expanduser()
    if download and not entry.downloadable:
        log.warning("%s: download=True ignored, regtune cannot download this dataset (%s)", name, entry.source)
    dataset = entry.reader(root, split, download)
    log.info("%s/%s: %d images, %d classes, from %s", name, split, len(dataset), dataset.num_classes, dataset.root)
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers


class _FileLoader:
    """Picklable ``load(i)`` opening the i-th file (a closure would break DataLoader workers under spawn)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __call__(self, index: int) -> Image.Image:
        return Image.open(self.paths[index])


class _ArrayLoader:
    """Picklable ``load(i)`` turning row ``i`` of a ``(N, H, W)`` uint8 tensor into a grayscale image."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(self.data[index].numpy(), mode="L")


def _relative_id(path: str | Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError as err:
        raise RuntimeError(f"image path {path} is not under the dataset root {root}; cannot make a stable id") from err


def _file_dataset(
    name: str,
    split: str,
    root: Path,
    paths: Sequence[str | Path],
    targets: Sequence[int],
    classes: Sequence[str],
    boxes: Sequence[Sequence[Box]] | None = None,
) -> ImageDataset:
    return ImageDataset(
        name=name,
        split=split,
        ids=[_relative_id(p, root) for p in paths],
        targets=[int(t) for t in targets],
        classes=[str(c) for c in classes],
        load=_FileLoader([str(p) for p in paths]),
        boxes=boxes,
        root=root,
    )


def _not_found(name: str, what: str, download: bool) -> DatasetNotFoundError:
    entry = _entry(name)
    if entry.downloadable and not download:
        how = " Or pass --download (download=True) to let torchvision fetch it."
    elif not entry.downloadable:
        how = " regtune cannot download it for you."
    else:
        how = ""
    return DatasetNotFoundError(f"{name}: {what}. {entry.source}{how}")


def _tv_attr(dataset: Any, attribute: str) -> Any:
    """A private torchvision attribute that lists files/labels without opening images; a clear error if renamed."""
    try:
        return getattr(dataset, attribute)
    except AttributeError as err:
        raise RuntimeError(
            f"torchvision {torchvision.__version__}: {type(dataset).__name__} has no attribute {attribute!r}, which "
            "regtune reads to list the images without opening them (tested with torchvision 0.26 to 0.29.1). "
            "Install a torchvision in that range or update regtune/data/datasets.py."
        ) from err


_T = TypeVar("_T")


def _construct(name: str, make: Callable[[], _T], expected: Path, download: bool) -> _T:
    """Build a torchvision dataset, turning its 'not found' errors into `DatasetNotFoundError`."""
    try:
        return make()
    except RuntimeError as err:
        if not str(err).startswith("Dataset not found"):
            raise
        raise _not_found(name, f"no complete copy under {expected} (torchvision: {err})", download) from err
    except FileNotFoundError as err:
        raise _not_found(name, f"{err.filename or err} is missing (expected under {expected})", download) from err


def _check_same_classes(name: str, class_lists: dict[str, Sequence[str]]) -> list[str]:
    """Return the class list shared by all named parts, or raise naming the difference."""
    (first_part, first), *rest = class_lists.items()
    for part, classes in rest:
        if list(classes) != list(first):
            only_first = sorted(set(first) - set(classes))
            only_other = sorted(set(classes) - set(first))
            raise DatasetLayoutError(
                f"{name}: the class lists of {first_part!r} ({len(first)} classes) and {part!r} ({len(classes)}) "
                f"differ: only in {first_part!r}: {only_first or '-'}; only in {part!r}: {only_other or '-'}"
                + ("; same names in another order" if not only_first and not only_other else "")
                + ". Targets would then name different classes in different splits; restore the missing files."
            )
    return list(first)


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def _fashion_mnist_gz_folder() -> Path:
    return Path(os.environ.get(FASHION_MNIST_GZ_ENV) or DEBIAN_FASHION_MNIST)


def _gunzip_atomically(source: Path, target: Path) -> None:
    """Decompress ``source`` into ``target`` via a temporary file in the same folder, so a crash leaves no partial
    ``target`` (torchvision only checks that the file exists)."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, gzip.open(source, "rb") as inp:
            try:
                while chunk := inp.read(1 << 20):
                    out.write(chunk)
            except (EOFError, zlib.error, gzip.BadGzipFile) as err:
                raise DatasetLayoutError(
                    f"fashion_mnist: {source} is not a complete gzip file ({err}); reinstall it (apt-get install "
                    "--reinstall -y dataset-fashion-mnist), or pass --download to let torchvision fetch the files"
                ) from err
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _unpack_fashion_mnist(raw: Path) -> None:
    """Decompress the official ``*.gz`` files from the Debian folder into torchvision's ``raw`` folder, once."""
    missing = [f for f in FASHION_MNIST_FILES if not (raw / f).is_file()]
    if not missing:
        return
    folder = _fashion_mnist_gz_folder()
    origin = f"${FASHION_MNIST_GZ_ENV}" if os.environ.get(FASHION_MNIST_GZ_ENV) else "Debian's package folder"
    sources = [folder / f"{f}.gz" for f in missing]
    absent = [s.name for s in sources if not s.is_file()]
    if absent:
        raise _not_found(
            "fashion_mnist",
            f"{raw} lacks {', '.join(missing)}, and {folder} ({origin}) lacks {', '.join(absent)} to unpack them from",
            download=False,
        )
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in zip(missing, sources):
        _gunzip_atomically(source, raw / name)
        log.info("fashion_mnist: unpacked %s into %s", source, raw)


@_register(
    "fashion_mnist",
    source=(
        "Install Debian's copy with `apt-get install -y dataset-fashion-mnist` (the .gz files in "
        f"{DEBIAN_FASHION_MNIST} are then unpacked into <root>/FashionMNIST/raw/ automatically; "
        f"${FASHION_MNIST_GZ_ENV} names another folder holding them), or pass --download to let torchvision fetch "
        "it from https://github.com/zalandoresearch/fashion-mnist."
    ),
    downloadable=True,
)
def _read_fashion_mnist(root: Path, split: str, download: bool) -> ImageDataset:
    """Fashion-MNIST through torchvision, fed offline from Debian's package when its raw files are missing."""
    raw = root / "FashionMNIST" / "raw"
    if not download:
        # Never hand Debian's files to torchvision with download=True: it would fetch and MD5-check instead.
        _unpack_fashion_mnist(raw)
    dataset = _construct(
        "fashion_mnist",
        lambda: tv_datasets.FashionMNIST(str(root), train=split == "train", download=download),
        raw,
        download,
    )
    data = _tv_attr(dataset, "data")
    return ImageDataset(
        name="fashion_mnist",
        split=split,
        ids=[f"{split}:{i}" for i in range(len(data))],
        targets=_tv_attr(dataset, "targets").tolist(),
        classes=list(dataset.classes),
        load=_ArrayLoader(data),
        root=root,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Generic class folders


_IMAGEFOLDER_LAYOUT = (
    "Arrange the images as <root>/train/<class>/<image> and <root>/test/<class>/<image>: one folder per class, the "
    f"same class folders in both splits, images with extensions {', '.join(tv_datasets.folder.IMG_EXTENSIONS)}."
)


@_register("imagefolder", source=_IMAGEFOLDER_LAYOUT, downloadable=False)
def _read_imagefolder(root: Path, split: str, download: bool) -> ImageDataset:
    """``root/<split>/<class>/<image>`` (AdaRand's layout); classes sorted by folder name."""
    folder = root / split
    if not folder.is_dir():
        raise _not_found("imagefolder", f"no folder {folder}", download)
    try:
        scanned = tv_datasets.ImageFolder(str(folder), allow_empty=True)
    except FileNotFoundError as err:  # raised when there is no class folder at all
        raise _not_found("imagefolder", f"{folder} has no class folders ({err})", download) from err
    classes = list(scanned.classes)
    targets = [t for _, t in scanned.samples]
    empty = [c for i, c in enumerate(classes) if i not in set(targets)]
    if empty:
        raise DatasetLayoutError(
            f"imagefolder: class folder(s) {', '.join(empty)} under {folder} hold no image with an extension in "
            f"{', '.join(tv_datasets.folder.IMG_EXTENSIONS)}; add images or remove the folder(s) from both splits"
        )
    other = root / ("test" if split == "train" else "train")
    if other.is_dir():
        other_classes = sorted(entry.name for entry in os.scandir(other) if entry.is_dir())
        _check_same_classes("imagefolder", {str(folder): classes, str(other): other_classes})
    else:
        log.warning("imagefolder: %s is missing, so the class folders of %s are not checked against it", other, folder)
    return _file_dataset("imagefolder", split, root, [p for p, _ in scanned.samples], targets, classes)


# ---------------------------------------------------------------------------------------------------------------------
# CUB-200-2011


_CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")


def _read_cub_table(path: Path, columns: int) -> dict[int, list[str]]:
    """``<id> <field> ...`` lines as ``{id: fields}``; the last field keeps any spaces."""
    table: dict[int, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns or not fields[0].isdigit():
            raise DatasetLayoutError(
                f"cub200: {path}:{number}: expected '<id>' and {columns - 1} more field(s), got {line!r}"
            )
        key = int(fields[0])
        if key in table:
            raise DatasetLayoutError(f"cub200: {path}:{number}: id {key} appears twice")
        table[key] = fields[1:]
    return table


def _cub_box(path: Path, key: int, fields: Sequence[str]) -> Box:
    try:
        x, y, width, height = map(float, fields)
    except ValueError as err:
        raise DatasetLayoutError(f"cub200: {path}: image {key}: expected 4 numbers, got {' '.join(fields)!r}") from err
    return (x, y, x + width + CUB_BOX_END_OFFSET, y + height + CUB_BOX_END_OFFSET)


@_register(
    "cub200",
    source=(
        "Download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it so that "
        "<root>/CUB_200_2011/images.txt exists (root may also be the CUB_200_2011 folder itself)."
    ),
    downloadable=False,
)
def _read_cub200(root: Path, split: str, download: bool) -> ImageDataset:
    """CUB-200-2011's native files; the official ``train_test_split.txt``, one box per image.

    Boxes come from ``bounding_boxes.txt`` (``x y width height`` in pixels) as ``(x, y, x + width - 1,
    y + height - 1)``, inclusive corners (see `CUB_BOX_END_OFFSET`). Class names are ``classes.txt``'s
    (``"001.Black_footed_Albatross"``), targets ``class_id - 1``.
    """
    base = root if (root / "images.txt").is_file() else root / "CUB_200_2011"
    missing = [f for f in _CUB_FILES if not (base / f).is_file()]
    if not (base / "images").is_dir():
        missing.append("images/")
    if "images.txt" in missing:  # nothing of CUB there: name the one file that identifies the layout
        missing = ["images.txt"]
    if missing:
        raise _not_found("cub200", f"{', '.join(str(base / f) for f in missing)} missing", download)

    images = _read_cub_table(base / "images.txt", 2)
    labels = _read_cub_table(base / "image_class_labels.txt", 2)
    is_train = _read_cub_table(base / "train_test_split.txt", 2)
    boxes = _read_cub_table(base / "bounding_boxes.txt", 5)
    class_table = _read_cub_table(base / "classes.txt", 2)

    if sorted(class_table) != list(range(1, len(class_table) + 1)):
        raise DatasetLayoutError(f"cub200: {base / 'classes.txt'}: class ids must be 1..{len(class_table)}")
    classes = [class_table[k][0] for k in range(1, len(class_table) + 1)]
    for file, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train),
                        ("bounding_boxes.txt", boxes)):
        lacking = sorted(set(images) - set(table))
        if lacking:
            raise DatasetLayoutError(
                f"cub200: {len(lacking)} image id(s) of images.txt have no line in {base / file}, "
                f"first {lacking[:5]}; re-extract the archive"
            )

    wanted = "1" if split == "train" else "0"
    paths: list[Path] = []
    targets: list[int] = []
    image_boxes: list[list[Box]] = []
    for key in sorted(images):
        flag = is_train[key][0]
        if flag not in ("0", "1"):
            raise DatasetLayoutError(
                f"cub200: {base / 'train_test_split.txt'}: image {key}: expected 0 or 1, got {flag!r}"
            )
        if flag != wanted:
            continue
        label = labels[key][0]
        if not label.isdigit() or not 1 <= int(label) <= len(classes):
            raise DatasetLayoutError(
                f"cub200: {base / 'image_class_labels.txt'}: image {key}: class {label!r} outside 1..{len(classes)}"
            )
        paths.append(base / "images" / images[key][0])
        targets.append(int(label) - 1)
        image_boxes.append([_cub_box(base / "bounding_boxes.txt", key, boxes[key])])
    return _file_dataset("cub200", split, base / "images", paths, targets, classes, boxes=image_boxes)


# ---------------------------------------------------------------------------------------------------------------------
# torchvision's fine-grained datasets


@_register(
    "aircraft",
    source=(
        "Get fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and extract it so "
        "that <root>/fgvc-aircraft-2013b/data/variants.txt exists."
    ),
    downloadable=True,
)
def _read_aircraft(root: Path, split: str, download: bool) -> ImageDataset:
    """FGVC-Aircraft, 100 variants; train is the official ``trainval``."""
    dataset = _construct(
        "aircraft",
        lambda: tv_datasets.FGVCAircraft(
            str(root), split={"train": "trainval", "test": "test"}[split], annotation_level="variant",
            download=download,
        ),
        root / "fgvc-aircraft-2013b",
        download,
    )
    return _file_dataset(
        "aircraft", split, root, _tv_attr(dataset, "_image_files"), _tv_attr(dataset, "_labels"), dataset.classes
    )


@_register(
    "cars",
    source=(
        "Stanford Cars' original site (https://ai.stanford.edu/~jkrause/cars/car_dataset.html) is offline and "
        "torchvision cannot download it; get a copy of the original release and lay it out as "
        "<root>/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, cars_test/, "
        "cars_test_annos_withlabels.mat}."
    ),
    downloadable=False,
)
def _read_cars(root: Path, split: str, download: bool) -> ImageDataset:
    """Stanford Cars, 196 classes, official train/test; ``download`` is never passed on (torchvision would raise)."""
    dataset = _construct(
        "cars",
        lambda: tv_datasets.StanfordCars(str(root), split=split, download=False),
        root / "stanford_cars",
        download,
    )
    samples = _tv_attr(dataset, "_samples")
    return _file_dataset("cars", split, root, [p for p, _ in samples], [t for _, t in samples], dataset.classes)


class _Flowers102(tv_datasets.Flowers102):
    """torchvision's ``Flowers102`` checking that ``imagelabels.mat`` and ``setid.mat`` exist instead of their MD5.

    We verify presence, not checksums, so that re-packed copies (same arrays, other bytes) and test fixtures are
    read; parsing and downloading stay torchvision's.
    """

    def _check_integrity(self) -> bool:
        base = Path(_tv_attr(self, "_base_folder"))
        files = _tv_attr(self, "_file_dict")
        return Path(_tv_attr(self, "_images_folder")).is_dir() and all(
            (base / files[key][0]).is_file() for key in ("label", "setid")
        )


@_register(
    "flowers102",
    source=(
        "Get 102flowers.tgz, imagelabels.mat and setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ "
        "into <root>/flowers-102/ and extract the archive there, so that <root>/flowers-102/jpg/ exists."
    ),
    downloadable=True,
)
def _read_flowers102(root: Path, split: str, download: bool) -> ImageDataset:
    """Oxford Flowers-102; train is the official ``train`` + ``val`` (10 + 10 images per class)."""
    parts = ("train", "val") if split == "train" else ("test",)
    paths: list[Path] = []
    labels: list[int] = []
    for part in parts:
        dataset = _construct(
            "flowers102",
            lambda part=part: _Flowers102(str(root), split=part, download=download),
            root / "flowers-102",
            download,
        )
        paths += _tv_attr(dataset, "_image_files")
        labels += _tv_attr(dataset, "_labels")
    return _file_dataset("flowers102", split, root, paths, labels, _Flowers102.classes)


@_register(
    "pets",
    source=(
        "Get images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ and extract both "
        "into <root>/oxford-iiit-pet/ (giving images/ and annotations/trainval.txt)."
    ),
    downloadable=True,
)
def _read_pets(root: Path, split: str, download: bool) -> ImageDataset:
    """Oxford-IIIT Pet, 37 breeds; train is the official ``trainval``.

    torchvision derives the class names from the images of the split it reads, so both splits are read (index files
    only) and must name the same classes.
    """
    parts = {}
    for part in ("trainval", "test"):
        parts[part] = _construct(
            "pets",
            lambda part=part: tv_datasets.OxfordIIITPet(
                str(root), split=part, target_types="category", download=download
            ),
            root / "oxford-iiit-pet",
            download,
        )
    classes = _check_same_classes("pets", {part: d.classes for part, d in parts.items()})
    dataset = parts["trainval" if split == "train" else "test"]
    return _file_dataset("pets", split, root, _tv_attr(dataset, "_images"), _tv_attr(dataset, "_labels"), classes)


@_register(
    "dtd",
    source=(
        "Get dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and extract it into <root>/dtd/ so "
        "that <root>/dtd/dtd/labels/train1.txt exists."
    ),
    downloadable=True,
)
def _read_dtd(root: Path, split: str, download: bool) -> ImageDataset:
    """Describable Textures, 47 classes, partition 1; train is ``train1`` + ``val1``.

    torchvision derives the class names from the split's label file, so train, val and test are all read (index
    files only) and must name the same classes.
    """
    parts = {}
    for part in ("train", "val", "test"):
        parts[part] = _construct(
            "dtd",
            lambda part=part: tv_datasets.DTD(str(root), split=part, partition=1, download=download),
            root / "dtd",
            download,
        )
    classes = _check_same_classes("dtd", {part: d.classes for part, d in parts.items()})
    paths: list[Path] = []
    labels: list[int] = []
    for part in ("train", "val") if split == "train" else ("test",):
        paths += _tv_attr(parts[part], "_image_files")
        labels += _tv_attr(parts[part], "_labels")
    return _file_dataset("dtd", split, root, paths, labels, classes)
