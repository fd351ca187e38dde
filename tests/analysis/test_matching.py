"""The vectorized greedy matching is COCOeval's: same AP at every IoU threshold, same pairs as a plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from fcos_lightning.analysis import matching
from fcos_lightning.analysis.boxset import BoxSet
from fcos_lightning.analysis.curves import average_precision
from fcos_lightning.analysis.matching import box_iou, greedy_match, match_detections, overlaps
from fcos_lightning.analysis.scoring import score
from tests.analysis.conftest import TINY_CLASSES


def test_ap_from_our_matching_equals_cocoeval_at_every_iou(generated_coco):
    gt, results, image_ids, category_map = generated_coco
    coco = score(gt, results, image_ids, category_map, backend="faster")
    boxes = BoxSet.from_coco(gt, results, image_ids, category_map)
    pairs = overlaps(boxes)
    for t, iou in enumerate(coco.iou_thresholds):
        m = match_detections(boxes, pairs, float(iou))
        kept = ~m.dt_ignored
        ap = average_precision(boxes.dt_labels[kept], m.true_positive[kept], boxes.num_gt_per_class())
        np.testing.assert_allclose(ap, coco.precision[t].mean(0) * 100, atol=1e-9, err_msg=f"IoU {iou}")
    assert m.dt_ignored.any(), "crowd regions ignore some detections"


def _sequential_greedy(pair_dt, pair_gt, pair_iou, num_dt, num_gt):
    """COCOeval's loop: detections in rank order each take the free candidate of highest IoU (ties: later box)."""
    iou = np.full((num_dt, num_gt), -1.0)
    iou[pair_dt, pair_gt] = pair_iou
    taken = np.zeros(num_gt, dtype=bool)
    match = np.full(num_dt, -1)
    for d in range(num_dt):
        best, m = -1.0, -1
        for g in range(num_gt):
            if iou[d, g] >= 0 and not taken[g] and iou[d, g] >= best:
                best, m = iou[d, g], g
        if m >= 0:
            taken[m] = True
            match[d] = m
    return match


@pytest.mark.parametrize("seed", range(5))
def test_greedy_match_equals_the_sequential_loop(seed):
    rng = np.random.default_rng(seed)
    num_dt, num_gt = 60, 25
    dense = rng.uniform(size=(num_dt, num_gt)) < 0.3  # many detections compete for the same boxes
    pair_dt, pair_gt = np.nonzero(dense)
    pair_iou = rng.choice([0.5, 0.6, 0.7, 0.8, 0.9], size=len(pair_dt))  # ties included
    expected = _sequential_greedy(pair_dt, pair_gt, pair_iou, num_dt, num_gt)
    np.testing.assert_array_equal(greedy_match(pair_dt, pair_gt, pair_iou, num_dt, num_gt), expected)


def test_equal_iou_goes_to_the_later_box_and_a_taken_box_to_the_better_detection():
    # detection 0 and 1 both overlap boxes 0 and 1 with IoU 0.7; detection 0 ranks first
    pair_dt, pair_gt, pair_iou = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.full(4, 0.7)
    np.testing.assert_array_equal(greedy_match(pair_dt, pair_gt, pair_iou, 2, 2), [1, 0])
    # detection 1 prefers box 0, which detection 0 (ranked first, its only candidate) holds
    pair_dt, pair_gt, pair_iou = np.array([0, 1, 1]), np.array([0, 0, 1]), np.array([0.6, 0.9, 0.55])
    np.testing.assert_array_equal(greedy_match(pair_dt, pair_gt, pair_iou, 2, 2), [0, 1])


def test_box_iou_and_crowd_overlap():
    dt = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    gt = np.array([[5, 0, 15, 10], [0, 0, 100, 100], [20, 20, 30, 30]], dtype=float)
    crowd = np.array([False, True, False])
    # 50 / (100 + 100 - 50); inside a crowd region: intersection over the detection's area; disjoint
    np.testing.assert_allclose(box_iou(dt, gt, crowd), [1 / 3, 1.0, 0.0])


def test_detection_in_a_crowd_region_of_its_class_is_ignored(tiny_case):
    crowd = (2, 2, [50, 50, 40, 40], 1)  # a cat crowd region in image 2
    gt, results, image_ids = tiny_case("perfect", extra_gt=[crowd], extra_dets=[(2, 2, [55, 55, 10, 10], 0.95)])
    boxes = BoxSet.from_coco(gt, results, image_ids, TINY_CLASSES)
    m = match_detections(boxes, overlaps(boxes), 0.5)
    assert boxes.dt_scores[0] == 0.95 and m.dt_ignored.tolist() == [True, False, False, False]
    assert m.true_positive.tolist() == [False, True, True, True]
    # the same detection as a dog is not inside a region of its class: a false positive
    gt, results, image_ids = tiny_case("perfect", extra_gt=[crowd], extra_dets=[(2, 7, [55, 55, 10, 10], 0.95)])
    boxes = BoxSet.from_coco(gt, results, image_ids, TINY_CLASSES)
    m = match_detections(boxes, overlaps(boxes), 0.5)
    assert m.false_positive.tolist() == [True, False, False, False]


def test_overlaps_do_not_depend_on_the_chunk_size(generated_coco, monkeypatch):
    gt, results, image_ids, category_map = generated_coco
    boxes = BoxSet.from_coco(gt, results, image_ids, category_map)
    whole = overlaps(boxes)
    monkeypatch.setattr(matching, "_MAX_PAIRS_PER_CHUNK", 500)
    chunked = overlaps(boxes)
    key = lambda p: np.lexsort((p.gt, p.dt))  # noqa: E731
    for name in ("dt", "gt", "iou", "crowd", "same_class"):
        np.testing.assert_array_equal(getattr(whole, name)[key(whole)], getattr(chunked, name)[key(chunked)])


def test_boxset_keeps_cocoevals_detections_and_order(tiny_case):
    gt, results, image_ids = tiny_case("perfect")
    many = results + [{"image_id": 1, "category_id": 7, "bbox": [60, 60, 5, 5], "score": 0.01}] * 3
    boxes = BoxSet.from_coco(gt, many, image_ids, TINY_CLASSES, max_dets=2)
    # dogs on image 1: the 0.8055 one and one of the three 0.01 ones (the max_dets=2 best)
    assert boxes.dt_scores.tolist() == [0.9055, 0.8055, 0.7055, 0.01]
    assert boxes.dt_boxes[0].tolist() == [0, 0, 10, 10]  # xywh -> xyxy
    with pytest.raises(ValueError, match=r"results: category_id 5 is not one of \[2, 7\]"):
        BoxSet.from_coco(gt, [{**results[0], "category_id": 5}], image_ids, TINY_CLASSES)
    with pytest.raises(ValueError, match=r"results for image ids \[2\] that are not evaluated"):
        BoxSet.from_coco(gt, results, [1], TINY_CLASSES)
