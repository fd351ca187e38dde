"""predict.py end to end: torchvision's own detections reproduced from a converted file (written image ->
predict -> JSON), and a folder of mixed image kinds.

Measured (2-core CPU): converted torchvision model vs torchvision on a 256x384 PNG: 17 detections, boxes
within 3.1e-5 px, scores within 5.3e-7, labels identical; on images torchvision resizes, the same.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fcos_lightning.app.predict import predict


@pytest.fixture
def run_predict(compose_cfg, tmp_path):
    """``run_predict(ckpt, input_path, *overrides)``: predict.py into ``tmp_path / "pred"``; (records, out dir)."""

    def run(ckpt, input_path, *extra):
        out = tmp_path / "pred"
        overrides = [f"ckpt_path={ckpt}", f"input={input_path}", f"output={out}", "device=cpu", *extra]
        cfg = compose_cfg("predict", overrides, out)
        cfg.output = str(out)
        return predict(cfg), out

    return run


def assert_torchvision_detections(theirs: dict, written: dict) -> None:
    """Every torchvision detection has one of ours (JSON record) with its label, box within 0.5 px and score within
    1e-3, and there are as many: tens, below the cap."""
    n = len(theirs["boxes"])
    assert 10 <= n < 100  # tens of detections, below the cap
    mine_boxes = torch.tensor(written["boxes_xyxy"])
    mine_scores = torch.tensor(written["scores"])
    mine_ids = torch.tensor(written["category_ids"])
    assert len(mine_scores) == n
    # torchvision's labels are its 91 slots, which are the COCO category ids
    assert torch.equal(mine_ids.sort().values, theirs["labels"].sort().values)
    available = torch.ones(n, dtype=torch.bool)
    worst_box = worst_score = 0.0
    for box, score, label in zip(theirs["boxes"], theirs["scores"], theirs["labels"], strict=True):
        box_err = (mine_boxes - box).abs().amax(dim=1)
        score_err = (mine_scores - score).abs()
        close = available & (mine_ids == label) & (box_err <= 0.5) & (score_err <= 1e-3)
        assert close.any(), f"torchvision detection {box.tolist()} {score.item()} {label.item()} unmatched"
        j = int(close.nonzero()[0, 0])
        available[j] = False
        worst_box, worst_score = max(worst_box, box_err[j].item()), max(worst_score, score_err[j].item())
    print(f"\n{n} detections; max |box diff| {worst_box:.2e} px, max |score diff| {worst_score:.2e}")


def test_converted_torchvision_reproduces_torchvision_detections(tmp_path, tv_converted, tv_image_size, run_predict):
    tv, ckpt = tv_converted
    HEIGHT, WIDTH = tv_image_size  # noqa: N806

    g = torch.Generator().manual_seed(5)
    image = (torch.rand(3, HEIGHT, WIDTH, generator=g) * 255).round().to(torch.uint8)
    image[:, 60:160, 100:250] = 40
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "img.png")  # lossless
    with torch.no_grad():
        theirs = tv([image.float() / 255])[0]

    # the checkpoint's test resize (800/1333) would upscale: ask for torchvision's sizes, as the tv model has
    records, out = run_predict(
        ckpt, tmp_path / "img.png", "score_thresh=null", "precision=32-true",
        f"test_min_size={HEIGHT}", f"test_max_size={WIDTH}",
    )  # fmt: skip
    written = json.loads((out / "img.png.json").read_text())
    assert written == records[0]
    assert (out / "img.png.png").is_file()
    assert_torchvision_detections(theirs, written)
    names = dict(zip(written["category_ids"], written["class_names"], strict=True))
    assert names.get(1, "person") == "person" and names.get(3, "car") == "car"


# resized to multiples of 128 once padded, where torchvision's anchor strides are exact (elsewhere its P6/P7
# points sit at ``i * (padded side // feature side)``, e.g. 61 px, not 64); the portrait one is resized to 639 x 512
# (detectron2's rounding: 640 x 512)
@pytest.mark.parametrize(("height", "width", "min_size", "max_size"), [(1024, 1280, 512, 640), (1536, 1229, 512, 640)])
def test_converted_torchvision_resizes_as_torchvision(
    tmp_path, tv_converted, run_predict, monkeypatch, height, width, min_size, max_size
):
    tv, ckpt = tv_converted
    monkeypatch.setattr(tv.transform, "min_size", (min_size,))
    monkeypatch.setattr(tv.transform, "max_size", max_size)
    g = torch.Generator().manual_seed(5)
    image = (torch.rand(3, height, width, generator=g) * 255).round().to(torch.uint8)
    image[:, 100:300, 200:500] = 40
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "img.png")
    with torch.no_grad():
        theirs = tv([image.float() / 255])[0]

    records, _ = run_predict(
        ckpt, tmp_path / "img.png", "score_thresh=null", "precision=32-true",
        f"test_min_size={min_size}", f"test_max_size={max_size}",
    )  # fmt: skip
    assert_torchvision_detections(theirs, records[0])
    assert torch.load(ckpt, weights_only=True)["test_resize"]["style"] == "torchvision"


def test_folder_of_mixed_images(tmp_path, tiny_ckpt, run_predict):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)).save(folder / "rgb.JPG")
    Image.fromarray(rng.integers(0, 255, (90, 70), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (64, 80, 4), dtype=np.uint8)).save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "rotated.jpg", exif=exif)
    (folder / "notes.txt").write_text("not an image")

    records, out = run_predict(tiny_ckpt, folder, "score_thresh=0.0")
    sizes = {r["file"].rsplit("/", 1)[-1]: (r["height"], r["width"]) for r in records}
    assert sizes == {"gray.png": (90, 70), "rgb.JPG": (100, 120), "rgba.png": (64, 80), "rotated.jpg": (60, 40)}
    for record in records:
        name = record["file"].rsplit("/", 1)[-1]
        assert json.loads((out / f"{name}.json").read_text()) == record
        picture = Image.open(out / f"{name}.png")
        assert picture.size == (record["width"], record["height"]) and picture.mode == "RGB"
        boxes = torch.tensor(record["boxes_xyxy"]).reshape(-1, 4)
        assert len(boxes) > 0, name
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes.min() >= 0 and (boxes[:, [0, 2]] <= record["width"]).all()
        assert (boxes[:, [1, 3]] <= record["height"]).all()
        assert set(record["category_ids"]) <= {2, 5, 9}
        lookup = {2: "square", 5: "disc", 9: "ring"}
        assert [lookup[c] for c in record["category_ids"]] == record["class_names"]
        assert record["scores"] == sorted(record["scores"], reverse=True)


def test_bad_images_are_reported_and_the_good_ones_written(tmp_path, tiny_ckpt, run_predict):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)).save(folder / "a_good.png")
    (folder / "b_corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.fromarray(rng.integers(0, 255, (1, 4000, 3), dtype=np.uint8)).save(folder / "c_thin.png")
    Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(folder / "d_good.jpg")
    pattern = r"2 of 4 images could not be processed: .*b_corrupt\.jpg.*; .*c_thin\.png: a 4000x1 image is too thin"
    with pytest.raises(ValueError, match=pattern):
        run_predict(tiny_ckpt, folder)
    out = tmp_path / "pred"
    assert sorted(p.name for p in out.glob("*.json")) == ["a_good.png.json", "d_good.jpg.json"]


def test_score_thresh_auto_applies_the_checkpoints_per_class_thresholds(tmp_path, tiny_ckpt, run_predict):
    image = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    (everything,), _ = run_predict(tiny_ckpt, tmp_path / "img.png", "score_thresh=null")
    by_class = {k: sorted(s for s, c in zip(everything["scores"], everything["labels"], strict=True) if c == k)
                for k in (0, 1, 2)}  # fmt: skip
    assert all(len(s) >= 2 for s in by_class.values()), "every class needs detections to cut"
    # class 0: its own threshold; classes 1 and 2 (None: no F1 of their own) the global one, from class 1's scores
    own, overall = by_class[0][len(by_class[0]) // 2], by_class[1][len(by_class[1]) // 2]
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["score_thresholds"] = {"global": overall, "per_class": [own, None, None], "iou": 0.5, "step": 24}
    torch.save(ckpt, tmp_path / "with_thresholds.ckpt")

    (auto,), _ = run_predict(tmp_path / "with_thresholds.ckpt", tmp_path / "img.png", "score_thresh=auto")
    threshold = {0: own, 1: overall, 2: overall}
    pairs = list(zip(everything["scores"], everything["labels"], strict=True))
    expected = [(s, c) for s, c in pairs if s >= threshold[c]]
    assert list(zip(auto["scores"], auto["labels"], strict=True)) == expected
    for single in (own, overall):  # one threshold for every class would keep other detections
        assert expected != [(s, c) for s, c in pairs if s >= single]


def test_score_thresh_auto_without_recorded_thresholds_says_what_to_do(tmp_path, tiny_ckpt, run_predict):
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    with pytest.raises(ValueError, match=r"score_thresh=auto: .*tiny\.ckpt records no F1-best score thresholds"):
        run_predict(tiny_ckpt, tmp_path / "img.png", "score_thresh=auto")
