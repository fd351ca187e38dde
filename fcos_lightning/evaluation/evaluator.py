"""The validation metric as an object: ``update`` with each batch's detections, ``compute`` once per round,
``reset`` before the next. The LightningModule is handed one and never sees ground truth itself.

Under DDP each rank feeds its own shard; :meth:`COCOEvaluator.compute` gathers every rank's detections,
removes the duplicates the sampler adds by padding (same image id), scores them once on rank 0 (faster-coco-eval
or pycocotools, :class:`~fcos_lightning.analysis.scoring.CocoScorer`), explains the score there
(:func:`~fcos_lightning.analysis.report.analyze`: curves, confusion matrix, error breakdown), and gives every rank
the same metrics and F1-best score thresholds. Results therefore do not depend on the number of processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from fcos_lightning.analysis import report
from fcos_lightning.analysis.scoring import Backend, CocoScorer
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.evaluation.coco import gather_detections, to_coco_results
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
    """COCO box AP of detections against a COCO-format ground truth, and the analysis that explains it.

    Args:
        ground_truth: the split's COCO json dict or a ``COCO`` object (every image, crowd annotations included).
        category_map: the contiguous label <-> category id map the detections use.
        results_file: where :meth:`compute` writes the gathered detections in COCO results format (rank 0;
            None: not written).
        backend: the COCO scorer, ``faster`` (faster-coco-eval, C++) or ``pycocotools`` (the reference; the same
            numbers, slower).
        analyze: also compute the :class:`~fcos_lightning.analysis.report.Analysis` (PR and F1 curves, confusion
            matrix, error breakdown) and the F1-best score thresholds at each :meth:`compute`.
    """

    def __init__(
        self,
        ground_truth: Any,
        category_map: CategoryMap,
        results_file: str | os.PathLike | None = None,
        backend: Backend = "faster",
        analyze: bool = True,
    ):
        self.ground_truth = ground_truth
        self.category_map = category_map
        self.results_file = results_file
        self.backend = backend
        self.analyze = analyze
        self._scorer: CocoScorer | None = None  # built on first use, on rank 0 only
        #: the last round's analysis, on rank 0 (None elsewhere, before the first round, or with analyze=False)
        self.analysis: report.Analysis | None = None
        #: the last analysed round's F1-best score thresholds (``Analysis.score_thresholds``), on every rank
        self.score_thresholds: dict[str, Any] | None = None
        #: wall time of the last round's scoring and analysis on rank 0, by step name
        self.seconds: dict[str, float] = {}
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

    def scorer(self) -> CocoScorer:
        """The scorer with the ground-truth index, built once."""
        if self._scorer is None:
            self._scorer = CocoScorer(self.ground_truth, self.category_map, self.backend)
        return self._scorer

    def compute(self, analyze: bool = True) -> dict[str, float]:
        """COCO's twelve summary metrics, ``AP/<class name>`` and ``num_images`` (percent; the same on every rank).
        ``analyze=False`` skips the analysis this round (Lightning's sanity check), whatever the constructor said.
        """
        results, image_ids = gather_detections(self._results, self._image_ids)
        self.analysis = None
        payload = None
        if not _distributed() or dist.get_rank() == 0:
            total = len(self.scorer().image_ids)
            if len(image_ids) != total:
                log.warning("validation scored %d of the %d val images", len(image_ids), total)
            if image_ids and not results:
                log.warning("COCO evaluation: the model made no detections on %d images; AP is 0", len(image_ids))
            start = time.perf_counter()
            scores = self.scorer().score(results, image_ids)
            self.seconds = {"score": time.perf_counter() - start}
            metrics = {**scores.metrics, "num_images": float(len(image_ids))}
            thresholds = None
            if self.analyze and analyze and image_ids:
                start = time.perf_counter()
                self.analysis = report.analyze(self.ground_truth, results, image_ids, self.category_map, scores)
                thresholds = self.analysis.score_thresholds()
                self.seconds["analyze"] = time.perf_counter() - start
            if self.results_file is not None:
                write_json_atomic(self.results_file, results)
            payload = (metrics, thresholds)
        metrics, thresholds = broadcast_object(payload)
        if thresholds is not None:
            self.score_thresholds = thresholds
        return metrics
