"""A NaN loss injected at a chosen step stops the run (naming the batch and the loss terms) and leaves the last
good checkpoint, or is skipped with module.on_nonfinite_loss=skip."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fcos_lightning.app.train import train
from fcos_lightning.lightning.nonfinite import NonFiniteLossError

NAN_AT = 5
RUN = [
    "schedule.max_iter=8",
    "schedule.val_interval=4",
    "schedule.warmup_iters=2",
    "schedule.milestones=[7]",
    "module._target_=tests.lightning.conftest.NaNLossAtStep",
    f"+module.nan_at_step={NAN_AT}",
]


def finite_state(path: Path) -> tuple[int, bool]:
    """(global_step, every floating tensor finite) of a checkpoint file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    finite = all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())
    return int(ckpt["global_step"]), finite


def test_nan_loss_stops_naming_images_and_terms_and_keeps_last_good_checkpoint(tiny_demo, tiny_cfg, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:
        train(tiny_cfg(tiny_demo, run, *RUN))
    msg = str(e.value)
    assert f"step {NAN_AT}" in msg and "image ids [" in msg
    assert "loss_box=nan" in msg and "loss_cls=" in msg and "lr=" in msg
    step, finite = finite_state(run / "checkpoints" / "last.ckpt")
    assert step == 4 and finite  # the checkpoint of the last validation before the NaN, untouched


def test_skip_policy_drops_the_step_and_finishes(tiny_demo, tiny_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="fcos_lightning.lightning.module"):
        train(tiny_cfg(tiny_demo, run, *RUN, "module.on_nonfinite_loss=skip"))
    skipped = [r for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 1 and f"step {NAN_AT}" in skipped[0].getMessage()
    step, finite = finite_state(run / "checkpoints" / "last.ckpt")
    assert step == 8 and finite
