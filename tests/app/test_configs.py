"""Every experiment and model preset composes, instantiates (random weights) and runs one forward pass."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from fcos_lightning.app.train import build_module, make_schedule, world_size
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.data.demo import make_demo_dataset
from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.runtime.precision import resolve_precision

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
EXPERIMENTS = sorted(
    str(Path(p).relative_to(Path(CONF_DIR) / "experiment").with_suffix(""))
    for p in glob.glob(os.path.join(CONF_DIR, "experiment", "**", "*.yaml"), recursive=True)
)
MODELS = sorted(Path(p).stem for p in glob.glob(os.path.join(CONF_DIR, "model", "*.yaml")))
ZOO = {
    "R_50_1x",
    "MS_R_50_2x",
    "MS_R_101_2x",
    "MS_X_101_32x8d_2x",
    "MS_X_101_64x4d_2x",
    "MS_X_101_32x8d_2x_dcnv2",
    "FCOS_RT/MS_DLA_34_4x_syncbn_shared_towers",
    "FCOS_RT/MS_DLA_34_4x_syncbn",
    "FCOS_RT/MS_R_50_4x_syncbn",
    "FCOS_RT/MS_DLA_34_4x_syncbn_shared_towers_bn_head",
    "FCOS_RT/MS_DLA_34_4x_syncbn_bn_head",
    "FCOS_RT/MS_R_50_4x_syncbn_bn_head",
}
CATEGORIES = CategoryMap(cat_ids=(1, 3, 7), names=("a", "b", "c"))


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    """Point a preset's data at a small generated COCO-format dataset (the presets default to COCO 2017)."""
    root = tmp_path_factory.mktemp("data")
    paths = make_demo_dataset(root, num_train=4, num_val=2, image_size=(192, 224), seed=2)
    return [
        f"data.train.ann_file={paths['train_ann_file']}",
        f"data.train.img_dir={paths['train_img_dir']}",
        f"data.val.ann_file={paths['val_ann_file']}",
        f"data.val.img_dir={paths['val_img_dir']}",
        "data.num_workers=0",
    ]


def test_every_zoo_row_has_a_preset():
    assert set(EXPERIMENTS) >= ZOO


def _forward(cfg, tmp_path) -> None:
    module = build_module(cfg, CATEGORIES.num_classes, CATEGORIES, make_schedule(cfg.schedule, 16))
    module.eval()
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        out = module(images, torch.tensor([[96, 120]]))
    strides = module.model.strides
    assert len(out.cls_logits) == len(strides) == len(module.model.sizes_of_interest) + 1
    for logits, reg, ctr, s in zip(out.cls_logits, out.box_reg, out.centerness, strides, strict=True):
        assert logits.shape == (1, 3, -(-96 // s), -(-128 // s))
        assert reg.shape[1] == 4 and ctr.shape[1] == 1 and (reg >= 0).all()
    dets = module.decoder(out, torch.tensor([[96, 120]]), torch.tensor([[192, 240]]))
    assert len(dets) == 1 and set(dets[0]) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, compose_cfg, tmp_path, data_overrides):
    cfg = compose_cfg("train", [f"experiment={experiment}", *data_overrides], tmp_path)
    assert OmegaConf.select(cfg, "model.backbone.pretrained") is False
    datamodule = instantiate(cfg.data.datamodule)
    assert datamodule.num_classes == 3 and datamodule.class_names == ["square", "disc", "ring"]
    assert datamodule.batch_size == cfg.data.batch_size
    assert list(datamodule.train_min_sizes) == list(cfg.data.datamodule.train_min_sizes)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) > 0 and len(datamodule.val_dataset) == 2
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    trainer = instantiate(cfg.trainer, precision=precision, max_steps=1, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == 1
    module = build_module(cfg, datamodule.num_classes, datamodule.category_map, make_schedule(cfg.schedule, 16))
    assert module.category_map == datamodule.category_map
    _forward(cfg, tmp_path)


@pytest.mark.parametrize("model", MODELS)
def test_model_preset_builds(model, compose_cfg, tmp_path):
    cfg = compose_cfg("train", [f"model={model}"], tmp_path)
    _forward(cfg, tmp_path)


def test_rt_model_with_devices_override_composes(compose_cfg):
    cfg = compose_cfg("train", ["model=dla34_rt", "trainer.devices=8"])
    assert world_size(cfg.trainer) == 8
    assert cfg.model.top_levels == 0 and list(cfg.model.sizes_of_interest) == [64, 128]


def test_schedule_scales_lr_and_iterations_with_global_batch(compose_cfg):
    cfg = compose_cfg("train", ["schedule=1x", "trainer.devices=4", "trainer.num_nodes=2", "data.batch_size=4"])
    global_batch = world_size(cfg.trainer) * cfg.data.batch_size
    assert global_batch == 32
    schedule = make_schedule(cfg.schedule, global_batch)
    assert schedule.lr == pytest.approx(0.02)
    assert schedule.max_steps == 45000 and schedule.milestones == [30000, 40000] and schedule.warmup_iters == 500
    same = make_schedule(cfg.schedule, 16)
    assert same.lr == pytest.approx(0.01) and same.max_steps == 90000 and same.milestones == [60000, 80000]


# AdelaiDet's DLA-34 builds level3/level4 ``project`` layers it never calls; timm's dla34 omits them
DLA_UNUSED_PROJECT = 41_728
# experiment -> AdelaiDet's parameter count with 80 classes (tests/convert/adelaidet_fcos_keys.txt)
ADELAIDET_PARAMS = {
    "R_50_1x": 32_244_250,
    "MS_R_50_2x": 32_244_250,
    "MS_X_101_32x8d_2x_dcnv2": 102_670_094,
    "FCOS_RT/MS_DLA_34_4x_syncbn": 22_191_880 - DLA_UNUSED_PROJECT,
    "FCOS_RT/MS_DLA_34_4x_syncbn_shared_towers": 19_829_512 - DLA_UNUSED_PROJECT,
    "FCOS_RT/MS_DLA_34_4x_syncbn_shared_towers_bn_head": 19_833_608 - DLA_UNUSED_PROJECT,
    "FCOS_RT/MS_R_50_4x_syncbn": 31_114_264,
    "FCOS_RT/MS_R_50_4x_syncbn_bn_head": 31_122_456,
}


@pytest.mark.parametrize("experiment", sorted(ADELAIDET_PARAMS))
def test_preset_parameter_count_equals_adelaidet(experiment, compose_cfg, tmp_path):
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    model = instantiate(cfg.model, num_classes=80)
    assert sum(p.numel() for p in model.parameters()) == ADELAIDET_PARAMS[experiment]


def test_constructors_get_plain_values_not_config_objects(compose_cfg, tmp_path, monkeypatch):
    received = []
    init = TimmBackbone.__init__

    def recording_init(self, *args, **kwargs):
        received.append(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(TimmBackbone, "__init__", recording_init)
    cfg = compose_cfg("train", ["experiment=demo"], tmp_path)
    module = build_module(cfg, CATEGORIES.num_classes, CATEGORIES, None)
    (kwargs,) = received
    assert type(kwargs["model_kwargs"]) is dict and type(kwargs["model_kwargs"]["channels"]) is list
    assert type(kwargs["out_indices"]) is list and type(kwargs["dcn_stages"]) is list
    assert not any(isinstance(v, DictConfig | ListConfig) for v in vars(module.decoder.postprocessor).values())
