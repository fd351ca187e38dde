"""A callback the end-to-end tests add through a Hydra override to observe a run from inside."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl


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
