"""Both COCO scorers give pycocotools' numbers; clear errors for bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fcos_lightning.analysis.scoring import STAT_NAMES, CocoScorer, score
from fcos_lightning.data.coco import CategoryMap
from tests.analysis.conftest import TINY_CLASSES


def test_generated_set_has_what_the_comparison_needs(generated_coco):
    gt, results, image_ids, category_map = generated_coco
    assert any(a["iscrowd"] for a in gt["annotations"])
    assert set(image_ids) - {a["image_id"] for a in gt["annotations"]}, "some images without boxes"
    assert list(category_map.cat_ids) != list(range(1, category_map.num_classes + 1))


def test_faster_and_pycocotools_agree(generated_coco):
    gt, results, image_ids, category_map = generated_coco
    faster = score(gt, results, image_ids, category_map, backend="faster")
    reference = score(gt, results, image_ids, category_map, backend="pycocotools")
    assert set(faster.metrics) == set(STAT_NAMES) | {f"AP/{n}" for n in category_map.names}
    for key, value in reference.metrics.items():
        assert faster.metrics[key] == pytest.approx(value, abs=1e-9), key
    np.testing.assert_allclose(faster.precision, reference.precision, atol=1e-9)
    assert 20 < faster.metrics["AP"] < 80  # a set where every stat means something, not all 0 or 100


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_subset_of_images_and_inputs_left_untouched(generated_coco, backend):
    gt, results, image_ids, category_map = generated_coco
    subset = image_ids[::2]
    chosen = [r for r in results if r["image_id"] in set(subset)]
    before = [dict(r) for r in chosen]
    scorer = CocoScorer(gt, category_map, backend)
    assert scorer.score(chosen, subset).metrics != scorer.score(results, image_ids).metrics
    assert chosen == before  # loadRes adds id/area/iscrowd to what it loads: the scorer gives it copies


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_detector_scores_100(tiny_case, backend):
    gt, results, image_ids = tiny_case("perfect")
    scores = score(gt, results, image_ids, TINY_CLASSES, backend)
    for key in ("AP", "AP50", "AP75", "AR100", "AP/cat", "AP/dog"):
        assert scores.metrics[key] == pytest.approx(100.0), key
    assert scores.precision.shape == (10, 101, 2)
    np.testing.assert_allclose(scores.precision, 1.0)  # tp / (tp + fp + eps)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_no_detections_score_zero(tiny_case, backend):
    gt, _, image_ids = tiny_case("perfect")
    scores = score(gt, [], image_ids, TINY_CLASSES, backend)
    assert all(v == 0.0 for v in scores.metrics.values())
    assert (scores.precision == 0).all()  # both classes have ground truth
    scores = score(gt, [], [2], TINY_CLASSES, backend)  # image 2 has only a cat
    assert (scores.precision[:, :, 0] == 0).all() and (scores.precision[:, :, 1] == -1).all()


def test_bad_input_is_named(tiny_case):
    gt, results, image_ids = tiny_case("perfect")
    with pytest.raises(ValueError, match="backend must be one of.*'detectron'"):
        CocoScorer(gt, TINY_CLASSES, backend="detectron")
    with pytest.raises(ValueError, match=r"image ids \[99\] are not in the ground truth"):
        score(gt, results, [1, 99], TINY_CLASSES)
    with pytest.raises(ValueError, match=r"results for image ids \[2\] that are not being evaluated"):
        score(gt, results, [1], TINY_CLASSES)
    with pytest.raises(ValueError, match=r"category ids \[5\]"):
        score(gt, [{**results[0], "category_id": 5}], image_ids, TINY_CLASSES)
    with pytest.raises(TypeError, match="COCO json dict or a COCO object"):
        score([1, 2], results, image_ids, TINY_CLASSES)


def _crowd_gt(crowd: list[int]) -> dict:
    return {
        "images": [{"id": 1, "width": 50, "height": 40}, {"id": 2, "width": 50, "height": 40}],
        "annotations": [
            {"id": k + 1, "image_id": 1 + k % 2, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": c}
            for k, c in enumerate(crowd)
        ],
        "categories": [{"id": 3, "name": "cat"}],
    }


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_crowd_only_ground_truth_warns_that_ap_is_undefined(caplog, backend):
    detections = [{"image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9}]
    classes = CategoryMap((3,), ("cat",))
    with caplog.at_level(logging.WARNING, logger="fcos_lightning.analysis.scoring"):
        scores = CocoScorer(_crowd_gt([1, 1]), classes, backend).score(detections, [1, 2])
    assert scores.metrics["AP"] == 0.0 and "no annotation that is not crowd: AP is undefined" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fcos_lightning.analysis.scoring"):
        scores = CocoScorer(_crowd_gt([0, 1]), classes, backend).score(detections, [1, 2])
    assert scores.metrics["AP"] > 99 and "undefined" not in caplog.text
