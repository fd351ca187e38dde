"""Pictures of detections: ground truth in white, predictions in the class colour with name and score."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe"]


def draw_detections(
    image: Tensor, pred: dict[str, Tensor], class_names: Sequence[str], gt: dict[str, Tensor] | None = None
) -> Tensor:
    """uint8 ``[3, H, W]`` image with ``gt`` boxes (thin, white) and predicted boxes labelled ``name score``."""
    out = image
    if gt is not None and gt["boxes"].numel():
        out = draw_bounding_boxes(out, gt["boxes"].float(), colors="white", width=1)
    if pred["boxes"].numel():
        labels = [f"{class_names[int(c)]} {float(s):.2f}" for c, s in zip(pred["labels"], pred["scores"])]
        colors = [PALETTE[int(c) % len(PALETTE)] for c in pred["labels"]]
        # white text on a label box filled with the class colour stays readable on any background
        out = draw_bounding_boxes(
            out,
            pred["boxes"].float(),
            labels=labels,
            colors=colors,
            width=2,
            label_colors="white",
            label_background_colors=colors,
            fill_labels=True,
        )
    return out


def detection_grid(
    items: Sequence[tuple[Tensor, dict, dict]], class_names: Sequence[str], score_thresh: float = 0.3
) -> Tensor:
    """A grid of ``(image, gt, pred)`` pictures (predictions above ``score_thresh``), padded to one size."""
    pictures = []
    for image, gt, pred in items:
        keep = pred["scores"] >= score_thresh
        pictures.append(draw_detections(image, {k: v[keep] for k, v in pred.items()}, class_names, gt))
    h = max(p.shape[1] for p in pictures)
    w = max(p.shape[2] for p in pictures)
    padded = torch.zeros(len(pictures), 3, h, w, dtype=torch.uint8)
    for i, p in enumerate(pictures):
        padded[i, :, : p.shape[1], : p.shape[2]] = p
    return make_grid(padded, nrow=min(len(pictures), 4), padding=4)
