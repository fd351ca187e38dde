"""The validation metric as an object: ``update`` with each batch's detections, ``compute`` once per round,
``reset`` before the next. The LightningModule is handed one and never sees ground truth itself.

Under DDP each rank feeds its own shard; :meth:`COCOEvaluator.compute` gathers every rank's detections,
removes the duplicates the sampler adds by padding (same image id), scores them once with pycocotools on rank
0, and gives every rank the same metrics. Results therefore do not depend on the number of processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from pycocotools.coco import COCO

from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.evaluation.coco import evaluate_coco, gather_detections, to_coco_results
from fcos_lightning.files import write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["COCOEvaluator"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any) -> Any:
    """rank 0's object on every rank (identity without a process group)."""
    if _distributed():
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj


class COCOEvaluator:
    """COCO box AP of detections against a COCO-format ground truth.

    Args:
        ground_truth: pycocotools ``COCO`` of the split (every image, crowd annotations included).
        category_map: the contiguous label <-> category id map the detections use.
        results_file: where :meth:`compute` writes the gathered detections in COCO results format (rank 0;
            None: not written).
    """

    def __init__(self, ground_truth: COCO, category_map: CategoryMap, results_file: str | os.PathLike | None = None):
        self.ground_truth = ground_truth
        self.category_map = category_map
        self.results_file = results_file
        self.reset()

    def reset(self) -> None:
        """Forget the detections of the previous round."""
        self._results: list[dict] = []
        self._image_ids: list[int] = []

    def update(self, detections: Sequence[dict[str, torch.Tensor]], image_ids: torch.Tensor | Sequence[int]) -> None:
        """Per-image ``{"boxes" xyxy, "scores", "labels"}`` in original-image pixels, and their image ids."""
        ids = [int(i) for i in image_ids]
        self._results.extend(to_coco_results(ids, detections, self.category_map))
        self._image_ids.extend(ids)

    def compute(self) -> dict[str, float]:
        """The six COCO summary metrics, ``AP/<class name>`` and ``num_images`` (percent; the same on every rank)."""
        results, image_ids = gather_detections(self._results, self._image_ids)
        metrics = None
        if not _distributed() or dist.get_rank() == 0:
            total = len(self.ground_truth.getImgIds())
            if len(image_ids) != total:
                log.warning("validation scored %d of the %d val images", len(image_ids), total)
            metrics = evaluate_coco(self.ground_truth, results, image_ids, self.category_map)
            metrics["num_images"] = float(len(image_ids))
            if self.results_file is not None:
                write_json_atomic(self.results_file, results)
        return broadcast_object(metrics)
