"""Feature pyramid (detectron2/AdelaiDet FPN): 1x1 laterals, nearest 2x top-down sum, 3x3
outputs, no norm or ReLU; optional P6/P7 computed from the FPN's P5 with a ReLU between P6 and P7."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """detectron2's init for FPN convs (kaiming uniform with a=1, zero bias)."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class FPN(nn.Module):
    """FPN over backbone features ``C3..C5`` returning ``P3..P(5+top_levels)``.

    Args:
        in_channels: channels of each backbone feature, finest first.
        in_strides: stride of each backbone feature, finest first (each twice the previous).
        out_channels: channels of every pyramid level.
        top_levels: extra stride-2 levels after the last one (2: P6/P7, 1: P6, 0: none as FCOS_RT).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        out_channels: int = 256,
        top_levels: int = 2,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(in_strides):
            raise ValueError(f"{len(in_channels)} in_channels for {len(in_strides)} strides")
        if any(b != 2 * a for a, b in zip(in_strides, in_strides[1:])):
            raise ValueError(f"FPN needs strides doubling from level to level, got {list(in_strides)}")
        if top_levels not in (0, 1, 2):
            raise ValueError(f"top_levels must be 0, 1 or 2, got {top_levels}")
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.top_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(top_levels)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                c2_xavier_fill(m)
        self.out_channels = out_channels
        self.strides = [int(s) for s in in_strides] + [int(in_strides[-1]) * 2 ** (k + 1) for k in range(top_levels)]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.insert(0, lateral + F.interpolate(merged[0], size=lateral.shape[-2:], mode="nearest"))
        outputs = [conv(m) for conv, m in zip(self.output_convs, merged, strict=True)]
        for k, conv in enumerate(self.top_convs):
            outputs.append(conv(outputs[-1] if k == 0 else F.relu(outputs[-1])))
        return outputs
