"""Target assignment: which ground-truth box (if any) each point regresses, batched over images.

AdelaiDet's rules: a point is a candidate for a box when it lies in the box's centre region
(radius ``center_sampling_radius * stride`` around the box centre, clipped to the box, strict inequalities)
and the box's largest distance ``max(l, t, r, b)`` falls in the point's level size range (inclusive both
ends). Among candidates the box of minimum area wins (first index on ties). Crowd boxes are never
candidates. With ``inclusive_ranges=False`` and ranges ``(0, 64), (64, 128) ...`` the same code reproduces
torchvision's matching rules.

With centre sampling (the default) a box can only claim the few points of each level that fall in its
centre region, at most ``ceil(2 * radius) + 1`` per axis, so the assigner enumerates exactly those
candidates (``B x M x L x k x k`` of them, found by binary search in the level's grid) instead of testing
every (point, box) pair: time and memory grow with the number of boxes, not with points x boxes. Without
centre sampling every point inside a box is a candidate, and the dense points x boxes test runs in chunks of
points so memory stays bounded for images with thousands of boxes. Neither path loops over images, boxes or
points in Python.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

INF = 1e8


class FCOSTargets(NamedTuple):
    """Per-point targets for a batch.

    ``labels``: ``[B, R]`` int64, ``0..C-1`` for positives and ``C`` (num_classes) for background.
    ``reg_targets``: ``[B, R, 4]`` float32 ``(l, t, r, b)`` in units of the point's stride (0 for background).
    ``matched_idx``: ``[B, R]`` int64 index of the matched box within its image, ``-1`` for background.
    """

    labels: Tensor
    reg_targets: Tensor
    matched_idx: Tensor


def size_ranges(sizes_of_interest: Sequence[float], num_levels: int) -> list[tuple[float, float]]:
    """``[64, 128, 256, 512]`` -> ``[(-1, 64), (64, 128), (128, 256), (256, 512), (512, INF)]``."""
    bounds = [float(s) for s in sizes_of_interest]
    if len(bounds) != num_levels - 1:
        raise ValueError(f"sizes_of_interest needs {num_levels - 1} values for {num_levels} levels, got {bounds}")
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"sizes_of_interest must increase, got {bounds}")
    edges = [-1.0, *bounds, INF]
    return list(zip(edges[:-1], edges[1:]))


def pad_boxes(
    boxes: Sequence[Tensor], labels: Sequence[Tensor], crowd: Sequence[Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image boxes ``[M_i, 4]`` into ``[B, M, 4]`` with labels ``[B, M]`` and a validity mask."""
    batch = len(boxes)
    max_boxes = max((b.shape[0] for b in boxes), default=0)
    device = boxes[0].device if batch else torch.device("cpu")
    out_boxes = torch.zeros(batch, max_boxes, 4, device=device, dtype=torch.float32)
    out_labels = torch.zeros(batch, max_boxes, device=device, dtype=torch.int64)
    valid = torch.zeros(batch, max_boxes, device=device, dtype=torch.bool)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):  # B iterations: a copy per image
        m = b.shape[0]
        out_boxes[i, :m] = b
        out_labels[i, :m] = lab
        valid[i, :m] = True if crowd is None else ~crowd[i].bool()
    return out_boxes, out_labels, valid


