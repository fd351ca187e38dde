"""torchvision.transforms.v2 pipelines on uint8 samples (AdelaiDet's input pipeline).

Train: detectron2 ``ResizeShortestEdge`` (one short side drawn per image, long side capped), horizontal flip,
clamp, drop boxes under 1 px. Test: the same resize with a fixed short side, or torchvision's (``style``) for
checkpoints converted from torchvision. No normalisation here: the model normalises on its device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2 import query_size

__all__ = [
    "RESIZE_STYLES",
    "ResizeShortestEdge",
    "ResizeStyle",
    "build_test_transforms",
    "build_train_transforms",
    "get_labels",
    "too_thin",
]

ResizeStyle = Literal["detectron2", "torchvision"]
RESIZE_STYLES: tuple[ResizeStyle, ...] = ("detectron2", "torchvision")


class ResizeShortestEdge(v2.Transform):
    """Resize so the short side is one of ``min_sizes`` and the long side at most ``max_size`` (detectron2).

    ``sample=True`` draws the short side uniformly from ``min_sizes`` per call (detectron2's "choice"
    sampling, using torch's RNG so DataLoader workers differ); otherwise ``min_sizes[0]`` is used. Boxes (and
    masks) are scaled to match, everything else passes through.

    ``style="detectron2"``: detectron2's sizes (rounded), uint8 images resized bilinearly with antialiasing (close
    to detectron2's PIL bilinear). ``style="torchvision"``: torchvision's ``GeneralizedRCNNTransform`` (sizes
    floored, bilinear without antialiasing); images come out float32 0-255, as rounding them back to uint8 would
    change what the network sees.
    """

    def __init__(
        self, min_sizes: Sequence[int] | int, max_size: int, sample: bool, style: ResizeStyle = "detectron2"
    ) -> None:
        super().__init__()
        if style not in RESIZE_STYLES:
            raise ValueError(f"resize style must be one of {list(RESIZE_STYLES)}, got {style!r}")
        sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(int(s) for s in min_sizes)
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"min_sizes must be non-empty and positive, got {min_sizes}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self.min_sizes = sizes
        self.max_size = int(max_size)
        self.sample = bool(sample)
        self.style = style

    @staticmethod
    def get_output_shape(
        h: int, w: int, short_edge: int, max_size: int, style: ResizeStyle = "detectron2"
    ) -> tuple[int, int]:
        """New ``(h, w)``: detectron2's ``ResizeShortestEdge.get_output_shape``, or torchvision's
        ``floor(side * min(short_edge / short side, max_size / long side))`` (``F.interpolate``'s
        ``recompute_scale_factor=True`` sizes)."""
        if style == "torchvision":
            scale = min(short_edge / min(h, w), max_size / max(h, w))
            return math.floor(h * scale), math.floor(w * scale)
        size = float(short_edge)
        scale = size / min(h, w)
        if h < w:
            new_h, new_w = size, scale * w
        else:
            new_h, new_w = scale * h, size
        if max(new_h, new_w) > max_size:
            scale = max_size / max(new_h, new_w)
            new_h, new_w = new_h * scale, new_w * scale
        return int(new_h + 0.5), int(new_w + 0.5)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        if self.sample and len(self.min_sizes) > 1:
            short = self.min_sizes[int(torch.randint(len(self.min_sizes), (1,)).item())]
        else:
            short = self.min_sizes[0]
        return {"size": self.get_output_shape(h, w, short, self.max_size, self.style)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        antialias = self.style == "detectron2"
        if not antialias and (type(inpt) is torch.Tensor or isinstance(inpt, tv_tensors.Image)):
            inpt = inpt.to(torch.float32)  # keeps the Image type
        return self._call_kernel(
            F.resize,
            inpt,
            size=list(params["size"]),
            interpolation=InterpolationMode.BILINEAR,
            antialias=antialias,
        )

    def extra_repr(self) -> str:
        return f"min_sizes={self.min_sizes}, max_size={self.max_size}, sample={self.sample}, style={self.style}"


def too_thin(
    heights: Sequence[int], widths: Sequence[int], short_edge: int, max_size: int, style: ResizeStyle = "detectron2"
) -> list[int]:
    """Indices of the ``(h, w)`` sizes whose resized side rounds to 0 px (e.g. 4000 x 1 with the long side capped
    at 1333): such an image cannot be resized, let alone detected in."""
    shape = ResizeShortestEdge.get_output_shape
    resized = {hw: shape(*hw, short_edge, max_size, style) for hw in set(zip(heights, widths))}
    return [i for i, hw in enumerate(zip(heights, widths)) if min(resized[hw]) < 1]


def get_labels(sample: dict[str, Any]) -> torch.Tensor:
    """``labels_getter`` for :class:`v2.SanitizeBoundingBoxes` (module-level so the pipeline pickles)."""
    return sample["labels"]


def build_train_transforms(min_sizes: Sequence[int], max_size: int, hflip_prob: float = 0.5) -> v2.Compose:
    """Multi-scale resize, horizontal flip, clamp, and removal of boxes under 1 px (labels kept aligned)."""
    return v2.Compose(
        [
            ResizeShortestEdge(min_sizes, max_size, sample=True),
            v2.RandomHorizontalFlip(hflip_prob),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=get_labels),
        ]
    )


def build_test_transforms(min_size: int, max_size: int, style: ResizeStyle = "detectron2") -> v2.Compose:
    """Fixed short side ``min_size``, long side at most ``max_size``, resized as ``style`` resizes; boxes are
    resized, never dropped."""
    return v2.Compose([ResizeShortestEdge((min_size,), max_size, sample=False, style=style)])
