"""Confusion matrix cells of the hand-made cases; rows and columns add up to boxes and kept detections."""

from __future__ import annotations

import numpy as np
import pytest

from fcos_lightning.analysis.boxset import BoxSet
from fcos_lightning.analysis.confusion import confusion_matrix
from fcos_lightning.analysis.matching import match_detections, overlaps
from tests.analysis.conftest import TINY_CLASSES

# rows: true cat, dog, background; columns: predicted cat, dog, background (missed)
CASES = {
    "perfect": [[2, 0, 0], [0, 1, 0], [0, 0, 0]],
    "missed": [[1, 0, 1], [0, 1, 0], [0, 0, 0]],  # C: a cat nobody found
    "wrong_class": [[2, 0, 0], [1, 0, 0], [0, 0, 0]],  # B: a dog found as a cat
    "duplicate": [[2, 0, 0], [0, 1, 0], [1, 0, 0]],  # the second cat on A: a cat on background
}


@pytest.mark.parametrize(("case", "expected"), CASES.items())
def test_cells(analysis_of, case, expected):
    confusion = analysis_of(case, confusion_score=0.5).confusion
    assert confusion.matrix.tolist() == expected
    assert (confusion.iou_threshold, confusion.score_threshold) == (0.5, 0.5)


def test_score_threshold_drops_detections(analysis_of):
    # at 0.8 only A (0.9055) and B (0.8055) are kept: C becomes missed
    assert analysis_of("perfect", confusion_score=0.8).confusion.matrix.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_default_score_threshold_is_the_best_f1(analysis_of):
    analysis = analysis_of("duplicate")
    assert analysis.confusion.score_threshold == pytest.approx(analysis.best_score_threshold) == 0.352


def test_own_class_first_then_any_class(tiny_case):
    # a dog detection overlapping both the dog B (IoU 0.6) and, more, a cat box D (IoU 0.9): it counts for B
    gt, results, image_ids = tiny_case(
        "perfect", extra_gt=[(2, 2, [40, 40, 10, 10], 0)], extra_dets=[(2, 7, [40, 40, 10, 9], 0.99)]
    )
    boxes = BoxSet.from_coco(gt, results, image_ids, TINY_CLASSES)
    matrix = confusion_matrix(boxes, overlaps(boxes), 0.5, 0.5).matrix
    # image 2 has no dog: the dog detection on the cat D (IoU 0.9) is a cat found as a dog
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_crowd_region_of_its_class_is_not_a_false_positive(analysis_of):
    crowd = (2, 2, [50, 50, 40, 40], 1)
    inside = analysis_of("perfect", extra_gt=[crowd], extra_dets=[(2, 2, [55, 55, 10, 10], 0.95)], confusion_score=0.5)
    assert inside.confusion.matrix.tolist() == CASES["perfect"]


def test_rows_and_columns_add_up(generated_coco):
    gt, results, image_ids, category_map = generated_coco
    boxes = BoxSet.from_coco(gt, results, image_ids, category_map)
    pairs = overlaps(boxes)
    m = confusion_matrix(boxes, pairs, 0.5, 0.3).matrix
    c = category_map.num_classes
    np.testing.assert_array_equal(m[:c].sum(1), boxes.num_gt_per_class())
    kept = boxes.dt_scores >= 0.3
    ignored = match_detections(boxes, pairs, 0.5, dt_mask=kept).dt_ignored  # inside crowd regions of their class
    assert ignored.any()
    np.testing.assert_array_equal(m[:, :c].sum(0), np.bincount(boxes.dt_labels[kept & ~ignored], minlength=c))
    assert m[:c, :c].trace() > m[:c, :c].sum() - m[:c, :c].trace() > 0  # mostly right, some confusion
