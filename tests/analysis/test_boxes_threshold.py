"""A box whose IoU equals delta exactly is a hit (IoU >= delta), as in the reference evaluator.

``clovaai/wsolevaluation`` (``evaluation.py``, ``BoxEvaluator.accumulate``) counts an image as correct where
``multiple_iou.max(1) >= _IOU_THRESHOLD``. The boxes here have integer areas whose ratio is exactly 0.3, 0.5 or 0.7
in float64 (``30 / 100 == 0.3``), so the comparison at the threshold itself decides the result.
"""

from __future__ import annotations

import numpy as np
import pytest

from regtune.analysis.localization import (
    box_accuracy,
    box_iou,
    boxes_from_cam,
    localization_accuracy,
    max_box_acc,
    max_box_acc_v2,
)

SHAPE = (16, 16)


def _block_cam() -> np.ndarray:
    """1 on rows and columns 0..8, 0 elsewhere: at every tau in [0, 1) its one contour's box is (0, 0, 9, 9).

    cv2.boundingRect gives width and height 9, and the reference's box is ``(x, y, x + w, y + h)``: 10 x 10 = 100
    inclusive pixels.
    """
    cam = np.zeros(SHAPE, dtype=np.float32)
    cam[0:9, 0:9] = 1.0
    return cam


def _gt_rows(rows: int) -> np.ndarray:
    """Ground truth inside the predicted box: columns 0..9, ``rows`` rows; IoU = 10 rows / 100 = rows / 10."""
    return np.array([[0, 0, 9, rows - 1]])


def test_fixture_boxes_have_iou_exactly_at_the_thresholds() -> None:
    assert boxes_from_cam(_block_cam(), 0.0).tolist() == [[0, 0, 9, 9]]
    assert boxes_from_cam(_block_cam(), 0.99).tolist() == [[0, 0, 9, 9]]
    # intersection = ground truth (10 x rows pixels), union = predicted box (100 pixels)
    assert box_iou([[0, 0, 9, 9]], _gt_rows(3))[0, 0] == 0.3
    assert box_iou([[0, 0, 9, 9]], _gt_rows(5))[0, 0] == 0.5
    assert box_iou([[0, 0, 9, 9]], _gt_rows(7))[0, 0] == 0.7


def test_max_box_acc_counts_iou_equal_to_delta_as_a_hit() -> None:
    assert max_box_acc([_block_cam()], [_gt_rows(5)], delta=0.5) == 1.0
    # one row less: IoU 40 / 100 = 0.4 < 0.5, a miss at every tau
    assert max_box_acc([_block_cam()], [_gt_rows(4)], delta=0.5) == 0.0
    # the whole tau grid hits, not only its best point
    result = box_accuracy([_block_cam()], [_gt_rows(5)], interval=0.1, iou_thresholds=(0.5,))
    assert result.accuracy.tolist() == [[1.0]] * 10


def test_max_box_acc_v2_counts_iou_equal_to_each_delta_as_a_hit() -> None:
    cams = [_block_cam()] * 3
    gts = [_gt_rows(3), _gt_rows(5), _gt_rows(7)]  # IoU 0.3, 0.5, 0.7
    # delta 0.3: all three hit (3/3); delta 0.5: IoU 0.5 and 0.7 (2/3); delta 0.7: IoU 0.7 only (1/3)
    # MaxBoxAccV2 = (1 + 2/3 + 1/3) / 3 = 2/3 (with a strict '>' it would be (2/3 + 1/3 + 0) / 3 = 1/3)
    result = box_accuracy(cams, gts, interval=0.1, iou_thresholds=(0.3, 0.5, 0.7), all_contours=True)
    np.testing.assert_allclose(result.accuracy.max(axis=0), [1.0, 2 / 3, 1 / 3])
    assert max_box_acc_v2(cams, gts) == pytest.approx(2 / 3)


def test_gt_known_and_top1_loc_count_iou_equal_to_delta_as_a_hit() -> None:
    cam = _block_cam()
    gts = [_gt_rows(5), _gt_rows(5), _gt_rows(4)]  # IoU 0.5, 0.5, 0.4
    result = localization_accuracy([cam] * 3, [cam] * 3, [True, False, True], gts, threshold=0.2, delta=0.5)
    # GT-known: images 1 and 2 (IoU 0.5 >= 0.5) -> 2/3; Top-1: image 1 only (image 2 misclassified) -> 1/3
    assert result["gt_known_loc"] == pytest.approx(2 / 3)
    assert result["top1_loc"] == pytest.approx(1 / 3)
