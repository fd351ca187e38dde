"""Precision-recall and F1 curves of the hand-made cases, point by point."""

from __future__ import annotations

import numpy as np
import pytest

from fcos_lightning.analysis.curves import SCORE_THRESHOLDS, f1_curves, middle_of_first_max

# Precision at the 101 recall thresholds 0.00..1.00 (COCOeval: the best precision at any recall >= r).
ONES = np.ones(101)
# Cat with ground truth A and C, one of them found first: precision 1 up to recall 0.50 (51 thresholds) ...
HALF_THEN_ZERO = np.r_[np.ones(51), np.zeros(50)]  # ... and C never found
# ... ranked true, false, true: precision 1, 1/2, 2/3 at recall 0.5, 0.5, 1 -> 2/3 for recall above 0.5
HALF_THEN_TWO_THIRDS = np.r_[np.ones(51), np.full(50, 2 / 3)]


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
@pytest.mark.parametrize(
    ("case", "cat", "dog"),
    [
        ("perfect", ONES, ONES),
        ("missed", HALF_THEN_ZERO, ONES),
        ("wrong_class", HALF_THEN_TWO_THIRDS, np.zeros(101)),  # the dog B is found only as a cat
        ("duplicate", HALF_THEN_TWO_THIRDS, ONES),  # the second cat on A is false at every IoU
    ],
)
def test_precision_recall_curves(analysis_of, backend, case, cat, dog):
    pr = analysis_of(case, backend=backend).pr
    np.testing.assert_allclose(pr.recall, np.linspace(0, 1, 101))
    # boxes are exact, so every IoU threshold gives the IoU 0.5 curve
    for curves in (pr.precision50, pr.precision):
        np.testing.assert_allclose(curves, np.stack([cat, dog]), atol=1e-12)
    np.testing.assert_allclose(pr.ap50, [cat.mean() * 100, dog.mean() * 100])
    np.testing.assert_allclose(pr.mean_curves()[0], (cat + dog) / 2, atol=1e-12)


def _piecewise(*pieces):
    """F1 on the 1001 thresholds from ``(last index, value)`` pieces; 0 after the last piece."""
    out, start = np.zeros(1001), 0
    for last, value in pieces:
        out[start : last + 1] = value
        start = last + 1
    return out


# Cat detections score 0.9055 (A), 0.8055 (the wrong-class one, on B), 0.8555 (the duplicate), 0.7055 (C); the dog
# 0.8055. Threshold index i keeps the detections scoring >= i / 1000.
@pytest.mark.parametrize(
    ("case", "cat", "dog", "best"),
    [
        # all kept up to 0.705: F1 1; then only A of 2 cats: P 1, R 1/2, F1 2/3. Dog: 1 up to 0.805.
        # Mean F1 is 1 on thresholds 0.000..0.705: the middle, 0.352.
        ("perfect", _piecewise((705, 1.0), (905, 2 / 3)), _piecewise((805, 1.0)), 0.352),
        # cat: only A found, P 1, R 1/2 -> 2/3 while kept; the mean is 5/6 on 0.000..0.805 -> 0.402
        ("missed", _piecewise((905, 2 / 3)), _piecewise((805, 1.0)), 0.402),
        # cat: 3 kept, 2 true: P 2/3 R 1 -> 0.8; 2 kept, 1 true: 0.5; A alone: 2/3. The dog is never found.
        ("wrong_class", _piecewise((705, 0.8), (805, 0.5), (905, 2 / 3)), np.zeros(1001), 0.352),
        ("duplicate", _piecewise((705, 0.8), (855, 0.5), (905, 2 / 3)), _piecewise((805, 1.0)), 0.352),
    ],
)
def test_f1_curves_and_best_threshold(analysis_of, case, cat, dog, best):
    analysis = analysis_of(case)
    f1 = analysis.f1
    np.testing.assert_allclose(f1.thresholds, SCORE_THRESHOLDS)
    np.testing.assert_allclose(f1.f1, np.stack([cat, dog]), atol=1e-12)
    assert f1.best_threshold() == pytest.approx(best) == analysis.best_score_threshold


def test_best_threshold_per_class_and_precision_recall_behind_f1(analysis_of):
    f1 = analysis_of("wrong_class").f1
    # cat: the first maximum (0.8 on 0.000..0.705), middle index 352; the dog has ground truth but F1 0 throughout
    assert f1.best_per_class().tolist() == [352, 500]
    np.testing.assert_allclose(f1.precision[0, [705, 706, 805, 806, 905, 906]], [2 / 3, 1 / 2, 1 / 2, 1, 1, 0])
    np.testing.assert_allclose(f1.recall[0, [705, 706, 805, 806, 905, 906]], [1, 1 / 2, 1 / 2, 1 / 2, 1 / 2, 0])


def test_class_without_ground_truth_has_no_f1():
    # class 1 has detections but no ground truth: NaN, left out of the mean
    curves = f1_curves(np.array([0, 1]), np.array([0.9, 0.8]), np.array([True, False]), np.array([1, 0]))
    assert np.isnan(curves.f1[1]).all() and curves.best_per_class()[1] == -1
    np.testing.assert_allclose(curves.mean_f1(), curves.f1[0])


def test_middle_of_first_max():
    values = np.array([[0, 1, 1, 1, 0, 1], [2, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 3]], dtype=float)
    assert middle_of_first_max(values).tolist() == [2, 0, 5]
