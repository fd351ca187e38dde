"""Precision-recall curves (from the scorer), COCO-style AP of a matching, and F1 against the score threshold.

The precision-recall curves are COCOeval's own interpolated ``precision`` array, so they agree with the reported AP
by construction. F1 uses the exact counts of true and false positives above each score threshold at IoU 0.5 (COCO's
matching, crowd-ignored detections left out): ``F1 = 2PR / (P + R)``; the threshold that maximizes it is what
``predict.py score_thresh=auto`` is meant to use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcos_lightning.analysis.scoring import CocoScores

#: COCOeval's 101 recall thresholds 0.00, 0.01, ..., 1.00.
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
#: Score thresholds at which F1 is evaluated: 0.000, 0.001, ..., 1.000.
SCORE_THRESHOLDS = np.linspace(0.0, 1.0, 1001)


@dataclass(frozen=True)
class PRCurves:
    """Interpolated precision at each recall threshold, per class: at IoU 0.5 and averaged over IoU 0.5:0.95.
    NaN rows for classes without ground truth."""

    recall: np.ndarray  # [R]
    precision50: np.ndarray  # [C, R]
    precision: np.ndarray  # [C, R] mean over the ten IoU thresholds
    ap50: np.ndarray  # [C] percent, NaN without ground truth
    ap: np.ndarray  # [C] percent

    def mean_curves(self) -> tuple[np.ndarray, np.ndarray]:
        """[R] curves averaged over the classes with ground truth (their mean is AP50 / AP)."""
        has = ~np.isnan(self.ap)
        if not has.any():
            return np.zeros_like(self.recall), np.zeros_like(self.recall)
        return self.precision50[has].mean(0), self.precision[has].mean(0)


def pr_curves(scores: CocoScores) -> PRCurves:
    """Per-class curves from a :class:`~fcos_lightning.analysis.scoring.CocoScores` precision array."""
    p = scores.precision  # [T, R, C]
    valid = p > -1
    t50 = int(np.flatnonzero(np.isclose(scores.iou_thresholds, 0.5))[0])
    has_gt = valid.any(axis=(0, 1))
    with np.errstate(invalid="ignore"):
        mean_over_iou = np.where(valid, p, 0).sum(0) / valid.sum(0)  # [R, C]
    precision50 = np.where(has_gt[None], p[t50], np.nan).T
    precision = np.where(has_gt[None], mean_over_iou, np.nan).T
    return PRCurves(
        recall=scores.recall_thresholds.copy(),
        precision50=precision50,
        precision=precision,
        ap50=precision50.mean(1) * 100,
        ap=precision.mean(1) * 100,
    )


def _cumulative_by_class(labels: np.ndarray, is_tp: np.ndarray, num_classes: int):
    """Detections in rank order grouped by class: the group bounds and cumulative true-positive counts."""
    order = np.argsort(labels, kind="stable")  # keeps rank (score) order within each class
    grouped = labels[order]
    start = np.searchsorted(grouped, np.arange(num_classes))
    stop = np.searchsorted(grouped, np.arange(num_classes), side="right")
    return order, start, stop, np.cumsum(is_tp[order])


def average_precision(labels: np.ndarray, is_tp: np.ndarray, num_gt: np.ndarray) -> np.ndarray:
    """COCO's 101-point interpolated AP (percent) per class of ranked detections: ``labels`` [N] and ``is_tp`` [N]
    in rank order (best first, ignored detections left out), ``num_gt`` [C]. NaN for classes without ground truth.
    """
    num_classes = len(num_gt)
    order, start, stop, cum_tp = _cumulative_by_class(labels, is_tp, num_classes)
    ap = np.full(num_classes, np.nan)
    for k in np.flatnonzero(num_gt > 0):
        tp = cum_tp[start[k] : stop[k]] - (cum_tp[start[k] - 1] if start[k] else 0)
        recall = tp / num_gt[k]
        precision = tp / (np.arange(1, len(tp) + 1) + np.spacing(1))  # COCOeval's tp / (tp + fp + eps)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # precision made non-increasing in recall
        at = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
        reached = at < len(tp)
        q = np.zeros(len(RECALL_THRESHOLDS))
        q[reached] = envelope[at[reached]]
        ap[k] = q.mean() * 100
    return ap


@dataclass(frozen=True)
class F1Curves:
    """Precision, recall and F1 of each class for the detections scoring at least each threshold (IoU 0.5)."""

    thresholds: np.ndarray  # [S] score thresholds
    precision: np.ndarray  # [C, S]
    recall: np.ndarray  # [C, S]
    f1: np.ndarray  # [C, S], NaN rows for classes without ground truth

    def mean_f1(self) -> np.ndarray:
        """[S] F1 averaged over the classes with ground truth."""
        has = ~np.isnan(self.f1[:, 0])
        return self.f1[has].mean(0) if has.any() else np.zeros_like(self.thresholds)

    def best_index(self) -> int:
        """Index into ``thresholds`` of the best mean F1 (see :func:`middle_of_first_max`)."""
        return int(middle_of_first_max(self.mean_f1()[None])[0])

    def best_threshold(self) -> float:
        """The score threshold with the highest mean F1 over the classes (rounded to the 0.001 grid)."""
        return round(float(self.thresholds[self.best_index()]), 6)

    def best_per_class(self) -> np.ndarray:
        """[C] index into ``thresholds`` of each class's highest F1; -1 for classes without ground truth."""
        has = ~np.isnan(self.f1[:, 0])
        return np.where(has, middle_of_first_max(np.where(has[:, None], self.f1, 0.0)), -1)


