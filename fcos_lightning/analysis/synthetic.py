"""A generated COCO ground truth and a detector's output on it, for the scorer and analysis tests and benchmarks.

Like COCO val: non-contiguous category ids, images without objects, a few crowd regions, objects of all three
COCO area ranges. The detections look like a detector's: a jittered copy of most objects (some with the wrong class,
some twice), then boxes anywhere up to ``dets_per_image``, scores higher for the good copies. Deterministic in
``seed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fcos_lightning.data.coco import CategoryMap


def synthetic_category_map(num_classes: int) -> CategoryMap:
    """``num_classes`` classes with ids 1, 3, 4, 6, 7, 9, ... (every third id skipped) and names ``class_<id>``."""
    from fcos_lightning.data.coco import CategoryMap  # not at import: fcos_lightning.data loads Lightning

    cat_ids = [k + 1 + k // 2 for k in range(num_classes)]
    return CategoryMap(cat_ids=tuple(cat_ids), names=tuple(f"class_{c}" for c in cat_ids))


def _xywh(rng: np.random.Generator, n: int, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """``n`` boxes of log-uniform size 8..300 px inside images of the given sizes."""
    size = np.exp(rng.uniform(np.log(8), np.log(300), size=(n, 2)))
    w = np.minimum(size[:, 0] * rng.uniform(0.5, 1.5, n), widths - 1)
    h = np.minimum(size[:, 1], heights - 1)
    x = rng.uniform(0, 1, n) * (widths - w)
    y = rng.uniform(0, 1, n) * (heights - h)
    return np.stack([x, y, w, h], axis=1)


def make_synthetic_coco(
    num_images: int,
    dets_per_image: int,
    num_classes: int,
    seed: int = 0,
    objects_per_image: float = 7.0,
    empty_fraction: float = 0.1,
    crowd_fraction: float = 0.02,
) -> tuple[dict, list[dict], CategoryMap]:
    """A COCO json dict, COCO-format results (``dets_per_image`` per image) and the class map."""
    rng = np.random.default_rng(seed)
    category_map = synthetic_category_map(num_classes)
    cat_ids = np.asarray(category_map.cat_ids)
    image_ids = np.arange(1, num_images + 1) * 3  # non-consecutive image ids too
    widths = rng.choice([640, 480], size=num_images)
    heights = 1120 - widths

    counts = rng.poisson(objects_per_image, size=num_images)
    counts[rng.uniform(size=num_images) < empty_fraction] = 0
    gt_img = np.repeat(np.arange(num_images), counts)
    gt_box = _xywh(rng, len(gt_img), widths[gt_img], heights[gt_img])
    gt_label = rng.integers(0, num_classes, size=len(gt_img))
    gt_crowd = rng.uniform(size=len(gt_img)) < crowd_fraction

    # Detections: a jittered copy of ~85% of the objects (10% of them with another class, 10% twice).
    copy = np.flatnonzero(rng.uniform(size=len(gt_img)) < 0.85)
    copy = np.concatenate([copy, copy[rng.uniform(size=len(copy)) < 0.1]])
    jitter = rng.normal(0, 0.06, size=(len(copy), 4)) * gt_box[copy][:, [2, 3, 2, 3]]
    det_box = gt_box[copy] + jitter
    det_box[:, 2:] = np.maximum(det_box[:, 2:], 1.0)
    det_label = gt_label[copy].copy()
    wrong = rng.uniform(size=len(copy)) < 0.1
    det_label[wrong] = rng.integers(0, num_classes, size=int(wrong.sum()))
    det_score = rng.beta(5, 2, size=len(copy))
    det_img = gt_img[copy]
    # Keep at most dets_per_image copies per image, then fill every image up with boxes anywhere (low scores).
    order = np.lexsort((-det_score, det_img))
    det_img, det_box, det_label, det_score = det_img[order], det_box[order], det_label[order], det_score[order]
    first = np.searchsorted(det_img, det_img)
    keep = np.arange(len(det_img)) - first < dets_per_image
    det_img, det_box, det_label, det_score = det_img[keep], det_box[keep], det_label[keep], det_score[keep]
    fill = dets_per_image - np.bincount(det_img, minlength=num_images)
    fill_img = np.repeat(np.arange(num_images), fill)
    det_img = np.concatenate([det_img, fill_img])
    det_box = np.concatenate([det_box, _xywh(rng, len(fill_img), widths[fill_img], heights[fill_img])])
    det_label = np.concatenate([det_label, rng.integers(0, num_classes, size=len(fill_img))])
    det_score = np.concatenate([det_score, rng.beta(1.2, 6, size=len(fill_img))])

    images = [
        {"id": int(i), "width": int(w), "height": int(h), "file_name": f"{i:012d}.jpg"}
        for i, w, h in zip(image_ids, widths, heights, strict=True)
    ]
    annotations = [
        {
            "id": k + 1,
            "image_id": int(image_ids[i]),
            "category_id": int(cat_ids[c]),
            "bbox": [round(float(v), 2) for v in b],
            "area": round(float(b[2] * b[3]), 2),
            "iscrowd": int(crowd),
        }
        for k, (i, b, c, crowd) in enumerate(zip(gt_img, gt_box, gt_label, gt_crowd, strict=True))
    ]
    categories = [{"id": int(c), "name": n} for c, n in zip(category_map.cat_ids, category_map.names, strict=True)]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    results = [
        {"image_id": int(image_ids[i]), "category_id": int(cat_ids[c]), "bbox": [round(float(v), 3) for v in b],
         "score": round(float(s), 5)}
        for i, b, c, s in zip(det_img, det_box, det_label, det_score, strict=True)
    ]  # fmt: skip
    return gt, results, category_map
