"""Use a finished run: classify images with the model it tested, in the evaluation frame it was tested in.

    >>> import regtune
    >>> predictor = regtune.load("runs/my-run")                      # doctest: +SKIP
    >>> predictor.predict(["photo.jpg"], topk=3)[0].label            # doctest: +SKIP
    'sneaker'

The model, its class names and its evaluation transform all come from the run directory (``config.yaml``,
``metrics.json`` and the tested weights, read without pickle), so a prediction on the run's own test images is the
run's test prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS  # the extensions the imagefolder reader takes

from regtune.data.base import as_rgb

__all__ = ["Prediction", "Predictor", "expand_inputs", "load", "open_rgb"]

_log = logging.getLogger(__name__)

TTA_MODES = (None, "flip")


@dataclass(frozen=True)
class Prediction:
    """One input's prediction: the best class and the ``topk`` best with their probabilities (best first), or the
    error that kept the input from being read (then ``label`` is ``None``)."""

    source: str
    topk: tuple[tuple[str, float], ...] = ()
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.topk[0][0] if self.topk else None

    @property
    def probability(self) -> float | None:
        return self.topk[0][1] if self.topk else None


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as the datasets read it: decoded now, converted to 3-channel RGB (grey, palette, RGBA)."""
    with Image.open(path) as image:
        image.load()
        return as_rgb(image)


class Predictor:
    """A model with its class names and evaluation transform (``regtune.load`` builds one from a run).

    Args:
        model: The classifier; put in evaluation mode.
        classes: Class names in the order of the model's outputs.
        transform: PIL image -> normalised (C, H, W) tensor, the run's evaluation transform.
        device: Where the forward passes run.
        preprocessing: The data config the transform was built from (input size, mean, std, frame).
        run: The run directory it comes from (``None`` for an export).
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], transform: Callable[[Image.Image], torch.Tensor],
                 device: str | torch.device = "cpu", preprocessing: dict[str, Any] | None = None,
                 run: Any = None) -> None:
        self.model = model.eval().to(device)
        self.classes = [str(c) for c in classes]
        self.transform = transform
        self.device = torch.device(device)
        self.preprocessing = dict(preprocessing or {})
        self.run = run

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor, tta: str | None = None) -> torch.Tensor:
        """Softmax probabilities (N, C) of a batch of transformed images; ``tta="flip"`` averages them with the
        horizontally flipped images'."""
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(map(str, TTA_MODES))}, got {tta!r}")
        batch = batch.to(self.device)
        probs = self.model(batch).float().softmax(dim=1)
        if tta == "flip":
            probs = (probs + self.model(batch.flip(-1)).float().softmax(dim=1)) / 2
        return probs.cpu()

    def predict(self, inputs: Iterable[str | Path | Image.Image | torch.Tensor], topk: int = 1,
                batch_size: int = 64, tta: str | None = None, progress: bool = False) -> list[Prediction]:
        """Classify images: file paths, PIL images, or tensors already transformed ((C, H, W) or (N, C, H, W)).

        A file that cannot be read gets a [`Prediction`][] with its ``error``; the others are classified all the
        same. ``topk`` is capped at the number of classes.
        """
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        items = list(_flatten(inputs))
        results: list[Prediction | None] = [None] * len(items)
        ready: list[tuple[int, torch.Tensor]] = []
        for i, (source, item) in enumerate(_progress(items, progress)):
            try:
                ready.append((i, item if isinstance(item, torch.Tensor) else self.transform(_rgb(item))))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
                results[i] = Prediction(source, error=f"{type(err).__name__}: {err}")
            if len(ready) == batch_size or (i == len(items) - 1 and ready):
                self._classify(ready, items, results, topk, tta)
                ready = []
        return [r for r in results if r is not None]

    def _classify(self, ready: list[tuple[int, torch.Tensor]], items: list[tuple[str, Any]],
                  results: list[Prediction | None], topk: int, tta: str | None) -> None:
        probs = self.probabilities(torch.stack([t for _, t in ready]), tta)
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        for row, (i, _) in enumerate(ready):
            results[i] = Prediction(items[i][0], tuple(
                (self.classes[int(c)], float(p)) for p, c in zip(values[row], indices[row])))


def _rgb(item: Image.Image | Path) -> Image.Image:
    """A PIL image in RGB (grey, palette or RGBA converted, as the datasets do), or the file read so."""
    return as_rgb(item) if isinstance(item, Image.Image) else open_rgb(item)


def _flatten(inputs: Iterable[str | Path | Image.Image | torch.Tensor]) -> Iterator[tuple[str, Any]]:
    """``(name, item)`` per image: a (N, C, H, W) tensor gives N items."""
    for n, item in enumerate(inputs):
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            yield from ((f"tensor[{n}][{k}]", t) for k, t in enumerate(item))
        elif isinstance(item, torch.Tensor):
            if item.dim() != 3:
                raise ValueError(f"a tensor input must be (C, H, W) or (N, C, H, W), got shape {tuple(item.shape)}")
            yield f"tensor[{n}]", item
        elif isinstance(item, Image.Image):
            yield f"image[{n}]", item
        else:
            yield str(item), Path(item)


def _progress(items: list[Any], shown: bool) -> Iterable[Any]:
    if not shown:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="predict", unit="image", disable=None)  # disable=None: no bar when not a terminal


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from paths: an image file as it is, a folder's images recursively (sorted), a ``.txt`` file's
    lines (one path per line, relative to the file's folder unless absolute). A path that does not exist is kept,
    so that the prediction reports it on its own line."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            found += [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
        else:
            found.append(path)
    return found


def load(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """The [`Predictor`][] of a finished run directory (the weights it tested, its class names, its evaluation
    transform: ``data.crop_mode``, ``crop_pct``, the model's normalisation) or of an export folder
    (``regtune export``: plain timm with its safetensors and ``config.json``)."""
    from regtune.data.transforms import build_transforms
    from regtune.export import CONFIG_FILE, load_export
    from regtune.train.rundir import RunDir, run_preprocessing

    if (Path(path) / CONFIG_FILE).is_file() and not (Path(path) / "metrics.json").is_file():
        return load_export(path, device)
    run = RunDir(path).require("finished")
    config = run.config()
    metrics = run.metrics()
    classes = metrics.get("class_names")
    if classes is None:  # a run written before metrics.json named its classes: its dataset does
        classes = list(run.dataset("test", config).classes)
    model, config, _ = run.load_model(len(classes), config=config)
    preprocessing = run_preprocessing(model, config)
    _, transform = build_transforms(preprocessing)
    return Predictor(model, classes, transform, device, preprocessing, run)
