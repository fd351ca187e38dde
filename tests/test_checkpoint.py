"""The checkpoint format: every checkpoint rebuilds its network without a config system, and checkpoints
written before the format had a version still load, through the one migration function."""

from __future__ import annotations

import pytest
import torch

from fcos_lightning.checkpoint import FORMAT_VERSION, load_checkpoint, load_model, migrate
from fcos_lightning.modeling.build import build_model, model_description
from fcos_lightning.runtime.predictor import Predictor


def test_version_0_checkpoint_loads_as_the_network_that_wrote_it(v0_checkpoint):
    path, writer = v0_checkpoint
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION
    assert not {"fcos_config", "category_map"} & set(ckpt)
    assert ckpt["global_step"] == 24 and ckpt["epoch"] == 5  # Lightning's entries stay
    assert ckpt["classes"] == {"cat_ids": [2, 5, 9], "names": ["square", "disc", "ring"]}
    assert ckpt["postprocess"] == {
        "score_thresh": 0.2,
        "thresh_with_ctr": False,
        "pre_nms_topk": 1000,
        "nms_thresh": 0.6,
        "max_detections": 100,
        "clip_before_nms": False,
    }
    assert ckpt["criterion"] == {
        "center_sampling_radius": 1.5,
        "box_loss_type": "giou",
        "focal_alpha": 0.25,
        "focal_gamma": 2.0,
        "inclusive_ranges": True,
        "box_quality": "ctrness",
    }
    assert ckpt["test_resize"] == {"min_size": 192, "max_size": 400, "style": "detectron2"}
    assert ckpt["source"]["kind"] == "trained" and ckpt["source"]["migrated_from_format"] == 0
    assert ckpt["source"]["data"] == {
        "val_ann_file": "data/demo/annotations/instances_val.json",
        "val_img_dir": "data/demo/val",
        "val_batch_size": 2,
        "num_workers": 0,
    }
    assert "pretrained" not in ckpt["model"]["backbone"]  # weights come from the checkpoint, never downloaded

    model, classes, postprocessor, _ = load_model(path)
    assert model_description(model) == model_description(writer)
    assert classes.names == ("square", "disc", "ring") and postprocessor.score_thresh == 0.2
    images = [torch.randint(0, 256, (3, 192, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))]
    expected = Predictor(writer, postprocessor, precision="32-true")(images)[0]
    got = Predictor(model, postprocessor, precision="32-true")(images)[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(got[key], expected[key]), key


def test_a_saved_checkpoint_rebuilds_its_network_alone(tmp_path, v0_checkpoint):
    ckpt = load_checkpoint(v0_checkpoint[0])
    torch.save(ckpt, tmp_path / "current.ckpt")  # written in the current format
    again = load_checkpoint(tmp_path / "current.ckpt")
    assert {k: v for k, v in again.items() if k != "state_dict"} == {k: v for k, v in ckpt.items() if k != "state_dict"}
    network = build_model(again["model"])
    assert model_description(network) == again["model"]
    # a format-1 file written before test_resize had a style resizes as detectron2 does
    old = migrate({**ckpt, "test_resize": {"min_size": 192, "max_size": 400}})
    assert old["test_resize"] == {"min_size": 192, "max_size": 400, "style": "detectron2"}


def test_unknown_versions_and_foreign_files_are_refused(tmp_path, v0_checkpoint):
    ckpt = load_checkpoint(v0_checkpoint[0])
    with pytest.raises(ValueError, match=r"future\.ckpt: checkpoint format 99; this fcos_lightning reads formats"):
        migrate({**ckpt, "format_version": 99}, "future.ckpt")
    with pytest.raises(ValueError, match=r"without \['test_resize'\]"):
        migrate({k: v for k, v in ckpt.items() if k != "test_resize"})
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match=r"foreign\.pth is not an fcos_lightning checkpoint.*convert\.py"):
        load_checkpoint(tmp_path / "foreign.pth")
