"""A callback the DDP tests add through a Hydra override to see what every rank holds after validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl


class RankMetricsProbe(pl.Callback):
    """Writes this rank's logged ``val/*`` metrics after each validation to ``<dir>/rank<global rank>.json``."""

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics))
