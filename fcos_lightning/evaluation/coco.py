"""COCO box evaluation with pycocotools over the whole split, once per validation round.

Each rank keeps its own detections; :func:`gather_detections` collects them on every rank and removes the
duplicates the distributed sampler adds by padding (same image id), so every image is scored exactly once.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fcos_lightning.data.coco import CategoryMap

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(
    image_ids: torch.Tensor | Sequence[int],
    detections: Sequence[dict[str, torch.Tensor]],
    category_map: CategoryMap,
) -> list[dict]:
    """Per-image ``{"boxes" xyxy, "scores", "labels"}`` in original-image pixels -> COCO result dicts with the
    dataset's own category ids and ``[x, y, w, h]`` boxes."""
    results = []
    for image_id, det in zip([int(i) for i in image_ids], detections, strict=True):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1).tolist()
        cat_ids = category_map.labels_to_cat_ids(det["labels"].cpu()).tolist()
        scores = det["scores"].detach().float().cpu().tolist()
        results.extend(
            {"image_id": image_id, "category_id": c, "bbox": [round(v, 3) for v in b], "score": round(s, 5)}
            for b, c, s in zip(xywh, cat_ids, scores, strict=True)
        )
    return results


def gather_detections(results: list[dict], image_ids: Sequence[int]) -> tuple[list[dict], list[int]]:
    """All ranks' COCO results and evaluated image ids, de-duplicated by image id (sampler padding)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, list(image_ids)))
    else:
        gathered = [(results, list(image_ids))]
    seen: set[int] = set()
    merged: list[dict] = []
    for rank_results, rank_ids in gathered:
        new_ids = set(rank_ids) - seen
        merged.extend(r for r in rank_results if r["image_id"] in new_ids)
        seen |= new_ids
    return merged, sorted(seen)


def evaluate_coco(
    coco_gt: COCO, results: list[dict], image_ids: Sequence[int], category_map: CategoryMap
) -> dict[str, float]:
    """COCO box AP (percent) over ``image_ids``: the six summary metrics plus ``AP/<class name>``."""
    metrics = dict.fromkeys(METRIC_NAMES, 0.0)
    metrics.update({f"AP/{name}": 0.0 for name in category_map.names})
    if not image_ids:
        log.warning("COCO evaluation: no images were evaluated")
        return metrics
    gt = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(image_ids)))
    if not any(not a.get("iscrowd") for a in gt):
        log.warning(
            "COCO evaluation: the %d evaluated images have no annotation that is not crowd: AP is undefined "
            "(reported as 0); add non-crowd boxes to the val set",
            len(image_ids),
        )
    if not results:
        log.warning("COCO evaluation: the model made no detections on %d images; AP is 0", len(image_ids))
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[:6]
    metrics.update({k: float(max(v, 0.0) * 100) for k, v in zip(METRIC_NAMES, stats)})
    # precision: [IoU thresholds, recall, classes, area ranges, max dets]; area "all", 100 detections.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    cat_index = {c: k for k, c in enumerate(evaluator.params.catIds)}
    for name, cat_id in zip(category_map.names, category_map.cat_ids, strict=True):
        p = precision[:, :, cat_index[cat_id]]
        p = p[p > -1]
        metrics[f"AP/{name}"] = float(np.mean(p) * 100) if p.size else 0.0
    return metrics


def format_table(metrics: dict[str, float], category_map: CategoryMap) -> str:
    """The COCO summary and per-class AP as a plain-text table."""
    lines = [
        "  ".join(f"{k:>6}" for k in METRIC_NAMES),
        "  ".join(f"{metrics[k]:6.2f}" for k in METRIC_NAMES),
    ]
    width = max((len(n) for n in category_map.names), default=5)
    lines.append("")
    lines.append(f"{'class':<{width}}  AP")
    lines.extend(f"{n:<{width}}  {metrics.get(f'AP/{n}', 0.0):6.2f}" for n in category_map.names)
    return "\n".join(lines)
