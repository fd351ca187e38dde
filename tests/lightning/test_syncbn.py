"""SyncBN conversion: only layers declared SyncBN, only under multi-GPU DDP; plain BN (and a log line) otherwise."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from timm.layers import SyncBatchNormAct
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from fcos_lightning.lightning import module as lightning_module
from fcos_lightning.lightning.module import FCOSLitModule
from fcos_lightning.lightning.syncbn import apply_sync_batchnorm, convert_batchnorm_to_sync, should_sync_batchnorm
from fcos_lightning.modeling.backbones import FrozenBatchNorm2d, TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead


def small_fcos(backbone_norm: str, head_norm: str, freeze_at: int = 2, fpn_norm: str = "none") -> FCOS:
    backbone = TimmBackbone(
        "resnet18",
        out_indices=(2, 3, 4),
        norm=backbone_norm,
        freeze_at=freeze_at,
        model_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16},
    )
    head = partial(FCOSHead, norm=head_norm, num_cls_convs=1, num_box_convs=1)
    return FCOS(
        backbone,
        head,
        num_classes=3,
        fpn_channels=32,
        top_levels=0,
        sizes_of_interest=(64, 128),
        fpn_norm=fpn_norm,
        fpn_relu=fpn_norm != "none",
    )


def norm_types(module: nn.Module) -> dict[str, type]:
    norms = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, nn.GroupNorm)
    return {name: type(m) for name, m in module.named_modules() if isinstance(m, norms)}


@pytest.mark.parametrize(
    ("trainer_kwargs", "why"),
    [
        ({"accelerator": "cpu", "devices": 1}, "a single process"),
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, "SyncBatchNorm needs GPUs"),
    ],
)
def test_cpu_and_single_process_convert_nothing_and_say_so(trainer_kwargs, why, caplog):
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, **trainer_kwargs)
    sync, reason = should_sync_batchnorm(trainer)
    assert not sync and why in reason
    model = small_fcos("SyncBN", "SyncBN", fpn_norm="SyncBN")
    before = norm_types(model)
    with caplog.at_level(logging.INFO, logger="fcos_lightning.lightning.syncbn"):
        counts = apply_sync_batchnorm(model, sync, reason)
    assert counts == {"backbone": 0, "fpn": 0, "head": 0}
    assert norm_types(model) == before
    assert not any(t is nn.SyncBatchNorm for t in before.values())
    assert any("plain BatchNorm" in r.getMessage() and why in r.getMessage() for r in caplog.records)


def test_sync_decision_converts_exactly_the_declared_layers():
    model = small_fcos("SyncBN", "SyncBN", freeze_at=2, fpn_norm="SyncBN")
    before = norm_types(model)
    counts = apply_sync_batchnorm(model, True, "forced for the test")
    after = norm_types(model)
    assert after.keys() == before.keys()
    changed = {name for name in before if before[name] is not after[name]}
    expected = {name for name, t in before.items() if t is nn.BatchNorm2d}
    assert changed == expected and all(after[n] is nn.SyncBatchNorm for n in changed)
    assert counts == {
        "backbone": sum(n.startswith("backbone.") for n in expected),
        "fpn": sum(n.startswith("fpn.") for n in expected),
        "head": sum(n.startswith("head.") for n in expected),
    }
    assert counts["backbone"] > 0 and counts["head"] == 2 * 1 * 3  # 2 towers x 1 conv x 3 levels
    assert counts["fpn"] == 3 + 3  # laterals and outputs of P3-P5 (no P6/P7 here)
    # the frozen stem and res2 stay FrozenBN without gradients
    frozen = [n for n, t in after.items() if t is FrozenBatchNorm2d]
    assert frozen and all(n.startswith(("backbone.body.bn1", "backbone.body.layer1")) for n in frozen)
    assert not any(p.requires_grad for p in model.backbone.body.layer1.parameters())
    # same parameters, and still a working (single-process) forward
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64) * 255)
    assert len(out.cls_logits) == 3


@pytest.mark.parametrize(
    ("backbone_norm", "head_norm", "fpn_norm", "expected_parts"),
    [
        ("BN", "BN", "BN", set()),
        ("SyncBN", "GN", "none", {"backbone"}),
        ("FrozenBN", "SyncBN", "GN", {"head"}),
        ("FrozenBN", "GN", "SyncBN", {"fpn"}),
    ],
)
def test_bn_declared_plain_stays_plain(backbone_norm, head_norm, fpn_norm, expected_parts):
    model = small_fcos(backbone_norm, head_norm, fpn_norm=fpn_norm)
    apply_sync_batchnorm(model, True, "forced for the test")
    synced = {name.split(".")[0] for name, t in norm_types(model).items() if t is nn.SyncBatchNorm}
    assert synced == expected_parts
    gn = {name.split(".")[0] for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    assert gn == {part for part, norm in (("head", head_norm), ("fpn", fpn_norm)) if norm == "GN"}


def test_lightning_module_converts_in_setup_when_told_to(monkeypatch, caplog):
    module = FCOSLitModule(small_fcos("SyncBN", "SyncBN"), {"cat_ids": [1, 2, 3], "names": ["a", "b", "c"]})
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO, logger="fcos_lightning.lightning.syncbn"):
        module.setup("fit")
    assert "plain BatchNorm" in caplog.text and "a single process" in caplog.text
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())

    monkeypatch.setattr(lightning_module, "should_sync_batchnorm", lambda trainer: (True, "DDP on CUDA (faked)"))
    module.setup("validate")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())  # only for training
    with caplog.at_level(logging.INFO, logger="fcos_lightning.lightning.syncbn"):
        module.setup("fit")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in module.model.head.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in module.model.backbone.modules())
    assert "converted to SyncBatchNorm (DDP on CUDA (faked))" in caplog.text


def test_timm_norm_act_layers_convert_keeping_their_activation():
    """VoVNet's BN layers are timm ``BatchNormAct2d`` (BN + ReLU in one module): declared SyncBN they become timm's
    ``SyncBatchNormAct``, with the same parameters and the ReLU still applied."""
    backbone = TimmBackbone("ese_vovnet39b", out_indices=(2, 3, 4), norm="SyncBN", freeze_at=0)
    layer = backbone.body.stem_0.bn
    weight = layer.weight
    assert convert_batchnorm_to_sync(backbone) > 0
    synced = backbone.body.stem_0.bn
    assert type(synced) is SyncBatchNormAct and synced.weight is weight and isinstance(synced.act, nn.ReLU)
    assert not any(type(m) is BatchNormAct2d for m in backbone.modules())
