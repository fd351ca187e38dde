"""How runs are launched: the SLURM sweep launcher config, the world-size check, when a multirun job needs its
own process for DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fcos_lightning.app.launch import check_world_size, relaunches_script, run_multirun_job_in_subprocess
from fcos_lightning.app.train import world_size

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def test_slurm_launcher_follows_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)


def test_world_size_check():
    ddp = trainer(devices=2, strategy="ddp")
    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 2, "num_nodes": 1})
    check_world_size(ddp, world_size(cfg))
    with pytest.raises(ValueError, match="scaled for 1 processes .* runs 2"):
        check_world_size(ddp, 1)


def test_only_script_relaunching_ddp_needs_a_process_per_multirun_job():
    assert relaunches_script(trainer(devices=2, strategy="ddp"))
    assert not relaunches_script(trainer(devices=2, strategy="ddp_spawn"))
    assert not relaunches_script(trainer(devices=1))


def test_a_job_process_returns_its_ap_to_the_parent(tmp_path):
    """What run_multirun_job_in_subprocess gets back is what the job's train() handed over, and the pipe's
    number is gone from the job's environment before it can start DDP ranks."""
    job = tmp_path / "job.py"
    job.write_text(
        "import os\n"
        "from fcos_lightning.app.launch import RESULT_FD, result_channel, send_result\n"
        "channel = result_channel()\n"
        "assert RESULT_FD not in os.environ\n"
        "send_result(channel, 41.5)\n"
    )
    assert run_multirun_job_in_subprocess(str(job), ["model=demo"], str(tmp_path)) == 41.5
    silent = tmp_path / "silent.py"
    silent.write_text("pass\n")
    with pytest.raises(RuntimeError, match="finished without returning its val/AP"):
        run_multirun_job_in_subprocess(str(silent), [], str(tmp_path))
