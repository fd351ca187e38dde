"""The Predictor: uint8 images in, detections out, over any backend (PyTorch eager, onnxruntime, OpenVINO).

:class:`Predictor` resizes (the test resize), pads, runs the backend's network
(:mod:`~fcos_lightning.runtime.backends`) and decodes the whole batch at once with
:class:`~fcos_lightning.fcos.decoder.FCOSDecoder`: only the network call differs between runtimes. With
:class:`TestTimeAugmentation` it runs each test size and its horizontal mirror and merges the detections per
class with NMS.
Each image is seen padded to its own stride multiple only
(:func:`~fcos_lightning.runtime.own_padding.detect_own_padded`), so its detections do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from fcos_lightning.data.collate import pad_images
from fcos_lightning.data.transforms import ResizeShortestEdge, ResizeStyle
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.fcos.postprocess import FCOSPostProcessor, best_per_image
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import HeadOutputs
from fcos_lightning.runtime.backends import TorchBackend
from fcos_lightning.runtime.own_padding import detect_own_padded


@dataclass(frozen=True)
class TestTimeAugmentation:
    """Test sizes (short sides, each capped by the test ``max_size``) and the horizontal mirror of each.

    The detections of every view, in original-image pixels, are merged per image and class with NMS at the
    post-processor's ``nms_thresh`` (torchvision ``batched_nms``), then the best ``max_detections`` kept."""

    __test__ = False  # not a pytest class

    min_sizes: tuple[int, ...]
    flip: bool = True

    def __post_init__(self) -> None:
        if not self.min_sizes or any(int(s) <= 0 for s in self.min_sizes):
            raise ValueError(f"tta min_sizes must be a non-empty list of positive sizes, got {list(self.min_sizes)}")


