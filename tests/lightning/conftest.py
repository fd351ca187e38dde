"""Fault injectors the Lightning-layer tests load through Hydra overrides
(``module._target_=tests.lightning.conftest.NaNLossAtStep``, ``+callbacks.sleep={_target_: ...SleepPerBatch}``)."""

from __future__ import annotations

import time

import pytorch_lightning as pl

from fcos_lightning.lightning.module import FCOSLitModule


class NaNLossAtStep(FCOSLitModule):
    """FCOSLitModule whose training loss is NaN at global step ``nan_at_step`` (test-only)."""

    def __init__(self, *args, nan_at_step: int = -1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at_step = nan_at_step

    def compute_loss(self, outputs, targets, sync=True):
        losses = super().compute_loss(outputs, targets, sync)
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
