"""Builders of COCO ground truth and results: hand-made tiny cases and a generated set."""

from __future__ import annotations

import pytest

from fcos_lightning.analysis.synthetic import make_synthetic_coco
from fcos_lightning.data.coco import CategoryMap

#: The hand-made cases' classes: non-contiguous ids, labels 0 (cat) and 1 (dog).
TINY_CLASSES = CategoryMap(cat_ids=(2, 7), names=("cat", "dog"))


def build_coco(gt_boxes, detections, image_ids=(1, 2)):
    """``gt_boxes``: ``(image_id, category_id, [x, y, w, h], iscrowd)``; ``detections``: ``(image_id, category_id,
    [x, y, w, h], score)``. Returns the COCO json dict, the results list and the image ids."""
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in image_ids]
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": list(b), "area": b[2] * b[3], "iscrowd": crowd}
        for k, (i, c, b, crowd) in enumerate(gt_boxes)
    ]
    categories = [{"id": c, "name": n} for c, n in zip(TINY_CLASSES.cat_ids, TINY_CLASSES.names, strict=True)]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    results = [{"image_id": i, "category_id": c, "bbox": list(b), "score": s} for i, c, b, s in detections]
    return gt, results, list(image_ids)


# Image 1: cat A and dog B; image 2: cat C. Boxes are exact, so IoU is 1 for a detection placed on them.
A, B, C = [0, 0, 10, 10], [20, 20, 10, 10], [0, 0, 20, 20]
TINY_GT = [(1, 2, A, 0), (1, 7, B, 0), (2, 2, C, 0)]
# Scores sit between the 0.001-spaced F1 thresholds, so "score >= threshold" holds up to threshold index 905, 805, 705.
PERFECT = [(1, 2, A, 0.9055), (1, 7, B, 0.8055), (2, 2, C, 0.7055)]


@pytest.fixture
def tiny_case():
    """The hand-made cases by name: ground truth A, B, C above and the detections of each case."""
    cases = {
        "perfect": PERFECT,
        "missed": PERFECT[:2],  # C not detected
        "wrong_class": [PERFECT[0], (1, 2, B, 0.8055), PERFECT[2]],  # B detected as a cat
        "duplicate": [*PERFECT, (1, 2, [1, 0, 10, 10], 0.8555)],  # a second cat on A, IoU 90/110
    }

    def make(name: str, extra_gt=(), extra_dets=()):
        return build_coco([*TINY_GT, *extra_gt], [*cases[name], *extra_dets])

    return make


@pytest.fixture(scope="session")
def generated_coco():
    """300 images x 60 detections, 8 classes with non-contiguous ids, empty images and crowd regions."""
    gt, results, category_map = make_synthetic_coco(300, 60, 8, seed=3)
    return gt, results, [img["id"] for img in gt["images"]], category_map


@pytest.fixture
def analysis_of(tiny_case):
    """``analysis_of(case, backend=..., **analyze kwargs)``: the scorer and :func:`analyze` on a hand-made case."""
    from fcos_lightning.analysis.report import analyze
    from fcos_lightning.analysis.scoring import score

    def run(name: str, backend: str = "faster", extra_gt=(), extra_dets=(), **kwargs):
        gt, results, image_ids = tiny_case(name, extra_gt, extra_dets)
        scores = score(gt, results, image_ids, TINY_CLASSES, backend)
        return analyze(gt, results, image_ids, TINY_CLASSES, scores, **kwargs)

    return run