class Predictor:
    """Detections for uint8 RGB images.

    Args:
        network: an :class:`FCOS` (run eagerly by :class:`TorchBackend`; prepare it with
            :func:`~fcos_lightning.runtime.optimize.optimize_for_inference`) or a backend of an exported model.
        postprocessor: decoding, NMS and rescaling settings (for a backend: give ``decoder`` instead).
        precision, compile: of the :class:`TorchBackend` (``network`` an FCOS only).
        decoder: the exported model's decoder (its strides, point offset and post-processing).
        test_resize: ``(min_size, max_size)`` of :meth:`detect` (the checkpoint's or sidecar's test resize).
        resize_style: how :meth:`detect` resizes (:class:`ResizeShortestEdge` ``style``; the checkpoint's or
            sidecar's ``test_resize.style``).
    """

    def __init__(
        self,
        network: FCOS | object,
        postprocessor: FCOSPostProcessor | None = None,
        precision: str = "auto",
        compile: bool | str = False,
        decoder: FCOSDecoder | None = None,
        test_resize: tuple[int, int] | None = None,
        resize_style: ResizeStyle = "detectron2",
    ) -> None:
        if isinstance(network, FCOS):
            self.model = network
            self.backend = TorchBackend(network, precision, compile)
            self.precision = self.backend.precision
            self.decoder = decoder or FCOSDecoder.for_model(network, postprocessor)
        else:
            if decoder is None:
                raise ValueError("a Predictor over an exported model's backend needs its decoder")
            self.backend, self.decoder, self.precision = network, decoder, getattr(network, "name", "exported")
        self.device = self.backend.device
        self.size_divisibility = self.backend.size_divisibility
        self.test_resize = None if test_resize is None else (int(test_resize[0]), int(test_resize[1]))
        self.resize_style: ResizeStyle = resize_style

    def pad(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Zero-pad ``[3, H, W]`` uint8 (or float 0-255) images into one batch on the model's device
        (:func:`pad_images`)."""
        return pad_images(images, self.size_divisibility, self.device)

    def network(self, batch: Tensor, image_sizes: Tensor) -> HeadOutputs:
        """The one network call of every path: a padded batch and its valid sizes -> raw head outputs."""
        return self.backend(batch, image_sizes)

    @torch.no_grad()  # not inference_mode: under it autocast re-casts every weight at every use
    def __call__(
        self,
        images: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | None = None,
        orig_sizes: Tensor | None = None,
    ) -> list[dict[str, Tensor]]:
        """Images already at the network's input resolution: a list of ``[3, H, W]`` uint8 or float 0-255 images
        (padded here), or a padded ``[B, 3, H, W]`` batch with its ``image_sizes``; ``orig_sizes`` rescales the
        boxes to the images before resizing. Each image is seen padded to its own stride multiple only."""
        if isinstance(images, Tensor) and images.ndim == 4:
            if image_sizes is None:
                image_sizes = torch.tensor([images.shape[-2:]] * images.shape[0], device=self.device)
            batch = images.to(self.device, non_blocking=True)
        else:
            batch, image_sizes = self.pad(images)
        if orig_sizes is not None:
            orig_sizes = orig_sizes.to(image_sizes.device)
        if hasattr(self.backend, "detections"):  # a graph that decodes: the network call is the decoder's
            forward, decode = (lambda x, _: x), self.backend.detections
        else:
            forward, decode = self.network, self.decoder
        detections, _ = detect_own_padded(forward, decode, batch, image_sizes, self.size_divisibility, orig_sizes)
        return detections

    def detect(self, images: Sequence[Tensor], tta: TestTimeAugmentation | None = None) -> list[dict[str, Tensor]]:
        """Detections of original-size ``[3, H, W]`` uint8 images, boxes in their own pixels: each image is
        resized as the test pipeline resizes (``test_resize``), or to every view of ``tta`` and merged."""
        if self.test_resize is None:
            raise ValueError("Predictor.detect needs test_resize=(min_size, max_size)")
        min_size, max_size = self.test_resize
        orig = torch.tensor([list(im.shape[-2:]) for im in images], dtype=torch.int64)
        if tta is None:
            return self(resized(images, min_size, max_size, self.resize_style), orig_sizes=orig)
        views = []
        for size in tta.min_sizes:
            scaled = resized(images, int(size), max_size, self.resize_style)
            views.append(self(scaled, orig_sizes=orig))
            if tta.flip:
                mirrored = self([im.flip(-1) for im in scaled], orig_sizes=orig)
                views.append([mirror_boxes(d, int(w)) for d, w in zip(mirrored, orig[:, 1].tolist(), strict=True)])
        return self.merge(views)

    def merge(self, views: Sequence[Sequence[dict[str, Tensor]]]) -> list[dict[str, Tensor]]:
        """Per-image detections of several views (same images, original pixels) merged by class-aware NMS."""
        post = self.decoder.postprocessor
        per_image = [[view[i] for view in views] for i in range(len(views[0]))]
        boxes = torch.cat([d["boxes"] for dets in per_image for d in dets])
        scores = torch.cat([d["scores"] for dets in per_image for d in dets])
        labels = torch.cat([d["labels"] for dets in per_image for d in dets])
        counts = torch.tensor([sum(len(d["scores"]) for d in dets) for dets in per_image])
        images = torch.repeat_interleave(torch.arange(len(per_image)), counts).to(boxes.device)
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
        keep = batched_nms(boxes, scores, images * num_classes + labels, post.nms_thresh)  # score-descending
        merged = best_per_image(
            boxes[keep], scores[keep], labels[keep], images[keep], len(per_image), post.max_detections
        )
        return merged.unpad()


def resized(images: Sequence[Tensor], min_size: int, max_size: int, style: ResizeStyle = "detectron2") -> list[Tensor]:
    """Each ``[3, H, W]`` uint8 image resized as the test pipeline does (:class:`ResizeShortestEdge` of ``style``:
    ``torchvision`` gives float 0-255 images)."""
    resize = ResizeShortestEdge((int(min_size),), int(max_size), sample=False, style=style)
    out = []
    for im in images:
        size = resize.get_output_shape(int(im.shape[-2]), int(im.shape[-1]), int(min_size), int(max_size), style)
        if min(size) < 1:
            raise ValueError(
                f"a {im.shape[-1]}x{im.shape[-2]} image is too thin to resize: a side rounds to 0 px at test "
                f"min_size={min_size}, max_size={max_size}"
            )
        out.append(im if tuple(size) == tuple(im.shape[-2:]) else resize(im))
    return out


def mirror_boxes(det: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """Detections of a horizontally mirrored image mapped back onto the image (``width`` its width in px)."""
    boxes = det["boxes"]
    return {**det, "boxes": torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), 1)}
