"""A small checkpoint of ours (the demo model with the end-to-end tests' tiny overrides, random weights made to
detect) for the predict / export / init_from tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcos_lightning.app.convert import convert_checkpoint
from fcos_lightning.app.train import build_module
from fcos_lightning.data.coco import CategoryMap
from tests.app.test_e2e import TINY
from tests.conftest import compose_config
from tests.parity.test_torchvision_model import perturbed_torchvision_fcos

TV_HEIGHT, TV_WIDTH = 256, 384  # multiples of 128: torchvision's anchor strides are exactly 8..128

CATEGORIES = {"cat_ids": [2, 5, 9], "names": ["square", "disc", "ring"]}


def write_tiny_checkpoint(path: Path, *overrides: str, categories: dict = CATEGORIES, seed: int = 0) -> Path:
    """A checkpoint as train.py writes it, for a tiny random network whose classifier fires."""
    cfg = compose_config("train", [*TINY, "module.postprocessor.score_thresh=0.2", *overrides], path.parent)
    torch.manual_seed(seed)
    category_map = CategoryMap.from_dict(categories)
    module = build_module(cfg, category_map.num_classes, category_map, None)
    model = module.model.eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-6.0)
        model.head.cls_logits.weight.normal_(std=0.2)
        model.head.bbox_pred.bias.fill_(2.0)
    torch.save(
        {**module.checkpoint_header(), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path
    )
    return path


@pytest.fixture(scope="package")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt")


@pytest.fixture(scope="package")
def tv_converted(tmp_path_factory):
    """A perturbed torchvision ``fcos_resnet50_fpn`` (not resizing TV_HEIGHT x TV_WIDTH images) and the
    checkpoint of ours converted from its saved state dict."""
    tmp = tmp_path_factory.mktemp("tv")
    tv = perturbed_torchvision_fcos()
    tv.transform.min_size, tv.transform.max_size = (TV_HEIGHT,), TV_WIDTH  # scale exactly 1.0
    torch.save(tv.state_dict(), tmp / "tv.pth")
    convert_checkpoint("torchvision", tmp / "tv.pth", tmp / "ours.ckpt")
    return tv, tmp / "ours.ckpt"
