"""Parameter count and FLOPs of a detector at an input size, as AdelaiDet's and mmdetection's tools report them.

FLOPs come from ``torch.utils.flop_counter`` over one forward pass (backbone, FPN, head; not the post-processing),
which counts 2 FLOPs per multiply-add. detectron2's and mmdetection's "GFLOPs" (fvcore, mmcv) count one per
multiply-add, so :attr:`ModelComplexity.gmacs` is the number to compare with theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelComplexity:
    """Size and cost of one forward pass of one ``height x width`` image."""

    parameters: int
    trainable_parameters: int
    flops: int
    input_size: tuple[int, int]  # (height, width) the network saw, padded to its size divisibility

    @property
    def gmacs(self) -> float:
        """Giga multiply-adds: what detectron2's and mmdetection's tools call GFLOPs."""
        return self.flops / 2e9

    def summary(self) -> str:
        h, w = self.input_size
        return (
            f"{self.parameters / 1e6:.2f} M parameters ({self.trainable_parameters / 1e6:.2f} M trainable), "
            f"{self.flops / 1e9:.1f} GFLOPs = {self.gmacs:.1f} GMACs per {h}x{w} image "
            "(torch.utils.flop_counter; detectron2/mmdetection 'GFLOPs' are GMACs)"
        )


def model_complexity(model: nn.Module, height: int, width: int) -> ModelComplexity:
    """Count ``model``'s parameters and the FLOPs of ``model(images)`` on one ``height x width`` uint8 image,
    padded up to ``model.size_divisibility`` (as the data pipeline pads) where the model declares one. The model
    runs in eval mode on its own device and is left in the mode it was in."""
    if height <= 0 or width <= 0:
        raise ValueError(f"input size must be positive, got {height}x{width}")
    divisor = int(getattr(model, "size_divisibility", 1) or 1)
    size = (math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    images = torch.zeros((1, 3, *size), dtype=torch.uint8, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    return ModelComplexity(
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        flops=int(counter.get_total_flops()),
        input_size=size,
    )
