"""``train.py init_from=``: matching weights load, the classifier is re-initialized only when the class set
differs, and the report says so."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fcos_lightning.app.config import build
from fcos_lightning.app.init_from import init_from_checkpoint
from fcos_lightning.app.train import train
from fcos_lightning.checkpoint import load_checkpoint, model_state
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.data.demo import make_demo_dataset

OTHER = {"cat_ids": [1, 7], "names": ["cat", "dog"]}


@pytest.fixture(scope="module")
def fresh_model(compose_cfg, tiny_overrides):
    """``fresh_model(num_classes)``: the tiny demo network with random weights (seed 123)."""

    def make(num_classes: int, seed: int = 123):
        torch.manual_seed(seed)
        return build(compose_cfg("train", tiny_overrides).model, num_classes=num_classes).eval()

    return make


def test_different_classes_reinitialize_only_the_classifier(
    tmp_path, fresh_model, write_tiny_checkpoint, tiny_categories
):
    path = write_tiny_checkpoint(tmp_path / "src.ckpt", categories=OTHER)
    source = model_state(load_checkpoint(path))
    model = fresh_model(3)
    report = init_from_checkpoint(model, path, CategoryMap.from_dict(tiny_categories))
    assert sorted(report.reinitialized) == ["head.cls_logits.bias", "head.cls_logits.weight"]
    assert "class set differs" in report.reinitialized["head.cls_logits.bias"]
    assert not report.unused
    state = model.state_dict()
    assert len(report.loaded) == len(state) - 2
    for key in report.loaded:
        assert torch.equal(state[key], source[key]), key
    torch.testing.assert_close(state["head.cls_logits.bias"], torch.full((3,), -math.log(99)))
    assert state["head.cls_logits.weight"].std() < 0.02  # N(0, 0.01), not the source's N(0, 0.5)
    table = report.table()
    assert "head.cls_logits" in table and "re-initialized head.cls_logits.weight: class set differs" in table


def test_same_classes_load_everything_and_other_shapes_are_reported(
    tmp_path, fresh_model, write_tiny_checkpoint, tiny_categories
):
    path = write_tiny_checkpoint(tmp_path / "src.ckpt")
    source = model_state(load_checkpoint(path))
    model = fresh_model(3)
    report = init_from_checkpoint(model, path, CategoryMap.from_dict(tiny_categories))
    assert not report.reinitialized and not report.unused
    assert torch.equal(model.state_dict()["head.cls_logits.bias"], source["head.cls_logits.bias"])

    wider = write_tiny_checkpoint(tmp_path / "wide.ckpt", "model.head.num_cls_convs=2")
    report = init_from_checkpoint(fresh_model(3), wider, CategoryMap.from_dict(tiny_categories))
    assert report.unused and all(k.startswith("head.cls_tower.1.") for k in report.unused)
    assert not report.reinitialized


def test_train_with_init_from_logs_the_table(tmp_path, caplog, compose_cfg, tiny_overrides, write_tiny_checkpoint):
    root = tmp_path / "demo"
    make_demo_dataset(root, num_train=8, num_val=2, image_size=(192, 224), seed=1)
    src = write_tiny_checkpoint(tmp_path / "src.ckpt", categories=OTHER)
    overrides = [
        *tiny_overrides,
        f"data.root={root}",
        "data.generate_demo=false",
        "schedule.max_iter=1",
        "schedule.val_interval=1",
        "schedule.warmup_iters=0",
        f"init_from={src}",
    ]
    with caplog.at_level(logging.INFO, logger="fcos_lightning"):
        train(compose_cfg("train", overrides, tmp_path / "run"))
    assert "re-initialized head.cls_logits.weight: class set differs" in caplog.text
    with pytest.raises(ValueError, match="exclude each other"):
        train(compose_cfg("train", [*overrides, f"ckpt_path={src}"], tmp_path / "run2"))
