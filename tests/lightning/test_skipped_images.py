"""A corrupt JPEG and a truncated PNG in the training set: on_bad_image=error stops naming the file, skip
trains on and reports both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcos_lightning.app.train import train

SHORT = ["schedule.max_iter=8", "schedule.val_interval=8", "schedule.warmup_iters=2", "schedule.milestones=[7]"]


@pytest.fixture
def damaged(tiny_demo_copy) -> tuple[Path, list[int], list[str]]:
    """A demo dataset with one corrupt JPEG and one truncated PNG among its training images."""
    root = tiny_demo_copy
    ann = json.loads((root / "annotations" / "instances_train.json").read_text())
    jpg = next(im for im in ann["images"] if im["file_name"].endswith(".jpg"))
    png = next(im for im in ann["images"] if im["file_name"].endswith(".png"))
    jpg_path, png_path = root / "train" / jpg["file_name"], root / "train" / png["file_name"]
    raw = jpg_path.read_bytes()
    jpg_path.write_bytes(raw[:64] + bytes(b ^ 0x5A for b in raw[64:]))  # header kept, body garbage
    raw = png_path.read_bytes()
    png_path.write_bytes(raw[: len(raw) // 2])
    return root, [jpg["id"], png["id"]], [jpg["file_name"], png["file_name"]]


def test_error_policy_stops_naming_the_file(damaged, tiny_cfg, tmp_path):
    """Caught when the dataset is built (image headers are read then), before any step: no checkpoint."""
    root, ids, names = damaged
    with pytest.raises(ValueError, match=r"image id \d+: \S*demo_train_\d+\.(jpg|png): unreadable") as e:
        train(tiny_cfg(root, tmp_path / "run", *SHORT, "data.on_bad_image=error"))
    assert any(name in str(e.value) for name in names) and "data.on_bad_image=skip" in str(e.value)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_skip_policy_finishes_and_reports_two_skipped(damaged, tiny_cfg, tmp_path):
    root, ids, _ = damaged
    run = tmp_path / "run"
    # one DataLoader worker: the skipped ids must reach the main process through the batches
    train(tiny_cfg(root, run, *SHORT, "data.on_bad_image=skip", "data.num_workers=1"))
    report = json.loads((run / "skipped_images.json").read_text())
    assert report["num_skipped_images"] == 2
    assert report["image_ids"] == sorted(ids)
    assert report["num_skipped_samples"] >= 2  # 2 epochs: each seen once per epoch
    assert (run / "checkpoints" / "last.ckpt").is_file()
