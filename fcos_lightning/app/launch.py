"""How a run is launched: the world-size check, and Hydra multirun jobs that need their own DDP launch.

Such a job runs as a separate ``train.py`` process; its ``train()`` hands its return value (the final
``val/AP``) back through a pipe the parent opened for it (:data:`RESULT_FD`), as a function returns a value.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytorch_lightning as pl
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

log = logging.getLogger(__name__)

#: environment variable naming the pipe a multirun job process writes its result to.
RESULT_FD = "FCOS_LIGHTNING_RESULT_FD"


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
    read_fd, write_fd = os.pipe()
    try:
        env = {**os.environ, RESULT_FD: str(write_fd)}
        subprocess.run(command, check=True, pass_fds=(write_fd,), env=env)
    finally:
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            result = pipe.read()
    if not result:
        raise RuntimeError(f"multirun job {output_dir} finished without returning its val/AP")
    return float(json.loads(result)["AP"])


def result_channel() -> int | None:
    """The pipe a parent :func:`run_multirun_job_in_subprocess` opened for this process's result, taken out of
    the environment so that processes started later (the job's DDP ranks) do not inherit its number."""
    fd = os.environ.pop(RESULT_FD, None)
    return None if fd is None else int(fd)


def send_result(channel: int | None, ap: float) -> None:
    """Hand ``train()``'s return value to the parent process (nothing to do without a channel)."""
    if channel is not None:
        with os.fdopen(channel, "w") as pipe:
            json.dump({"AP": ap}, pipe)
