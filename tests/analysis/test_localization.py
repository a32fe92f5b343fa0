"""Localization metrics with the reference evaluator's conventions: box at tau, inclusive-pixel IoU, BoxAcc."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from regtune.analysis.localization import (
    box_accuracy,
    box_iou,
    boxes_from_cam,
    localization_accuracy,
    max_box_acc,
    max_box_acc_v2,
    normalize_cam,
)


def test_box_iou_inclusive_pixels_hand_values() -> None:
    # (0,0)-(1,1) and (1,1)-(2,2): 4 pixels each, 1 shared -> 1 / (4 + 4 - 1)
    assert box_iou([[0, 0, 1, 1]], [[1, 1, 2, 2]])[0, 0] == pytest.approx(1 / 7)
    assert box_iou([[3, 4, 10, 12]], [[3, 4, 10, 12]])[0, 0] == 1.0
    assert box_iou([[0, 0, 1, 1]], [[2, 2, 3, 3]])[0, 0] == 0.0
    # a single pixel box has area 1, not 0
    assert box_iou([[5, 5, 5, 5]], [[5, 5, 6, 5]])[0, 0] == pytest.approx(1 / 2)
    assert box_iou(np.zeros((2, 4)), np.zeros((3, 4))).shape == (2, 3)


def test_normalize_cam_bicubic_min_max_and_constant() -> None:
    cam = np.array([[0.0, 1.0], [2.0, 4.0]], dtype=np.float32)
    out = normalize_cam(cam, (8, 6))
    expected = cv2.resize(cam, (6, 8), interpolation=cv2.INTER_CUBIC)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.shape == (8, 6) and out.min() == 0.0 and out.max() == 1.0
    assert not normalize_cam(np.full((3, 3), 7.0), (5, 5)).any()
    assert not normalize_cam(np.full((3, 3), np.nan), (5, 5)).any()


def _box_cam(shape=(32, 40), box=(5, 8, 20, 25)) -> np.ndarray:
    cam = np.zeros(shape, dtype=np.float32)
    x0, y0, x1, y1 = box
    cam[y0:y1 + 1, x0:x1 + 1] = 1.0
    return cam


def test_boxes_from_cam_bounding_rect_convention() -> None:
    boxes = boxes_from_cam(_box_cam(), 0.5)
    # cv2.boundingRect gives width 16 for columns 5..20; the reference's x1 = x0 + w (then clipped)
    assert boxes.tolist() == [[5, 8, 21, 26]]
    assert boxes_from_cam(np.zeros((4, 4), dtype=np.float32), 0.2).tolist() == [[0, 0, 0, 0]]
    edge = boxes_from_cam(_box_cam(box=(30, 20, 39, 31)), 0.5)
    assert edge.tolist() == [[30, 20, 39, 31]]  # clipped to width - 1, height - 1


def test_max_box_acc_is_one_for_a_cam_equal_to_the_box() -> None:
    gt = [np.array([[5, 8, 20, 25]])]
    result = box_accuracy([_box_cam()], gt, interval=0.05, iou_thresholds=(0.3, 0.5, 0.7))
    assert (result.accuracy == 1.0).all()  # every tau in [0, 1), every delta
    assert max_box_acc([_box_cam()], gt) == 1.0 and max_box_acc_v2([_box_cam()], gt) == 1.0


def test_v2_counts_any_contour_v1_only_the_largest() -> None:
    cam = _box_cam(shape=(40, 40), box=(2, 2, 20, 20))  # a large distractor
    cam[30:36, 30:36] = 0.8  # the object: a smaller, weaker blob apart from it
    gt = [np.array([[30, 30, 35, 35]])]
    # the largest contour is the distractor at every tau where the object is present, and alone above 0.8
    assert max_box_acc([cam], gt) == 0.0
    # with every contour's box the object is found (IoU 36 / 49 = 0.73 >= 0.7 with the reference's box convention)
    assert max_box_acc_v2([cam], gt) == 1.0


def test_localization_accuracy_hand_case() -> None:
    hit, miss = _box_cam(box=(5, 8, 20, 25)), _box_cam(box=(25, 0, 39, 6))
    gt = [np.array([[5, 8, 20, 25]])] * 3
    result = localization_accuracy([hit, hit, miss], [hit, miss, miss], [True, True, True], gt)
    assert result["gt_known_loc"] == pytest.approx(2 / 3) and result["top1_loc"] == pytest.approx(1 / 3)
    wrong_class = localization_accuracy([hit], [hit], [False], gt[:1])
    assert wrong_class["gt_known_loc"] == 1.0 and wrong_class["top1_loc"] == 0.0
