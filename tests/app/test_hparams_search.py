"""hparams_search=fcos_optuna: the presets compose onto real keys, and (slow) a 2-trial sweep runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fcos_lightning.data.demo import make_demo_dataset
from tests.conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
SEARCHED = ["schedule.base_lr", "module.focal_alpha", "module.focal_gamma", "module.postprocessor.score_thresh"]


def _compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    ("overrides", "trials", "backbone"),
    [
        (["hparams_search=fcos_optuna", "experiment=R_50_1x"], 20, "resnet50"),
        (["hparams_search=fcos_optuna_demo"], 4, "resnet18"),
    ],
)
def test_presets_compose_onto_real_keys(overrides, trials, backbone):
    cfg = _compose_with_hydra(overrides)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and sweeper.n_trials == trials
    assert list(sweeper.params) == SEARCHED
    for key in SEARCHED:  # each searched key exists, and its preset value lies inside the searched interval
        low, high = (float(v) for v in str(sweeper.params[key]).split("interval(")[1].rstrip(")").split(","))
        assert low <= OmegaConf.select(cfg, key) <= high, key
    assert cfg.model.backbone.name == backbone
    if trials == 4:
        assert cfg.schedule.max_iter == cfg.schedule.val_interval == 100  # one validation, at the end


@pytest.mark.slow  # two short trainings in a subprocess: about 1.5 minutes on 2 cores
def test_two_trial_sweep_runs_and_reports_the_best(tmp_path):
    data = tmp_path / "data"
    make_demo_dataset(data, num_train=16, num_val=4, image_size=(192, 224), seed=1)
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "hparams_search=fcos_optuna_demo",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep_dir}",
        f"data.root={data}",
        "data.generate_demo=false",
        "data.batch_size=4",
        "schedule.reference_batch_size=4",
        "schedule.max_iter=6",
        "schedule.milestones=[4,5]",
        "schedule.warmup_iters=2",
        "schedule.val_interval=6",
        "data.datamodule.train_min_sizes=[192]",
        "data.datamodule.test_min_size=192",
        "model.fpn_channels=32",
        "model.backbone.model_kwargs={channels:[16,32,64,128],stem_width:16}",
        "trainer.enable_progress_bar=false",
        "trainer.precision=32-true",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "Best parameters:" in log and "Best value:" in log
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == set(SEARCHED)
    trial_aps = [
        yaml.safe_load((sweep_dir / str(i) / "metrics.json").read_text())["AP"] for i in range(2)
    ]  # each trial's final val/AP, the value train() returned to the sweeper
    assert results["best_value"] == pytest.approx(max(trial_aps))
