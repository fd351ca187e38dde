"""Where the AP goes: TIDE's error breakdown (Bolya et al., ECCV 2020) on COCOeval's matching at IoU 0.5.

Each false positive gets the first type that applies, in TIDE's order (IoU with non-crowd ground truth):
localization (IoU with a box of its class in [0.1, 0.5]), classification (IoU >= 0.5 with a box of another class),
duplicate (IoU >= 0.5 with a box of its class that a better detection already matched), background (IoU <= 0.1 with
every box, or an image without boxes), both (none of these: wrong class and badly placed). A ground-truth box that no
detection matched and no classification/localization error points at is missed.

The cost of an error type is TIDE's dAP: AP50 with only that type fixed, minus AP50. Fixing turns the
highest-scoring classification/localization error pointing at each unmatched box into its true positive (relabelled
for classification) and drops the others; duplicates, background and "both" errors are dropped; a missed box is
removed from the ground truth. Two further numbers: the AP gained if every false positive scored below every true
positive, and if every unmatched box were removed from the ground truth. AP50 is COCO's: 101-point interpolated,
averaged over the classes with ground truth (TIDE also averages in classes that only have detections, at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcos_lightning.analysis.boxset import BoxSet
from fcos_lightning.analysis.curves import average_precision
from fcos_lightning.analysis.matching import Matching, Overlaps

#: TIDE's six main error types, in its order.
ERROR_TYPES = ("classification", "localization", "both", "duplicate", "background", "missed")
#: The two summary fixes: perfect ranking of false positives, and no unmatched ground truth.
SPECIAL_ERRORS = ("false_positive", "false_negative")
_NONE = -1


@dataclass(frozen=True)
class ErrorBreakdown:
    """AP50 (percent), and per error type: how many there are and the AP50 points fixing them would add."""

    ap50: float
    delta_ap: dict[str, float]  # ERROR_TYPES + SPECIAL_ERRORS
    counts: dict[str, int]  # ERROR_TYPES (+ "true_positive")
    pos_threshold: float
    background_threshold: float


def _best_pair(dt: np.ndarray, gt: np.ndarray, iou: np.ndarray, num_dt: int) -> tuple[np.ndarray, np.ndarray]:
    """[D] each detection's highest IoU among the given pairs (0 without any) and that box (-1; ties: the first)."""
    o = np.lexsort((gt, -iou, dt))
    first = np.r_[True, dt[o][1:] != dt[o][:-1]] if len(o) else np.zeros(0, dtype=bool)
    best_iou, best_gt = np.zeros(num_dt), np.full(num_dt, _NONE, dtype=np.int64)
    best_iou[dt[o][first]] = iou[o][first]
    best_gt[dt[o][first]] = gt[o][first]
    return best_iou, best_gt


def _map(labels: np.ndarray, is_tp: np.ndarray, num_gt: np.ndarray) -> float:
    ap = average_precision(labels, is_tp, num_gt)
    return float(np.nanmean(ap)) if (~np.isnan(ap)).any() else 0.0


def error_breakdown(
    boxes: BoxSet,
    pairs: Overlaps,
    matching: Matching,
    pos_threshold: float = 0.5,
    background_threshold: float = 0.1,
) -> ErrorBreakdown:
    """TIDE's error types and their dAP from COCOeval's matching at ``pos_threshold`` (``matching``)."""
    num_dt = len(boxes.dt_scores)
    real = ~pairs.crowd
    dt, gt, iou = pairs.dt[real], pairs.gt[real], pairs.iou[real]
    same = pairs.same_class[real]
    loc_iou, loc_gt = _best_pair(dt[same], gt[same], iou[same], num_dt)
    cls_iou, cls_gt = _best_pair(dt[~same], gt[~same], iou[~same], num_dt)
    used = same & matching.gt_matched[gt]
    dup_iou, _ = _best_pair(dt[used], gt[used], iou[used], num_dt)
    any_iou, _ = _best_pair(dt, gt, iou, num_dt)
    image_has_gt = np.bincount(boxes.gt_image[~boxes.gt_crowd], minlength=boxes.num_images) > 0

    fp = matching.false_positive
    kind = np.select(
        [
            ~fp,
            ~image_has_gt[boxes.dt_image],
            (loc_iou >= background_threshold) & (loc_iou <= pos_threshold),
            cls_iou >= pos_threshold,
            dup_iou >= pos_threshold,
            any_iou <= background_threshold,
        ],
        [_NONE, 4, 1, 0, 3, 4],
        default=2,
    )
    # Classification/localization errors that could become the true positive of an unmatched box: per box, only the
    # best-ranked one (TIDE's BestGTMatch); the others, and those pointing at a matched box, are dropped when fixed.
    target = np.select([kind == 0, kind == 1], [cls_gt, loc_gt], default=_NONE)
    fixable = (target >= 0) & ~matching.gt_matched[np.maximum(target, 0)]
    winner = np.full(len(boxes.gt_labels), num_dt, dtype=np.int64)
    np.minimum.at(winner, target[fixable], np.flatnonzero(fixable))
    wins = fixable & (winner[np.maximum(target, 0)] == np.arange(num_dt))
    gt_usable = winner < num_dt
    missed = ~boxes.gt_crowd & ~matching.gt_matched & ~gt_usable

    kept = ~matching.dt_ignored
    labels, is_tp = boxes.dt_labels, matching.true_positive
    num_gt = boxes.num_gt_per_class()
    base = _map(labels[kept], is_tp[kept], num_gt)

    def fixed(k: int) -> float:
        if k == 5:  # missed: those boxes leave the ground truth
            return _map(labels[kept], is_tp[kept], num_gt - np.bincount(boxes.gt_labels[missed], minlength=len(num_gt)))
        keep = kept & ((kind != k) | wins)
        becomes_tp = (kind == k) & wins
        new_labels = np.where(becomes_tp, boxes.gt_labels[np.maximum(target, 0)], labels)  # the box's class
        return _map(new_labels[keep], (is_tp | becomes_tp)[keep], num_gt)

    delta = {name: max(fixed(k) - base, 0.0) for k, name in enumerate(ERROR_TYPES)}
    # every true positive ranked above every false positive; every unmatched box removed from the ground truth
    reorder = np.flatnonzero(kept)[np.argsort(~is_tp[kept], kind="stable")]
    delta["false_positive"] = max(_map(labels[reorder], is_tp[reorder], num_gt) - base, 0.0)
    matched_per_class = np.bincount(boxes.gt_labels[matching.gt_matched], minlength=len(num_gt))
    delta["false_negative"] = max(_map(labels[kept], is_tp[kept], matched_per_class) - base, 0.0)
    counts = {name: int((kind == k).sum()) for k, name in enumerate(ERROR_TYPES[:5])}
    counts["missed"] = int(missed.sum())
    counts["true_positive"] = int(is_tp.sum())
    return ErrorBreakdown(
        ap50=base,
        delta_ap=delta,
        counts=counts,
        pos_threshold=pos_threshold,
        background_threshold=background_threshold,
    )
