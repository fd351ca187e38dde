"""LossWatch on synthetic loss sequences: it names the step of a spike and of a stall, and stays quiet on a
healthy run."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from fcos_lightning.lightning.loss_watch import LossWatch


def _feed(watch: LossWatch, losses: list[float]) -> None:
    for step, value in enumerate(losses, start=1):
        outputs = {"loss": torch.tensor(value)}
        watch.on_train_batch_end(SimpleNamespace(global_step=step), None, outputs, None, step - 1)
    watch.on_train_batch_end(SimpleNamespace(global_step=len(losses)), None, None, None, 0)  # a skipped step


def _healthy(n: int) -> list[float]:
    return [3.0 * math.exp(-i / 150) + 0.3 + 0.05 * math.sin(i) for i in range(n)]


def test_a_healthy_loss_gives_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fcos_lightning"):
        _feed(LossWatch(), _healthy(600))
    assert caplog.text == ""


def test_a_spike_is_named_by_its_step(caplog):
    losses = _healthy(300)
    losses[137] = 25.0  # step 138
    with caplog.at_level(logging.WARNING, logger="fcos_lightning"):
        _feed(LossWatch(), losses)
    assert "training loss spiked to 25 at step 138" in caplog.text
    assert "gradient clipping" in caplog.text and "lower learning rate" in caplog.text
    assert "stalls" not in caplog.text


def test_a_loss_stuck_above_its_start_is_a_stall_named_by_its_steps(caplog):
    # falls for 60 steps, then jumps up to a plateau above where it started (a collapsed classifier)
    losses = _healthy(60) + [3.6 + 0.01 * (i % 3) for i in range(340)]
    with caplog.at_level(logging.WARNING, logger="fcos_lightning"):
        watch = LossWatch(max_warnings=2)
        _feed(watch, losses)
    assert (
        "training loss stalls: mean 3.609 over steps 181-200, not below the starting loss 2.923 (the lowest of the "
        "first 20 steps)" in caplog.text
    )
    assert caplog.text.count("stalls") == 2  # at most max_warnings


def test_a_run_that_blows_up_in_its_first_steps_is_named(caplog):
    """The demo at 64x its learning rate without clipping: the loss explodes within the first window, then sits
    on a plateau below that window's mean but far above where it started."""
    losses = _healthy(7) + [80.0, 30.0] + [12.0] * 11 + [7.0 + 0.1 * (i % 5) for i in range(280)]
    with caplog.at_level(logging.WARNING, logger="fcos_lightning"):
        _feed(LossWatch(), losses)
    assert "training loss spiked to 80 at step 8, 25.4x the lowest loss 3.154 of the first 20 steps" in caplog.text
    assert "training loss stalls: mean 7.2 over steps 181-200, not below the starting loss 3.154" in caplog.text


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="spike_factor > 1"):
        LossWatch(spike_factor=0.5)
