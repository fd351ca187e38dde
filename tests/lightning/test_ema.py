"""EMA of the weights: the warmed-up decay, the average itself, checkpoints with both weight sets, exact resume."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fcos_lightning.app.train import train
from fcos_lightning.checkpoint import load_checkpoint, load_network, model_state
from fcos_lightning.lightning.ema import EMAWeights, ema_decay
from fcos_lightning.lightning.module import FCOSLitModule


def test_decay_warms_up_to_its_value():
    assert ema_decay(1, 0.9998, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1 / 2000)))
    assert ema_decay(40000, 0.9998, 2000) == pytest.approx(0.9998, abs=1e-8)
    assert ema_decay(1, 0.99, 0) == 0.99
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(decay=1.0)


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        self.device = torch.device("cpu")


def test_average_follows_the_warmed_up_decay_and_swaps_for_validation():
    holder, ema = _Holder(), EMAWeights(decay=0.9, tau=3.0)
    ema.setup(None, holder, "fit")
    weight = holder.model[0].weight
    expected = None
    for step in range(1, 6):
        with torch.no_grad():
            weight.add_(float(step))
            holder.model[1].num_batches_tracked += 1
        ema.on_train_batch_end(SimpleNamespace(global_step=step), holder, None, None, step - 1)
        if expected is None:  # the first update copies
            expected = weight.detach().clone()
        else:
            d = 0.9 * (1 - math.exp(-step / 3.0))
            expected = d * expected + (1 - d) * weight.detach()
    averaged = ema._average_model.module
    torch.testing.assert_close(averaged[0].weight, expected)
    assert int(averaged[1].num_batches_tracked) == 5  # integer buffers take the current value
    trained = weight.detach().clone()
    ema.on_validation_epoch_start(None, holder)
    torch.testing.assert_close(weight.detach(), expected)
    ema.on_validation_epoch_end(None, holder)
    assert torch.equal(weight.detach(), trained)


def test_resuming_an_ema_checkpoint_without_ema_continues_the_trained_weights():
    trained, averaged = {"model.w": torch.zeros(2)}, {"model.w": torch.ones(2)}
    without_ema = SimpleNamespace(trainer=SimpleNamespace(callbacks=[]))
    checkpoint = {"state_dict": averaged, "current_model_state": trained}
    FCOSLitModule.on_load_checkpoint(without_ema, checkpoint)
    assert checkpoint["state_dict"] is trained
    with_ema = SimpleNamespace(trainer=SimpleNamespace(callbacks=[EMAWeights()]))
    checkpoint = {"state_dict": averaged, "current_model_state": trained}
    FCOSLitModule.on_load_checkpoint(with_ema, checkpoint)
    assert checkpoint["state_dict"] is averaged  # the EMA callback restores both sets


SCHEDULE = [
    "ema=true",
    "ema_callback.decay=0.9",
    "ema_callback.tau=2",
    "schedule.max_iter=9",
    "schedule.val_interval=3",
    "schedule.warmup_iters=2",
    "schedule.milestones=[7]",
    "callbacks.checkpoint.save_top_k=-1",
    "callbacks.checkpoint.monitor=step",
    "callbacks.checkpoint.filename='step{step:03d}'",
    "logger=csv",
]


@pytest.mark.slow  # two tiny trainings: about a minute on a free 2-core CPU
def test_resume_gives_bit_identical_ema_weights_and_loaders_use_them(tiny_demo, tiny_cfg, tmp_path, caplog):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(tiny_cfg(tiny_demo, whole, *SCHEDULE))
    # step 6: an epoch boundary (3 batches of 4 of the 14 non-empty train images)
    train(tiny_cfg(tiny_demo, resumed, *SCHEDULE, f"ckpt_path={whole / 'checkpoints' / 'step006.ckpt'}"))
    a = load_checkpoint(whole / "checkpoints" / "last.ckpt")
    b = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 9
    assert a["ema"] == b["ema"] == {"decay": 0.9, "tau": 2.0, "updates": 9}
    for key in ("state_dict", "current_model_state"):
        assert a[key].keys() == b[key].keys()
        different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, (key, different[:5])
    averaged, trained = model_state(a), model_state(a, "trained")
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)
    with caplog.at_level(logging.INFO, logger="fcos_lightning.checkpoint"):
        network = load_network(a)
    assert "the EMA of its weights (decay 0.9, tau 2 steps, 9 updates" in caplog.text
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in averaged.items())
