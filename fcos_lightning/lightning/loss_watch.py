"""A warning in the log when training goes wrong while the loss stays finite: a spike, or a loss that stays far
above where it started.

A too-high learning rate or training from scratch without gradient clipping can throw FCOS into a state it never
leaves (the classifier collapses, the loss sits on a plateau) without a single NaN. :class:`LossWatch` reads the
training loss once per window of steps (the per-step values are accumulated on the device, so no step waits for
the GPU) and warns, naming the step:

- a spike: a step whose loss exceeds ``spike_factor`` times the mean of the previous window (in the first
  window, times that window's lowest loss);
- a stall: a window mean, ``stall_after`` steps or more into training, at least ``stall_ratio`` times the
  starting loss: the lowest step loss of the first window. Not its mean: a run that diverges in its first steps
  (the demo at 64x its learning rate, unclipped: a first-window mean of 9.7, then a plateau near 7 while a healthy
  run is near 1) has a mean that hides the plateau, and no earlier window to call the blow-up a spike against.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch import Tensor

log = logging.getLogger("fcos_lightning")

__all__ = ["LossWatch"]

ADVICE = "gradient clipping (trainer.gradient_clip_val=10) or a lower learning rate (schedule.base_lr) may help"


class LossWatch(pl.Callback):
    """Warns about a training loss that spikes or stalls far above its start (see the module docstring).

    Args:
        window: steps per reading of the loss.
        spike_factor: a step's loss above this times the previous window's mean is a spike.
        stall_ratio: a window mean at least this times the starting loss is a stall ...
        stall_after: ... once training is this many steps in.
        max_warnings: warnings of each kind at most (the log stays readable).
    """

    def __init__(
        self,
        window: int = 20,
        spike_factor: float = 3.0,
        stall_ratio: float = 1.0,
        stall_after: int = 200,
        max_warnings: int = 3,
    ) -> None:
        if window < 1 or spike_factor <= 1 or stall_ratio <= 0 or stall_after < window:
            raise ValueError(
                f"LossWatch needs window >= 1, spike_factor > 1, stall_ratio > 0 and stall_after >= window; got "
                f"window={window}, spike_factor={spike_factor}, stall_ratio={stall_ratio}, stall_after={stall_after}"
            )
        self.window, self.spike_factor, self.stall_ratio = window, spike_factor, stall_ratio
        self.stall_after, self.max_warnings = stall_after, max_warnings
        self.start: float | None = None
        self.previous_mean: float | None = None
        self.warnings = {"spike": 0, "stall": 0}
        self._reset()

    def _reset(self) -> None:
        self._sum: Tensor | float = 0.0
        self._count = 0
        self._max: Tensor | None = None
        self._max_step: Tensor | None = None
        self._min: Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):  # a skipped step
            return
        loss = loss.detach().float()
        step = torch.tensor(trainer.global_step, device=loss.device)
        self._sum = self._sum + loss
        self._count += 1
        if self._max is None:
            self._max, self._max_step, self._min = loss, step, loss
        else:
            higher = loss > self._max
            self._max, self._max_step = torch.where(higher, loss, self._max), torch.where(higher, step, self._max_step)
            self._min = torch.minimum(self._min, loss)
        if self._count == self.window:
            readings = torch.stack((self._sum / self._count, self._max, self._max_step.to(loss), self._min))
            mean, peak, peak_step, low = readings.tolist()  # one host sync per window
            self.check(mean, peak, int(peak_step), trainer.global_step, low)
            self._reset()

    def check(self, mean: float, peak: float, peak_step: int, step: int, low: float) -> None:
        """One window's reading: its mean, highest loss (at ``peak_step``) and lowest loss, ending at ``step``."""
        if self.start is None:
            self.start = low
            reference, what = low, f"the lowest loss {low:.4g} of the first {self.window} steps"
        else:
            reference, what = self.previous_mean, f"the mean {self.previous_mean:.4g} of the {self.window} steps before"
        if peak > self.spike_factor * reference:
            self._warn(
                "spike",
                "training loss spiked to %.4g at step %d, %.1fx %s; %s",
                peak,
                peak_step,
                peak / reference,
                what,
                ADVICE,
            )
        if step >= self.stall_after and mean >= self.stall_ratio * self.start:
            self._warn(
                "stall",
                "training loss stalls: mean %.4g over steps %d-%d, not below the starting loss %.4g (the lowest of "
                "the first %d steps); %s",
                mean,
                step - self.window + 1,
                step,
                self.start,
                self.window,
                ADVICE,
            )
        self.previous_mean = mean

    def _warn(self, kind: str, message: str, *args) -> None:
        if self.warnings[kind] < self.max_warnings:
            self.warnings[kind] += 1
            log.warning(message, *args)

    def state_dict(self) -> dict:
        return {"start": self.start, "previous_mean": self.previous_mean, "warnings": dict(self.warnings)}

    def load_state_dict(self, state_dict: dict) -> None:
        start = state_dict.get("start", state_dict.get("first_mean"))  # checkpoints before the lowest-loss start
        self.start, self.previous_mean = start, state_dict["previous_mean"]
        self.warnings = dict(state_dict["warnings"])
