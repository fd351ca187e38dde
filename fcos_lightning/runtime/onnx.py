"""ONNX export of the network (the graph onnxruntime runs, and OpenVINO converts).

The split: the ONNX graph is the network (normalization with padding masked to the mean pixel, backbone, FPN,
head) with dynamic batch, height and width; its outputs are the raw per-level head outputs. Decoding, the
score threshold, NMS and the rescale to original pixels run outside the graph, in the same
:class:`~fcos_lightning.fcos.decoder.FCOSDecoder` (torch) as PyTorch inference (the
:class:`~fcos_lightning.runtime.predictor.Predictor` over a :mod:`~fcos_lightning.runtime.backends` backend),
so exported and PyTorch detections come from the same post-processing code. Inputs: ``images`` float32
``[B, 3, H, W]`` RGB 0-255 padded bottom/right to a multiple of the coarsest stride, ``image_sizes`` int64
``[B, 2]`` (h, w) of the valid region.

With ``nms=true`` (:class:`DetectingFCOS`, for callers in other languages) the graph also decodes: the same
decoder traced (:meth:`~fcos_lightning.fcos.decoder.FCOSDecoder.padded`), NMS as ONNX ``NonMaxSuppression``;
an extra input ``orig_sizes`` int64 ``[B, 2]`` (h, w) of the images before resizing, and the outputs
``boxes`` ``[B, D, 4]`` xyxy in those pixels, ``scores`` ``[B, D]``, ``labels`` ``[B, D]`` (0-based, -1 past
the end), ``num_detections`` ``[B]``: each image's detections packed at the front in score order.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fcos_lightning.fcos.decoder import FCOSDecoder

log = logging.getLogger(__name__)


class ExportableFCOS(nn.Module):
    """The network with a flat output tuple ``(cls_logits_p3, box_reg_p3, centerness_p3, cls_logits_p4, ...)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(images, image_sizes)
        return tuple(t for level in zip(*outputs, strict=True) for t in level)


class DetectingFCOS(nn.Module):
    """The network and its decoder: ``(images, image_sizes, orig_sizes) -> (boxes, scores, labels,
    num_detections)`` (:class:`~fcos_lightning.fcos.postprocess.PaddedDetections`)."""

    def __init__(self, model: nn.Module, decoder: FCOSDecoder) -> None:
        super().__init__()
        self.model, self.decoder = model, decoder

    def forward(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.decoder.padded(self.model(images, image_sizes), image_sizes, orig_sizes))


#: Outputs of an ``nms=true`` graph.
DETECTION_OUTPUTS = ["boxes", "scores", "labels", "num_detections"]


def output_names(strides: Sequence[int]) -> list[str]:
    levels = [f"p{s.bit_length() - 1}" for s in strides]
    return [f"{kind}_{lvl}" for lvl in levels for kind in ("cls_logits", "box_reg", "centerness")]


def export_onnx(model: nn.Module, path: str | Path, opset: int = 17, decoder: FCOSDecoder | None = None) -> Path:
    """Write ``model`` (an :class:`FCOS`) to ``path`` with dynamic batch/height/width; the model is untouched.
    With ``decoder`` the graph decodes too (:class:`DetectingFCOS`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = copy.deepcopy(model).float().cpu()
    d = model.size_divisibility
    images, sizes = sample_batch(4 * d, 5 * d, d)  # an image with content: candidates and detections to trace
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"}}
    if decoder is None:
        wrapper, inputs, input_names = ExportableFCOS(network), (images, sizes), ["images", "image_sizes"]
        names = output_names(model.strides)
        for i, name in enumerate(names):
            axes[name] = {0: "batch", 2: f"height_{i // 3}", 3: f"width_{i // 3}"}
    else:
        wrapper, inputs = DetectingFCOS(network, decoder), (images, sizes, sizes)
        input_names, names = ["images", "image_sizes", "orig_sizes"], DETECTION_OUTPUTS
        axes.update({name: {0: "batch"} for name in ["orig_sizes", *names]})
    with torch.no_grad():
        torch.onnx.export(
            wrapper.eval(),  # tracing must not update BN statistics
            inputs,
            str(path),
            input_names=input_names,
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
