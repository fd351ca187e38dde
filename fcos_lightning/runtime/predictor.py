"""The Predictor: uint8 images in, detections out.

:class:`Predictor` pads a batch on the model's device and runs the network under the precision's autocast (bf16
on CPUs with native bf16 and on GPUs, by ``precision=auto``), each image padded to its own stride multiple only
(:func:`~fcos_lightning.runtime.own_padding.detect_own_padded`), so its detections do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fcos_lightning.data.collate import pad_images
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.runtime.optimize import autocast, autocast_dtype
from fcos_lightning.runtime.own_padding import detect_own_padded
from fcos_lightning.runtime.precision import resolve_precision


class Predictor:
    """Detections for uint8 RGB images at the network's input resolution.

    Args:
        model: the network (prepare it with :func:`optimize_for_inference` for speed).
        postprocessor: decoding, NMS and rescaling settings.
        precision: a Lightning precision or ``auto`` (:func:`~fcos_lightning.runtime.precision.resolve_precision`).
        compile: wrap the network in ``torch.compile`` (the first calls compile; slower on the CPU measured, README);
            a string picks its ``mode`` (``reduce-overhead``: CUDA graphs, one launch per network call on a GPU).
    """

    def __init__(
        self,
        model: FCOS,
        postprocessor: FCOSPostProcessor | None = None,
        precision: str = "auto",
        compile: bool | str = False,
    ) -> None:
        self.model = model.eval()
        self.decoder = FCOSDecoder.for_model(model, postprocessor)
        device = next(model.parameters()).device
        self.device = device
        self.precision = resolve_precision(precision, "cpu" if device.type == "cpu" else "gpu")
        stray = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Conv2d)}
        stray -= {torch.float32, autocast_dtype(self.precision)}
        if stray:
            raise ValueError(
                f"the model's convolution weights are {sorted(map(str, stray))} but precision {self.precision!r} "
                "computes in another dtype; pass the same precision to optimize_for_inference(precision=...)"
            )
        mode = compile if isinstance(compile, str) else None
        self.network = torch.compile(model, dynamic=False, mode=mode) if compile else model

    def pad(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Zero-pad ``[3, H, W]`` uint8 images into one batch on the model's device (:func:`pad_images`)."""
        return pad_images(images, self.model.size_divisibility, self.device)

    @torch.no_grad()  # not inference_mode: under it autocast re-casts every weight at every use
    def __call__(
        self,
        images: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | None = None,
        orig_sizes: Tensor | None = None,
    ) -> list[dict[str, Tensor]]:
        """A list of ``[3, H, W]`` uint8 images (padded here), or an already padded ``[B, 3, H, W]`` batch with
        its ``image_sizes``; ``orig_sizes`` rescales the boxes to the images before resizing."""
        if isinstance(images, Tensor) and images.ndim == 4:
            if image_sizes is None:
                image_sizes = torch.tensor([images.shape[-2:]] * images.shape[0], device=self.device)
            batch = images.to(self.device, non_blocking=True)
        else:
            batch, image_sizes = self.pad(images)
        detections, _ = detect_own_padded(
            self.forward, self.decoder, batch, image_sizes, self.model.size_divisibility, orig_sizes
        )
        return detections

    def forward(self, batch: Tensor, image_sizes: Tensor):
        """The network's raw outputs for a padded batch: the one place the network runs."""
        with autocast(self.precision, self.device):
            return self.network(batch, image_sizes)
