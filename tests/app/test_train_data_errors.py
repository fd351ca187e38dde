"""Data that cannot train or validate stops train.py before step 0 with the reason and the fix: no usable
batch (validate_data.py reports it too), a val image that cannot be decoded or a val id that is not an integer,
a resume on other category ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from fcos_lightning.app.train import train
from fcos_lightning.app.validate_data import validate_data

# should a check regress, the run trains 2 steps, not the demo's schedule
SHORT = ["schedule.max_iter=2", "schedule.val_interval=2", "schedule.warmup_iters=1", "schedule.milestones=[1]"]


def _rewrite(root: Path, split: str, change) -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _no_annotations(d):
    d["annotations"] = []


def _all_crowd(d):
    for a in d["annotations"]:
        a["iscrowd"] = 1


def _three_images(d):
    keep = {a["image_id"] for a in d["annotations"] if not a["iscrowd"]}
    d["images"] = [im for im in d["images"] if im["id"] in keep][:3]
    kept = {im["id"] for im in d["images"]}
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in kept]


def _no_images(d):
    d["images"], d["annotations"] = [], []


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (_no_annotations, r"none of its 16 images has a box.*data\.filter_empty=false"),
        (_all_crowd, r"none of its 16 images has a box.*data\.filter_empty=false"),
        (_three_images, r"3 usable training images make no full batch of data\.batch_size=4.*data\.batch_size=3"),
        (_no_images, r"lists no usable image"),
    ],
    ids=["no_annotations", "every_image_without_boxes", "fewer_images_than_the_batch", "no_images"],
)
def test_training_set_without_a_batch_stops_with_the_reason(
    tiny_demo_copy, tiny_cfg, compose_cfg, tiny_overrides, tmp_path, change, pattern
):
    _rewrite(tiny_demo_copy, "train", change)
    with pytest.raises(ValueError, match=pattern):
        train(tiny_cfg(tiny_demo_copy, tmp_path / "run", *SHORT))
    assert not (tmp_path / "run" / "checkpoints").exists()
    cfg = compose_cfg(
        "validate_data",
        [*tiny_overrides, f"data.root={tiny_demo_copy}", "data.generate_demo=false", "validate.images=none"],
        tmp_path / "validate",
    )
    report = validate_data(cfg)
    assert not report.ok
    assert any(re.search(pattern, i.message) for i in report.splits[0].errors)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_undecodable_val_image_stops_before_training(tiny_demo_copy, tiny_cfg, tmp_path, suffix):
    """A garbage JPEG (found by its header when the dataset is built) and a truncated PNG (whose header reads:
    found by decoding every val image before training)."""
    val = json.loads((tiny_demo_copy / "annotations" / "instances_val.json").read_text())
    image = next(im for im in val["images"] if im["file_name"].endswith(suffix))
    path = tiny_demo_copy / "val" / image["file_name"]
    raw = path.read_bytes()
    path.write_bytes(raw[:64] + bytes(b ^ 0x5A for b in raw[64:]) if suffix == ".jpg" else raw[: len(raw) // 2])
    pattern = rf"instances_val\.json: .*image id {image['id']}: .*{image['file_name']}: unreadable"
    with pytest.raises(ValueError, match=pattern):
        train(tiny_cfg(tiny_demo_copy, tmp_path / "run", *SHORT))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_integer_val_image_id_stops_before_training(tiny_demo_copy, tiny_cfg, tmp_path):
    def fractional(d):
        d["images"][1]["id"] = 3.5

    _rewrite(tiny_demo_copy, "val", fractional)
    with pytest.raises(ValueError, match=r"instances_val\.json: image entry #1 \(id=3\.5\): id 3\.5"):
        train(tiny_cfg(tiny_demo_copy, tmp_path / "run", *SHORT))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_on_other_category_ids_is_refused_naming_both(tiny_demo, tiny_cfg, write_tiny_checkpoint, tmp_path):
    other = {"cat_ids": [1, 5, 9], "names": ["square", "disc", "ring"]}
    ckpt = write_tiny_checkpoint(tmp_path / "other.ckpt", categories=other)
    torch.save({**torch.load(ckpt, weights_only=True), "pytorch-lightning_version": pl.__version__}, ckpt)
    with pytest.raises(ValueError, match=r"other\.ckpt: trained on category ids \[1, 5, 9\].*data has \[2, 5, 9\]"):
        train(tiny_cfg(tiny_demo, tmp_path / "run", *SHORT, f"ckpt_path={ckpt}"))


def test_image_too_thin_to_resize_is_named_by_train_and_validate_data(
    tiny_demo_copy, tiny_cfg, compose_cfg, tiny_overrides, tmp_path
):
    Image.new("RGB", (4000, 1)).save(tiny_demo_copy / "train" / "thin.png")

    def add_thin(d):
        d["images"].append({"id": 999, "file_name": "thin.png", "width": 4000, "height": 1})

    _rewrite(tiny_demo_copy, "train", add_thin)
    pattern = r"instances_train\.json: 1 images too thin to resize: .*train_min_sizes=192.*image id 999 \(4000x1\)"
    with pytest.raises(ValueError, match=pattern):
        train(tiny_cfg(tiny_demo_copy, tmp_path / "run", *SHORT, "data.filter_empty=false"))
    overrides = [*tiny_overrides, f"data.root={tiny_demo_copy}", "data.generate_demo=false", "validate.images=header"]
    report = validate_data(compose_cfg("validate_data", overrides, tmp_path / "validate"))
    (thin,) = [i for i in report.splits[0].errors if i.code == "image_too_thin"]
    assert thin.ids == [999] and thin.details == ["image id 999: 4000x1"]
