"""Reading and writing the project's files safely: checkpoints that cannot run code when loaded, and JSON
outputs that are never seen half-written.

- :func:`safe_load` is the only way the project reads a checkpoint or weights file:
  ``torch.load(weights_only=True)``, with a clear refusal for files that need full unpickling (which can
  execute arbitrary code).
- :func:`write_json_atomic` writes to a temporary file and renames it over the target.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "safe_load", "write_json_atomic"]


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """``json.dumps(obj)`` written to a temporary file and renamed over ``path``: readers (and a resumed run)
    never see a half-written ``metrics.json``, report or annotation file."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(obj, **dumps_kwargs))
    os.replace(tmp, path)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that only full unpickling could load; refused because unpickling can run code."""


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors naming the file and saying why it was refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive, or a pickle (legacy)
        raise ValueError(f"{path}: not a checkpoint: {_looks_like(head)}, not a torch.save file")
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


def _looks_like(head: bytes) -> str:
    kinds = {
        b"\xff\xd8": "a JPEG image",
        b"\x89PNG": "a PNG image",
        b"RIFF": "a WebP image",
        b"{": "JSON",
        b"[": "JSON",
    }
    found = next((kind for magic, kind in kinds.items() if head.lstrip().startswith(magic)), None)
    return f"it is {found}" if found else f"it starts with {head!r}" if head else "it is empty"
