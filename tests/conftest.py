"""Shared fixtures: a generated COCO-format dataset and Hydra config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

torch.set_num_threads(max(1, os.cpu_count() or 1))


def compose_config(config_name: str, overrides: list[str], output_dir: str | os.PathLike = "unused"):
    """Compose ``conf/<config_name>.yaml`` as ``@hydra.main`` hands it to the task (no ``hydra`` node), with
    ``output_dir`` standing for the Hydra run dir."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.output_dir = str(output_dir)
    return cfg


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are skipped (``make gpu-check`` runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def compose_cfg():
    return compose_config


@pytest.fixture
def single_thread():
    """Small tensor ops: one intra-op thread is as fast and immune to a busy CPU, where spinning OpenMP workers
    slowed such tests tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
