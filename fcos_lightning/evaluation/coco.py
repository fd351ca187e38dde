"""Detections as COCO results, gathered over the whole split once per validation round, and the COCO table.

Each rank keeps its own detections; :func:`gather_detections` collects them on every rank and removes the
duplicates the distributed sampler adds by padding (same image id), so every image is scored exactly once
(by :class:`~fcos_lightning.analysis.scoring.CocoScorer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from fcos_lightning.data.coco import CategoryMap

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
