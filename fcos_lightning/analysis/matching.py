"""Detection-to-ground-truth overlaps and COCOeval's greedy matching, vectorized over the whole split.

COCOeval matches detections in score order, each taking the unmatched ground truth it overlaps most (IoU at least
the threshold); a detection left over that overlaps a crowd region of its class by the threshold (intersection over
the detection's area) is ignored rather than false. That greedy pass is sequential per detection; here it runs as
deferred acceptance: every unmatched detection proposes to its best remaining candidate, each ground truth keeps the
best-ranked proposer, the rejected ones move on to their next candidate. Because every ground truth ranks
detections the same way (by score rank), the result is the unique stable matching, which is the greedy one; each
round is a handful of array operations over all detections of all images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcos_lightning.analysis.boxset import BoxSet

_MAX_PAIRS_PER_CHUNK = 1 << 22


@dataclass(frozen=True)
class Overlaps:
    """Every (detection, ground truth) pair of the same image that overlaps at all.

    ``iou`` is COCO's box IoU for ordinary ground truth and intersection over the detection's area for crowd
    regions (``crowd`` set), as pycocotools computes them.
    """

    dt: np.ndarray  # [P] detection index
    gt: np.ndarray  # [P] ground-truth index
    iou: np.ndarray  # [P] float64
    crowd: np.ndarray  # [P] bool
    same_class: np.ndarray  # [P] bool


def box_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Elementwise IoU of ``dt[i]`` and ``gt[i]`` (``xyxy``, [N, 4] each); for ``crowd[i]`` the union is the
    detection's area (pycocotools' ``iscrowd``)."""
    w = np.minimum(dt[:, 2], gt[:, 2]) - np.maximum(dt[:, 0], gt[:, 0])
    h = np.minimum(dt[:, 3], gt[:, 3]) - np.maximum(dt[:, 1], gt[:, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    dt_area = (dt[:, 2] - dt[:, 0]) * (dt[:, 3] - dt[:, 1])
    gt_area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    union = np.where(crowd, dt_area, dt_area + gt_area - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def overlaps(boxes: BoxSet) -> Overlaps:
    """All overlapping same-image pairs: every detection against every ground truth of its image, in chunks of
    images so memory stays bounded (COCO val: ~3.6M candidate pairs)."""
    gt_order = np.argsort(boxes.gt_image, kind="stable")
    gt_start = np.searchsorted(boxes.gt_image[gt_order], np.arange(boxes.num_images + 1))
    gt_count = np.diff(gt_start)
    dt_order = np.argsort(boxes.dt_image, kind="stable")
    pairs_per_dt = gt_count[boxes.dt_image[dt_order]]
    cum = np.cumsum(pairs_per_dt)
    parts = []
    begin = 0
    while begin < len(dt_order):
        end = max(int(np.searchsorted(cum, (cum[begin - 1] if begin else 0) + _MAX_PAIRS_PER_CHUNK)), begin + 1)
        d_idx = dt_order[begin:end]
        n = pairs_per_dt[begin:end]
        pair_dt = np.repeat(d_idx, n)
        offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        pair_gt = gt_order[np.repeat(gt_start[boxes.dt_image[d_idx]], n) + offset]
        crowd = boxes.gt_crowd[pair_gt]
        iou = box_iou(boxes.dt_boxes[pair_dt], boxes.gt_boxes[pair_gt], crowd)
        hit = iou > 0
        parts.append((pair_dt[hit], pair_gt[hit], iou[hit], crowd[hit]))
        begin = end
    if parts:
        dt, gt, iou, crowd = (np.concatenate(x) for x in zip(*parts, strict=True))
    else:
        dt = gt = np.zeros(0, dtype=np.int64)
        iou, crowd = np.zeros(0), np.zeros(0, dtype=bool)
    return Overlaps(dt, gt, iou, crowd, boxes.dt_labels[dt] == boxes.gt_labels[gt])


def greedy_match(
    pair_dt: np.ndarray, pair_gt: np.ndarray, pair_iou: np.ndarray, num_dt: int, num_gt: int
) -> np.ndarray:
    """COCOeval's greedy matching over candidate pairs (already filtered to IoU >= threshold and any class rule).

    Detections are ranked by index (a :class:`BoxSet` keeps them in score order). A detection prefers higher IoU;
    between equal IoUs it takes the later ground truth, as COCOeval's ``>=`` update does. Returns [D] the matched
    ground-truth index or -1.
    """
    order = np.lexsort((-pair_gt, -pair_iou, pair_dt))
    cand = pair_gt[order]
    sorted_dt = pair_dt[order]
    ptr = np.searchsorted(sorted_dt, np.arange(num_dt))
    end = np.searchsorted(sorted_dt, np.arange(num_dt), side="right")
    holder = np.full(num_gt, -1, dtype=np.int64)
    match = np.full(num_dt, -1, dtype=np.int64)
    active = np.flatnonzero(ptr < end)
    while active.size:
        wanted = cand[ptr[active]]
        current = holder[wanted]
        held = current >= 0
        contender = np.concatenate([active, current[held]])
        target = np.concatenate([wanted, wanted[held]])
        o = np.lexsort((contender, target))  # per ground truth, the best-ranked (lowest index) contender first
        target, contender = target[o], contender[o]
        first = np.r_[True, target[1:] != target[:-1]]
        win_gt, win_dt = target[first], contender[first]
        previous = holder[win_gt]
        bumped = np.unique(previous[(previous >= 0) & (previous != win_dt)])
        match[bumped] = -1
        holder[win_gt] = win_dt
        match[win_dt] = win_gt
        rejected = np.concatenate([active[match[active] < 0], bumped])
        ptr[rejected] += 1
        active = rejected[ptr[rejected] < end[rejected]]
    return match


@dataclass(frozen=True)
class Matching:
    """COCOeval's outcome for each detection at one IoU threshold: matched ground truth (or -1), and whether it
    is ignored (unmatched but inside a crowd region of its class)."""

    dt_match: np.ndarray  # [D] ground-truth index or -1
    dt_ignored: np.ndarray  # [D] bool
    gt_matched: np.ndarray  # [G] bool

    @property
    def true_positive(self) -> np.ndarray:
        return self.dt_match >= 0

    @property
    def false_positive(self) -> np.ndarray:
        return (self.dt_match < 0) & ~self.dt_ignored


def match_detections(
    boxes: BoxSet, pairs: Overlaps, iou_threshold: float, class_aware: bool = True, dt_mask: np.ndarray | None = None
) -> Matching:
    """Greedy matching at ``iou_threshold`` (per class like COCOeval, or across classes), optionally of the
    detections in ``dt_mask`` only."""
    num_dt, num_gt = len(boxes.dt_scores), len(boxes.gt_labels)
    ok = pairs.iou >= iou_threshold
    if class_aware:
        ok &= pairs.same_class
    if dt_mask is not None:
        ok &= dt_mask[pairs.dt]
    real = ok & ~pairs.crowd
    dt_match = greedy_match(pairs.dt[real], pairs.gt[real], pairs.iou[real], num_dt, num_gt)
    in_crowd = np.zeros(num_dt, dtype=bool)
    in_crowd[pairs.dt[ok & pairs.crowd]] = True
    gt_matched = np.zeros(num_gt, dtype=bool)
    gt_matched[dt_match[dt_match >= 0]] = True
    return Matching(dt_match=dt_match, dt_ignored=(dt_match < 0) & in_crowd, gt_matched=gt_matched)
