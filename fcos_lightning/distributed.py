"""Multi-process training helpers: SyncBN conversion and Hydra multirun jobs that need their own DDP launch.

SyncBN: the head (``norm: SyncBN``), the FPN (``fpn_norm: SyncBN``) and the backbones declared
``norm: syncbn`` are built with plain ``BatchNorm2d``. Only under DDP on CUDA with more than one process are
exactly those layers turned into ``SyncBatchNorm``: FrozenBN stays frozen, GroupNorm is untouched and a head
declared ``BN`` keeps per-process statistics. Lightning's ``Trainer(sync_batchnorm=True)`` would instead
convert every BN of the model.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
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
    is ``SyncBN``, the backbone if its norm is ``syncbn``."""
    targets = {}
    if getattr(getattr(model, "backbone", None), "norm", None) == "syncbn":
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


def relaunches_script(trainer: pl.Trainer) -> bool:
    """True when ``trainer.fit`` would start its other ranks by re-running ``sys.argv`` (``strategy=ddp``
    launched directly), which inside a Hydra multirun would re-run the whole sweep in every child."""
    launcher = trainer.strategy.launcher
    return isinstance(launcher, _SubprocessScriptLauncher) and not (
        trainer.strategy.cluster_environment.creates_processes_externally or trainer.num_devices <= 1
    )


def check_world_size(trainer: pl.Trainer, assumed: int) -> None:
    """Fail fast when the LR was scaled for ``assumed`` processes but the Trainer runs a different number."""
    if trainer.world_size != assumed:
        raise ValueError(
            f"the schedule was scaled for {assumed} processes (trainer.devices x trainer.num_nodes) but the "
            f"Trainer runs {trainer.world_size}; set trainer.devices and trainer.num_nodes to match the launcher"
        )


def run_multirun_job_with_ddp(trainer: pl.Trainer, script: str, output_dir: str) -> float | None:
    """Inside a Hydra multirun job whose Trainer would re-run the script for its other ranks, run the job as
    a separate single-run process instead and return its AP; None when the job can train in this process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and relaunches_script(trainer)):
        return None
    return run_multirun_job_in_subprocess(script, list(HydraConfig.get().overrides.task), output_dir)


def run_multirun_job_in_subprocess(script: str, task_overrides: list[str], output_dir: str) -> float:
    """Run one Hydra multirun job as its own single-run ``script`` process writing into ``output_dir``, so the
    DDP launch of that process starts its ranks with the job's overrides and run dir. Returns its ``val/AP``."""
    command = [
        sys.executable,
        os.path.abspath(script),
        *task_overrides,
        f"hydra.run.dir={output_dir}",
        "hydra.output_subdir=null",
    ]
    log.info("multirun job with DDP: running %s", " ".join(command))
    subprocess.run(command, check=True)
    metrics = Path(output_dir) / "metrics.json"
    return float(json.loads(metrics.read_text())["AP"]) if metrics.is_file() else float("nan")
