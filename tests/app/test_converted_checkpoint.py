"""A converted checkpoint is a checkpoint of ours: evaluate.py scores it on COCO-format data with COCO ids."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from fcos_lightning.app.evaluate import evaluate
from fcos_lightning.data.coco_categories import COCO_CATEGORIES


def test_evaluate_accepts_a_converted_checkpoint(tmp_path, tv_converted, tv_image_size, compose_cfg):
    tv, ckpt = tv_converted
    TV_HEIGHT, TV_WIDTH = tv_image_size  # noqa: N806
    images = tmp_path / "val"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (TV_HEIGHT, TV_WIDTH, 3), dtype=np.uint8)).save(images / "a.png")
    ann = {
        "images": [{"id": 7, "file_name": "a.png", "height": TV_HEIGHT, "width": TV_WIDTH}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 44, "bbox": [40, 30, 80, 60], "area": 4800, "iscrowd": 0}
        ],
        "categories": [{"id": i, "name": n} for i, n in COCO_CATEGORIES],
    }
    ann_file = tmp_path / "val.json"
    ann_file.write_text(json.dumps(ann))
    out = tmp_path / "eval"
    cfg = compose_cfg(
        "evaluate",
        [
            f"ckpt_path={ckpt}",
            f"data.val.ann_file={ann_file}",
            f"data.val.img_dir={images}",
            "data.num_workers=0",
            f"data.test_min_size={TV_HEIGHT}",
            f"data.test_max_size={TV_WIDTH}",
            "trainer.precision=32-true",
            "trainer.enable_progress_bar=false",
            "num_pictures=1",
        ],
        out,
    )
    metrics = evaluate(cfg)
    assert 0.0 <= metrics["AP"] <= 100.0 and metrics["num_images"] == 1
    detections = json.loads((out / "detections.json").read_text())
    assert detections and {d["image_id"] for d in detections} == {7}
    with torch.no_grad():
        theirs = tv([torch.from_numpy(np.array(Image.open(images / "a.png"))).permute(2, 0, 1).float() / 255])[0]
    assert sorted(d["category_id"] for d in detections) == sorted(theirs["labels"].tolist())
