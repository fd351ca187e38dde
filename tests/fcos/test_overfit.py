"""A tiny FCOS overfits two images: targets, loss, backbone, FPN and head train together."""

from __future__ import annotations

import functools

import pytest
import torch

from fcos_lightning.fcos.criterion import FCOSCriterion
from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("single_thread")


def make_batch():
    """Two 128 x 160 images with coloured rectangles on a noisy background, and their boxes."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 128, 160, generator=g) * 60).to(torch.uint8)
    boxes = [
        torch.tensor([[10.0, 12.0, 70.0, 60.0], [90.0, 30.0, 150.0, 120.0]]),
        torch.tensor([[20.0, 20.0, 44.0, 52.0], [60.0, 10.0, 150.0, 100.0], [5.0, 80.0, 60.0, 125.0]]),
    ]
    labels = [torch.tensor([0, 1]), torch.tensor([2, 0, 1])]
    colours = torch.tensor([[220, 40, 40], [40, 220, 40], [40, 40, 220]], dtype=torch.uint8)
    for i in range(2):
        for (x0, y0, x1, y1), lab in zip(boxes[i].int().tolist(), labels[i].tolist(), strict=True):
            images[i, :, y0:y1, x0:x1] = colours[lab][:, None, None]
    return images, boxes, labels


def test_tiny_fcos_overfits_two_images():
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18", out_indices=(2, 3, 4), norm="BN", freeze_at=0)
    head = functools.partial(FCOSHead, norm="GN", num_cls_convs=2, num_box_convs=2)
    model = FCOS(backbone, head, NUM_CLASSES, fpn_channels=32, top_levels=2)
    images, boxes, labels = make_batch()
    criterion = FCOSCriterion.for_model(model)
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    model.train()
    for _ in range(50):
        out = model(images)
        assert (criterion.assign(out, targets).labels < NUM_CLASSES).sum() > 20  # every box has positives
        losses = criterion(out, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()} | {"total": total.item()})
    first, last = history[0], history[-1]
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert last["total"] < 0.5 * first["total"], (first, last)
    assert last["loss_cls"] < 0.5 * first["loss_cls"] and last["loss_box"] < 0.5 * first["loss_box"], (
        first,
        last,
    )
