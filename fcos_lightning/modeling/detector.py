"""The FCOS network: normalize -> backbone -> FPN -> head, returning raw per-level outputs in train and eval
mode alike. Targets, losses and decoding live in ``fcos_lightning.fcos``; the LightningModule combines them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fcos_lightning.modeling.fpn import FPN, FPNNorm
from fcos_lightning.modeling.head import FCOSHead, HeadOutputs

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


class FCOS(nn.Module):
    """FCOS detector network.

    Args:
        backbone: a module with ``out_channels`` and ``strides`` lists returning one feature per stride.
        head: builds the head given ``in_channels``, ``num_classes`` and ``num_levels`` (a Hydra partial).
        num_classes: foreground classes, read from the dataset's annotation file.
        fpn_channels: channels of every pyramid level.
        top_levels: P6/P7 levels added after the backbone's coarsest stride (2 standard, 0 for FCOS_RT).
        fpn_norm, fpn_relu: the FPN's norm and ReLU (:class:`FPN`; ``SyncBN`` and True in AdelaiDet's
            full-SyncBN configs, none and False otherwise).
        sizes_of_interest: ``L - 1`` boundaries between the levels' object-size ranges (AdelaiDet
            ``[64, 128, 256, 512]`` for P3-P7, ``[64, 128]`` for FCOS_RT's P3-P5).
        point_offset: point position inside its cell as a fraction of the stride (0.5 AdelaiDet, 0.0
            torchvision); part of the model because weights are trained for one geometry.
        pixel_mean, pixel_std: RGB normalization of 0-255 inputs, kept as buffers so checkpoints carry the
            input convention (ImageNet statistics by default).
        channels_last: run the network in channels-last memory format (faster convolutions on CPU and GPU).
        cpu_micro_batch: in eval mode on CPU inputs, run the backbone, FPN and head on this many images at a
            time and concatenate the outputs (identical per image: nothing mixes images), so the working set
            stays in cache (:func:`~fcos_lightning.runtime.optimize.optimize_for_inference` sets 1). None runs the
            whole batch at once, as training and GPUs always do.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: Callable[..., FCOSHead],
        num_classes: int,
        fpn_channels: int = 256,
        top_levels: int = 2,
        sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
        point_offset: float = 0.5,
        pixel_mean: Sequence[float] = IMAGENET_MEAN_255,
        pixel_std: Sequence[float] = IMAGENET_STD_255,
        channels_last: bool = False,
        cpu_micro_batch: int | None = None,
        fpn_norm: FPNNorm = "none",
        fpn_relu: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = FPN(backbone.out_channels, backbone.strides, fpn_channels, top_levels, fpn_norm, fpn_relu)
        self.head = head(in_channels=fpn_channels, num_classes=num_classes, num_levels=len(self.fpn.strides))
        self.num_classes = num_classes
        if len(sizes_of_interest) != len(self.fpn.strides) - 1:
            raise ValueError(
                f"sizes_of_interest {list(sizes_of_interest)} needs {len(self.fpn.strides) - 1} values for the "
                f"{len(self.fpn.strides)} levels with strides {self.fpn.strides}"
            )
        self.sizes_of_interest = [float(s) for s in sizes_of_interest]
        self.point_offset = float(point_offset)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))
        self.channels_last = channels_last
        self.cpu_micro_batch = cpu_micro_batch
        self.fpn_channels = int(fpn_channels)
        self.top_levels = int(top_levels)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def constructor_args(self) -> dict[str, Any]:
        """This network's own constructor arguments as plain values: not ``backbone`` and ``head`` (see
        :func:`~fcos_lightning.modeling.build.model_description`) nor ``cpu_micro_batch`` (how it runs, set by
        ``optimize_for_inference``). ``pixel_mean``/``pixel_std`` are read from the buffers."""
        return {
            "num_classes": int(self.num_classes),
            "fpn_channels": self.fpn_channels,
            "top_levels": self.top_levels,
            "fpn_norm": self.fpn.norm,
            "fpn_relu": bool(self.fpn.use_relu),
            "sizes_of_interest": list(self.sizes_of_interest),
            "point_offset": self.point_offset,
            "pixel_mean": self.pixel_mean.flatten().tolist(),
            "pixel_std": self.pixel_std.flatten().tolist(),
            "channels_last": bool(self.channels_last),
        }

    @property
    def strides(self) -> list[int]:
        return self.fpn.strides

    @property
    def size_divisibility(self) -> int:
        """Padding multiple the input needs: the backbone's coarsest stride, so the FPN's 2x top-down sums align
        (detectron2's ``size_divisibility``, 32). P6/P7 are strided convs and need none; the data pipeline pads
        to the same multiple."""
        return self.backbone.size_divisibility

    def normalize(self, images: Tensor, image_sizes: Tensor | None = None) -> Tensor:
        """uint8 (or float 0-255) RGB ``[B, 3, H, W]`` -> normalized float; padding set to 0 (the mean pixel),
        as detectron2 pads after normalizing."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if image_sizes is not None:
            h, w = x.shape[-2:]
            rows = torch.arange(h, device=x.device)[None, :, None] < image_sizes[:, 0, None, None]
            cols = torch.arange(w, device=x.device)[None, None, :] < image_sizes[:, 1, None, None]
            x = x * (rows & cols)[:, None].to(x.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_features(self, x: Tensor) -> HeadOutputs:
        """Backbone, FPN and head on an already normalized batch."""
        return self.head(self.fpn(self.backbone(x)))

    def forward(self, images: Tensor, image_sizes: Tensor | None = None) -> HeadOutputs:
        step = self.cpu_micro_batch
        if self.training or not step or images.shape[0] <= step or images.device.type != "cpu":
            return self.forward_features(self.normalize(images, image_sizes))
        chunks = images.split(step)
        sizes = image_sizes.split(step) if image_sizes is not None else [None] * len(chunks)
        parts = [self.forward_features(self.normalize(x, s)) for x, s in zip(chunks, sizes, strict=True)]
        # parts[chunk].field[level] -> field[level], the chunks concatenated along the batch.
        return HeadOutputs(*([torch.cat(level) for level in zip(*field)] for field in zip(*parts)))
