"""Pictures of detections: boxes in the class colour, readable labels, ground truth in white, score filter."""

from __future__ import annotations

import torch

from fcos_lightning.evaluation.visualize import PALETTE, detection_grid, draw_detections

RED = (230, 25, 75)  # PALETTE[0]


def test_box_in_class_colour_with_white_label_text_on_a_filled_background():
    assert PALETTE[0] == "#e6194b"
    image = torch.zeros(3, 64, 96, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 80.0, 60.0]])
    pred = {"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    out = draw_detections(image, pred, ["square"])
    assert tuple(out[:, 40, 10].tolist()) == RED  # left edge of the box
    label_area = out[:, 15:23, 12:60].flatten(1).T  # inside the filled label box below the top edge
    reddish = (label_area[:, 0] > 200) & (label_area[:, 1] < 120)
    light = (label_area > 200).all(dim=1)  # white text (anti-aliased towards the background)
    assert reddish.float().mean() > 0.3 and light.any() and not (label_area < 20).all(dim=1).any()


def test_grid_draws_ground_truth_and_hides_low_scores():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    gt = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
    low = {"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "scores": torch.tensor([0.1]), "labels": torch.tensor([0])}
    grid = detection_grid([(image, gt, low), (image, gt, low)], ["a", "b"], score_thresh=0.3)
    assert grid.shape[0] == 3 and grid.dtype == torch.uint8
    colours = {tuple(p) for p in grid.flatten(1).T.tolist()}
    assert (255, 255, 255) in colours and RED not in colours
