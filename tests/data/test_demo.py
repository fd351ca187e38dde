import json
from pathlib import Path

import pytest
import torch

from fcos_lightning.data import DEMO_CATEGORIES, make_demo_dataset, read_image


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The default demo dataset (240 + 40 images), built once for this module."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"))


def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def test_layout_categories_and_image_files(demo):
    root = Path(demo["train_ann_file"]).parent.parent
    assert demo["train_ann_file"] == str(root / "annotations" / "instances_train.json")
    assert demo["val_img_dir"] == str(root / "val")
    for split, n in (("train", 240), ("val", 40)):
        data = _load(demo[f"{split}_ann_file"])
        assert [(c["id"], c["name"]) for c in data["categories"]] == [(2, "square"), (5, "disc"), (9, "ring")]
        assert len(data["images"]) == n
        names = [im["file_name"] for im in data["images"]]
        assert {Path(f).suffix for f in names} == {".jpg", ".png"}
        assert all((Path(demo[f"{split}_img_dir"]) / f).is_file() for f in names)
        assert len({im["id"] for im in data["images"]}) == n
        sizes = {(im["height"], im["width"]) for im in data["images"]}
        assert sizes == {(256, 320), (320, 256)}  # landscape and portrait, for aspect-ratio grouping
    assert DEMO_CATEGORIES.cat_ids == (2, 5, 9) and DEMO_CATEGORIES.names == ("square", "disc", "ring")


@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_images_one_crowd_and_box_sizes(demo, split):
    data = _load(demo[f"{split}_ann_file"])
    anns = data["annotations"]
    crowd = [a for a in anns if a["iscrowd"]]
    assert len(crowd) == 1
    objects = [a for a in anns if not a["iscrowd"]]
    with_objects = {a["image_id"] for a in objects}
    empty = [im for im in data["images"] if im["id"] not in with_objects]
    assert 0.05 <= len(empty) / len(data["images"]) <= 0.2
    per_image = [sum(a["image_id"] == im["id"] for a in objects) for im in data["images"]]
    assert max(per_image) <= 4
    sides = torch.tensor([a["bbox"][2:] for a in objects], dtype=torch.float32)
    assert sides.min() >= 16 and sides.max() <= 180
    if split == "train":  # enough objects to span P3..P5 at the default sizes of interest
        assert sides.min() <= 20 and sides.max() >= 150
    images = {im["id"]: im for im in data["images"]}
    for a in anns:
        x, y, w, h = a["bbox"]
        im = images[a["image_id"]]
        assert all(float(v).is_integer() for v in a["bbox"])
        assert a["area"] == w * h
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert a["category_id"] in (2, 5, 9)


def test_boxes_are_exact_on_lossless_images(demo):
    """In PNG images a shape touches every side of its box and nothing coloured lies just outside it."""
    data = _load(demo["val_ann_file"])
    images = {im["id"]: im for im in data["images"]}
    saturated = {}
    checked = 0
    for a in data["annotations"]:
        im = images[a["image_id"]]
        if not im["file_name"].endswith(".png"):
            continue
        if im["id"] not in saturated:
            img = read_image(str(Path(demo["val_img_dir"]) / im["file_name"])).int()
            # shapes are vivid, the background near grey
            saturated[im["id"]] = (img.max(0).values - img.min(0).values) > 60
        coloured = saturated[im["id"]]
        x0, y0, w, h = a["bbox"]
        x1, y1 = x0 + w, y0 + h
        inside = coloured[y0:y1, x0:x1]
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        if y0 > 0:
            assert not coloured[y0 - 1, x0:x1].any()
        if y1 < im["height"]:
            assert not coloured[y1, x0:x1].any()
        if x0 > 0:
            assert not coloured[y0:y1, x0 - 1].any()
        if x1 < im["width"]:
            assert not coloured[y0:y1, x1].any()
        checked += 1
    assert checked >= 5


def test_deterministic_and_idempotent(tmp_path):
    kwargs = {"num_train": 12, "num_val": 4, "image_size": (192, 224), "seed": 3}
    a = make_demo_dataset(tmp_path / "a", **kwargs)
    b = make_demo_dataset(tmp_path / "b", **kwargs)
    for key in ("train_ann_file", "val_ann_file"):
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes()
    for f in sorted(Path(a["train_img_dir"]).iterdir()):
        assert f.read_bytes() == (Path(b["train_img_dir"]) / f.name).read_bytes()

    mtime = Path(a["train_ann_file"]).stat().st_mtime_ns
    assert make_demo_dataset(tmp_path / "a", **kwargs) == a
    assert Path(a["train_ann_file"]).stat().st_mtime_ns == mtime  # reused, not rewritten

    c = make_demo_dataset(tmp_path / "a", **{**kwargs, "num_train": 6, "seed": 4})
    assert len(_load(c["train_ann_file"])["images"]) == 6
    assert len(list(Path(c["train_img_dir"]).iterdir())) == 6  # stale images removed
    other_seed = _load(c["val_ann_file"])
    assert other_seed != _load(b["val_ann_file"])
