"""Per-level point grids: the locations FCOS classifies and regresses from.

AdelaiDet puts the point of feature cell ``(i, j)`` of a level with stride ``s`` at
``(j * s + s // 2, i * s + s // 2)``; torchvision's FCOS uses the cell corner ``(j * s, i * s)``.
``offset`` is that shift as a fraction of the stride (0.5 AdelaiDet, 0.0 torchvision). The same grids
serve target assignment and decoding, so training and inference can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor


def level_points(height: int, width: int, stride: int, offset: float, device: torch.device) -> Tensor:
    """Points of one level, ``[H*W, 2]`` as ``(x, y)`` in row-major order (matches ``[B, C, H, W]`` flattening)."""
    shift = float(int(stride * offset)) if offset == 0.5 else stride * offset
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + shift
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + shift
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1)


@lru_cache(maxsize=64)
def _cached_points(sizes: tuple[tuple[int, int], ...], strides: tuple[int, ...], offset: float, device: str):
    return tuple(level_points(h, w, s, offset, torch.device(device)) for (h, w), s in zip(sizes, strides, strict=True))


def make_points(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    offset: float,
    device: torch.device | str,
) -> list[Tensor]:
    """Point grids for every level (``L`` tensors ``[H_l*W_l, 2]``), cached by sizes, strides and device.

    Batches of the same padded size reuse the tensors, so the grid is built once per input shape.
    """
    sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
    return list(_cached_points(sizes, tuple(int(s) for s in strides), float(offset), str(torch.device(device))))


def flatten_level(t: Tensor) -> Tensor:
    """``[B, K, H, W]`` -> ``[B, H*W, K]`` (row-major, matching the point grids)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])


def flatten_levels(levels: Sequence[Tensor]) -> Tensor:
    """Per-level ``[B, K, H_l, W_l]`` -> ``[B, R, K]``, levels concatenated in the order of the grids."""
    return torch.cat([flatten_level(x) for x in levels], dim=1)
