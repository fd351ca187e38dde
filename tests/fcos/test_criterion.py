"""A tiny FCOS overfits two images through the criterion: points, targets, loss, backbone, FPN and head train
together."""

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


def test_tiny_fcos_overfits_two_images(two_images):
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18", out_indices=(2, 3, 4), norm="BN", freeze_at=0)
    head = functools.partial(FCOSHead, norm="GN", num_cls_convs=2, num_box_convs=2)
    model = FCOS(backbone, head, NUM_CLASSES, fpn_channels=32, top_levels=2)
    images, boxes, labels = two_images
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
