"""Shared fixtures: Hydra config composition, a format-0 checkpoint, one intra-op thread."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead

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


V0_CONFIG = Path(__file__).with_name("checkpoint_v0_config.yaml")


@pytest.fixture(scope="session")
def v0_checkpoint(tmp_path_factory) -> tuple[Path, FCOS]:
    """A checkpoint in format 0 (before the format had a version) as train.py wrote it at step 24: Lightning's
    entries, the weights under ``model.``, ``category_map`` and the resolved config as ``fcos_config``
    (``checkpoint_v0_config.yaml``); and the network that wrote it (random weights, the classifier made to fire).
    The network is built as that config's ``model`` node built it, spelled out: resnet18 (16-128 channels, BN,
    nothing frozen), 32-channel FPN on P3-P5, one GN conv per tower."""
    fcos_config = OmegaConf.to_container(OmegaConf.load(V0_CONFIG))
    torch.manual_seed(0)
    backbone = TimmBackbone(
        "resnet18", (2, 3, 4), norm="BN", freeze_at=0, model_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16}
    )
    head = functools.partial(FCOSHead, num_cls_convs=1, num_box_convs=1, norm="GN")
    network = FCOS(backbone, head, 3, fpn_channels=32, top_levels=0, sizes_of_interest=(64, 128)).eval()
    with torch.no_grad():
        network.head.cls_logits.bias.fill_(-4.0)
        network.head.cls_logits.weight.normal_(std=0.2)
    path = tmp_path_factory.mktemp("v0") / "last.ckpt"
    torch.save(
        {
            "epoch": 5,
            "global_step": 24,
            "pytorch-lightning_version": "2.5.0",
            "state_dict": {f"model.{k}": v for k, v in network.state_dict().items()},
            "category_map": {"cat_ids": [2, 5, 9], "names": ["square", "disc", "ring"]},
            "fcos_config": fcos_config,
        },
        path,
    )
    return path, network
