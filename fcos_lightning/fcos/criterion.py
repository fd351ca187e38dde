"""The training joint: head outputs + per-image targets -> ``{"loss_cls", "loss_box", "loss_ctr"}``.

Point grids for the outputs' level sizes (:func:`~fcos_lightning.fcos.points.make_points`), target assignment
(:class:`~fcos_lightning.fcos.targets.TargetAssigner`), outputs flattened in the grids' order, and
:class:`~fcos_lightning.fcos.loss.FCOSLoss`. Training, validation and the tests compute losses through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fcos_lightning.fcos.loss import BoxLossType, BoxQuality, FCOSLoss
from fcos_lightning.fcos.points import flatten_levels, make_points
from fcos_lightning.fcos.targets import FCOSTargets, TargetAssigner

__all__ = ["FCOSCriterion"]


class FCOSCriterion:
    """Losses of a batch from the network's raw per-level outputs.

    Args:
        num_classes: foreground classes ``C``.
        strides, sizes_of_interest, point_offset: the model's geometry (``FCOS.strides`` etc.): where the points
            sit and which object sizes each level takes; :meth:`for_model` reads them from the network.
        center_sampling_radius, inclusive_ranges: target assignment (:class:`TargetAssigner`).
        box_loss_type, focal_alpha, focal_gamma, box_quality: the loss terms (:class:`FCOSLoss`).
    """

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int],
        sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
        point_offset: float = 0.5,
        center_sampling_radius: float = 1.5,
        inclusive_ranges: bool = True,
        box_loss_type: BoxLossType = "giou",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_quality: BoxQuality = "ctrness",
    ) -> None:
        self.num_classes = int(num_classes)
        self.strides = [int(s) for s in strides]
        self.point_offset = float(point_offset)
        self.assigner = TargetAssigner(self.strides, sizes_of_interest, center_sampling_radius, inclusive_ranges)
        self.loss = FCOSLoss(self.num_classes, box_loss_type, focal_alpha, focal_gamma, box_quality)

    @classmethod
    def for_model(cls, model: Any, **settings: Any) -> FCOSCriterion:
        """The criterion of an :class:`~fcos_lightning.modeling.detector.FCOS` network (its classes and
        geometry) with the loss and assignment ``settings`` (see :meth:`settings`)."""
        return cls(model.num_classes, model.strides, model.sizes_of_interest, model.point_offset, **settings)

    def settings(self) -> dict[str, Any]:
        """The loss and assignment settings (everything but the model's classes and geometry), as plain values."""
        return {
            "center_sampling_radius": self.assigner.center_sampling_radius,
            "inclusive_ranges": self.assigner.inclusive_ranges,
            "box_loss_type": self.loss.box_loss_type,
            "focal_alpha": self.loss.focal_alpha,
            "focal_gamma": self.loss.focal_gamma,
            "box_quality": self.loss.box_quality,
        }

    def assign(self, outputs: Any, targets: Sequence[Mapping[str, Tensor]]) -> FCOSTargets:
        """Per-point targets for the outputs' point grids (what :meth:`__call__` computes the loss against)."""
        sizes = [x.shape[-2:] for x in outputs.cls_logits]
        points = make_points(sizes, self.strides, self.point_offset, outputs.cls_logits[0].device)
        return self.assigner(points, [t["boxes"] for t in targets], [t["labels"] for t in targets], self.num_classes)

    def __call__(self, outputs: Any, targets: Sequence[Mapping[str, Tensor]], sync: bool = True) -> dict[str, Tensor]:
        """``outputs``: :class:`~fcos_lightning.modeling.head.HeadOutputs` (per-level ``[B, K, H, W]``);
        ``targets``: per image ``{"boxes": [M, 4] xyxy pixels of the network input, "labels": [M]}``;
        ``sync``: average the loss normalizers over DDP ranks (:class:`FCOSLoss`)."""
        gt = self.assign(outputs, targets)
        return self.loss(
            flatten_levels(outputs.cls_logits),
            flatten_levels(outputs.box_reg),
            flatten_levels(outputs.centerness)[..., 0],
            gt.labels,
            gt.reg_targets,
            sync,
        )
