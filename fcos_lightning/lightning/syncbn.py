"""SyncBN under DDP: only the layers a preset declares synchronized become ``SyncBatchNorm``.

SyncBN: the head (``norm: SyncBN``), the FPN (``fpn_norm: SyncBN``) and the backbones declared
``norm: SyncBN`` are built with plain ``BatchNorm2d``. Only under DDP on CUDA with more than one process are
exactly those layers turned into ``SyncBatchNorm``: FrozenBN stays frozen, GroupNorm is untouched and a head
declared ``BN`` keeps per-process statistics. Lightning's ``Trainer(sync_batchnorm=True)`` would instead
convert every BN of the model.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

log = logging.getLogger(__name__)


def should_sync_batchnorm(trainer: pl.Trainer) -> tuple[bool, str]:
    """Whether SyncBN layers should synchronize under ``trainer``, and why in words (for the log)."""
    if trainer.world_size <= 1:
        return False, "a single process"
    if not isinstance(trainer.strategy, DDPStrategy):
        return False, f"strategy {type(trainer.strategy).__name__} is not DDP"
    if trainer.strategy.root_device.type != "cuda":
        return False, f"DDP on {trainer.strategy.root_device.type} (SyncBatchNorm needs GPUs)"
    return True, f"DDP on CUDA over {trainer.world_size} processes"


def sync_batchnorm_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The parts of an FCOS network whose BatchNorm is declared synchronized: the head or the FPN if its norm
    is ``SyncBN``, the backbone if its norm is ``SyncBN``."""
    targets = {}
    if getattr(getattr(model, "backbone", None), "norm", None) == "SyncBN":
        targets["backbone"] = model.backbone
    if getattr(getattr(model, "fpn", None), "norm", None) == "SyncBN":
        targets["fpn"] = model.fpn
    if getattr(getattr(model, "head", None), "norm", None) == "SyncBN":
        targets["head"] = model.head
    return targets


def convert_batchnorm_to_sync(module: nn.Module) -> int:
    """Replace every ``BatchNorm2d`` below ``module`` by ``SyncBatchNorm`` (timm's ``BatchNormAct2d`` by timm's
    ``SyncBatchNormAct``, keeping its activation) sharing its parameters and buffers; returns how many. FrozenBN
    and GN are not BatchNorm2d and stay as they are."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            module.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
            count += 1
        elif type(child) is BatchNormAct2d:
            module.add_module(name, timm_convert_sync_batchnorm(child))
            count += 1
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            raise TypeError(f"cannot convert {type(child).__name__} ({name}) to SyncBatchNorm")
        else:
            count += convert_batchnorm_to_sync(child)
    return count


def apply_sync_batchnorm(model: nn.Module, sync: bool, why: str, verbose: bool = True) -> dict[str, int]:
    """Convert the declared-SyncBN parts of ``model`` when ``sync``; returns converted layers per part.
    Logs what happened when the model declares SyncBN at all (``verbose``: on rank 0)."""
    targets = sync_batchnorm_targets(model)
    if not targets:
        return {}
    if not sync:
        if verbose:
            log.info("SyncBN (%s) runs as plain BatchNorm on each process's batch: %s", ", ".join(targets), why)
        return dict.fromkeys(targets, 0)
    counts = {name: convert_batchnorm_to_sync(part) for name, part in targets.items()}
    if verbose:
        done = ", ".join(f"{name} {n}" for name, n in counts.items())
        log.info("SyncBN: %s BatchNorm layers converted to SyncBatchNorm (%s)", done, why)
    return counts
