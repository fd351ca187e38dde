"""How a dataset's boxes fall on a model's FPN levels at the test resolution, and which boxes no point can take
as a positive (FCOS's best possible recall below 1): ``validate_data``'s view of a dataset through the model.

The boxes are scaled as the test resize scales them and assigned by the project's own
:class:`~fcos_lightning.fcos.targets.TargetAssigner` on the model's point grids, batched over images, without
decoding any image.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fcos_lightning.data.transforms import ResizeShortestEdge
from fcos_lightning.data.validate import CoverageReport
from fcos_lightning.fcos.points import make_points
from fcos_lightning.fcos.targets import TargetAssigner, size_ranges

__all__ = ["FPNCoverage"]

IMAGES_PER_CALL = 4  # images per TargetAssigner call


@dataclass(frozen=True)
class FPNCoverage:
    """The coverage check for a model's geometry (strides, size ranges, point offset), centre sampling and test
    resize; called by :func:`~fcos_lightning.data.validate.validate_split`."""

    strides: tuple[int, ...]
    sizes_of_interest: tuple[float, ...]
    center_sampling_radius: float = 1.5
    point_offset: float = 0.5
    test_min_size: int = 800
    test_max_size: int = 1333

    def __call__(
        self, image_sizes: Mapping[int, tuple[int, int]], boxes: Mapping[int, Sequence[tuple[int, list[float]]]]
    ) -> CoverageReport:
        """``image_sizes``: (h, w) per image id; ``boxes``: per image id, ``(annotation id, xyxy)`` of its target
        boxes in original pixels."""
        # many small tensor ops: one intra-op thread is faster, and far faster on a busy machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._coverage(image_sizes, boxes)
        finally:
            torch.set_num_threads(threads)

    def _coverage(self, image_sizes, boxes_by_image) -> CoverageReport:
        strides = list(self.strides)
        ranges = size_ranges(self.sizes_of_interest, len(strides))
        assigner = TargetAssigner(strides, self.sizes_of_interest, self.center_sampling_radius)
        per_level = np.zeros(len(strides), dtype=np.int64)
        groups: dict[tuple[int, int], list[tuple[list[int], torch.Tensor]]] = defaultdict(list)
        num_boxes = 0
        for iid, entries in boxes_by_image.items():
            if not entries:
                continue
            ann_ids, boxes = [e[0] for e in entries], [e[1] for e in entries]
            h, w = image_sizes[iid]
            nh, nw = ResizeShortestEdge.get_output_shape(h, w, self.test_min_size, self.test_max_size)
            scale = torch.tensor([nw / w, nh / h] * 2, dtype=torch.float32)
            b = torch.tensor(boxes, dtype=torch.float32) * scale
            half_long = (torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / 2).numpy()
            for k, (lo, hi) in enumerate(ranges):
                per_level[k] += int(((half_long >= lo) & (half_long <= hi)).sum())
            groups[(nh, nw)].append((ann_ids, b))
            num_boxes += len(boxes)

        unassignable: list[tuple[int, str]] = []
        for (h, w), items in groups.items():
            sizes = [(-(-h // s), -(-w // s)) for s in strides]
            grid = make_points(sizes, strides, self.point_offset, "cpu")
            items.sort(key=lambda t: len(t[1]))
            for start in range(0, len(items), IMAGES_PER_CALL):
                chunk = items[start : start + IMAGES_PER_CALL]
                boxes = [b for _, b in chunk]
                labels = [torch.zeros(len(b), dtype=torch.int64) for b in boxes]
                matched = assigner(grid, boxes, labels, num_classes=1).matched_idx
                for row, (ann_ids, b) in enumerate(chunk):
                    hit = torch.zeros(len(b), dtype=torch.bool)
                    hit[matched[row][matched[row] >= 0]] = True
                    for j in torch.nonzero(~hit).flatten().tolist():
                        x0, y0, x1, y1 = b[j].tolist()
                        size = f"{x1 - x0:.1f}x{y1 - y0:.1f} px (w x h) at test size (h, w) = ({h}, {w})"
                        unassignable.append((ann_ids[j], f"annotation {ann_ids[j]}: {size}"))
        levels = [
            {"level": int(round(math.log2(s))), "stride": s, "range": [lo, None if hi >= 1e8 else hi], "boxes": int(n)}
            for s, (lo, hi), n in zip(strides, ranges, per_level)
        ]
        return CoverageReport(levels, num_boxes, unassignable, self.center_sampling_radius)
