"""EMA of the network's weights: Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging` over the FCOS
network alone, with the decay warmed up as ultralytics' and timm's model EMA do.

The averaged copy is updated after every optimizer step with decay ``decay * (1 - exp(-step / tau))``, so early
steps, whose weights are soon far behind, count little. Validation runs on the averaged weights (swapped in for
the round), and so does the model after training. Checkpoints follow Lightning's layout: ``state_dict`` holds the
averaged weights, which every loader of our checkpoints then uses without knowing about EMA,
``current_model_state`` the trained ones, ``averaging_state`` the averager's count, and ``ema`` (see
:mod:`fcos_lightning.checkpoint`) the settings; a resumed run continues both exactly.

Only the network (``pl_module.model``) is averaged and copied: the module's evaluator, criterion and decoder are
not. Buffers are averaged too (BN running statistics); integer buffers take the current value.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMAWeights", "ema_decay"]


def ema_decay(step: int, decay: float, tau: float) -> float:
    """The EMA decay at optimizer step ``step`` (1-based): ``decay * (1 - exp(-step / tau))``; ``tau=0``: ``decay``."""
    return decay if tau == 0 else decay * (1.0 - math.exp(-step / tau))


class EMAWeights(WeightAveraging):
    """Exponential moving average of ``pl_module.model``'s parameters and buffers.

    Args:
        decay: the decay once warmed up (0.9998: about the last 5000 steps count).
        tau: warm-up of the decay, in optimizer steps (0: none).
        device: where the averaged copy lives (None: with the model).
    """

    def __init__(self, decay: float = 0.9998, tau: float = 2000.0, device: str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
        if tau < 0:
            raise ValueError(f"ema tau must be >= 0 optimizer steps, got {tau!r}")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self._average)
        self.decay, self.tau = decay, tau
        self._step = 0

    # ---- the averaging ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _average(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(self._step, self.decay, self.tau))
        else:  # num_batches_tracked
            torch._foreach_copy_(averaged, current)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._average_model is None:
            self._average_model = AveragedModel(
                pl_module.model, device=self._device, use_buffers=True, multi_avg_fn=self._average
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._device is None:  # the strategy has moved the model by now
            self._average_model.to(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step = trainer.global_step
        super().on_train_batch_end(trainer, pl_module.model, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # averaged per step only

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module.model)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, pl_module.model)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module.model)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """What a checkpoint records about the averaging (its ``ema`` entry)."""
        return {"decay": self.decay, "tau": self.tau, "updates": int(self._average_model.n_averaged)}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:  # outside fit: the module already holds the averaged weights
            return
        averaged = self._average_model.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {
            **checkpoint["state_dict"],
            **{"model." + k.removeprefix("module."): v for k, v in averaged.items() if k.startswith("module.")},
        }
        checkpoint["averaging_state"] = {k: v for k, v in averaged.items() if not k.startswith("module.")}
        checkpoint["ema"] = self.settings()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # from a run without EMA, the average starts at the next step from the weights then (a count of 0 copies)
        if self._average_model is None or "current_model_state" not in checkpoint:
            return
        # an EMA run: continue both weight sets where they were
        state = checkpoint["state_dict"]
        averaged = {"module." + k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        self._average_model.load_state_dict({**averaged, **checkpoint["averaging_state"]})
        pl_module.load_state_dict(checkpoint["current_model_state"])