class TargetAssigner:
    """Assigns FCOS targets for all images of a batch at once.

    Args:
        strides: stride of each level, finest first.
        sizes_of_interest: ``L - 1`` boundaries between the levels' size ranges (AdelaiDet SIZES_OF_INTEREST).
        center_sampling_radius: centre region radius in strides; 0 disables centre sampling (whole box).
        inclusive_ranges: AdelaiDet tests ``lo <= max(ltrb) <= hi``; torchvision ``lo < max(ltrb) < hi``.
        chunk_elements: upper bound on ``B * points_per_chunk * M`` for the dense pairwise test (no centre
            sampling only).
    """

    def __init__(
        self,
        strides: Sequence[int],
        sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
        center_sampling_radius: float = 1.5,
        inclusive_ranges: bool = True,
        chunk_elements: int = 1 << 22,
    ) -> None:
        self.strides = [int(s) for s in strides]
        self.ranges = size_ranges(sizes_of_interest, len(self.strides))
        self.center_sampling_radius = float(center_sampling_radius)
        self.inclusive_ranges = inclusive_ranges
        self.chunk_elements = int(chunk_elements)
        self._grids: dict[int, tuple[weakref.ref, Tensor, Tensor]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_grids": None}  # weak references do not pickle (DDP spawn, deepcopy)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _grids={})

    def point_attributes(self, points: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Concatenate level grids into ``[R, 2]`` points with per-point stride ``[R]`` and range ``[R, 2]``."""
        if len(points) != len(self.strides):
            raise ValueError(f"got {len(points)} point levels for {len(self.strides)} strides")
        flat = torch.cat(list(points), dim=0)
        device = flat.device

        # Filled on the device, level by level: a host list copied to a GPU would synchronize every step.
        def fill(values: Sequence[float]) -> Tensor:  # one value per level -> one per point
            return torch.cat([torch.full((p.shape[0],), float(v), device=device) for p, v in zip(points, values)])

        strides = fill(self.strides)
        ranges = torch.stack((fill([lo for lo, _ in self.ranges]), fill([hi for _, hi in self.ranges])), dim=1)
        return flat, strides, ranges

    @torch.no_grad()
    def __call__(
        self,
        points: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        num_classes: int,
        gt_crowd: Sequence[Tensor] | None = None,
    ) -> FCOSTargets:
        """Targets for ``points`` (the full per-level grids of :func:`make_points`, finest first), per-image
        ``gt_boxes`` ``[M_i, 4]`` xyxy pixels, ``gt_labels`` ``[M_i]`` and optional ``gt_crowd`` ``[M_i]`` flags."""
        flat, point_strides, ranges = self.point_attributes(points)
        boxes, labels, valid = pad_boxes(gt_boxes, gt_labels, gt_crowd)
        batch, num_points = len(gt_boxes), flat.shape[0]
        device = flat.device
        out_labels = torch.full((batch, num_points), num_classes, dtype=torch.int64, device=device)
        out_reg = torch.zeros(batch, num_points, 4, dtype=torch.float32, device=device)
        out_idx = torch.full((batch, num_points), -1, dtype=torch.int64, device=device)
        if boxes.shape[1] == 0:
            return FCOSTargets(out_labels, out_reg, out_idx)

        if self.center_sampling_radius > 0:
            idx = self._match_center_regions(points, boxes, valid)
            pos = idx >= 0
            chosen = boxes.gather(1, idx.clamp(min=0)[..., None].expand(-1, -1, 4))  # [B, R, 4]
            x, y = flat[None, :, 0], flat[None, :, 1]
            reg = torch.stack((x - chosen[..., 0], y - chosen[..., 1], chosen[..., 2] - x, chosen[..., 3] - y), -1)
            out_idx = torch.where(pos, idx, -1)
            out_reg = reg / point_strides[None, :, None] * pos[..., None]
            out_labels = torch.where(pos, labels.gather(1, idx.clamp(min=0)), num_classes)
            return FCOSTargets(out_labels, out_reg, out_idx)

        chunk = max(1, self.chunk_elements // (batch * boxes.shape[1]))
        for start in range(0, num_points, chunk):  # bounded-memory chunks, not a loop over points
            sl = slice(start, min(start + chunk, num_points))
            idx, reg = self._assign_chunk(flat[sl], ranges[sl], boxes, valid)
            pos = idx >= 0
            out_idx[:, sl] = idx
            out_reg[:, sl] = reg / point_strides[sl, None] * pos[..., None]
            out_labels[:, sl] = torch.where(pos, labels.gather(1, idx.clamp(min=0)), num_classes)
        return FCOSTargets(out_labels, out_reg, out_idx)

    def _match_center_regions(self, points: Sequence[Tensor], boxes: Tensor, valid: Tensor) -> Tensor:
        """Matched box per point ``[B, R]`` (``>= M`` for none), enumerating each box's centre-region points.

        Per level (an ``L``-step loop) the region ``(max(cx - r, x0), min(cx + r, x1))`` holds at most ``k``
        grid columns, the first found by ``searchsorted`` on the level's sorted x coordinates (likewise rows);
        the ``k x k`` candidates are tested against the region (strict) and the size range. Conflicts resolve
        by scatter-min: the smallest area, then the smallest box index, as ``min`` over a dense row would.
        """
        batch, num_boxes = boxes.shape[:2]
        device = boxes.device
        k = math.ceil(2 * self.center_sampling_radius) + 1
        steps = torch.arange(k, device=device)
        x0, y0, x1, y1 = (boxes[..., c, None] for c in range(4))  # [B, M, 1]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        area = (x1 - x0) * (y1 - y0)
        keys, box_ids, areas = [], [], []
        total = batch * sum(p.shape[0] for p in points)
        image_offset = torch.arange(batch, device=device)[:, None, None, None] * (total // batch)
        start = 0
        for pts, stride, (lo, hi) in zip(points, self.strides, self.ranges, strict=True):
            xs, ys = self._grid_axes(pts, stride)
            width, height = xs.shape[0], ys.shape[0]
            radius = stride * self.center_sampling_radius
            rx0, rx1 = torch.maximum(cx - radius, x0), torch.minimum(cx + radius, x1)
            ry0, ry1 = torch.maximum(cy - radius, y0), torch.minimum(cy + radius, y1)
            col = torch.searchsorted(xs, rx0.contiguous(), right=True) + steps  # [B, M, k], first x > rx0
            row = torch.searchsorted(ys, ry0.contiguous(), right=True) + steps
            col_ok, row_ok = col < width, row < height
            col, row = col.clamp(max=width - 1), row.clamp(max=height - 1)
            px, py = xs[col][..., None, :], ys[row][..., :, None]  # [B, M, 1, k] and [B, M, k, 1]
            inside = (col_ok & (xs[col] < rx1))[..., None, :] & (row_ok & (ys[row] < ry1))[..., :, None]
            x0_, y0_, x1_, y1_ = (c[..., None] for c in (x0, y0, x1, y1))
            max_dist = torch.maximum(torch.maximum(px - x0_, py - y0_), torch.maximum(x1_ - px, y1_ - py))
            if self.inclusive_ranges:
                in_range = (max_dist >= lo) & (max_dist <= hi)
            else:
                in_range = (max_dist > lo) & (max_dist < hi)
            ok = inside & in_range & valid[..., None, None]  # [B, M, k, k]
            point = image_offset + start + row[..., :, None] * width + col[..., None, :]
            keys.append(torch.where(ok, point, total).flatten())  # rejected candidates go to a spare slot
            box_ids.append(torch.arange(num_boxes, device=device)[None, :, None, None].expand_as(ok).flatten())
            areas.append(area[..., None].expand_as(ok).flatten())
            start += pts.shape[0]

        # Masking by index (not boolean selection) keeps the shapes static: no host sync on GPUs.
        key, box_id, cand_area = torch.cat(keys), torch.cat(box_ids), torch.cat(areas)
        min_area = torch.full((total + 1,), math.inf, device=device).scatter_reduce(0, key, cand_area, "amin")
        best_key = torch.where(cand_area == min_area[key], key, total)
        fill = torch.full((total + 1,), num_boxes, dtype=torch.int64, device=device)
        idx = fill.scatter_reduce(0, best_key, box_id, "amin")[:total]
        return torch.where(idx < num_boxes, idx, -1).view(batch, start)

    def _grid_axes(self, pts: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        """The x and y coordinates ``[W]``, ``[H]`` of a level grid, checked once per points tensor (the
        cached grids of :func:`make_points` recur every step, and the check reads values back to the host)."""
        key = id(pts)
        cached = self._grids.get(key)
        if cached is not None and cached[0]() is pts:
            return cached[1], cached[2]
        width = int((pts[:, 1] == pts[0, 1]).sum())
        height = pts.shape[0] // width
        xs, ys = pts[:width, 0].contiguous(), pts[::width, 1].contiguous()
        increasing = bool((xs.diff() > 0).all() and (ys.diff() > 0).all())  # searchsorted needs sorted axes
        if (
            not increasing
            or width * height != pts.shape[0]
            or not torch.equal(pts, torch.stack((xs.repeat(height), ys.repeat_interleave(width)), dim=1))
        ):
            raise ValueError(
                f"points of stride {stride} are not a full row-major grid with increasing x and y (use make_points)"
            )
        forget = weakref.ref(pts, lambda _, key=key, grids=self._grids: grids.pop(key, None))
        self._grids[key] = (forget, xs, ys)
        return xs, ys

    def _assign_chunk(self, points: Tensor, ranges: Tensor, boxes: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Without centre sampling: a point is a candidate for every box it lies inside (strictly)."""
        # points [P, 2], ranges [P, 2], boxes [B, M, 4], valid [B, M]
        x = points[None, :, 0, None]  # [1, P, 1]
        y = points[None, :, 1, None]
        x0, y0, x1, y1 = (boxes[:, None, :, k] for k in range(4))  # [B, 1, M]
        ltrb = torch.stack((x - x0, y - y0, x1 - x, y1 - y), dim=-1)  # [B, P, M, 4]
        inside = ltrb.amin(dim=-1) > 0

        max_dist = ltrb.amax(dim=-1)  # [B, P, M]
        lo, hi = ranges[None, :, 0, None], ranges[None, :, 1, None]
        if self.inclusive_ranges:
            in_range = (max_dist >= lo) & (max_dist <= hi)
        else:
            in_range = (max_dist > lo) & (max_dist < hi)

        area = ((x1 - x0) * (y1 - y0)).expand_as(max_dist)
        candidate = inside & in_range & valid[:, None, :]
        min_area, idx = torch.where(candidate, area, INF).min(dim=2)  # first index on ties
        pos = min_area < INF
        reg = ltrb.gather(2, idx[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)  # [B, P, 4] pixels
        return torch.where(pos, idx, -1), reg
