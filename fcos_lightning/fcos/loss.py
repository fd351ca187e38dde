"""FCOS loss (AdelaiDet's ``FCOSOutputs.fcos_losses``): focal classification, an IoU-family box loss and a
box-quality BCE, with AdelaiDet's two quality branches (``BOX_QUALITY``):

- ``ctrness`` (default): the box loss is weighted by the centerness targets and divided by their sum; the
  quality output is trained towards the centerness targets.
- ``iou``: the box loss is unweighted and divided by the number of positives; the quality output is trained
  towards the (detached) IoU between each positive's predicted box and its target box.

Either way inference multiplies the class probability by the sigmoid of the quality output. The normalizers
(number of positives, sum of centerness targets) are averaged over DDP ranks, so the loss does not depend on
how many processes share a batch.

Loss names (ours -> AdelaiDet): ``loss_cls`` -> ``loss_fcos_cls``, ``loss_box`` -> ``loss_fcos_loc``,
``loss_ctr`` -> ``loss_fcos_ctr`` with ``ctrness`` and ``loss_fcos_iou`` with ``iou``. Our key stays
``loss_ctr`` for both, so the training step, logs and TensorBoard tags are the same for either branch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

BoxLossType = Literal["giou", "iou", "linear_iou"]
BoxQuality = Literal["ctrness", "iou"]
BOX_QUALITIES = ("ctrness", "iou")


def reduce_mean(value: Tensor, sync: bool = True) -> Tensor:
    """Mean of a scalar over DDP ranks (identity when no process group is up, or without ``sync``)."""
    value = value.detach().clone()
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / dist.get_world_size()
    return value


def centerness_targets(reg_targets: Tensor) -> Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` for ``[P, 4]`` positive ltrb targets."""
    lr = reg_targets[:, 0::2]  # slices, not index lists: a list index is copied to the GPU at every call
    tb = reg_targets[:, 1::2]
    ratio = (lr.amin(dim=1) / lr.amax(dim=1)) * (tb.amin(dim=1) / tb.amax(dim=1))
    return torch.sqrt(ratio)


def box_ious(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(iou, giou)`` per box of ltrb distances ``[P, 4]`` sharing a point, with AdelaiDet's smoothed
    ``iou = (inter + 1) / (union + 1)`` and ``giou = iou - (enclose - union) / enclose``."""
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    w_inter = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    h_inter = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    inter = w_inter * h_inter
    union = pred_area + target_area - inter
    ious = (inter + 1.0) / (union + 1.0)
    w_enc = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 2], target[:, 2])
    h_enc = torch.maximum(pred[:, 1], target[:, 1]) + torch.maximum(pred[:, 3], target[:, 3])
    enclose = w_enc * h_enc
    return ious, ious - (enclose - union) / enclose


def iou_family_loss(ious: Tensor, gious: Tensor, loss_type: BoxLossType) -> Tensor:
    """Per-box loss from :func:`box_ious`: ``giou`` 1 - GIoU, ``iou`` -log IoU, ``linear_iou`` 1 - IoU."""
    if loss_type == "iou":
        return -torch.log(ious)
    if loss_type == "linear_iou":
        return 1.0 - ious
    if loss_type == "giou":
        return 1.0 - gious
    raise ValueError(f"unknown box loss type {loss_type!r}; expected giou, iou or linear_iou")


def iou_loss(pred: Tensor, target: Tensor, loss_type: BoxLossType) -> Tensor:
    """Per-box IoU-family loss on ltrb distances ``[P, 4]`` with AdelaiDet's ``(inter + 1) / (union + 1)``."""
    return iou_family_loss(*box_ious(pred, target), loss_type)


class FCOSLoss:
    """Computes ``loss_cls``, ``loss_box`` and ``loss_ctr`` (the quality loss) from flattened head outputs and
    targets.

    Args:
        num_classes: foreground classes ``C``; label ``C`` marks background.
        box_loss_type: ``giou`` (AdelaiDet default), ``iou`` (-log IoU) or ``linear_iou`` (1 - IoU).
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        box_quality: what the quality output (the head's ``centerness`` conv) learns, AdelaiDet's
            ``BOX_QUALITY``: ``ctrness`` (centerness targets; box loss weighted by them) or ``iou`` (the
            detached IoU of each positive's predicted box; box loss unweighted, over the number of positives).
    """

    def __init__(
        self,
        num_classes: int,
        box_loss_type: BoxLossType = "giou",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_quality: BoxQuality = "ctrness",
    ) -> None:
        if box_loss_type not in ("giou", "iou", "linear_iou"):
            raise ValueError(f"unknown box loss type {box_loss_type!r}; expected giou, iou or linear_iou")
        if box_quality not in BOX_QUALITIES:
            raise ValueError(f"unknown box_quality {box_quality!r}; expected one of {list(BOX_QUALITIES)}")
        self.num_classes = num_classes
        self.box_loss_type = box_loss_type
        self.box_quality = box_quality
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __call__(
        self,
        cls_logits: Tensor,
        box_reg: Tensor,
        centerness: Tensor,
        labels: Tensor,
        reg_targets: Tensor,
        sync: bool = True,
    ) -> dict[str, Tensor]:
        """cls_logits ``[B, R, C]``, box_reg ``[B, R, 4]`` (stride units), centerness ``[B, R]`` (quality
        logits), labels ``[B, R]`` and reg_targets ``[B, R, 4]`` from :class:`TargetAssigner`. ``sync=False``
        keeps the normalizers of this process (a call every rank does not make the same number of times, such
        as validation's per-size groups, must not all-reduce)."""
        cls_logits, box_reg, centerness = cls_logits.float(), box_reg.float(), centerness.float()
        pos = labels < self.num_classes  # [B, R]
        num_pos = reduce_mean(pos.sum().float(), sync).clamp(min=1.0)

        one_hot = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].to(cls_logits.dtype)
        loss_cls = (
            sigmoid_focal_loss(cls_logits, one_hot, self.focal_alpha, self.focal_gamma, reduction="sum") / num_pos
        )

        # The positives are selected once, by index: their count decides the shapes, so this is the loss's one
        # host synchronization (boolean indexing would add one per tensor, and one per gradient in backward).
        idx = pos.flatten().nonzero().squeeze(1)
        pos_reg = box_reg.flatten(0, 1).index_select(0, idx)
        pos_targets = reg_targets.flatten(0, 1).index_select(0, idx)
        pos_ctr = centerness.flatten().index_select(0, idx)
        ious, gious = box_ious(pos_reg, pos_targets)
        box_losses = iou_family_loss(ious, gious, self.box_loss_type)  # [P]
        # With no positives these sums are over empty tensors: 0, and still connected to the graph, so every
        # parameter gets a (zero) gradient and DDP needs no find_unused_parameters.
        if self.box_quality == "ctrness":
            quality_targets = centerness_targets(pos_targets)
            ctr_norm = reduce_mean(quality_targets.sum(), sync).clamp(min=1e-6)
            loss_box = (box_losses * quality_targets).sum() / ctr_norm
        else:
            quality_targets = ious.detach()
            loss_box = box_losses.sum() / num_pos
        loss_ctr = F.binary_cross_entropy_with_logits(pos_ctr, quality_targets, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}
