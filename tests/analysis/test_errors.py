"""TIDE error counts and dAP of the hand-made cases."""

from __future__ import annotations

import pytest

from fcos_lightning.analysis.boxset import BoxSet
from fcos_lightning.analysis.errors import ERROR_TYPES, error_breakdown
from fcos_lightning.analysis.matching import match_detections, overlaps
from tests.analysis.conftest import PERFECT, TINY_CLASSES, TINY_GT, build_coco

# AP50 of the cat when A is found first and C after one false positive: precision 1 on the 51 recall thresholds up
# to 0.50, 2/3 on the 50 above (see test_curves.py); when C is never found: 1 on 51, 0 on 50.
CAT_TRUE_FALSE_TRUE = (51 + 50 * 2 / 3) / 101 * 100  # 83.498...
CAT_HALF = 51 / 101 * 100  # 50.495...
WRONG_CLASS_AP50 = CAT_TRUE_FALSE_TRUE / 2  # the dog B is never found as a dog: AP 0
DUPLICATE_AP50 = (CAT_TRUE_FALSE_TRUE + 100) / 2


def _no_errors(**overrides):
    return {**dict.fromkeys(ERROR_TYPES, 0), **overrides}


def _counts(errors, true_positive):
    assert errors.counts["true_positive"] == true_positive
    return {k: errors.counts[k] for k in ERROR_TYPES}


@pytest.mark.parametrize(
    ("case", "ap50", "counts", "delta"),
    [
        ("perfect", 100.0, _no_errors(), {}),
        # missed C: fixing it leaves the cat one box, found: AP 100 for both classes
        ("missed", (CAT_HALF + 100) / 2, _no_errors(missed=1), {"missed": 100 - (CAT_HALF + 100) / 2}),
        # the cat on B overlaps the dog B (IoU 1): a classification error; fixed, it is B's true positive and both
        # classes reach AP 100. B counts as found by that error, so it is not missed.
        ("wrong_class", WRONG_CLASS_AP50, _no_errors(classification=1), {"classification": 100 - WRONG_CLASS_AP50}),
        # the second cat on A (IoU 0.82 with a matched box): a duplicate; dropping it gives AP 100
        ("duplicate", DUPLICATE_AP50, _no_errors(duplicate=1), {"duplicate": 100 - DUPLICATE_AP50}),
    ],
)  # fmt: skip
def test_counts_and_delta_ap(analysis_of, case, ap50, counts, delta):
    errors = analysis_of(case).errors
    assert errors.ap50 == pytest.approx(ap50)
    assert _counts(errors, 2 if case in ("missed", "wrong_class") else 3) == counts
    expected = dict.fromkeys(ERROR_TYPES, 0.0) | delta
    assert {k: errors.delta_ap[k] for k in ERROR_TYPES} == pytest.approx(expected)


@pytest.mark.parametrize(
    ("case", "false_positive", "false_negative"),
    [
        ("perfect", 0.0, 0.0),
        ("missed", 0.0, 100 - (CAT_HALF + 100) / 2),  # nothing to re-rank; C removed -> 100
        # false positive ranked last: cat 100, dog 0 -> 50. Unmatched boxes removed: the dog has none left, the
        # cat stays true, false, true -> its AP alone
        ("wrong_class", 50 - CAT_TRUE_FALSE_TRUE / 2, CAT_TRUE_FALSE_TRUE / 2),
        ("duplicate", 100 - (CAT_TRUE_FALSE_TRUE + 100) / 2, 0.0),
    ],
)
def test_special_errors(analysis_of, case, false_positive, false_negative):
    delta = analysis_of(case).errors.delta_ap
    assert delta["false_positive"] == pytest.approx(false_positive)
    assert delta["false_negative"] == pytest.approx(false_negative)


def _errors(gt_boxes, detections, image_ids=(1, 2)):
    gt, results, ids = build_coco(gt_boxes, detections, image_ids)
    boxes = BoxSet.from_coco(gt, results, ids, TINY_CLASSES)
    pairs = overlaps(boxes)
    return error_breakdown(boxes, pairs, match_detections(boxes, pairs, 0.5))


def test_every_false_positive_kind():
    extra = [
        (1, 2, [5, 0, 10, 10], 0.6),  # cat, IoU 1/3 with the cat A: localization
        (1, 7, [5, 0, 10, 10], 0.5),  # dog, IoU 1/3 with the cat A, none with a dog: both
        (1, 2, [60, 60, 10, 10], 0.4),  # cat overlapping nothing: background
        (3, 2, [0, 0, 10, 10], 0.3),  # on image 3, which has no boxes: background
    ]
    errors = _errors(TINY_GT, [*PERFECT, *extra], image_ids=(1, 2, 3))
    assert _counts(errors, 3) == _no_errors(localization=1, both=1, background=2)
    # A is matched, so fixing the localization error only drops it: the cat is found before any false positive,
    # nothing to gain; the dog's false positive ranks below its true one: nothing either
    assert errors.delta_ap["localization"] == errors.delta_ap["both"] == 0.0


def test_localization_error_on_a_missed_box_is_not_missed():
    # C not found, but a cat at IoU 100/400 = 0.25 with it: a localization error pointing at C
    errors = _errors(TINY_GT, [*PERFECT[:2], (2, 2, [0, 0, 10, 10], 0.6)])
    assert _counts(errors, 2) == _no_errors(localization=1)
    # fixed, it is C's true positive: AP 100; before, the cat's curve was 1 up to recall 0.5, then 0
    assert errors.delta_ap["localization"] == pytest.approx(100 - (CAT_HALF + 100) / 2)
    assert errors.delta_ap["missed"] == 0.0


def test_only_the_best_scored_error_per_box_is_fixed():
    # two localization errors on the missed C: fixing makes the 0.6 one true and drops the 0.5 one
    errors = _errors(TINY_GT, [*PERFECT[:2], (2, 2, [0, 0, 10, 10], 0.6), (2, 2, [10, 10, 10, 10], 0.5)])
    assert errors.counts["localization"] == 2
    assert errors.delta_ap["localization"] == pytest.approx(100 - (CAT_HALF + 100) / 2)
