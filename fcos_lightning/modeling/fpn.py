"""Feature pyramid (detectron2/AdelaiDet FPN): 1x1 laterals, nearest 2x top-down sum, 3x3 outputs; optional
P6/P7 computed from the FPN's P5 with a ReLU between P6 and P7. By default no norm and no ReLU (every
AdelaiDet config but the full-SyncBN ones); ``norm`` and ``use_relu`` reproduce ``MODEL.FPN.NORM`` and
``MODEL.FPN.USE_RELU`` of ``R_18_1x-Full-SyncBN`` and ``FCOS_RT/MS_R_50_4x_full-syncbn``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

FPNNorm = Literal["none", "GN", "BN", "SyncBN"]
FPN_NORMS = ("none", "GN", "BN", "SyncBN")


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """detectron2's init for FPN convs (kaiming uniform with a=1, zero bias)."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def fpn_norm_layer(norm: FPNNorm, channels: int) -> nn.Module:
    """The norm after one FPN conv: GroupNorm(32), BatchNorm (``SyncBN`` is synchronized under multi-GPU DDP
    by the training code) or identity."""
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm in ("BN", "SyncBN"):
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown FPN norm {norm!r}; expected one of {list(FPN_NORMS)}")


class FPN(nn.Module):
    """FPN over backbone features ``C3..C5`` returning ``P3..P(5+top_levels)``.

    Args:
        in_channels: channels of each backbone feature, finest first.
        in_strides: stride of each backbone feature, finest first (each twice the previous).
        out_channels: channels of every pyramid level.
        top_levels: extra stride-2 levels after the last one (2: P6/P7, 1: P6, 0: none as FCOS_RT).
        norm: norm after every conv (laterals, outputs, P6/P7), which then have no bias: ``none``, ``GN``,
            ``BN`` or ``SyncBN``.
        use_relu: AdelaiDet's ``FPN.USE_RELU``, exactly as its full-SyncBN models compute it: every top-down
            sum and every output of the levels below the coarsest input pass a ReLU, the coarsest input's output
            (P5) does not; P6 and P7 are ReLU'd after their conv (instead of the plain ReLU between them).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        out_channels: int = 256,
        top_levels: int = 2,
        norm: FPNNorm = "none",
        use_relu: bool = False,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(in_strides):
            raise ValueError(f"{len(in_channels)} in_channels for {len(in_strides)} strides")
        if any(b != 2 * a for a, b in zip(in_strides, in_strides[1:])):
            raise ValueError(f"FPN needs strides doubling from level to level, got {list(in_strides)}")
        if top_levels not in (0, 1, 2):
            raise ValueError(f"top_levels must be 0, 1 or 2, got {top_levels}")
        fpn_norm_layer(norm, out_channels)  # validates the name
        bias = norm == "none"
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1, bias=bias) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias) for _ in in_channels
        )
        self.top_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1, bias=bias) for _ in range(top_levels)
        )
        # identities without a norm: no state-dict keys, so the plain FPN's layout is unchanged
        self.lateral_norms = nn.ModuleList(fpn_norm_layer(norm, out_channels) for _ in in_channels)
        self.output_norms = nn.ModuleList(fpn_norm_layer(norm, out_channels) for _ in in_channels)
        self.top_norms = nn.ModuleList(fpn_norm_layer(norm, out_channels) for _ in range(top_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                c2_xavier_fill(m)
        self.out_channels = out_channels
        self.norm = norm
        self.use_relu = use_relu
        self.strides = [int(s) for s in in_strides] + [int(in_strides[-1]) * 2 ** (k + 1) for k in range(top_levels)]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        laterals = [
            norm(conv(f)) for conv, norm, f in zip(self.lateral_convs, self.lateral_norms, features, strict=True)
        ]
        merged = laterals[-1]
        outputs = [self.output_norms[-1](self.output_convs[-1](merged))]
        for level in range(len(laterals) - 2, -1, -1):
            lateral = laterals[level]
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            if self.use_relu:
                merged = F.relu(merged)
            out = self.output_norms[level](self.output_convs[level](merged))
            outputs.insert(0, F.relu(out) if self.use_relu else out)
        for k, (conv, norm) in enumerate(zip(self.top_convs, self.top_norms, strict=True)):
            x = outputs[-1] if k == 0 or self.use_relu else F.relu(outputs[-1])
            out = norm(conv(x))
            outputs.append(F.relu(out) if self.use_relu else out)
        return outputs
