"""COCO evaluation: a val set that only holds crowd annotations says that AP is undefined."""

from __future__ import annotations

import contextlib
import io
import logging

from pycocotools.coco import COCO

from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.evaluation.coco import evaluate_coco


def _coco(crowd: list[int]) -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 50, "height": 40}, {"id": 2, "width": 50, "height": 40}],
        "annotations": [
            {"id": k + 1, "image_id": 1 + k % 2, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": c}
            for k, c in enumerate(crowd)
        ],
        "categories": [{"id": 3, "name": "cat"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_crowd_only_ground_truth_warns_that_ap_is_undefined(caplog):
    detections = [{"image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9}]
    classes = CategoryMap((3,), ("cat",))
    with caplog.at_level(logging.WARNING, logger="fcos_lightning.evaluation.coco"):
        metrics = evaluate_coco(_coco([1, 1]), detections, [1, 2], classes)
    assert metrics["AP"] == 0.0 and "no annotation that is not crowd: AP is undefined" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fcos_lightning.evaluation.coco"):
        metrics = evaluate_coco(_coco([0, 1]), detections, [1, 2], classes)
    assert metrics["AP"] > 99 and "undefined" not in caplog.text
