"""Fault injectors the reliability tests add through Hydra overrides, and a tiny training config."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from fcos_lightning.data.demo import make_demo_dataset
from fcos_lightning.lightning.module import FCOSLitModule
from tests.app.test_e2e import TINY
from tests.conftest import compose_config


class NaNLossAtStep(FCOSLitModule):
    """FCOSLitModule whose training loss is NaN at global step ``nan_at_step`` (test-only)."""

    def __init__(self, *args, nan_at_step: int = -1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at_step = nan_at_step

    def compute_loss(self, outputs, targets):
        losses = super().compute_loss(outputs, targets)
        if self.training and self.global_step == self.nan_at_step:
            losses["loss_box"] = losses["loss_box"] * float("nan")
            losses["loss"] = losses["loss_cls"] + losses["loss_box"] + losses["loss_ctr"]
        return losses


class SleepPerBatch(pl.Callback):
    """Slows a run down so a test can kill it mid-training."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


def demo_copy(src: Path, dst: Path) -> Path:
    """A private copy of a demo dataset (tests that damage files must not share them)."""
    shutil.copytree(src, dst)
    return dst


def make_tiny_demo(root: Path) -> Path:
    make_demo_dataset(root, num_train=16, num_val=5, image_size=(192, 224), seed=1)
    return root


def tiny_cfg(root: Path, out: Path, *extra: str):
    return compose_config("train", [*TINY, f"data.root={root}", "data.generate_demo=false", *extra], out)


def finite_state(path: Path) -> tuple[int, bool]:
    """(global_step, every floating tensor finite) of a checkpoint file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    finite = all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())
    return int(ckpt["global_step"]), finite
