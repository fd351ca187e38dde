"""FCOS head (AdelaiDet's): class and box towers (or one shared tower), predictors for class
logits, ltrb regression and centerness (on the box tower), a learnable scale per level and
``relu(scale * x)`` regression in stride units."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcos_lightning.modeling.dcn import ModulatedDeformConv2d

HeadNorm = Literal["GN", "BN", "SyncBN", "none"]


class HeadOutputs(NamedTuple):
    """Raw per-level outputs, finest level first: ``cls_logits`` ``[B, C, H, W]``, ``box_reg`` ``[B, 4, H, W]``
    (non-negative ltrb distances in units of the level stride), ``centerness`` ``[B, 1, H, W]`` logits."""

    cls_logits: list[Tensor]
    box_reg: list[Tensor]
    centerness: list[Tensor]


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init], dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class TowerLayer(nn.Module):
    """conv3x3 -> norm -> ReLU. BN and SyncBN keep one norm per level, selected by the explicit level index."""

    def __init__(self, channels: int, norm: HeadNorm, num_levels: int, deformable: bool) -> None:
        super().__init__()
        self.conv = (
            ModulatedDeformConv2d(channels, channels, 3, padding=1, bias=True)
            if deformable
            else nn.Conv2d(channels, channels, 3, padding=1)
        )
        if norm == "GN":
            self.norm: nn.Module | None = nn.GroupNorm(32, channels)
        elif norm in ("BN", "SyncBN"):
            self.norm = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_levels))
        elif norm == "none":
            self.norm = None
        else:
            raise ValueError(f"unknown head norm {norm!r}; expected GN, BN, SyncBN or none")

    def forward(self, x: Tensor, level: int) -> Tensor:
        x = self.conv(x)
        if isinstance(self.norm, nn.ModuleList):
            x = self.norm[level](x)
        elif self.norm is not None:
            x = self.norm(x)
        return F.relu(x)


class Tower(nn.ModuleList):
    """A stack of :class:`TowerLayer`; DCNv2 on the last conv when ``deformable``."""

    def __init__(self, num_convs: int, channels: int, norm: HeadNorm, num_levels: int, deformable: bool) -> None:
        super().__init__(
            TowerLayer(channels, norm, num_levels, deformable and i == num_convs - 1) for i in range(num_convs)
        )

    def forward(self, x: Tensor, level: int) -> Tensor:
        for layer in self:
            x = layer(x, level)
        return x


class FCOSHead(nn.Module):
    """The FCOS head shared across pyramid levels.

    Args:
        in_channels: FPN channels.
        num_classes: foreground classes (sigmoid logits, no background).
        num_levels: pyramid levels (one Scale, and one BN per tower layer for BN heads, each).
        num_cls_convs, num_box_convs: tower depths (4 and 4 in AdelaiDet; 0 and 0 with shared towers).
        num_share_convs: depth of a tower shared by all predictors (4 in the ``shared_towers`` presets).
        norm: ``GN`` (32 groups), ``BN`` / ``SyncBN`` (one BN per level), or ``none``.
        use_deformable: DCNv2 on the last conv of the class and box towers.
        prior_prob: initial foreground probability of the classifier (bias ``-log((1-p)/p)``).
        use_scale: learn a per-level scale on the regression (AdelaiDet); False fixes it at 1 (torchvision).
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        num_levels: int = 5,
        num_cls_convs: int = 4,
        num_box_convs: int = 4,
        num_share_convs: int = 0,
        norm: HeadNorm = "GN",
        use_deformable: bool = False,
        prior_prob: float = 0.01,
        use_scale: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.norm = norm
        self._args = {
            "num_cls_convs": int(num_cls_convs),
            "num_box_convs": int(num_box_convs),
            "num_share_convs": int(num_share_convs),
            "norm": str(norm),
            "use_deformable": bool(use_deformable),
            "prior_prob": float(prior_prob),
            "use_scale": bool(use_scale),
        }
        self.share_tower = Tower(num_share_convs, in_channels, norm, num_levels, deformable=False)
        self.cls_tower = Tower(num_cls_convs, in_channels, norm, num_levels, use_deformable)
        self.box_tower = Tower(num_box_convs, in_channels, norm, num_levels, use_deformable)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        if not use_scale:
            self.scales.requires_grad_(False)

        # AdelaiDet: every nn.Conv2d of the towers and predictors (DCN offset convs included) ~ N(0, 0.01).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def constructor_args(self) -> dict[str, Any]:
        """The arguments this head was built with, as plain values, except those the detector supplies
        (``in_channels``, ``num_classes``, ``num_levels``)."""
        return dict(self._args)

    def forward(self, features: list[Tensor]) -> HeadOutputs:
        if len(features) != self.num_levels:
            raise ValueError(f"head built for {self.num_levels} levels got {len(features)} features")
        cls_out, box_out, ctr_out = [], [], []
        for level, x in enumerate(features):
            x = self.share_tower(x, level)
            cls_feat = self.cls_tower(x, level)
            box_feat = self.box_tower(x, level)
            cls_out.append(self.cls_logits(cls_feat))
            box_out.append(F.relu(self.scales[level](self.bbox_pred(box_feat))))
            ctr_out.append(self.centerness(box_feat))
        return HeadOutputs(cls_out, box_out, ctr_out)
