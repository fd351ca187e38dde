"""ONNX export of the network (the graph onnxruntime runs, and OpenVINO converts).

The split: the ONNX graph is the network (normalization with padding masked to the mean pixel, backbone, FPN,
head) with dynamic batch, height and width; its outputs are the raw per-level head outputs. Decoding, the
score threshold, NMS and the rescale to original pixels run outside the graph, in the same
:class:`~fcos_lightning.fcos.decoder.FCOSDecoder` (torch) as PyTorch inference (the
:class:`~fcos_lightning.runtime.predictor.Predictor` over a :mod:`~fcos_lightning.runtime.backends` backend),
so exported and PyTorch detections come from the same post-processing code. Inputs: ``images`` float32
``[B, 3, H, W]`` RGB 0-255 padded bottom/right to a multiple of the coarsest stride, ``image_sizes`` int64
``[B, 2]`` (h, w) of the valid region.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class ExportableFCOS(nn.Module):
    """The network with a flat output tuple ``(cls_logits_p3, box_reg_p3, centerness_p3, cls_logits_p4, ...)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(images, image_sizes)
        return tuple(t for level in zip(*outputs, strict=True) for t in level)


def output_names(strides: Sequence[int]) -> list[str]:
    levels = [f"p{s.bit_length() - 1}" for s in strides]
    return [f"{kind}_{lvl}" for lvl in levels for kind in ("cls_logits", "box_reg", "centerness")]


def export_onnx(model: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` (an :class:`FCOS`) to ``path`` with dynamic batch/height/width; the model is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableFCOS(copy.deepcopy(model).float().cpu()).eval()  # tracing must not update BN statistics
    d = model.size_divisibility
    images = torch.zeros(1, 3, 4 * d, 5 * d)
    sizes = torch.tensor([[4 * d, 5 * d]])
    names = output_names(model.strides)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"}}
    for i, name in enumerate(names):
        axes[name] = {0: "batch", 2: f"height_{i // 3}", 3: f"width_{i // 3}"}
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (images, sizes),
            str(path),
            input_names=["images", "image_sizes"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            training=torch.onnx.TrainingMode.EVAL,
        )
    return path


def sample_batch(height: int, width: int, divisibility: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A padded batch of one synthetic image (noise with flat blocks) of size ``height x width``."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 255
    image[:, height // 4 : height // 2, width // 3 : width // 2] = 60.0
    image[:, height // 2 :, : width // 4] = 200.0
    hp, wp = -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility
    batch = torch.zeros(1, 3, hp, wp)
    batch[0, :, :height, :width] = image.round()
    return batch, torch.tensor([[height, width]])
