"""Detections that do not depend on the batch an image is in.

A padded batch pads every image to the largest one; the network then sees more zeros around a small image
than it would alone: GroupNorm's statistics in the head and the convolutions at the border change, and so do
the detections (AP moved by more than a point between evaluation batch 1 and 16). :func:`detect_own_padded`
crops each image of a batch to its own size rounded up to ``size_divisibility``, runs the images sharing that
size as one sub-batch and decodes them; an image thus gets the same detections at any batch size and on any
number of processes. Validation and the :class:`~fcos_lightning.runtime.predictor.Predictor` both call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["detect_own_padded", "own_padded_groups"]


def own_padded_groups(image_sizes: Tensor, divisor: int) -> list[tuple[Tensor, int, int]]:
    """``(indices, H, W)`` for each distinct own padded size: ``image_sizes`` ``[B, 2]`` rounded up to
    multiples of ``divisor`` (no rounding for 0 or 1), in the order of the images' first occurrence."""
    d = max(int(divisor), 1)
    padded = (image_sizes.cpu() + d - 1) // d * d
    keys, inverse = torch.unique(padded, dim=0, return_inverse=True)
    first = [int((inverse == k).nonzero()[0]) for k in range(len(keys))]
    return [
        ((inverse == k).nonzero().flatten().to(image_sizes.device), int(keys[k, 0]), int(keys[k, 1]))
        for k in sorted(range(len(keys)), key=first.__getitem__)
    ]


def detect_own_padded(
    forward: Callable[[Tensor, Tensor], Any],
    decode: Callable[..., list[dict[str, Tensor]]],
    images: Tensor,
    image_sizes: Tensor,
    divisor: int,
    orig_sizes: Tensor | None = None,
) -> tuple[list[dict[str, Tensor]], list[tuple[Tensor, Any]]]:
    """Detections per image of a padded ``[B, 3, H, W]`` batch, each image seen padded to its own multiple
    of ``divisor`` only.

    Args:
        forward: the network, ``forward(images, image_sizes) -> outputs``.
        decode: ``decode(outputs, image_sizes, orig_sizes) -> detections per image``
            (:class:`~fcos_lightning.fcos.decoder.FCOSDecoder`).
        images, image_sizes: the batch and each image's ``[B, 2]`` (h, w) before padding.
        divisor: the network's ``size_divisibility``.
        orig_sizes: ``[B, 2]`` sizes to rescale the boxes to (None: network-input pixels).

    Returns:
        the detections in batch order, and ``(indices, outputs)`` of every sub-batch (validation computes its
        losses on them).
    """
    detections: list[dict[str, Tensor] | None] = [None] * images.shape[0]
    groups = []
    for index, h, w in own_padded_groups(image_sizes, divisor):
        whole = len(index) == images.shape[0] and (h, w) == tuple(images.shape[-2:])
        sub = images if whole else images[index, :, :h, :w]
        sizes = image_sizes[index]
        outputs = forward(sub, sizes)
        dets = decode(outputs, sizes, None if orig_sizes is None else orig_sizes[index])
        for i, det in zip(index.tolist(), dets, strict=True):
            detections[i] = det
        groups.append((index, outputs))
    return detections, groups
