"""Inference post-processing (AdelaiDet's), batched over images.

Per level: keep ``cls_prob > score_thresh`` (on the class probability; on ``cls * ctr`` with
``thresh_with_ctr``), take the top ``pre_nms_topk`` by ``cls * ctr``, decode ``point -/+ ltrb * stride``,
score ``sqrt(cls * ctr)``. Then one class-aware ``batched_nms`` for the whole batch (images are separate
NMS groups), the best ``max_detections`` per image, boxes rescaled to each original image size, clipped,
and empty boxes dropped. Runs in fp32 whatever the autocast state. Every step is a fixed-size or
data-dependent tensor op without a host sync, so the same code traces into the ONNX graph of
``export.py nms=true`` (:class:`PaddedDetections`); only :meth:`PaddedDetections.unpad` splits per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

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

    def __call__(self, *args: Any, **kwargs: Any) -> list[dict[str, Tensor]]:
        """Detections per image ``{"boxes", "scores", "labels"}``: :meth:`padded` split per image."""
        return self.padded(*args, **kwargs).unpad()

    @torch.no_grad()
    def padded(
        self,
        cls_logits: Sequence[Tensor],
        box_reg: Sequence[Tensor],
        centerness: Sequence[Tensor],
        points: Sequence[Tensor],
        strides: Sequence[int],
        image_sizes: Tensor,
        orig_sizes: Tensor | None = None,
    ) -> PaddedDetections:
        """Per-level ``[B, C, H, W]`` logits, ``[B, 4, H, W]`` stride-unit ltrb, ``[B, 1, H, W]`` centerness;
        ``image_sizes`` ``[B, 2]`` (h, w) of the network input before padding; ``orig_sizes`` ``[B, 2]`` of the
        original images (boxes are rescaled to them; None: boxes stay in network-input pixels) -> fixed-size
        :class:`PaddedDetections`, with no host sync: the form that traces into an ONNX graph
        (``export.py nms=true``) and the one every caller's detections come from."""
        boxes, scores, labels = self.candidates(cls_logits, box_reg, centerness, points, strides)
        batch, num_classes = scores.shape[0], cls_logits[0].shape[1]
        # Flat single-axis indexing throughout: it traces to ONNX for any number of candidates.
        cand = (scores.flatten() >= 0).nonzero().squeeze(1)  # image-major, levels in order within an image
        image = torch.div(cand, scores.shape[1], rounding_mode="floor")
        boxes, scores, labels = boxes.flatten(0, 1)[cand], scores.flatten()[cand].sqrt(), labels.flatten()[cand]
        if self.clip_before_nms:
            boxes = clip_to_sizes(boxes, image_sizes[image])
        # One NMS call for the batch: each (image, class) pair is its own group.
        keep = batched_nms(boxes, scores, image * num_classes + labels, self.nms_thresh)
        det = best_per_image(boxes[keep], scores[keep], labels[keep], image[keep], batch, self.max_detections)
        return det if orig_sizes is None else det.rescaled(image_sizes, orig_sizes)

    def candidates(
        self,
        cls_logits: Sequence[Tensor],
        box_reg: Sequence[Tensor],
        centerness: Sequence[Tensor],
        points: Sequence[Tensor],
        strides: Sequence[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The top ``pre_nms_topk`` of each level and image: boxes ``[B, K, 4]`` (network-input pixels),
        ``cls * ctr`` ``[B, K]`` (-1 where below the threshold) and labels ``[B, K]``."""
        level_boxes, level_scores, level_labels = [], [], []
        for logits, reg, ctr, pts, stride in zip(cls_logits, box_reg, centerness, points, strides, strict=True):
            num_classes = logits.shape[1]
            cls_prob = flatten_level(logits.float()).sigmoid()  # [B, HW, C]
            ctr_prob = flatten_level(ctr.float()).sigmoid()  # [B, HW, 1]
            ltrb = flatten_level(reg.float()) * stride  # [B, HW, 4] pixels
            score = cls_prob * ctr_prob
            keep = (score if self.thresh_with_ctr else cls_prob) > self.score_thresh
            ranked = torch.where(keep, score, -1.0).flatten(1)  # [B, HW*C]
            if torch.jit.is_tracing() or ranked.shape[1] < self.pre_nms_topk:
                # A traced graph runs at any size: pad so that top-k always has pre_nms_topk entries.
                ranked = torch.cat((ranked, ranked.new_full((ranked.shape[0], self.pre_nms_topk), -1.0)), 1)
            top_scores, top_idx = ranked.topk(self.pre_nms_topk, dim=1)  # [B, k]
            point_idx = torch.where(top_scores >= 0, top_idx // num_classes, 0)  # padding -> any real point
            p = pts[point_idx]  # [B, k, 2]
            d = ltrb.gather(1, point_idx[..., None].expand(-1, -1, 4))  # [B, k, 4]
            level_boxes.append(torch.cat((p - d[..., :2], p + d[..., 2:]), dim=-1))
            level_scores.append(top_scores)
            level_labels.append(top_idx % num_classes)
        return torch.cat(level_boxes, 1), torch.cat(level_scores, 1), torch.cat(level_labels, 1)


class PaddedDetections(NamedTuple):
    """Detections of a batch in fixed-size tensors, each image's in score order and packed at the front:
    boxes ``[B, D, 4]`` xyxy, scores ``[B, D]``, labels ``[B, D]`` (-1 past the end), counts ``[B]``.
    The outputs of an ``export.py nms=true`` graph (TensorRT's EfficientNMS layout)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    counts: Tensor

    def unpad(self) -> list[dict[str, Tensor]]:
        """Per-image ``{"boxes", "scores", "labels"}`` (one host sync)."""
        valid = self.labels >= 0
        counts = self.counts.tolist()
        return [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(
                self.boxes[valid].split(counts),
                self.scores[valid].split(counts),
                self.labels[valid].split(counts),
                strict=True,
            )
        ]

    def rescaled(self, image_sizes: Tensor, orig_sizes: Tensor) -> PaddedDetections:
        """Boxes scaled from network-input sizes ``[B, 2]`` to ``orig_sizes`` ``[B, 2]`` (h, w), clipped to
        them; boxes empty after clipping are dropped (the rest keep their order)."""
        scale = (orig_sizes.float() / image_sizes.float())[:, None, [1, 0, 1, 0]]  # [B, 1, 4]
        boxes = clip_to_sizes(self.boxes * scale, orig_sizes[:, None, :])
        valid = (self.labels >= 0) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        return packed(boxes, self.scores, self.labels, valid)


def best_per_image(
    boxes: Tensor, scores: Tensor, labels: Tensor, images: Tensor, batch: int, k: int
) -> PaddedDetections:
    """The first ``k`` of each image's detections among ``N`` given in score order (NMS's output order, kept
    for ties): ``[N, 4]`` boxes, ``[N]`` scores, labels and image indices -> ``[batch, k]`` padded."""
    n = images.shape[0]
    # Row = image, column = position in the given order (then k padding columns); higher = earlier.
    position = torch.arange(n, device=images.device)
    order = torch.full((batch * (n + k),), -torch.inf, device=scores.device)
    order = order.scatter(0, images * (n + k) + position, -position.float()).view(batch, n + k)
    top, idx = order.topk(k, dim=1)  # [B, k] positions into the inputs padded with k rows
    boxes = torch.cat((boxes, boxes.new_zeros(k, 4)))[idx]
    scores = torch.cat((scores, scores.new_zeros(k)))[idx]
    labels = torch.cat((labels, labels.new_zeros(k)))[idx]
    return packed(boxes, scores, labels, top > -torch.inf)


def packed(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor) -> PaddedDetections:
    """``[B, D]`` detections with the ``valid`` ones moved to the front in their order, the rest zeroed
    (label -1)."""
    d = valid.shape[1]
    rank = torch.arange(d, 0, -1, device=valid.device, dtype=torch.float)  # D .. 1: earlier ranks higher
    _, order = torch.where(valid, rank, 0.0).topk(d, dim=1)
    valid = valid.gather(1, order)
    boxes = torch.where(valid[..., None], boxes.gather(1, order[..., None].expand(-1, -1, 4)), 0.0)
    scores = torch.where(valid, scores.gather(1, order), 0.0)
    labels = torch.where(valid, labels.gather(1, order), -1)
    return PaddedDetections(boxes, scores, labels, valid.sum(1))


def clip_to_sizes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clip ``[..., 4]`` boxes to image sizes ``[..., 2]`` (h, w) broadcast against them, as
    ``clip_boxes_to_image`` per image."""
    wh = sizes.flip(-1).to(boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), torch.cat((wh, wh), -1))
