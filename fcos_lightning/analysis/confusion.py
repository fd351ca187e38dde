"""Confusion matrix of the detections kept at a score threshold, with a background row and column.

Rows are the true class, columns the predicted class; the last row and column are background. Detections scoring
at least ``score_threshold`` are matched to ground truth in two greedy passes (COCOeval's, see
:mod:`~fcos_lightning.analysis.matching`): first to boxes of their own class (the diagonal), then what is left to
boxes of any class (off-diagonal cells: a box found with the wrong class). A detection still unmatched is a false
positive (background row) unless it lies in a crowd region of its class (ignored, as COCOeval does); a box still
unmatched is missed (background column). So row ``k`` sums to class ``k``'s ground-truth boxes and column ``k`` to
its kept, non-ignored detections.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcos_lightning.analysis.boxset import BoxSet
from fcos_lightning.analysis.matching import Overlaps, greedy_match, match_detections


@dataclass(frozen=True)
class ConfusionMatrix:
    """``matrix[true, predicted]`` counts, [C + 1, C + 1], index C = background."""

    matrix: np.ndarray
    iou_threshold: float
    score_threshold: float


def confusion_matrix(
    boxes: BoxSet, pairs: Overlaps, iou_threshold: float = 0.5, score_threshold: float = 0.3
) -> ConfusionMatrix:
    """Counts of (true class, predicted class) over the detections scoring at least ``score_threshold``."""
    num_classes = boxes.num_classes
    kept = boxes.dt_scores >= score_threshold
    first = match_detections(boxes, pairs, iou_threshold, class_aware=True, dt_mask=kept)
    # second pass: unmatched, non-ignored detections against unmatched boxes of any class
    left_dt = kept & (first.dt_match < 0) & ~first.dt_ignored
    ok = (pairs.iou >= iou_threshold) & ~pairs.crowd & left_dt[pairs.dt] & ~first.gt_matched[pairs.gt]
    second = greedy_match(pairs.dt[ok], pairs.gt[ok], pairs.iou[ok], len(boxes.dt_scores), len(boxes.gt_labels))

    dt_match = np.where(first.dt_match >= 0, first.dt_match, second)
    matched = kept & (dt_match >= 0)
    true = boxes.gt_labels[dt_match[matched]]
    predicted = boxes.dt_labels[matched]
    false_pos = left_dt & (second < 0)
    gt_found = np.zeros(len(boxes.gt_labels), dtype=bool)
    gt_found[dt_match[matched]] = True
    missed = ~boxes.gt_crowd & ~gt_found

    bg = num_classes
    rows = np.concatenate([true, np.full(int(false_pos.sum()), bg), boxes.gt_labels[missed]])
    cols = np.concatenate([predicted, boxes.dt_labels[false_pos], np.full(int(missed.sum()), bg)])
    matrix = np.bincount(rows * (num_classes + 1) + cols, minlength=(num_classes + 1) ** 2)
    return ConfusionMatrix(
        matrix=matrix.reshape(num_classes + 1, num_classes + 1),
        iou_threshold=float(iou_threshold),
        score_threshold=float(score_threshold),
    )
