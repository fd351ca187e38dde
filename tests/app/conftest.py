"""Builders for the entry-point tests: small checkpoints of ours, a converted torchvision checkpoint, and
callbacks that runs load through Hydra overrides (``_target_: tests.app.conftest.StepProbe``) to be observed
from inside."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from fcos_lightning.app.convert import convert_checkpoint
from fcos_lightning.app.train import build_module
from fcos_lightning.data.coco import CategoryMap

TV_SIZE = (256, 384)  # (h, w), multiples of 128: torchvision's anchor strides are exactly 8..128
CATEGORIES = {"cat_ids": [2, 5, 9], "names": ["square", "disc", "ring"]}


@pytest.fixture(scope="session")
def tiny_categories() -> dict:
    """The demo's class map (``CategoryMap.to_dict()``)."""
    return dict(CATEGORIES)


@pytest.fixture(scope="session")
def write_tiny_checkpoint(compose_cfg, tiny_overrides) -> Callable[..., Path]:
    """``write_tiny_checkpoint(path, *overrides, categories=..., seed=0)``: a checkpoint as train.py writes it,
    for the tiny demo network with random weights whose classifier fires."""

    def write(path: Path, *overrides: str, categories: dict = CATEGORIES, seed: int = 0) -> Path:
        overrides = [*tiny_overrides, "module.postprocessor.score_thresh=0.2", *overrides]
        cfg = compose_cfg("train", overrides, path.parent)
        torch.manual_seed(seed)
        category_map = CategoryMap.from_dict(categories)
        module = build_module(cfg, category_map.num_classes, category_map, None)
        model = module.model.eval()
        with torch.no_grad():
            model.head.cls_logits.bias.fill_(-6.0)
            model.head.cls_logits.weight.normal_(std=0.2)
            model.head.bbox_pred.bias.fill_(2.0)
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        torch.save({**module.checkpoint_header(), "state_dict": state}, path)
        return path

    return write


@pytest.fixture(scope="package")
def tiny_ckpt(tmp_path_factory, write_tiny_checkpoint) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt")


@pytest.fixture(scope="session")
def tv_image_size() -> tuple[int, int]:
    """(h, w) at which the converted torchvision model's boxes equal torchvision's exactly."""
    return TV_SIZE


@pytest.fixture(scope="package")
def tv_converted(tmp_path_factory, perturbed_tv_fcos):
    """A perturbed torchvision ``fcos_resnet50_fpn`` (not resizing ``tv_image_size`` images) and the
    checkpoint of ours converted from its saved state dict."""
    tmp = tmp_path_factory.mktemp("tv")
    tv = perturbed_tv_fcos(*TV_SIZE)
    torch.save(tv.state_dict(), tmp / "tv.pth")
    convert_checkpoint("torchvision", tmp / "tv.pth", tmp / "ours.ckpt")
    return tv, tmp / "ours.ckpt"


class StepProbe(pl.Callback):
    """Writes the first global step trained by this process and its learning rate to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.first: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.first = {"step": trainer.global_step, "lr": lr}
            self.path.write_text(json.dumps(self.first))


class RankMetricsProbe(pl.Callback):
    """Writes this rank's logged ``val/*`` metrics after each validation to ``<dir>/rank<global rank>.json``."""

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="package")
def tiny_trained_ckpt(tiny_demo, tiny_cfg, tmp_path_factory) -> Path:
    """``last.ckpt`` of the tiny demo run trained for 24 steps on :func:`tiny_demo` (it records its training
    set, which int8 exports calibrate on)."""
    from fcos_lightning.app.train import train

    run = tmp_path_factory.mktemp("tiny_trained") / "run"
    overrides = [
        "schedule.max_iter=24",
        "schedule.val_interval=24",
        "schedule.warmup_iters=4",
        "schedule.milestones=[20]",
    ]
    train(tiny_cfg(tiny_demo, run, *overrides))
    return run / "checkpoints" / "last.ckpt"
