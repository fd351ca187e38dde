"""TimmBackbone: shapes from feature_info, FrozenBN/freeze_at, stride_in_1x1, DCN stages, weight loading, and
parameter counts that add up to AdelaiDet's published detector totals."""

import copy
import functools
import logging

import pytest
import timm
import torch
from timm.layers import EffectiveSEModule
from torch import nn

from fcos_lightning.modeling.backbones import (
    FrozenBatchNorm2d,
    FrozenBatchNormAct2d,
    TimmBackbone,
    convert_frozen_batch_norm,
)
from fcos_lightning.modeling.dcn import ModulatedDeformConv2d

RESNET_C3_C5 = [512, 1024, 2048]
DLA_LEVEL3_5 = [128, 256, 512]
DLA = {"name": "dla34", "out_indices": (3, 4, 5), "norm": "SyncBN", "freeze_at": -1}


@functools.cache
def _build(name: str, **kwargs) -> TimmBackbone:
    return TimmBackbone(name, **kwargs)


def build(name: str, **kwargs) -> TimmBackbone:
    """A cached backbone (building X-101s costs seconds) with its gradients cleared."""
    backbone = _build(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    backbone.zero_grad(set_to_none=True)
    return backbone


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- parameter counts of what AdelaiDet puts on top of the backbone (AdelaiDet's FPN and head) ---------------


def conv(k: int, cin: int, cout: int, bias: bool = True, groups: int = 1) -> int:
    return k * k * cin // groups * cout + (cout if bias else 0)


def fpn_params(in_channels: list[int], top_levels: int, ch: int = 256, norm: bool = False) -> int:
    """Lateral 1x1 + output 3x3 per input, plus P6/P7 3x3 stride-2 convs; each with a bias, or (``norm``, the
    full-SyncBN FPN) without bias and with a BN affine pair."""
    per_conv = 2 * ch if norm else 0
    layers = sum(conv(1, c, ch, not norm) + conv(3, ch, ch, not norm) + 2 * per_conv for c in in_channels)
    return layers + top_levels * (conv(3, ch, ch, not norm) + per_conv)


def head_params(levels: int, norm: str = "gn", shared: bool = False, dcn: bool = False, classes: int = 80) -> int:
    """4 cls + 4 bbox (or 4 shared) conv3x3(bias)+norm (GN: one affine pair, "BN": one BN per level);
    cls_logits, bbox_pred, ctrness; one Scale per level; DCN head: the last cls and bbox tower conv gain a
    27-channel offset conv."""
    ch = 256
    norm_affine = 2 * ch * (levels if norm == "BN" else 1)
    towers = (4 if shared else 8) * (conv(3, ch, ch) + norm_affine)
    predictors = conv(3, ch, classes) + conv(3, ch, 4) + conv(3, ch, 1)
    return towers + predictors + levels + (2 * conv(3, ch, 27) if dcn else 0)


# ucbdrive/AdelaiDet DLA-34 builds level3.project and level4.project (1x1 conv + BN) but never calls them;
# timm's dla34 omits them (the rest of the state dict matches key for key and shape for shape).
DLA_UNUSED_PROJECT = (conv(1, 64, 128, bias=False) + 2 * 128) + (conv(1, 128, 256, bias=False) + 2 * 256)

# (AdelaiDet config, backbone kwargs, AdelaiDet total from adelaidet_fcos_keys.txt, FPN + head params, unused)
PUBLISHED = [
    ("R_50_1x", {"name": "resnet50"}, 32_244_250, fpn_params(RESNET_C3_C5, 2) + head_params(5), 0),
    (
        "RT_MS_R_50_4x_syncbn",
        {"name": "resnet50", "norm": "SyncBN"},
        31_114_264,
        fpn_params(RESNET_C3_C5, 0) + head_params(3),
        0,
    ),
    (
        "RT_MS_R_50_4x_syncbn_bn_head",
        {"name": "resnet50", "norm": "SyncBN"},
        31_122_456,
        fpn_params(RESNET_C3_C5, 0) + head_params(3, norm="BN"),
        0,
    ),
    (
        "MS_X_101_32x8d_2x_dcnv2",
        {"name": "resnext101_32x8d", "dcn_stages": (4, 5)},
        102_670_094,
        fpn_params(RESNET_C3_C5, 2) + head_params(5, dcn=True),
        0,
    ),
    (
        "RT_MS_DLA_34_4x_syncbn",
        DLA,
        22_191_880,
        fpn_params(DLA_LEVEL3_5, 0) + head_params(3),
        DLA_UNUSED_PROJECT,
    ),
    (
        "RT_MS_DLA_34_4x_syncbn_shared_towers",
        DLA,
        19_829_512,
        fpn_params(DLA_LEVEL3_5, 0) + head_params(3, shared=True),
        DLA_UNUSED_PROJECT,
    ),
    (
        "RT_MS_DLA_34_4x_syncbn_shared_towers_bn_head",
        DLA,
        19_833_608,
        fpn_params(DLA_LEVEL3_5, 0) + head_params(3, norm="BN", shared=True),
        DLA_UNUSED_PROJECT,
    ),
]


@pytest.mark.parametrize(("config", "kwargs", "total", "fpn_head", "unused"), PUBLISHED, ids=[c[0] for c in PUBLISHED])
def test_parameter_count_matches_adelaidet(config, kwargs, total, fpn_head, unused):
    assert n_params(build(**kwargs)) == total - fpn_head - unused


def bottleneck_resnet_params(blocks: list[int], groups: int = 1, width_per_group: int = 64) -> int:
    """Conv weights of a detectron2 bottleneck ResNet/ResNeXt trunk (all FrozenBN: no BN parameters)."""
    total = conv(7, 3, 64, bias=False)
    cin = 64
    for stage, n in enumerate(blocks):
        width, cout = groups * width_per_group * 2**stage, 256 * 2**stage
        total += conv(1, cin, cout, bias=False)  # shortcut of block 0
        for i in range(n):
            block_in = cin if i == 0 else cout
            total += (
                conv(1, block_in, width, False) + conv(3, width, width, False, groups) + conv(1, width, cout, False)
            )
        cin = cout
    return total


@pytest.mark.parametrize(
    ("name", "blocks", "groups", "width_per_group"),
    [
        ("resnet50", [3, 4, 6, 3], 1, 64),
        ("resnet101", [3, 4, 23, 3], 1, 64),
        ("resnext101_32x8d", [3, 4, 23, 3], 32, 8),
        ("resnext101_64x4d", [3, 4, 23, 3], 64, 4),
    ],
)
def test_parameter_count_matches_detectron2_resnet(name, blocks, groups, width_per_group):
    count = n_params(build(name))
    print(f"{name} FrozenBN backbone: {count:,} parameters")
    assert count == bottleneck_resnet_params(blocks, groups, width_per_group)


def vovnet_params(blocks: list[int], ese_every_block: bool = True) -> int:
    """Parameters of AdelaiDet's eSE-VoVNet (vovnet.py: stem 3x3 convs 3->64->64->128; per stage OSA blocks of
    five bias-free 3x3 convs (128/160/192/224 channels), a bias-free 1x1 conv over their concatenation with the
    block input to 256/512/768/1024 channels and an eSE 1x1 conv with bias; FrozenBN holds buffers only).
    ``ese_every_block=False`` counts timm's layout, with eSE on each stage's last block only."""
    total = conv(3, 3, 64, bias=False) + conv(3, 64, 64, bias=False) + conv(3, 64, 128, bias=False)
    cin = 128
    for n, mid, out in zip(blocks, (128, 160, 192, 224), (256, 512, 768, 1024), strict=True):
        for i in range(n):
            block_in = cin if i == 0 else out
            total += (
                conv(3, block_in, mid, False) + 4 * conv(3, mid, mid, False) + conv(1, block_in + 5 * mid, out, False)
            )
            if ese_every_block or i == n - 1:
                total += conv(1, out, out)
        cin = out
    return total


VOVNET = {"out_indices": (2, 3, 4), "norm": "FrozenBN", "freeze_at": 0}
VOVNET_BLOCKS = {"ese_vovnet39b": [1, 1, 2, 2], "ese_vovnet57b": [1, 1, 4, 3], "ese_vovnet99b": [1, 3, 9, 3]}


@pytest.mark.parametrize("name", list(VOVNET_BLOCKS))
def test_vovnet_parameter_count_matches_adelaidet_with_ese_in_every_block(name):
    blocks = VOVNET_BLOCKS[name]
    ours = build(name, ese_every_block=True, **VOVNET)
    timm_layout = build(name, **VOVNET)
    print(f"{name}: AdelaiDet layout {n_params(ours):,}, timm layout {n_params(timm_layout):,}")
    assert n_params(ours) == vovnet_params(blocks)
    assert n_params(timm_layout) == vovnet_params(blocks, ese_every_block=False)
    # the eSE convs timm leaves out: one per block but the last of each stage (C x C weights + C biases)
    missing = sum((n - 1) * conv(1, c, c) for n, c in zip(blocks, (256, 512, 768, 1024), strict=True))
    assert n_params(ours) - n_params(timm_layout) == missing
    assert missing == {"ese_vovnet39b": 1_640_192, "ese_vovnet57b": 3_870_976, "ese_vovnet99b": 7_349_248}[name]
    assert ours.out_channels == [512, 768, 1024] and ours.strides == [8, 16, 32]


def basic_resnet_params(blocks: list[int], trainable_bn: bool = True) -> int:
    """detectron2 BasicBlock ResNet (R-18/34) trunk: 7x7 stem, two bias-free 3x3 convs per block, a 1x1 shortcut
    where the channels change; BN affine terms count when BN is trainable (full SyncBN)."""
    bn = 2 if trainable_bn else 0
    total, cin = conv(7, 3, 64, bias=False) + bn * 64, 64
    for stage, n in enumerate(blocks):
        c = 64 * 2**stage
        for i in range(n):
            block_in = cin if i == 0 else c
            total += conv(3, block_in, c, False) + conv(3, c, c, False) + 2 * bn * c
            if block_in != c:
                total += conv(1, block_in, c, False) + bn * c
        cin = c
    return total


def test_resnet18_full_syncbn_parameter_count_matches_detectron2():
    backbone = build("resnet18", norm="SyncBN", freeze_at=0)
    assert all(p.requires_grad for p in backbone.parameters())
    assert n_params(backbone) == basic_resnet_params([2, 2, 2, 2]) == 11_176_512
    assert backbone.out_channels == [128, 256, 512]


def dcn_offsets(widths_and_blocks: list[tuple[int, int]]) -> int:
    """Offset convs (3x3, 27 channels, bias) DCNv2 adds to every block of a stage: ``[(width, blocks), ...]``."""
    return sum(n * conv(3, width, 27) for width, n in widths_and_blocks)


# derived totals of the new zoo rows (80 classes), the same numbers tests/app/test_configs.py checks presets against
DERIVED_TOTALS = {
    "vovnet/MS_V_39_3x": (vovnet_params([1, 1, 2, 2]) + fpn_params([512, 768, 1024], 2) + head_params(5), 33_625_370),
    "vovnet/MS_V_57_3x": (vovnet_params([1, 1, 4, 3]) + fpn_params([512, 768, 1024], 2) + head_params(5), 49_884_954),
    "vovnet/MS_V_99_3x": (vovnet_params([1, 3, 9, 3]) + fpn_params([512, 768, 1024], 2) + head_params(5), 77_931_034),
    "R_18_1x-Full-SyncBN": (
        basic_resnet_params([2, 2, 2, 2]) + fpn_params([128, 256, 512], 2, norm=True) + head_params(5, norm="BN"),
        19_296_154,
    ),
    "MS_R_101_2x": (bottleneck_resnet_params([3, 4, 23, 3]) + fpn_params(RESNET_C3_C5, 2) + head_params(5), 51_184_154),
    "MS_X_101_32x8d_2x": (
        bottleneck_resnet_params([3, 4, 23, 3], 32, 8) + fpn_params(RESNET_C3_C5, 2) + head_params(5),
        95_328_794,
    ),
    "MS_X_101_64x4d_2x_dcnv2": (
        bottleneck_resnet_params([3, 4, 23, 3], 64, 4)
        + dcn_offsets([(1024, 23), (2048, 3)])
        + fpn_params(RESNET_C3_C5, 2)
        + head_params(5, dcn=True),
        97_334_030,
    ),
}


@pytest.mark.parametrize("row", list(DERIVED_TOTALS))
def test_derived_fcos_totals(row):
    """Totals of zoo rows the key contract does not list, from the layer formulas above: the X-101-32x8d-DCNv2
    row of the contract (102,670,094) validates the ResNeXt, DCN-offset and DCN-head terms."""
    derived, expected = DERIVED_TOTALS[row]
    assert derived == expected
    dcnv2_32x8d = (
        bottleneck_resnet_params([3, 4, 23, 3], 32, 8)
        + dcn_offsets([(1024, 23), (2048, 3)])
        + fpn_params(RESNET_C3_C5, 2)
        + head_params(5, dcn=True)
    )
    assert dcnv2_32x8d == 102_670_094


def test_rt_r50_full_syncbn_total():
    """FCOS_RT/MS_R_50_4x_full-syncbn: every ResNet-50 BN trainable (their affine terms count), SyncBN FPN and
    per-level SyncBN head on P3-P5."""
    bn_affine = sum(
        2 * m.num_features
        for m in build("resnet50", norm="SyncBN", freeze_at=0).modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    total = bottleneck_resnet_params([3, 4, 6, 3]) + bn_affine + fpn_params(RESNET_C3_C5, 0, norm=True)
    assert total + head_params(3, norm="BN") == 31_126_936


# --- forward / backward -------------------------------------------------------------------------------------

# The 101-layer models train only res5 here (freeze_at=4): bf16 convolutions fall back to slow kernels on CPUs
# without native bf16, and weight gradients of 23 res4 blocks would dominate the test time; res5 of the X-101
# holds DCN layers, so the DCN backward runs under autocast too. R-50 covers the default freeze_at=2.
FORWARD_CASES = [
    ({"name": "resnet50"}, RESNET_C3_C5),
    ({"name": "resnet101", "freeze_at": 4}, RESNET_C3_C5),
    ({"name": "resnext101_32x8d", "dcn_stages": (4, 5), "freeze_at": 4}, RESNET_C3_C5),
    ({"name": "resnext101_64x4d", "freeze_at": 4}, RESNET_C3_C5),
    (DLA, DLA_LEVEL3_5),
    ({"name": "ese_vovnet39b", "ese_every_block": True, **VOVNET}, [512, 768, 1024]),
    ({"name": "resnet18", "norm": "SyncBN", "freeze_at": 0}, [128, 256, 512]),
]


@pytest.mark.parametrize(("kwargs", "channels"), FORWARD_CASES, ids=[c[0]["name"] for c in FORWARD_CASES])
def test_forward_backward_fp32_and_bf16_autocast(kwargs, channels):
    backbone = build(**kwargs)
    assert backbone.out_channels == channels
    assert backbone.strides == [8, 16, 32]
    assert backbone.size_divisibility == 32
    x = torch.randn(1, 3, 32, 64)
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    for autocast in (False, True):
        backbone.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            feats = backbone(x)
        assert len(feats) == len(channels)
        for f, c, s in zip(feats, backbone.out_channels, backbone.strides, strict=True):
            assert f.shape == (1, c, 32 // s, 64 // s)
            assert torch.isfinite(f).all()
        sum(f.float().square().mean() for f in feats).backward()
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    backbone.zero_grad(set_to_none=True)  # the backbone stays cached: free its gradients


# --- norm and freezing --------------------------------------------------------------------------------------

RESNET_UNITS = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


@pytest.mark.parametrize("freeze_at", [-1, 0, 1, 2, 5])
def test_freeze_at_resnet(freeze_at):
    backbone = build("resnet50", norm="BN", freeze_at=freeze_at)
    for i, unit in enumerate(RESNET_UNITS):
        frozen = i < freeze_at
        modules = [m for attr in unit for m in getattr(backbone.body, attr).modules()]
        assert all(p.requires_grad != frozen for m in modules for p in m.parameters()), (unit, freeze_at)
        bn_types = {type(m) for m in modules if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)}
        assert bn_types == ({FrozenBatchNorm2d} if frozen else {nn.BatchNorm2d}), (unit, freeze_at)


def test_freeze_at_dla_maps_stem_then_levels():
    backbone = build("dla34", out_indices=(3, 4, 5), norm="BN", freeze_at=2)
    body = backbone.body
    assert not any(p.requires_grad for p in [*body.base_layer.parameters(), *body.level0.parameters()])
    assert all(p.requires_grad for p in body.level1.parameters())
    assert isinstance(body.level0[1], FrozenBatchNorm2d) and isinstance(body.level1[1], nn.BatchNorm2d)


def test_frozen_stages_stay_frozen_in_train_mode():
    backbone = build("resnet50", norm="BN", freeze_at=2).train()
    frozen_bn = backbone.body.layer1[0].bn1
    live_bn = backbone.body.layer2[0].bn1
    frozen_before = frozen_bn.running_mean.clone(), backbone.body.bn1.running_var.clone()
    live_before = live_bn.running_mean.clone()
    x = torch.randn(2, 3, 32, 32)
    out = backbone(x)
    assert torch.equal(frozen_bn.running_mean, frozen_before[0])
    assert torch.equal(backbone.body.bn1.running_var, frozen_before[1])
    assert not torch.equal(live_bn.running_mean, live_before)
    sum(f.sum() for f in out).backward()
    assert all(p.grad is None for p in [*backbone.body.conv1.parameters(), *backbone.body.layer1.parameters()])
    assert backbone.body.layer2[0].conv1.weight.grad is not None
    stem = nn.Sequential(backbone.body.conv1, backbone.body.bn1)
    with torch.no_grad():
        torch.testing.assert_close(stem.train()(x), stem.eval()(x))


def trunk_with_random_bn(name: str, bias_std: float) -> nn.Module:
    """A timm features_only trunk (res3-res5 / stage3-stage5) in eval mode with non-trivial BN terms."""
    torch.manual_seed(0)
    trunk = timm.create_model(name, features_only=True, out_indices=(2, 3, 4)).eval()
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, bias_std)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return trunk


def test_frozen_bn_everywhere_matches_batch_norm_in_eval():
    backbone = build("resnet50", norm="FrozenBN", freeze_at=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(p.ndim == 4 for p in backbone.parameters())  # FrozenBN affine terms are buffers

    trunk = trunk_with_random_bn("resnet50", bias_std=0.1)
    frozen = convert_frozen_batch_norm(copy.deepcopy(trunk)).train()
    assert all(m.eps == 1e-5 for m in frozen.modules() if isinstance(m, FrozenBatchNorm2d))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(trunk(x), frozen(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_vovnet_frozen_bn_keeps_the_activation_and_matches_bn_in_eval():
    trunk = trunk_with_random_bn("ese_vovnet39b", bias_std=0.5)  # negative pre-activations: the ReLUs matter
    frozen = convert_frozen_batch_norm(copy.deepcopy(trunk)).train()
    norms = [m for m in frozen.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(isinstance(m, FrozenBatchNormAct2d) and isinstance(m.act, nn.ReLU) for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(trunk(x), frozen(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    relu_free = copy.deepcopy(frozen)
    for m in relu_free.modules():
        if isinstance(m, FrozenBatchNormAct2d):
            m.act = nn.Identity()
    with torch.no_grad():
        assert not torch.allclose(relu_free(x)[0], frozen(x)[0], atol=1e-3)


def test_freeze_at_vovnet_maps_stem_then_stages():
    backbone = build("ese_vovnet39b", out_indices=(2, 3, 4), norm="BN", freeze_at=2)
    body = backbone.body
    frozen = [body.stem_0, body.stem_1, body.stem_2, body.stages_0]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in body.stages_1.parameters())
    assert isinstance(body.stages_0.blocks[0].conv_concat.bn, FrozenBatchNormAct2d)
    assert type(body.stages_1.blocks[0].conv_concat.bn).__name__ == "BatchNormAct2d"


def test_ese_every_block_adds_the_missing_attention():
    backbone = build("ese_vovnet57b", ese_every_block=True, **VOVNET)
    blocks = [b for stage in (backbone.body.stages_2, backbone.body.stages_3) for b in stage.blocks]
    assert len(blocks) == 4 + 3 and all(isinstance(b.attn, EffectiveSEModule) for b in blocks)
    assert [b.attn.fc.in_channels for b in blocks] == [768] * 4 + [1024] * 3
    plain = build("ese_vovnet57b", **VOVNET)
    assert [b.attn is None for b in plain.body.stages_2.blocks] == [True, True, True, False]


# --- stride_in_1x1, DCN -------------------------------------------------------------------------------------


def test_stride_in_1x1_moves_the_stride_and_changes_the_function():
    msra = copy.deepcopy(build("resnet50", stride_in_1x1=True))
    torch.manual_seed(0)
    for m in msra.modules():
        if isinstance(m, FrozenBatchNorm2d):  # timm zero-inits the last BN of each block: make branches live
            m.weight.uniform_(0.5, 1.5)
    default = copy.deepcopy(build("resnet50"))
    default.load_state_dict(msra.state_dict())
    for layer in (msra.body.layer2, msra.body.layer3, msra.body.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
        assert all(b.conv1.stride == (1, 1) and b.conv2.stride == (1, 1) for b in layer[1:])
    assert msra.body.layer1[0].conv1.stride == (1, 1)
    assert default.body.layer2[0].conv2.stride == (2, 2)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = msra(x), default(x)
    assert [t.shape for t in a] == [t.shape for t in b]
    assert not torch.allclose(a[0], b[0], rtol=1e-3, atol=1e-3)


def test_dcn_stages_replace_every_conv2():
    backbone = build("resnet50", dcn_stages=(4, 5), dcn_deformable_groups=2)
    body = backbone.body
    for layer in (body.layer3, body.layer4):
        for block in layer:
            assert isinstance(block.conv2, ModulatedDeformConv2d)
            assert block.conv2.bias is None and block.conv2.deformable_groups == 2
            assert block.conv2.offset.out_channels == 2 * 27
    assert not any(isinstance(m, ModulatedDeformConv2d) for m in [*body.layer1.modules(), *body.layer2.modules()])
    assert body.layer3[0].conv2.stride == (2, 2)
    added = 6 * conv(3, 256, 54) + 3 * conv(3, 512, 54)
    assert n_params(backbone) == n_params(build("resnet50")) + added


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "dla34", "stride_in_1x1": True}, "stride_in_1x1"),
        ({"name": "dla34", "dcn_stages": (4,)}, "dcn_stages"),
        ({"name": "resnet50", "dcn_stages": (6,)}, "dcn_stages"),
        ({"name": "resnet50", "norm": "gn"}, "norm"),
        ({"name": "resnet50", "freeze_at": 6}, "freeze_at"),
        ({"name": "resnet50", "ese_every_block": True}, "ese_every_block needs an eSE-VoVNet"),
        ({"name": "eca_vovnet39b", "out_indices": (2, 3, 4), "ese_every_block": True}, "EcaModule attention"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimmBackbone(**kwargs)


# --- weights ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_like_resnet50() -> nn.Module:
    """A full timm classifier (with ``fc``, as an ImageNet checkpoint has) with non-trivial BN statistics."""
    torch.manual_seed(0)
    source = timm.create_model("resnet50").eval()
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
    return source


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_loads_local_weights(tmp_path, caplog, imagenet_like_resnet50, wrapper):
    source = imagenet_like_resnet50
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "r50.pth"
    torch.save(state if wrapper is None else {wrapper: state}, path)
    with caplog.at_level(logging.INFO, logger="fcos_lightning.modeling.backbones"):
        backbone = TimmBackbone("resnet50", weights=str(path))
    assert "fc.weight" in caplog.text
    assert torch.equal(backbone.body.layer3[2].conv2.weight, source.layer3[2].conv2.weight)
    assert torch.equal(backbone.body.layer1[0].bn1.running_mean, source.layer1[0].bn1.running_mean)
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        expected = source.forward_intermediates(x, indices=(2, 3, 4), intermediates_only=True)
        for a, b in zip(backbone(x), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_loads_local_vovnet_classifier_weights_into_the_flattened_trunk(tmp_path, caplog):
    """timm's VoVNet classifier names its layers stem.0 / stages.0; features_only flattens them to stem_0 /
    stages_0. The eSE layers AdelaiDet's layout adds are not in such a file: a warning says they start random."""
    torch.manual_seed(0)
    source = timm.create_model("ese_vovnet39b").eval()
    path = tmp_path / "v39.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="fcos_lightning.modeling.backbones"):
        backbone = TimmBackbone("ese_vovnet39b", weights=str(path), ese_every_block=True, **VOVNET)
    assert torch.equal(
        backbone.body.stages_3.blocks[1].conv_concat.conv.weight, source.stages[3].blocks[1].conv_concat.conv.weight
    )
    assert torch.equal(backbone.body.stem_0.bn.running_var, source.stem[0].bn.running_var)
    assert "2 eSE layers added" in caplog.text and "start from random initialization" in caplog.text
    assert "missing" not in caplog.text  # every tensor of timm's layout found its place
    plain = TimmBackbone("ese_vovnet39b", weights=str(path), **VOVNET)  # timm's layout: every trunk tensor loads
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates(x, indices=(2, 3, 4), intermediates_only=True)
        for a, b in zip(plain(x), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_rejects_weights_that_match_nothing(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match="no key matches"):
        TimmBackbone("resnet50", weights=str(path))
