"""One evaluation explained: curves, confusion matrix and error breakdown from COCO ground truth and detections.

:func:`analyze` takes the scorer's output (so COCO is scored once) and the same ground truth and results, and
returns an :class:`Analysis` whose :meth:`~Analysis.to_dict` is plain JSON (for ``metrics.json``); the pictures are
drawn from it by :mod:`~fcos_lightning.analysis.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fcos_lightning.analysis.boxset import BoxSet
from fcos_lightning.analysis.confusion import ConfusionMatrix, confusion_matrix
from fcos_lightning.analysis.curves import F1Curves, PRCurves, f1_curves, pr_curves
from fcos_lightning.analysis.errors import ErrorBreakdown, error_breakdown
from fcos_lightning.analysis.matching import match_detections, overlaps
from fcos_lightning.analysis.scoring import CocoScores

# CategoryMap for annotations only: importing fcos_lightning.data still loads the LightningDataModule
if TYPE_CHECKING:
    from fcos_lightning.data.coco import CategoryMap

#: F1 curves in the JSON: every 10th threshold (0.00, 0.01, ..., 1.00).
_JSON_THRESHOLD_STEP = 10


@dataclass(frozen=True)
class Analysis:
    """Everything the evaluation pictures show, for one split and one model."""

    class_names: tuple[str, ...]
    metrics: dict[str, float]
    pr: PRCurves
    f1: F1Curves
    confusion: ConfusionMatrix
    errors: ErrorBreakdown

    @property
    def best_score_threshold(self) -> float:
        """The score threshold with the highest mean F1 over the classes (``predict.py score_thresh=auto``)."""
        return self.f1.best_threshold()

    def score_thresholds(self) -> dict[str, Any]:
        """The F1-maximizing score thresholds at IoU 0.5, for ``predict.py score_thresh=auto``:
        ``{"global": t, "per_class": [t_0, ..., t_{C-1}], "iou": 0.5}`` in label order, ``None`` for a class whose
        F1 is 0 at every threshold (no ground truth, or never found), where the global threshold applies."""
        best = self.f1.best_per_class()
        per_class = [
            round(float(self.f1.thresholds[i]), 6) if i >= 0 and self.f1.f1[k, i] > 0 else None
            for k, i in enumerate(best)
        ]
        return {"global": self.best_score_threshold, "per_class": per_class, "iou": 0.5}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists and floats only, NaN (class without ground truth) as null."""
        names = self.class_names
        mean50, mean = self.pr.mean_curves()
        every = slice(None, None, _JSON_THRESHOLD_STEP)
        mean_f1 = self.f1.mean_f1()
        overall = self.f1.best_index()

        def at(values: np.ndarray, k: int, i: int) -> float:
            return float(values[k, i]) if i >= 0 else math.nan

        best = self.f1.best_per_class()
        return _clean(
            {
                "coco": dict(self.metrics),
                "precision_recall": {
                    "recall": self.pr.recall,
                    "iou_0.50": {"mean": mean50, **dict(zip(names, self.pr.precision50, strict=True))},
                    "iou_0.50:0.95": {"mean": mean, **dict(zip(names, self.pr.precision, strict=True))},
                },
                "f1": {
                    "thresholds": self.f1.thresholds[every],
                    "mean": mean_f1[every],
                    "per_class": dict(zip(names, self.f1.f1[:, every], strict=True)),
                    "best_threshold": float(self.f1.thresholds[overall]),
                    "best_mean_f1": float(mean_f1[overall]),
                    "best_per_class": {
                        name: {
                            "threshold": float(self.f1.thresholds[i]) if i >= 0 else math.nan,
                            "f1": at(self.f1.f1, k, i),
                            "precision": at(self.f1.precision, k, i),
                            "recall": at(self.f1.recall, k, i),
                        }
                        for k, (name, i) in enumerate(zip(names, best, strict=True))
                    },
                },
                "confusion_matrix": {
                    "labels": [*names, "background"],
                    "rows": "true class",
                    "columns": "predicted class",
                    "iou_threshold": self.confusion.iou_threshold,
                    "score_threshold": self.confusion.score_threshold,
                    "matrix": self.confusion.matrix,
                },
                "error_breakdown": {
                    "ap50": self.errors.ap50,
                    "delta_ap": self.errors.delta_ap,
                    "counts": self.errors.counts,
                    "pos_threshold": self.errors.pos_threshold,
                    "background_threshold": self.errors.background_threshold,
                },
            }
        )


def _clean(obj: Any) -> Any:
    """numpy -> lists and Python numbers, NaN -> None, floats to 6 decimals."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) else round(float(obj), 6)
    return obj


def analyze(
    gt: Mapping[str, Any] | Any,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    category_map: CategoryMap,
    scores: CocoScores,
    confusion_iou: float = 0.5,
    confusion_score: float | None = None,
    max_dets: int = 100,
) -> Analysis:
    """Curves, confusion matrix and error breakdown of ``results`` on ``image_ids``.

    ``scores``: the scorer's output for the same inputs (its precision array gives the precision-recall curves).
    ``confusion_score``: the confusion matrix's score threshold; ``None`` takes the one with the best mean F1.
    """
    boxes = BoxSet.from_coco(gt, results, image_ids, category_map, max_dets=max_dets)
    pairs = overlaps(boxes)
    at50 = match_detections(boxes, pairs, 0.5)
    kept = ~at50.dt_ignored
    f1 = f1_curves(boxes.dt_labels[kept], boxes.dt_scores[kept], at50.true_positive[kept], boxes.num_gt_per_class())
    threshold = f1.best_threshold() if confusion_score is None else float(confusion_score)
    return Analysis(
        class_names=tuple(category_map.names),
        metrics=dict(scores.metrics),
        pr=pr_curves(scores),
        f1=f1,
        confusion=confusion_matrix(boxes, pairs, confusion_iou, threshold),
        errors=error_breakdown(boxes, pairs, at50),
    )
