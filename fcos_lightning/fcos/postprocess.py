"""Inference post-processing (AdelaiDet's), batched over images.

Per level: keep ``cls_prob > score_thresh`` (on the class probability; on ``cls * ctr`` with
``thresh_with_ctr``), take the top ``pre_nms_topk`` by ``cls * ctr``, decode ``point -/+ ltrb * stride``,
score ``sqrt(cls * ctr)``. Then one class-aware ``batched_nms`` for the whole batch (images are separate
NMS groups), the best ``max_detections`` per image, boxes rescaled to each original image size, clipped,
and empty boxes dropped. Runs in fp32 whatever the autocast state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from fcos_lightning.fcos.points import flatten_level


class FCOSPostProcessor:
    """Turns per-level head outputs into per-image detections ``{"boxes", "scores", "labels"}``.

    Args:
        score_thresh: candidate threshold (0.05 in AdelaiDet).
        thresh_with_ctr: threshold ``cls * ctr`` instead of ``cls`` (torchvision's ``sqrt(cls*ctr) > t`` is
            ``thresh_with_ctr=True`` with ``score_thresh = t**2``).
        pre_nms_topk: candidates kept per level and image.
        nms_thresh: IoU above which NMS suppresses a box of the same class.
        max_detections: detections kept per image.
        clip_before_nms: clip boxes to the (resized) image before NMS, as torchvision does.
    """

    def __init__(
        self,
        score_thresh: float = 0.05,
        thresh_with_ctr: bool = False,
        pre_nms_topk: int = 1000,
        nms_thresh: float = 0.6,
        max_detections: int = 100,
        clip_before_nms: bool = False,
    ) -> None:
        self.score_thresh = score_thresh
        self.thresh_with_ctr = thresh_with_ctr
        self.pre_nms_topk = pre_nms_topk
        self.nms_thresh = nms_thresh
        self.max_detections = max_detections
        self.clip_before_nms = clip_before_nms

    def settings(self) -> dict[str, float | int | bool]:
        """The constructor arguments as plain values (saved in checkpoints)."""
        return {
            "score_thresh": self.score_thresh,
            "thresh_with_ctr": self.thresh_with_ctr,
            "pre_nms_topk": self.pre_nms_topk,
            "nms_thresh": self.nms_thresh,
            "max_detections": self.max_detections,
            "clip_before_nms": self.clip_before_nms,
        }

    @torch.no_grad()
    def __call__(
        self,
        cls_logits: Sequence[Tensor],
        box_reg: Sequence[Tensor],
        centerness: Sequence[Tensor],
        points: Sequence[Tensor],
        strides: Sequence[int],
        image_sizes: Tensor,
        orig_sizes: Tensor | None = None,
    ) -> list[dict[str, Tensor]]:
        """Per-level ``[B, C, H, W]`` logits, ``[B, 4, H, W]`` stride-unit ltrb, ``[B, 1, H, W]`` centerness;
        ``image_sizes`` ``[B, 2]`` (h, w) of the network input before padding; ``orig_sizes`` ``[B, 2]``
        of the original images (boxes are rescaled to them; defaults to ``image_sizes``)."""
        batch = cls_logits[0].shape[0]
        level_boxes, level_scores, level_labels = [], [], []
        for logits, reg, ctr, pts, stride in zip(cls_logits, box_reg, centerness, points, strides, strict=True):
            num_classes = logits.shape[1]
            cls_prob = flatten_level(logits.float()).sigmoid()  # [B, HW, C]
            ctr_prob = flatten_level(ctr.float()).sigmoid()  # [B, HW, 1]
            ltrb = flatten_level(reg.float()) * stride  # [B, HW, 4] pixels
            score = cls_prob * ctr_prob
            keep = (score if self.thresh_with_ctr else cls_prob) > self.score_thresh
            ranked = torch.where(keep, score, -1.0).flatten(1)  # [B, HW*C]
            k = min(self.pre_nms_topk, ranked.shape[1])
            top_scores, top_idx = ranked.topk(k, dim=1)  # [B, k]
            point_idx, labels = top_idx // num_classes, top_idx % num_classes
            p = pts[point_idx]  # [B, k, 2]
            d = ltrb.gather(1, point_idx[..., None].expand(-1, -1, 4))  # [B, k, 4]
            level_boxes.append(torch.cat((p - d[..., :2], p + d[..., 2:]), dim=-1))
            level_scores.append(top_scores)
            level_labels.append(labels)

        # All levels' candidates [B, K] first, then one selection: every boolean selection waits for the GPU.
        scores = torch.cat(level_scores, dim=1)
        image, cand = (scores >= 0).nonzero(as_tuple=True)  # image-major, levels in order within an image
        boxes = torch.cat(level_boxes, dim=1)[image, cand]
        labels = torch.cat(level_labels, dim=1)[image, cand]
        scores, images = scores[image, cand].sqrt(), image
        if self.clip_before_nms:
            boxes = clip_to_sizes(boxes, image_sizes[images])
        # One NMS call for the batch: each (image, class) pair is its own group.
        keep = batched_nms(boxes, scores, images * num_classes + labels, self.nms_thresh)
        boxes, scores, labels, images = boxes[keep], scores[keep], labels[keep], images[keep]
        wanted = per_image_rank(images, batch) < self.max_detections
        if orig_sizes is not None:
            scale = (orig_sizes.float() / image_sizes.float())[images]  # (h, w) ratios
            boxes = clip_to_sizes(boxes * scale[:, [1, 0, 1, 0]], orig_sizes[images])
            wanted &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # empty after clipping
        kept = wanted.nonzero().squeeze(1)  # the best max_detections per image, in NMS (score) order
        boxes, scores, labels, images = boxes[kept], scores[kept], labels[kept], images[kept]

        order = torch.argsort(images, stable=True)  # NMS order (score-descending) within each image
        counts = images.new_zeros(batch).scatter_add_(0, images, torch.ones_like(images)).tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(
                boxes[order].split(counts),
                scores[order].split(counts),
                labels[order].split(counts),
                strict=True,
            )
        ]


def per_image_rank(images: Tensor, batch: int) -> Tensor:
    """Rank of each entry among the entries of its image, in the given (score-descending) order."""
    if images.numel() == 0:
        return images
    order = torch.argsort(images, stable=True)
    sorted_images = images[order]
    counts = images.new_zeros(batch).scatter_add_(0, images, torch.ones_like(images))  # bincount, no host sync
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(images)
    ranks[order] = torch.arange(images.numel(), device=images.device) - starts[sorted_images]
    return ranks


def clip_to_sizes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clip ``[N, 4]`` boxes to per-box image sizes ``[N, 2]`` (h, w), as ``clip_boxes_to_image`` per image."""
    wh = sizes.flip(1).to(boxes.dtype).repeat(1, 2)
    return torch.minimum(boxes.clamp(min=0), wh)
