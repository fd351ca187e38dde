"""Lightning's checkpoint IO made safe: checkpoints survive kills and cannot run code when loaded.

:class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the same directory, fsyncs it and
renames it over the target, so a process killed mid-save (SIGKILL included) leaves the previous file whole. It
refuses to save a model with a NaN/Inf tensor, so ``last.ckpt`` and ``best-*`` stay usable, and it loads with
:func:`~fcos_lightning.files.safe_load` (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from fcos_lightning.files import UnsafeCheckpointError, safe_load

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "NonFiniteModelError",
    "first_nonfinite",
    "remove_stale_temp_files",
]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space left, file-size limit); the previous file is intact."""


class NonFiniteModelError(RuntimeError):
    """The model holds NaN/Inf values; saving it would overwrite a good checkpoint with a useless one."""


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
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
            kept = "the previous checkpoint is kept" if os.path.exists(path) else "nothing was written"
            raise CheckpointWriteError(
                f"could not write checkpoint {path} (disk full or over a file-size limit?); {kept}: {e}"
            ) from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _fsync_dir(os.path.dirname(path) or ".")

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise UnsafeCheckpointError(f"refusing weights_only=False for {path}: unpickling can run code")
        return safe_load(path, map_location=map_location)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete the ``*.tmp<pid>`` files a process killed while saving left in ``directory`` (those of a running
    process are kept: it may be saving now); returns their paths."""
    removed = []
    for tmp in sorted(Path(directory).glob("*.tmp*")) if os.path.isdir(directory) else []:
        pid = tmp.suffix.removeprefix(".tmp")
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp))
            log.warning("removed %s, left by a process killed while saving a checkpoint", tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
