"""Training callbacks that keep a run recoverable and its failures visible.

- :class:`SaveLast` saves ``last.ckpt`` at the end of training (the steps after the last validation are not
  lost) and when a plain SIGTERM (cluster preemption) stops the run.
- :class:`RNGStateCheckpoint` stores the torch/numpy/python RNG states, so a resumed run draws the same
  augmentations as an uninterrupted one.
- :class:`SkippedImageCounter` counts the images skipped under ``data.on_bad_image=skip``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from collections import Counter
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger("fcos_lightning")

__all__ = ["RNGStateCheckpoint", "SaveLast", "SkippedImageCounter"]


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


class SaveLast(pl.Callback):
    """Saves ``last.ckpt`` when training ends, so it holds the final step (``ModelCheckpoint`` saves only at
    validations: with 14 steps and validation every 10 it would hold step 10), and on a plain SIGTERM
    (Lightning stops after the current batch) before the run exits. ``fast_dev_run`` saves nothing.

    ``dirpath``: where to write it; default: the ``ModelCheckpoint``'s directory, else
    ``<default_root_dir>/checkpoints``. Resume with ``ckpt_path=last`` (or ``auto``).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath = dirpath
        self.filename = filename

    def path(self, trainer: pl.Trainer) -> str:
        dirpath = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        return os.path.join(dirpath or os.path.join(trainer.default_root_dir, "checkpoints"), self.filename)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke run (debug=fast) writes no checkpoint, as Lightning's own callbacks
            return
        trainer.save_checkpoint(self.path(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.path(trainer)
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: saved %s at step %d; resume with ckpt_path=last", path, trainer.global_step)
        exception.code = 128 + signal.SIGTERM  # Lightning's SystemExit() would exit 0, as if training had ended


class RNGStateCheckpoint(pl.Callback):
    """Saves and restores the global torch, numpy and python RNG states with the checkpoint (plain tensors and
    tuples, so ``weights_only=True`` loads them).

    The states are applied at the first ``on_train_epoch_start`` after loading, not in :meth:`load_state_dict`:
    Lightning draws random numbers while it sets the run up, after restoring callbacks. From an epoch-boundary
    checkpoint the resumed run then draws exactly the augmentations of an uninterrupted one.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global state is what seeding sets)
        return {
            "torch": torch.get_rng_state(),
            "numpy": {
                "name": str(name),
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            },
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


def _set_rng_states(state_dict: dict[str, Any]) -> None:
    torch.set_rng_state(state_dict["torch"])
    n = state_dict["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached"]))  # noqa: NPY002
    version, internal, gauss = state_dict["python"]
    random.setstate((version, tuple(internal), gauss))
