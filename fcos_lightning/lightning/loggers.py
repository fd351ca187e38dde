"""Pictures to whichever Lightning loggers a run uses, each through its own image API.

TensorBoard: ``SummaryWriter.add_image``; Weights & Biases: ``WandbLogger.log_image``; MLflow:
``MlflowClient.log_image`` (an image series by key and step); CSV: a PNG file under ``<log dir>/images/`` next to
``metrics.csv``. Any other logger whose ``experiment`` has ``add_image`` gets that; the rest are skipped with one
warning naming the logger.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _chw_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected a [3, H, W] (or [1, H, W]) uint8 image, got {array.dtype} {list(array.shape)}")
    return array


def csv_image_path(logger: CSVLogger, key: str, step: int) -> Path:
    """Where :func:`log_image` writes ``key`` at ``step`` for a CSV logger: ``<log dir>/images/<key>-step<N>.png``
    (``/`` in the key becomes ``_``)."""
    return Path(logger.log_dir) / "images" / f"{key.replace('/', '_')}-step{step:07d}.png"


def log_image(logger: Logger, key: str, image: np.ndarray | torch.Tensor, step: int) -> bool:
    """Send one ``[3, H, W]`` uint8 image under ``key`` at ``step``; False if the logger has no image API, and on
    every process but global rank 0 (loggers record from rank 0 only)."""
    chw = _chw_uint8(image)
    if rank_zero_only.rank != 0:
        return False
    hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, chw, global_step=step, dataformats="CHW")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[hwc], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, hwc, key=key, step=step)
    elif isinstance(logger, CSVLogger):
        path = csv_image_path(logger, key, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(hwc if hwc.shape[2] == 3 else hwc[..., 0]).save(path)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):
        logger.experiment.add_image(key, chw, global_step=step, dataformats="CHW")
    else:
        name = type(logger).__name__
        if name not in _warned:
            _warned.add(name)
            log.warning("%s has no image API known to fcos_lightning: pictures are not sent to it", name)
        return False
    return True


def log_images(loggers: Iterable[Logger], images: Mapping[str, np.ndarray | torch.Tensor], step: int) -> int:
    """Every image (``{key: [3, H, W] uint8}``) to every logger; returns how many (logger, image) pairs were sent."""
    return sum(log_image(logger, key, image, step) for logger in loggers for key, image in images.items())
