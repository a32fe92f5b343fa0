"""`regtune cam`: class activation maps of a finished run, their overlays, and localization on a dataset's boxes.

The run's selected checkpoint is loaded with its own config. For localization the image is resized to a square of
the run's input size without cropping and its boxes are scaled the same way, as the reference evaluator
(``clovaai/wsolevaluation``: ``transforms.Resize((224, 224))`` and ``resize_bbox``, coordinates truncated to
integers) does; the metrics are those of [`regtune.analysis.localization`][regtune.analysis.localization], defined in
docs/methods/analysis-metrics.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch import nn

from regtune._io import atomic_write_json
from regtune.analysis.cam import NotAGapLinearHead, class_activation_maps, grad_cam
from regtune.analysis.localization import (
    BoxAccuracy,
    box_accuracy,
    box_iou,
    boxes_from_cam,
    localization_accuracy,
    normalize_cam,
)
from regtune.data.base import Box, ImageDataset
from regtune.data.transforms import build_transforms
from regtune.models import data_config
from regtune.train.rundir import RunDir, run_preprocessing

__all__ = [
    "SOURCES",
    "cam_maps",
    "evaluate_localization",
    "localization_transform",
    "localize_run",
    "resize_box",
    "write_cam_overlays",
]

_log = logging.getLogger(__name__)

SOURCES = ("cam", "positive", "gradcam", "gradcam++", "hirescam", "xgradcam", "eigencam", "layercam")
"""Where a score map comes from: the classic CAM, its positive part CAM⁺ alone (the CAM study's option), or a
method of the ``grad-cam`` package (for heads that are not GAP + linear, e.g. ViTs)."""


def localization_transform(model: nn.Module, size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to ``size x size`` without cropping (the reference evaluator's frame), then the model's normalisation.

    timm's ``create_transform`` with ``crop_mode="squash"`` and ``crop_pct=1``; interpolation, mean and std from the
    model's data config (EfficientNet-Lite's 0.5 / 0.5, not ImageNet's).
    """
    config = data_config(model, size)
    return create_transform(input_size=(3, size, size), crop_pct=1.0, crop_mode="squash",
                            interpolation=config["interpolation"], mean=config["mean"], std=config["std"])


def resize_box(box: Box, image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box ``(x0, y0, x1, y1)`` of an image of ``image_size = (width, height)`` in the frame of the image resized to
    ``size = (width, height)``: each coordinate scaled and truncated to an integer (wsolevaluation's ``resize_bbox``).
    """
    (width, height), (new_width, new_height) = image_size, size
    x0, y0, x1, y1 = (float(v) for v in box)
    return (int(x0 * new_width / width), int(y0 * new_height / height), int(x1 * new_width / width),
            int(y1 * new_height / height))


def cam_maps(model: nn.Module, images: torch.Tensor, classes: torch.Tensor, source: str = "cam"
             ) -> dict[str, np.ndarray | None]:
    """Score maps of ``classes`` for a batch: ``{"map", "cam", "positive", "negative"}`` as (B, h, w) arrays.

    ``map`` is the one that localises (the CAM, CAM⁺ or the Grad-CAM-family map); ``cam`` / ``positive`` /
    ``negative`` are the classic CAM and its sign split (``None`` for grad-cam sources, which have no sign split).

    Raises:
        NotAGapLinearHead: ``source`` is ``"cam"`` or ``"positive"`` and the model's head is not GAP + linear (use a
            grad-cam source).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown CAM source {source!r}; known: {', '.join(SOURCES)}")
    if source in ("cam", "positive"):
        try:
            maps = class_activation_maps(model, images, classes)
        except NotAGapLinearHead as err:
            raise NotAGapLinearHead(f"{err}. From the command line: --source gradcam (or {', '.join(SOURCES[3:])})") \
                from err
        cam, positive, negative = (m.cpu().numpy() for m in (maps.cam, maps.positive, maps.negative))
        return {"map": cam if source == "cam" else positive, "cam": cam, "positive": positive, "negative": negative}
    with torch.enable_grad():
        scores = grad_cam(model, images, classes, method=source)
    return {"map": scores, "cam": None, "positive": None, "negative": None}


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).argmax(1)


def evaluate_localization(model: nn.Module, dataset: ImageDataset, size: int, items: Sequence[int] | None = None,
                          source: str = "cam", threshold: float = 0.2, interval: float = 0.01,
                          batch_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """Localization of ``model``'s CAMs on ``dataset``'s ground-truth boxes (MaxBoxAcc, MaxBoxAccV2, GT-known and
    Top-1 Loc; docs/methods/analysis-metrics.md).

    Args:
        model: Trained timm model (eval mode is set here).
        dataset: A dataset with ``boxes`` (e.g. ``cub200``).
        size: Input resolution (square, no crop).
        items: Indices of the dataset to use (default: all).
        source: See `SOURCES`; ``"positive"`` localises with CAM⁺ alone.
        threshold: Fixed tau of GT-known Loc and Top-1 Loc (0.2 of the max: the threshold commonly used since the
            CAM paper; papers do not always state theirs, hence a parameter).
        interval: Step of the tau grid of MaxBoxAcc / MaxBoxAccV2.

    Returns:
        ``max_box_acc`` (delta 0.5, largest contour), its ``best_threshold``, ``max_box_acc_v2`` (mean over delta in
        {0.3, 0.5, 0.7}, all contours) with ``max_box_acc_v2_per_delta``, ``gt_known_loc``, ``top1_loc``,
        ``top1_cls``, ``n``, ``source``, and ``box_acc_curve`` (BoxAcc over tau at delta 0.5).
    """
    if dataset.boxes is None:
        raise ValueError(f"{dataset.name} has no bounding boxes; localization needs a dataset with boxes "
                         "(e.g. cub200)")
    model.eval()
    transform = localization_transform(model, size)
    items = list(range(len(dataset))) if items is None else list(items)
    if not items:
        raise ValueError("no image to localize")
    # Hit counts accumulate batch by batch, so memory does not grow with the dataset (CUB's 5,794 test maps at
    # 224 px would be 2.3 GB).
    thresholds = deltas_v2 = None
    hits_v1 = hits_v2 = None
    gt_known = top1 = correct = 0
    iterator: Any = range(0, len(items), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="localization", unit="batch")
    for start in iterator:
        chunk = items[start:start + batch_size]
        pictures = [dataset[i][0] for i in chunk]
        images = torch.stack([transform(p) for p in pictures])
        labels = torch.tensor([dataset.targets[i] for i in chunk])
        predicted = _predict(model, images)
        on_truth = cam_maps(model, images, labels, source)["map"]
        wrong = predicted != labels
        on_prediction = on_truth.copy()
        if wrong.any():
            on_prediction[wrong.numpy()] = cam_maps(model, images[wrong], predicted[wrong], source)["map"]
        gt_cams = [normalize_cam(m, (size, size)) for m in on_truth]
        pred_cams = [normalize_cam(m, (size, size)) for m in on_prediction]
        hit = (predicted == labels).tolist()
        boxes = [np.array([resize_box(b, picture.size, (size, size)) for b in dataset.boxes[i]])
                 for i, picture in zip(chunk, pictures)]
        v1 = box_accuracy(gt_cams, boxes, interval, (0.5,), all_contours=False)
        v2 = box_accuracy(gt_cams, boxes, interval, (0.3, 0.5, 0.7), all_contours=True)
        fixed = localization_accuracy(gt_cams, pred_cams, hit, boxes, threshold=threshold)
        n = len(chunk)
        hits_v1 = v1.accuracy * n if hits_v1 is None else hits_v1 + v1.accuracy * n
        hits_v2 = v2.accuracy * n if hits_v2 is None else hits_v2 + v2.accuracy * n
        thresholds, deltas_v2 = v1.thresholds, v2.iou_thresholds
        gt_known += fixed["gt_known_loc"] * n
        top1 += fixed["top1_loc"] * n
        correct += sum(hit)
    total = len(items)
    v1 = BoxAccuracy(thresholds, (0.5,), np.rint(hits_v1) / total, all_contours=False)
    v2 = BoxAccuracy(thresholds, deltas_v2, np.rint(hits_v2) / total, all_contours=True)
    return {
        "n": total, "source": source, "size": size,
        "max_box_acc": v1.max_box_acc(0.5), "best_threshold": v1.best_threshold(0.5),
        "max_box_acc_v2": v2.mean_max,
        "max_box_acc_v2_per_delta": {str(d): v2.max_box_acc(d) for d in v2.iou_thresholds},
        "gt_known_loc": round(float(gt_known)) / total, "top1_loc": round(float(top1)) / total,
        "threshold": threshold, "top1_cls": correct / total,
        "box_acc_curve": {"tau": v1.thresholds.round(6).tolist(), "acc": v1.accuracy[:, 0].tolist()},
    }


def _load_run(run_dir: str | Path, split: str) -> tuple[RunDir, ImageDataset, nn.Module, str, int]:
    """The run, its dataset split, its selected model, the checkpoint path and the run's input size."""
    run = RunDir(run_dir).require("finished")
    config = run.config()
    dataset = run.dataset(split, config)
    model, _, checkpoint = run.load_model(dataset.num_classes, config=config)
    return run, dataset, model, str(checkpoint), int(run_preprocessing(model, config)["input_size"][-1])


def localize_run(run_dir: str | Path, split: str = "test", source: str = "cam", limit: int | None = None,
                 threshold: float = 0.2, progress: bool = False) -> dict[str, Any]:
    """`evaluate_localization` of a finished run on its dataset's ``split``; writes
    ``localization[_<source>].json`` into the run directory."""
    started = time.perf_counter()
    run, dataset, model, checkpoint, size = _load_run(run_dir, split)
    if dataset.boxes is None:
        raise ValueError(f"the run's dataset {dataset.name!r} has no bounding boxes: localization needs one that has "
                         "(cub200); `regtune cam RUN --images ...` still draws the CAMs")
    items = range(len(dataset)) if limit is None else range(min(limit, len(dataset)))
    result = evaluate_localization(model, dataset, size, items, source=source, threshold=threshold,
                                   progress=progress)
    result.update({"run_dir": str(run.path), "checkpoint": checkpoint, "split": split,
                   "seconds": round(time.perf_counter() - started, 2)})
    atomic_write_json(run.localization_json(source), result)
    return result


def _display(score: np.ndarray | None, size: int) -> np.ndarray | None:
    return None if score is None else normalize_cam(score, (size, size))


_Entry = tuple[str, Image.Image, "np.ndarray | None", "int | None"]  # name, picture, boxes in the frame, target


def _overlay_entries(dataset: ImageDataset, images: Sequence[str | Path], indices: Sequence[int], split: str,
                     size: int, per_figure: int) -> list[_Entry]:
    """The pictures to draw: image files (no box, no target), then items of ``split`` with their scaled boxes."""
    entries: list[_Entry] = []
    for path in images:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            with Image.open(path) as picture:
                entries.append((path.name, picture.convert("RGB"), None, None))
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
    if not images and not indices:
        indices = range(min(per_figure, len(dataset)))
    for i in indices:
        if not 0 <= int(i) < len(dataset):
            raise ValueError(f"index {i} is outside the {split} split (0..{len(dataset) - 1})")
        picture, target = dataset[int(i)]
        boxes = None if dataset.boxes is None else np.array(
            [resize_box(b, picture.size, (size, size)) for b in dataset.boxes[int(i)]])
        entries.append((f"{split}[{i}] {dataset.ids[int(i)]}", picture, boxes, int(target)))
    return entries


def _draw_row(axes: Any, entry: _Entry, maps: dict[str, Any], row: int, predicted: str, classes: Sequence[str],
              source: str, threshold: float, size: int) -> None:
    """One row of an overlay figure: image, map, CAM+, |CAM-|, and the map's box with the true boxes."""
    from matplotlib.patches import Rectangle

    name, picture, boxes, target = entry
    shown = np.asarray(picture.convert("RGB").resize((size, size), Image.BICUBIC))
    score = _display(maps["map"][row], size)
    panels = [("image", None), (f"{source} (pred {predicted[:18]})",
                                _display(maps["cam"][row], size) if maps["cam"] is not None else score),
              ("CAM+", _display(maps["positive"][row], size) if maps["positive"] is not None else None),
              ("|CAM-|", _display(-maps["negative"][row], size) if maps["negative"] is not None else None),
              (f"box at tau={threshold}", None)]
    raw = maps["map"][row]
    constant = not np.isfinite(raw).all() or float(np.ptp(raw)) <= 0
    if constant:  # e.g. a 1x1 feature map: no location information at all
        panels[1] = (panels[1][0] + " - constant", panels[1][1])
    for column, (title, heat) in enumerate(panels):
        ax = axes[row, column]
        ax.imshow(shown)
        if heat is not None:
            ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        elif column in (2, 3):
            ax.text(0.5, 0.5, "no sign split\nfor " + source, ha="center", va="center",
                    transform=ax.transAxes, color="white", backgroundcolor="black")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title if column else name[:34], fontsize=8)
    ax = axes[row, 4]
    predicted_box = boxes_from_cam(score, threshold)[0]
    x0, y0, x1, y1 = (int(v) for v in predicted_box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0 + 1, y1 - y0 + 1, fill=False, color="red", linewidth=2))
    label = "red: CAM box" + (" (none: constant map)" if constant else "")
    if boxes is not None:
        for gx0, gy0, gx1, gy1 in boxes:
            ax.add_patch(Rectangle((gx0, gy0), gx1 - gx0 + 1, gy1 - gy0 + 1, fill=False, color="lime",
                                   linewidth=2))
        iou = float(box_iou(predicted_box[None], boxes).max())
        label += f", green: truth, IoU {iou:.2f}"
    if target is not None:
        label += f"\ntrue {classes[target][:22]}"
    ax.set_xlabel(label, fontsize=7)


