"""Builders for the runtime tests: a narrow FCOS, and one trained on the two generated images."""

from __future__ import annotations

import functools

import pytest
import torch

from fcos_lightning.fcos.criterion import FCOSCriterion
from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead

STEPS = 60
NUM_CLASSES = 3  # the classes of the two_images fixture


def build_tiny_fcos(norm: str = "BN", name: str = "resnet18") -> FCOS:
    narrow = {"channels": [16, 32, 64, 128], "stem_width": 16} if name == "resnet18" else {}
    backbone = TimmBackbone(name, out_indices=(2, 3, 4), norm=norm, freeze_at=0, model_kwargs=narrow)
    head = functools.partial(FCOSHead, norm="GN", num_cls_convs=2, num_box_convs=2)
    return FCOS(backbone, head, NUM_CLASSES, fpn_channels=64, top_levels=2)


@pytest.fixture(scope="session")
def tiny_fcos():
    """``tiny_fcos(norm="BN", name="resnet18")``: a narrow FCOS with random weights (P3-P7, 64-channel FPN)."""
    return build_tiny_fcos


@pytest.fixture(scope="package")
def trained(two_images):
    """A narrow FCOS trained on two generated images until it detects their five boxes confidently (~5 s):
    ``(model, images, boxes, labels)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # package-scoped, so set up before the single_thread fixture applies
    torch.manual_seed(0)
    model = build_tiny_fcos()
    images, boxes, labels = two_images
    criterion = FCOSCriterion.for_model(model)
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(STEPS):
        out = model(images)
        losses = criterion(out, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval(), images, boxes, labels
