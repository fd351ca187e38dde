"""The inference joint: head outputs + image sizes (+ original sizes) -> detections per image.

Point grids for the outputs' level sizes (:func:`~fcos_lightning.fcos.points.make_points`) and
:class:`~fcos_lightning.fcos.postprocess.FCOSPostProcessor` (decode, thresholds, NMS, rescale to the original
pixels). Validation, the Predictor, the ONNX runner and its check, the benchmark and the tests decode through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fcos_lightning.fcos.points import level_points, make_points
from fcos_lightning.fcos.postprocess import FCOSPostProcessor, PaddedDetections

__all__ = ["FCOSDecoder"]


class FCOSDecoder:
    """Detections ``{"boxes" xyxy, "scores", "labels"}`` per image from raw per-level outputs.

    Args:
        strides, point_offset: the model's geometry (``FCOS.strides``, ``FCOS.point_offset``); :meth:`for_model`
            reads them from the network.
        postprocessor: thresholds and NMS (AdelaiDet's defaults when None).
    """

    def __init__(
        self, strides: Sequence[int], point_offset: float = 0.5, postprocessor: FCOSPostProcessor | None = None
    ) -> None:
        self.strides = [int(s) for s in strides]
        self.point_offset = float(point_offset)
        self.postprocessor = postprocessor or FCOSPostProcessor()

    @classmethod
    def for_model(cls, model: Any, postprocessor: FCOSPostProcessor | None = None) -> FCOSDecoder:
        """The decoder of an :class:`~fcos_lightning.modeling.detector.FCOS` network's geometry."""
        return cls(model.strides, model.point_offset, postprocessor)

    def __call__(self, outputs: Any, image_sizes: Tensor, orig_sizes: Tensor | None = None) -> list[dict[str, Tensor]]:
        """``outputs``: :class:`~fcos_lightning.modeling.head.HeadOutputs`; ``image_sizes`` ``[B, 2]`` (h, w) of
        the network input before padding; ``orig_sizes`` ``[B, 2]`` of the original images, to which boxes are
        rescaled (None: boxes stay in network-input pixels)."""
        return self.padded(outputs, image_sizes, orig_sizes).unpad()

    def padded(self, outputs: Any, image_sizes: Tensor, orig_sizes: Tensor | None = None) -> PaddedDetections:
        """As :meth:`__call__`, as fixed-size tensors (what ``export.py nms=true`` traces into its graph)."""
        if torch.jit.is_tracing():  # grids from the traced sizes, so the graph runs at any input size
            points = [
                level_points(x.shape[-2], x.shape[-1], s, self.point_offset, x.device)
                for x, s in zip(outputs.cls_logits, self.strides, strict=True)
            ]
        else:
            sizes = [x.shape[-2:] for x in outputs.cls_logits]
            points = make_points(sizes, self.strides, self.point_offset, outputs.cls_logits[0].device)
        return self.postprocessor.padded(
            outputs.cls_logits, outputs.box_reg, outputs.centerness, points, self.strides, image_sizes, orig_sizes
        )