def write_cam_overlays(run_dir: str | Path, images: Sequence[str | Path] = (), indices: Sequence[int] = (),
                       split: str = "test", out: str | Path | None = None, source: str = "cam",
                       threshold: float = 0.2, per_figure: int = 6) -> list[Path]:
    """Figures with, per image: the image, the CAM, CAM⁺, |CAM⁻| and the box the CAM gives at ``threshold``.

    Args:
        images: Image files (any photo; no ground-truth box).
        indices: Items of the run's dataset ``split`` (their ground-truth boxes are drawn when the dataset has
            boxes). With neither, the first ``per_figure`` items of the split.
        out: Folder of the PNGs (default ``<run>/cams``).
        source: Map that gives the box (see `SOURCES`); grad-cam sources have no sign split.
        threshold: tau of the drawn box (largest contour).
        per_figure: Images per PNG.

    Returns:
        The written PNG paths (``cams_000.png``, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, dataset, model, _, size = _load_run(run_dir, split)
    transform = localization_transform(model, size)
    preprocessing = run_preprocessing(model, run.config())
    _, evaluate = build_transforms(preprocessing)  # the frame the run was tested in: its predictions
    entries = _overlay_entries(dataset, images, indices, split, size, per_figure)
    out = Path(out) if out is not None else run.path / "cams"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for figure_index, start in enumerate(range(0, len(entries), per_figure)):
        chunk = entries[start:start + per_figure]
        batch = torch.stack([transform(picture) for _, picture, _, _ in chunk])
        predicted = _predict(model, torch.stack([evaluate(picture) for _, picture, _, _ in chunk]))
        maps = cam_maps(model, batch, predicted, source)  # the predicted class's map, in the localization frame
        figure, axes = plt.subplots(len(chunk), 5, figsize=(12.5, 3.0 * len(chunk)), squeeze=False)
        for row, entry in enumerate(chunk):
            _draw_row(axes, entry, maps, row, dataset.classes[int(predicted[row])], dataset.classes, source,
                      threshold, size)
        figure.suptitle(f"pred: the run's prediction (evaluation frame: {preprocessing['crop_mode']}, as tested); "
                        f"maps and boxes: the whole image squashed to {size}x{size} (the localization frame)",
                        fontsize=8)
        figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure.get_figheight()))  # 0.35 in above for the note
        path = out / f"cams_{figure_index:03d}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
