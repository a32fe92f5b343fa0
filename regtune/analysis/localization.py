"""Localization from class activation maps, with the conventions of the reference evaluator.

Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020 (``clovaai/wsolevaluation``):
a CAM is upsampled bicubically to the image size and min-max normalised; at threshold tau the uint8 map is
binarised (strictly above ``int(tau * max)``), its contours give boxes (the largest contour for MaxBoxAcc, every
contour for MaxBoxAccV2), and a box is correct when its IoU with a ground-truth box, counted in inclusive pixels,
reaches delta. Boxes are ``(x0, y0, x1, y1)`` in pixels, both ends inclusive. The equations, and where regtune
departs from the reference: docs/methods/analysis-metrics.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "BoxAccuracy",
    "box_accuracy",
    "box_iou",
    "boxes_from_cam",
    "localization_accuracy",
    "max_box_acc",
    "max_box_acc_v2",
    "normalize_cam",
]


def normalize_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic upsampling to ``size = (height, width)``, then min-max to ``[0, 1]``; a constant or NaN map gives zeros.

    Same as the reference (``cv2.INTER_CUBIC``, then ``normalize_scoremap``), except that constancy is also checked
    before the resize, where the reference would normalise the resize's rounding noise.

    Args:
        cam: A class activation map at the feature-map resolution.
        size: ``(height, width)`` of the output, the image's size.

    Shape:
        cam: (h, w). Output: (height, width), float32.

    Raises:
        ValueError: ``cam`` is not 2-D.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"a CAM is a 2-D map, got shape {cam.shape}")
    height, width = size
    if not np.isfinite(cam).all() or float(np.max(cam)) - float(np.min(cam)) <= 0:
        # Checked before resizing too: bicubic interpolation of a constant map leaves float noise (~1e-7) that
        # min-max normalisation would blow up into a random 0/1 pattern.
        return np.zeros((height, width), dtype=np.float32)
    resized = cv2.resize(cam, (width, height), interpolation=cv2.INTER_CUBIC)
    low, high = float(np.min(resized)), float(np.max(resized))
    if not np.isfinite(low) or not np.isfinite(high) or high - low <= 0:
        return np.zeros((height, width), dtype=np.float32)
    return ((resized - low) / (high - low)).astype(np.float32)


def boxes_from_cam(cam: np.ndarray, threshold: float, all_contours: bool = False) -> np.ndarray:
    """Boxes of the regions of a normalised CAM above ``threshold`` (a fraction of its maximum).

    The map is quantised to uint8 (``int(255 * cam)``) and binarised strictly above ``int(threshold * max)``; the
    box of a contour is ``cv2.boundingRect``'s ``(x, y, w, h)`` as ``(x, y, x + w, y + h)``, one pixel past the
    region on the right and bottom as in the reference.

    Args:
        cam: (H, W) map in ``[0, 1]`` (see [`normalize_cam`][regtune.analysis.localization.normalize_cam]).
        threshold: tau in ``[0, 1)``.
        all_contours: One box per contour (MaxBoxAccV2) instead of the largest contour's box only (MaxBoxAcc).

    Returns:
        (K, 4) int boxes ``(x0, y0, x1, y1)``, right and bottom clipped to ``width - 1`` / ``height - 1``; one
        ``(0, 0, 0, 0)`` box when nothing is above the threshold.
    """
    height, width = cam.shape
    scaled = (np.asarray(cam) * 255).astype(np.uint8)  # truncation, as the reference
    _, binary = cv2.threshold(scaled, int(threshold * np.max(scaled)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return np.zeros((1, 4), dtype=np.int64)
    if not all_contours:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x0, y0, w, h = cv2.boundingRect(contour)
        boxes.append((x0, y0, min(x0 + w, width - 1), min(y0 + h, height - 1)))
    return np.asarray(boxes, dtype=np.int64)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every pair, with inclusive pixel boxes: area = (x1 - x0 + 1)(y1 - y0 + 1).

    Args:
        boxes_a: Boxes ``(x0, y0, x1, y1)``.
        boxes_b: Boxes ``(x0, y0, x1, y1)``.

    Shape:
        boxes_a: (N, 4). boxes_b: (M, 4). Output: (N, M).
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0 + 1, 0, None) * np.clip(y1 - y0 + 1, 0, None)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@dataclass(frozen=True)
class BoxAccuracy:
    """BoxAcc(tau, delta) over a set of images, and its maximum over tau per delta.

    Attributes:
        thresholds: The tau grid.
        iou_thresholds: The delta values.
        accuracy: BoxAcc as fractions, (len(tau), len(delta)).
        all_contours: Whether every contour's box counted (MaxBoxAccV2) or the largest contour's only.
    """

    thresholds: np.ndarray  # tau grid
    iou_thresholds: tuple[float, ...]  # delta values
    accuracy: np.ndarray  # (len(tau), len(delta)), fractions
    all_contours: bool

    def max_box_acc(self, delta: float = 0.5) -> float:
        """MaxBoxAcc(delta): the largest BoxAcc over the tau grid; ``delta`` must be one of ``iou_thresholds``."""
        return float(self.accuracy[:, self.iou_thresholds.index(delta)].max())

    def best_threshold(self, delta: float = 0.5) -> float:
        """The first tau of the grid at which BoxAcc(tau, delta) reaches MaxBoxAcc(delta)."""
        return float(self.thresholds[int(self.accuracy[:, self.iou_thresholds.index(delta)].argmax())])

    @property
    def mean_max(self) -> float:
        """Mean over delta of MaxBoxAcc(delta) (MaxBoxAccV2 with delta in {0.3, 0.5, 0.7} and all contours)."""
        return float(self.accuracy.max(axis=0).mean())


def box_accuracy(cams: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], interval: float = 0.01,
                 iou_thresholds: Sequence[float] = (0.5,), all_contours: bool = False) -> BoxAccuracy:
    """BoxAcc(tau, delta) = share of images whose best box matches a ground-truth box with IoU >= delta.

    Args:
        cams: Normalised CAMs (H, W) in ``[0, 1]``, each at its image's size.
        gt_boxes: Per image, the (G, 4) ground-truth boxes in the same pixel frame.
        interval: Step of the tau grid ``0, interval, ..., < 1`` (the reference: 0.01 standalone, 0.001 in training).
        iou_thresholds: delta values.
        all_contours: Every contour's box (V2) or the largest contour's only.

    Returns:
        The [`BoxAccuracy`][regtune.analysis.localization.BoxAccuracy] over the grid.

    Raises:
        ValueError: no CAM, or not one ground-truth box set per CAM.
    """
    if len(cams) != len(gt_boxes) or not cams:
        raise ValueError(f"need one ground-truth box set per CAM, got {len(cams)} CAMs and {len(gt_boxes)} sets")
    thresholds = np.arange(0.0, 1.0, interval)
    deltas = tuple(float(d) for d in iou_thresholds)
    hits = np.zeros((len(thresholds), len(deltas)))
    for cam, boxes in zip(cams, gt_boxes):
        for i, tau in enumerate(thresholds):
            best = box_iou(boxes_from_cam(cam, tau, all_contours), boxes).max()
            hits[i] += [best >= d for d in deltas]
    return BoxAccuracy(thresholds, deltas, hits / len(cams), all_contours)


def max_box_acc(cams: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], delta: float = 0.5,
                interval: float = 0.01) -> float:
    """MaxBoxAcc (CVPR 2020): max over tau of BoxAcc(tau, delta), largest-contour boxes."""
    return box_accuracy(cams, gt_boxes, interval, (delta,), all_contours=False).max_box_acc(delta)


def max_box_acc_v2(cams: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], interval: float = 0.01) -> float:
    """MaxBoxAccV2: mean over delta in {0.3, 0.5, 0.7} of the max over tau, boxes of all contours."""
    return box_accuracy(cams, gt_boxes, interval, (0.3, 0.5, 0.7), all_contours=True).mean_max


def localization_accuracy(gt_class_cams: Sequence[np.ndarray], predicted_class_cams: Sequence[np.ndarray],
                          correct: Sequence[bool], gt_boxes: Sequence[np.ndarray], threshold: float = 0.2,
                          delta: float = 0.5) -> dict[str, float]:
    """GT-known Loc and Top-1 Loc at a fixed threshold (tau = 0.2 of the max by default).

    GT-known Loc: the CAM of the true class gives a (largest-contour) box with IoU >= delta. Top-1 Loc: the image is
    classified correctly and the CAM of the predicted class localises it. The reference evaluator has neither (it
    reports MaxBoxAcc only); both use its binarisation and box rule. 0.2 of the maximum is the threshold commonly
    used since the CAM paper; papers do not always state theirs, hence a parameter.

    Args:
        gt_class_cams: Normalised CAMs of the true classes, one per image.
        predicted_class_cams: Normalised CAMs of the predicted classes.
        correct: Whether each image is classified correctly.
        gt_boxes: Per image, the (G, 4) ground-truth boxes.
        threshold: tau, a fraction of each map's maximum.
        delta: The IoU a box needs.

    Returns:
        ``{"gt_known_loc", "top1_loc", "threshold", "delta"}``.

    Raises:
        ValueError: the four sequences differ in length, or are empty.
    """
    n = len(gt_class_cams)
    if not n or not len(predicted_class_cams) == len(correct) == len(gt_boxes) == n:
        raise ValueError("need the same number of ground-truth CAMs, predicted-class CAMs, flags and box sets")
    gt_known = top1 = 0
    for cam_gt, cam_pred, ok, boxes in zip(gt_class_cams, predicted_class_cams, correct, gt_boxes):
        gt_known += box_iou(boxes_from_cam(cam_gt, threshold), boxes).max() >= delta
        top1 += bool(ok) and box_iou(boxes_from_cam(cam_pred, threshold), boxes).max() >= delta
    return {"gt_known_loc": gt_known / n, "top1_loc": top1 / n, "threshold": threshold, "delta": delta}
