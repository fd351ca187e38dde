"""Modulated deformable convolution (DCNv2) as AdelaiDet/detectron2 use it, on torchvision's deform_conv2d."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d


class ModulatedDeformConv2d(nn.Module):
    """DCNv2: a 3x3 (or kxk) conv whose sampling points and their weights are predicted from the input.

    ``self.offset`` predicts ``3 * k * k`` channels per deformable group, laid out as in AdelaiDet's
    ``DFConv2d`` and detectron2's ``DeformBottleneckBlock`` (mmcv layout):
    ``o1, o2, mask = chunk(offset, 3)``, ``offset = cat(o1, o2)`` (torchvision, like mmcv's kernel, reads
    channel ``2j`` as the y and ``2j + 1`` as the x offset of kernel tap ``j``, group-major),
    ``mask = sigmoid(mask)``. The offset conv is zero-initialised, so a fresh module samples the regular grid
    with mask ``sigmoid(0) = 0.5``: it equals half the plain conv (without bias), exactly as AdelaiDet's
    freshly built DCN layers do.

    Parameter names: ``weight`` ``[out, in / groups, kh, kw]``, ``bias`` ``[out]`` or None,
    ``offset.weight`` / ``offset.bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        if in_channels % deformable_groups:
            raise ValueError(f"in_channels={in_channels} must be divisible by deformable_groups={deformable_groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.offset = nn.Conv2d(
            in_channels,
            deformable_groups * 3 * kh * kw,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """detectron2 ``ModulatedDeformConv`` init: kaiming-uniform (ReLU) weight, zero bias; zero offset."""
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, deformable_groups: int = 1) -> ModulatedDeformConv2d:
        """A DCN with ``conv``'s channels, kernel, stride, padding and dilation, its weight and its bias (if any).

        Used to swap a backbone's 3x3 conv in place; the new offset conv is zero-initialised.
        """
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("from_conv needs an nn.Conv2d with numeric zero padding")
        dcn = cls(
            conv.in_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            deformable_groups=deformable_groups,
            bias=conv.bias is not None,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            dcn.weight.copy_(conv.weight)
            if conv.bias is not None:
                dcn.bias.copy_(conv.bias)
        return dcn

    def forward(self, x: Tensor) -> Tensor:
        o1, o2, mask = torch.chunk(self.offset(x).to(x.dtype), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        # torchvision's CPU kernel has no bfloat16/float16 implementation and its CUDA autocast rule runs
        # this op in float32 anyway, so reduced-precision inputs are computed in float32, then cast back.
        compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = deform_conv2d(
                x.to(compute_dtype),
                offset.to(compute_dtype),
                self.weight.to(compute_dtype),
                bias,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                mask=torch.sigmoid(mask.to(compute_dtype)),
            )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}"
        )


__all__ = ["ModulatedDeformConv2d"]
