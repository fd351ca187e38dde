"""The analysis as JSON for metrics.json: plain types, the hand-made numbers, null for classes without boxes."""

from __future__ import annotations

import json

import pytest

from fcos_lightning.analysis.report import analyze
from fcos_lightning.analysis.scoring import score
from tests.analysis.conftest import PERFECT, TINY_CLASSES, TINY_GT, build_coco


def test_json_of_the_missed_case(analysis_of):
    d = json.loads(json.dumps(analysis_of("missed").to_dict(), allow_nan=False))
    assert d["coco"]["AP50"] == pytest.approx((51 / 101 * 100 + 100) / 2, abs=1e-6)
    assert len(d["precision_recall"]["recall"]) == 101 and d["precision_recall"]["iou_0.50"]["cat"][50:52] == [1, 0]
    assert len(d["f1"]["thresholds"]) == 101 and d["f1"]["thresholds"][-1] == 1.0
    assert d["f1"]["best_threshold"] == 0.402 and d["f1"]["best_mean_f1"] == pytest.approx(5 / 6, abs=1e-6)
    assert d["f1"]["best_per_class"]["dog"] == {"threshold": 0.402, "f1": 1.0, "precision": 1.0, "recall": 1.0}
    assert d["f1"]["best_per_class"]["cat"]["recall"] == 0.5
    assert d["confusion_matrix"]["labels"] == ["cat", "dog", "background"]
    assert d["confusion_matrix"]["matrix"] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert d["confusion_matrix"]["score_threshold"] == 0.402
    assert d["error_breakdown"]["counts"]["missed"] == 1
    assert d["error_breakdown"]["delta_ap"]["missed"] == pytest.approx(100 - d["coco"]["AP50"], abs=1e-5)


def test_class_without_ground_truth_is_null():
    gt, results, image_ids = build_coco(TINY_GT, [PERFECT[2]], image_ids=(2,))  # image 2 has only the cat C
    d = analyze(gt, results, image_ids, TINY_CLASSES, score(gt, results, image_ids, TINY_CLASSES)).to_dict()
    text = json.dumps(d, allow_nan=False)
    assert "NaN" not in text
    assert d["precision_recall"]["iou_0.50"]["dog"] == [None] * 101
    assert d["f1"]["best_per_class"]["dog"] == {"threshold": None, "f1": None, "precision": None, "recall": None}
    assert d["precision_recall"]["iou_0.50"]["mean"] == d["precision_recall"]["iou_0.50"]["cat"]


def test_generated_set_round_trips(generated_coco):
    gt, results, image_ids, category_map = generated_coco
    analysis = analyze(gt, results, image_ids, category_map, score(gt, results, image_ids, category_map))
    d = json.loads(json.dumps(analysis.to_dict(), allow_nan=False))
    assert set(d) == {"coco", "precision_recall", "f1", "confusion_matrix", "error_breakdown"}
    assert d["f1"]["best_threshold"] == pytest.approx(analysis.best_score_threshold)
    assert d["error_breakdown"]["ap50"] == pytest.approx(d["coco"]["AP50"], abs=1e-5)  # same matching, same AP


def test_score_thresholds_for_predict(analysis_of):
    analysis = analysis_of("missed")
    best = analysis.to_dict()["f1"]["best_per_class"]
    thresholds = analysis.score_thresholds()
    assert thresholds == {"global": 0.402, "per_class": [best["cat"]["threshold"], 0.402], "iou": 0.5}
    assert 0 < thresholds["per_class"][0] <= 1
    # a class without ground truth has no threshold of its own: predict.py uses the global one for it
    gt, results, image_ids = build_coco(TINY_GT, [PERFECT[2]], image_ids=(2,))
    alone = analyze(gt, results, image_ids, TINY_CLASSES, score(gt, results, image_ids, TINY_CLASSES))
    assert alone.score_thresholds()["per_class"][1] is None and alone.score_thresholds()["per_class"][0] is not None
