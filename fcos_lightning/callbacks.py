"""Training callbacks that make failures visible: images skipped under ``data.on_bad_image=skip``."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist

log = logging.getLogger("fcos_lightning")

__all__ = ["SkippedImageCounter"]


class SkippedImageCounter(pl.Callback):
    """Counts the training images replaced because they could not be used (``data.on_bad_image=skip``).

    Datasets run in DataLoader workers, so the counting happens here, in the main process, from the batch's
    ``skipped_image_ids``. At the end of training the distinct ids (summed over ranks) are logged and written
    to ``<default_root_dir>/skipped_images.json``. The counts are part of the checkpoint, so a resumed run
    reports the whole run.
    """

    def __init__(self, filename: str = "skipped_images.json") -> None:
        self.filename = filename
        self.counts: Counter[int] = Counter()

    @property
    def num_skipped(self) -> int:
        """Distinct image ids skipped so far (by this rank)."""
        return len(self.counts)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        ids = batch.get("skipped_image_ids") if isinstance(batch, dict) else None
        if ids is None or len(ids) == 0:
            return
        for i in ids.tolist():
            if i not in self.counts:
                log.warning("skipped unreadable training image id %d (data.on_bad_image=skip)", i)
            self.counts[i] += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = Counter(self.counts)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, dict(self.counts))
            counts = sum((Counter(g) for g in gathered), Counter())
        if not trainer.is_global_zero:
            return
        report = {
            "num_skipped_images": len(counts),
            "num_skipped_samples": int(sum(counts.values())),
            "image_ids": sorted(counts),
        }
        if counts:
            log.warning(
                "%d training images were skipped as unreadable (%d times in all): ids %s",
                report["num_skipped_images"],
                report["num_skipped_samples"],
                report["image_ids"][:20],
            )
        path = os.path.join(trainer.default_root_dir, self.filename)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": {int(k): int(v) for k, v in self.counts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts = Counter({int(k): int(v) for k, v in state_dict["counts"].items()})
