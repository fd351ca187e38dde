"""Checkpoints that survive kills and cannot run code when loaded (USER_NEEDS §1.6, §3.7).

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same directory, fsyncs it
  and renames it over the target, so a process killed mid-save (SIGKILL included) leaves the previous file
  whole. It refuses to save a model with a NaN/Inf tensor, so ``last.ckpt`` and ``best-*`` stay usable.
- :func:`safe_load` is the only way the project reads a checkpoint: ``torch.load(weights_only=True)``, with
  a clear refusal for files that need full unpickling (which can execute arbitrary code).
- :class:`SaveOnSigterm` saves ``last.ckpt`` when a plain SIGTERM (cluster preemption) stops the run.
- :class:`RNGStateCheckpoint` stores the torch/numpy/python RNG states, so a resumed run draws the same
  augmentations as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger("fcos_lightning")

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteModelError",
    "RNGStateCheckpoint",
    "SaveOnSigterm",
    "UnsafeCheckpointError",
    "first_nonfinite",
    "safe_load",
]


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """``json.dumps(obj)`` written to a temporary file and renamed over ``path``: readers (and a resumed run)
    never see a half-written ``metrics.json``, report or annotation file."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(obj, **dumps_kwargs))
    os.replace(tmp, path)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that only full unpickling could load; refused because unpickling can run code."""


class NonFiniteModelError(RuntimeError):
    """The model holds NaN/Inf values; saving it would overwrite a good checkpoint with a useless one."""


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors naming the file and saying why it was refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains Python objects that only full unpickling can rebuild, and "
            f"unpickling a file can execute arbitrary code. fcos_lightning checkpoints hold only tensors and "
            f"plain containers (torch.load weights_only=True). If you trust the file, re-save its state_dict "
            f"as plain tensors. ({reason})"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from e


def first_nonfinite(state_dict: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor in ``state_dict`` holding NaN or Inf (None if all finite)."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to ``<path>.tmp<pid>`` + fsync + ``os.replace`` (local paths), never
    saves a non-finite model, and loads with :func:`safe_load`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = os.fspath(path)
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise NonFiniteModelError(
                f"not saving {path}: parameter/buffer {bad!r} holds NaN/Inf (step {checkpoint.get('global_step')}); "
                "the previous checkpoints are kept"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _fsync_dir(os.path.dirname(path) or ".")

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise UnsafeCheckpointError(f"refusing weights_only=False for {path}: unpickling can run code")
        return safe_load(path, map_location=map_location)


def _fsync_dir(directory: str) -> None:
    # Make the rename itself durable (POSIX); not possible on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SaveOnSigterm(pl.Callback):
    """On a plain SIGTERM (Lightning stops after the current batch), save ``last.ckpt`` before exiting.

    ``dirpath``: where to write it; default: the ``ModelCheckpoint``'s directory, else
    ``<default_root_dir>/checkpoints``. Resume with ``ckpt_path=last`` (or ``auto``).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath = dirpath
        self.filename = filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        ckpt_cb = trainer.checkpoint_callback
        dirpath = self.dirpath or getattr(ckpt_cb, "dirpath", None)
        dirpath = dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(dirpath, self.filename)
        trainer.save_checkpoint(path)
        log.warning("SIGTERM: saved %s at step %d; resume with ckpt_path=last", path, trainer.global_step)


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