def middle_of_first_max(values: np.ndarray) -> np.ndarray:
    """[N] per row of ``values`` [N, S], the middle index of the first run of its maximum.

    F1 stays flat between two detection scores (the same detections are kept), so the maximum is a run of
    thresholds; its middle keeps the same detections with the widest margin on both sides.
    """
    at_max = values >= values.max(axis=1, keepdims=True)
    first = np.argmax(at_max, axis=1)
    past = at_max | (np.arange(values.shape[1]) < first[:, None])
    last = np.where(past.all(axis=1), values.shape[1] - 1, np.argmin(past, axis=1) - 1)
    return (first + last) // 2


def f1_curves(
    labels: np.ndarray,
    scores: np.ndarray,
    is_tp: np.ndarray,
    num_gt: np.ndarray,
    thresholds: np.ndarray = SCORE_THRESHOLDS,
) -> F1Curves:
    """F1 curves of ranked detections (``scores`` non-increasing, ignored ones left out) against ``thresholds``."""
    num_classes = len(num_gt)
    order, start, stop, cum_tp = _cumulative_by_class(labels, is_tp, num_classes)
    grouped_scores = scores[order]
    shape = (num_classes, len(thresholds))
    precision, recall, f1 = np.zeros(shape), np.zeros(shape), np.full(shape, np.nan)
    for k in range(num_classes):
        s = grouped_scores[start[k] : stop[k]]
        n = np.searchsorted(-s, -thresholds, side="right")  # detections with score >= threshold
        before = cum_tp[start[k] - 1] if start[k] else 0
        tp = np.where(n > 0, cum_tp[start[k] + np.maximum(n, 1) - 1] - before, 0) if len(s) else np.zeros(len(n))
        precision[k] = np.divide(tp, n, out=np.zeros(len(n)), where=n > 0)
        if num_gt[k] > 0:
            recall[k] = tp / num_gt[k]
            denom = precision[k] + recall[k]
            f1[k] = np.divide(2 * precision[k] * recall[k], denom, out=np.zeros(len(n)), where=denom > 0)
    return F1Curves(thresholds=thresholds.copy(), precision=precision, recall=recall, f1=f1)
