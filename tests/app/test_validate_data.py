"""validate_data.py names every defect of a damaged dataset and exits non-zero; a clean dataset passes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

from fcos_lightning.app.validate_data import validate_data
from fcos_lightning.data.validate import validate_split
from fcos_lightning.evaluation.coverage import FPNCoverage

REPO = Path(__file__).resolve().parents[2]


def _defective(clean: Path, dst: Path) -> dict:
    """A copy of ``clean`` whose train split holds one of each defect; returns the ids involved."""
    import shutil

    shutil.copytree(clean, dst)
    path = dst / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    images, anns = data["images"], data["annotations"]
    with_boxes = sorted({a["image_id"] for a in anns if not a.get("iscrowd")})
    by_id = {im["id"]: im for im in images}
    a_ids = iter(a for a in anns if not a.get("iscrowd"))
    defects = {}

    # duplicate image id: a second entry reusing an existing id
    dup_img = copy.deepcopy(by_id[with_boxes[0]])
    images.append(dup_img)
    defects["duplicate_image_id"] = dup_img["id"]
    # duplicate annotation id
    a = next(a_ids)
    anns.append({**copy.deepcopy(a), "bbox": [1, 1, 20, 20]})
    defects["duplicate_annotation_id"] = a["id"]
    next_id = max(x["id"] for x in anns) + 1
    extra = []
    for code, image_id, cat, bbox in [
        ("unknown_category_id", with_boxes[1], 77, [10, 10, 20, 20]),
        ("unknown_image_id", 999999, data["categories"][0]["id"], [10, 10, 20, 20]),
        ("degenerate_box", with_boxes[1], data["categories"][0]["id"], [10, 10, 0, 20]),
        ("degenerate_box_negative", with_boxes[1], data["categories"][0]["id"], [10, 10, 15, -3]),
        ("box_outside_image", with_boxes[2], data["categories"][0]["id"], [200, 150, 40, 30]),
        ("box_unassignable", with_boxes[2], data["categories"][0]["id"], [0.5, 0.5, 2, 2]),
    ]:
        extra.append({"id": next_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0})
        defects[code] = next_id
        next_id += 1
    anns.extend(extra)

    # image files: missing, corrupt, and a size that differs from the json
    missing, corrupt, resized = (by_id[i] for i in with_boxes[3:6])
    os.remove(dst / "train" / missing["file_name"])
    (dst / "train" / corrupt["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    resized["width"] += 10
    defects.update(image_file_missing=missing["id"], image_file_unreadable=corrupt["id"])
    defects["image_size_mismatch"] = resized["id"]
    path.write_text(json.dumps(data))
    return defects


def test_every_defect_is_named_and_the_exit_code_is_non_zero(tiny_demo, tiny_overrides, tmp_path):
    root = tmp_path / "bad"
    defects = _defective(tiny_demo, root)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [*tiny_overrides, f"data.root={root}", "data.generate_demo=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "validate_data.py"), *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout
    report = json.loads((out / "validation.json").read_text())
    assert report["ok"] is False
    train_issues = {i["code"]: i for i in report["splits"][0]["issues"]}
    expected_codes = {
        "duplicate_image_id": "image",
        "duplicate_annotation_id": "annotation",
        "unknown_category_id": "annotation",
        "unknown_image_id": "annotation",
        "degenerate_box": "annotation",
        "box_outside_image": "annotation",
        "box_unassignable": "annotation",
        "image_file_missing": "image",
        "image_file_unreadable": "image",
        "image_size_mismatch": "image",
    }
    for code, kind in expected_codes.items():
        assert code in train_issues, (code, sorted(train_issues))
        assert train_issues[code]["id_kind"] == kind
        assert defects[code] in train_issues[code]["ids"], (code, train_issues[code])
        assert code in text
    assert defects["degenerate_box_negative"] in train_issues["degenerate_box"]["ids"]
    assert "16.0 px outside" in " ".join(train_issues["box_outside_image"]["details"])
    assert train_issues["box_unassignable"]["severity"] == "warning"
    assert report["splits"][1]["issues"] == []  # val untouched
    split = report["splits"][0]
    assert split["num_images_without_boxes"] >= 1 and sum(lv["boxes"] for lv in split["levels"]) > 0
    assert "FAILED" in text


def test_clean_dataset_passes(tiny_demo, tiny_overrides, compose_cfg, tmp_path):
    overrides = [*tiny_overrides, f"data.root={tiny_demo}", "data.generate_demo=false"]
    cfg = compose_cfg("validate_data", overrides, tmp_path / "out")
    report = validate_data(cfg)
    assert report.ok and not any(s.issues for s in report.splits)
    written = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert written["ok"] is True and written["num_errors"] == 0
    train = written["splits"][0]
    assert train["num_images"] == 16 and train["best_possible_recall"] == 1.0
    assert set(train["per_class"]) == {"square (2)", "disc (5)", "ring (9)"}


def test_crowd_only_images_and_header_mode(small_coco):
    geo = FPNCoverage(strides=(8, 16, 32), sizes_of_interest=(64, 128), test_min_size=32, test_max_size=64)
    rep = validate_split("train", small_coco.ann_file, small_coco.img_dir, geo, image_check="header")
    assert rep.num_images == 7 and rep.num_crowd == 2
    assert rep.num_crowd_only_images == 1  # image 77
    assert rep.num_images_without_boxes == 2  # 66 (none) and 77 (crowd only)
    codes = {i.code: i for i in rep.issues}
    assert codes["box_dropped_after_clipping"].ids == [4, 6]  # under 1 px wide; entirely right of the image
    assert codes["box_outside_image"].ids == [3, 5, 6]
    assert "15.0 px outside" in " ".join(codes["box_outside_image"].details)
    assert not rep.errors
