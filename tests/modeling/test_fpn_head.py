"""FPN and FCOS head: shapes, the P6/P7 wiring, head variants, initialisation and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcos_lightning.modeling.dcn import ModulatedDeformConv2d
from fcos_lightning.modeling.fpn import FPN
from fcos_lightning.modeling.head import FCOSHead

IN_CHANNELS = (8, 16, 32)
IN_STRIDES = (8, 16, 32)


def backbone_features(batch: int = 2, height: int = 64, width: int = 96, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, height // s, width // s, generator=g) for c, s in zip(IN_CHANNELS, IN_STRIDES)]


@pytest.mark.parametrize("top_levels", [0, 1, 2])
def test_fpn_strides_and_channels(top_levels):
    fpn = FPN(IN_CHANNELS, IN_STRIDES, out_channels=16, top_levels=top_levels)
    expected_strides = [8, 16, 32, 64, 128][: 3 + top_levels]
    assert fpn.strides == expected_strides and fpn.out_channels == 16
    outputs = fpn(backbone_features(height=256, width=384))
    assert [o.shape for o in outputs] == [torch.Size([2, 16, 256 // s, 384 // s]) for s in expected_strides]


def test_fpn_matches_manual_computation_with_p6_from_p5_and_relu_before_p7():
    torch.manual_seed(0)
    fpn = FPN(IN_CHANNELS, IN_STRIDES, out_channels=16, top_levels=2)
    with torch.no_grad():
        for p in fpn.parameters():
            p.normal_()  # non-zero biases too
    c3, c4, c5 = backbone_features()

    def conv(module, x, stride=1):
        return F.conv2d(x, module.weight, module.bias, stride=stride, padding=module.weight.shape[-1] // 2)

    lat3, lat4, lat5 = (conv(m, c) for m, c in zip(fpn.lateral_convs, (c3, c4, c5)))
    m5 = lat5
    m4 = lat4 + m5.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2x upsampling
    m3 = lat3 + m4.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    p3, p4, p5 = (conv(m, x) for m, x in zip(fpn.output_convs, (m3, m4, m5)))
    p6 = conv(fpn.top_convs[0], p5, stride=2)  # from the FPN's P5, not from C5
    p7 = conv(fpn.top_convs[1], p6.relu(), stride=2)
    outputs = fpn([c3, c4, c5])
    for name, ours, ref in zip(("P3", "P4", "P5", "P6", "P7"), outputs, (p3, p4, p5, p6, p7)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4, msg=name)
    assert (p6 < 0).any()  # the ReLU before P7 mattered
    wrong_p7 = conv(fpn.top_convs[1], p6, stride=2)
    assert not torch.allclose(outputs[4], wrong_p7, atol=1e-3)


def test_fpn_norm_and_relu_match_manual_computation():
    """AdelaiDet's full-SyncBN FPN: conv -> BN everywhere (no conv bias); ReLU after every top-down sum and every
    output below the coarsest input level, none on P5 itself; P6 and P7 ReLU'd after their own conv."""
    torch.manual_seed(0)
    fpn = FPN(IN_CHANNELS, IN_STRIDES, out_channels=16, top_levels=2, norm="BN", use_relu=True).eval()
    assert all(conv.bias is None for conv in (*fpn.lateral_convs, *fpn.output_convs, *fpn.top_convs))
    with torch.no_grad():
        for m in fpn.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics and affine terms
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    c3, c4, c5 = backbone_features()

    def conv_bn(conv, bn, x, stride=1):
        y = F.conv2d(x, conv.weight, stride=stride, padding=conv.weight.shape[-1] // 2)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False)

    def up(x):
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    lat3, lat4, lat5 = (conv_bn(c, n, x) for c, n, x in zip(fpn.lateral_convs, fpn.lateral_norms, (c3, c4, c5)))
    p5 = conv_bn(fpn.output_convs[2], fpn.output_norms[2], lat5)  # the coarsest level: no ReLU at all
    m4 = (lat4 + up(lat5)).relu()
    p4 = conv_bn(fpn.output_convs[1], fpn.output_norms[1], m4).relu()
    m3 = (lat3 + up(m4)).relu()
    p3 = conv_bn(fpn.output_convs[0], fpn.output_norms[0], m3).relu()
    p6 = conv_bn(fpn.top_convs[0], fpn.top_norms[0], p5, stride=2).relu()
    p7 = conv_bn(fpn.top_convs[1], fpn.top_norms[1], p6, stride=2).relu()
    with torch.no_grad():
        outputs = fpn([c3, c4, c5])
    for name, ours, ref in zip(("P3", "P4", "P5", "P6", "P7"), outputs, (p3, p4, p5, p6, p7), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4, msg=name)
    assert (outputs[2] < 0).any() and all((o >= 0).all() for i, o in enumerate(outputs) if i != 2)

    plain = FPN(IN_CHANNELS, IN_STRIDES, out_channels=16, top_levels=2)
    assert all(isinstance(n, nn.Identity) for n in (*plain.lateral_norms, *plain.output_norms, *plain.top_norms))
    assert all(conv.bias is not None for conv in plain.lateral_convs)
    # the plain FPN keeps its state-dict layout (older checkpoints load), the normed one adds norm entries
    assert sorted(plain.state_dict()) == sorted(
        f"{kind}_convs.{i}.{leaf}"
        for kind, n in (("lateral", 3), ("output", 3), ("top", 2))
        for i in range(n)
        for leaf in ("weight", "bias")
    )
    assert "lateral_norms.0.running_mean" in fpn.state_dict() and "top_norms.1.weight" in fpn.state_dict()


def test_fpn_norm_parameter_counts():
    """Every conv loses its bias and gains a norm's affine pair: 2 x 256 per conv, for 3 + 3 + 2 convs."""
    in_channels = (128, 256, 512)  # ResNet-18 res3-res5
    plain = FPN(in_channels, IN_STRIDES, top_levels=2)
    convs = [*plain.lateral_convs, *plain.output_convs, *plain.top_convs]
    plain_count = sum(p.numel() for p in plain.parameters())
    for norm in ("BN", "SyncBN", "GN"):
        fpn = FPN(in_channels, IN_STRIDES, top_levels=2, norm=norm, use_relu=True)
        assert sum(p.numel() for p in fpn.parameters()) == plain_count - len(convs) * 256 + len(convs) * 2 * 256, norm
    assert plain_count == sum(conv_params(c, 256, 1) + conv_params(256, 256, 3) for c in in_channels) + 2 * (
        conv_params(256, 256, 3)
    )
    with pytest.raises(ValueError, match=r"unknown FPN norm 'LN'; expected one of \['none', 'GN', 'BN', 'SyncBN'\]"):
        FPN(in_channels, IN_STRIDES, norm="LN")  # type: ignore[arg-type]


def test_fpn_rejects_bad_configs():
    with pytest.raises(ValueError, match="doubling"):
        FPN((8, 16), (8, 24))
    with pytest.raises(ValueError, match="top_levels"):
        FPN(IN_CHANNELS, IN_STRIDES, top_levels=3)
    with pytest.raises(ValueError, match="in_channels"):
        FPN((8, 16), IN_STRIDES)


def pyramid(levels: int = 3, channels: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, 16 >> i, 24 >> i, generator=g) * (1 + i) + i for i in range(levels)]


@pytest.mark.parametrize("norm", ["GN", "BN", "SyncBN", "none"])
def test_head_variants_shapes_and_non_negative_regression(norm):
    head = FCOSHead(in_channels=32, num_classes=5, num_levels=3, norm=norm)
    with torch.no_grad():
        head.bbox_pred.weight.normal_()  # plenty of negative pre-activations
    out = head(pyramid())
    for level, x in enumerate(pyramid()):
        h, w = x.shape[-2:]
        assert out.cls_logits[level].shape == (2, 5, h, w)
        assert out.box_reg[level].shape == (2, 4, h, w)
        assert out.centerness[level].shape == (2, 1, h, w)
    regression = torch.cat([r.flatten() for r in out.box_reg])
    assert regression.min() == 0 and (regression == 0).any() and (regression > 0).any()  # relu(scale * x)
    norms = [layer.norm for layer in head.cls_tower]
    if norm == "GN":
        assert all(isinstance(n, nn.GroupNorm) and n.num_groups == 32 for n in norms)
    elif norm in ("BN", "SyncBN"):
        assert all(isinstance(n, nn.ModuleList) and len(n) == 3 for n in norms)
        assert all(isinstance(bn, nn.BatchNorm2d) for n in norms for bn in n)
    else:
        assert all(n is None for n in norms)
    assert len(head.cls_tower) == 4 and len(head.box_tower) == 4 and len(head.share_tower) == 0


def test_unknown_head_norm():
    with pytest.raises(ValueError, match="unknown head norm"):
        FCOSHead(in_channels=32, num_levels=3, norm="LN")  # type: ignore[arg-type]


def test_per_level_batch_norm_is_distinct_per_level():
    head = FCOSHead(in_channels=32, num_classes=2, num_levels=3, norm="BN", num_cls_convs=1, num_box_convs=1)
    head.train()
    features = pyramid()  # level i has mean ~i and std ~(1 + i)
    head(features)
    bns = head.cls_tower[0].norm
    means = [bn.running_mean.clone() for bn in bns]
    assert all(bn.num_batches_tracked.item() == 1 for bn in bns)  # each level updated its own BN, once
    assert not torch.allclose(means[0], means[1]) and not torch.allclose(means[1], means[2])
    # each BN saw exactly its level's conv output
    for level, bn in enumerate(bns):
        conv_out = head.cls_tower[0].conv(features[level]).detach()
        torch.testing.assert_close(bn.running_mean, 0.1 * conv_out.mean(dim=(0, 2, 3)))
    # in eval mode the same input gives different outputs on different levels (different statistics)
    head.eval()
    x = features[0][:, :, :4, :6]
    out = head([x, x, x])
    assert not torch.allclose(out.cls_logits[0], out.cls_logits[1])
    assert torch.equal(head([x, x, x]).cls_logits[0], out.cls_logits[0])


def test_shared_towers():
    head = FCOSHead(in_channels=32, num_classes=3, num_levels=2, num_cls_convs=0, num_box_convs=0, num_share_convs=4)
    assert len(head.share_tower) == 4 and len(head.cls_tower) == 0 and len(head.box_tower) == 0
    features = pyramid(levels=2)
    out = head(features)
    for level, x in enumerate(features):  # every predictor reads the shared tower's output
        shared = head.share_tower(x, level)
        torch.testing.assert_close(out.cls_logits[level], head.cls_logits(shared))
        torch.testing.assert_close(out.centerness[level], head.centerness(shared))
        torch.testing.assert_close(out.box_reg[level], F.relu(head.scales[level](head.bbox_pred(shared))))
    assert not any(k.startswith(("cls_tower", "box_tower")) for k in head.state_dict())


def test_deformable_last_tower_conv():
    head = FCOSHead(in_channels=32, num_classes=3, num_levels=2, use_deformable=True)
    for tower in (head.cls_tower, head.box_tower):
        kinds = [type(layer.conv) for layer in tower]
        assert kinds == [nn.Conv2d, nn.Conv2d, nn.Conv2d, ModulatedDeformConv2d]
        dcn = tower[3].conv
        # AdelaiDet re-initialises the offset conv (an nn.Conv2d) with N(0, 0.01) like every head conv
        assert 0.005 < dcn.offset.weight.std().item() < 0.015 and torch.all(dcn.offset.bias == 0)
        assert dcn.weight.std().item() > 0.02  # the DCN weight keeps its kaiming init
    out = head(pyramid(levels=2))
    assert out.cls_logits[0].shape == (2, 3, 16, 24)


HEAD_VARIANTS = {
    "GN": {"norm": "GN"},
    "BN": {"norm": "BN"},
    "SyncBN": {"norm": "SyncBN"},
    "none": {"norm": "none"},
    "shared_towers": {"norm": "GN", "num_cls_convs": 0, "num_box_convs": 0, "num_share_convs": 4},
    "shared_towers_BN": {"norm": "SyncBN", "num_cls_convs": 0, "num_box_convs": 0, "num_share_convs": 4},
    "dcn": {"norm": "GN", "use_deformable": True},
}


@pytest.mark.parametrize("variant", list(HEAD_VARIANTS))
def test_head_variants_forward_backward_fp32_and_bf16_autocast(variant):
    torch.manual_seed(0)
    head = FCOSHead(in_channels=32, num_classes=3, num_levels=3, **HEAD_VARIANTS[variant])
    features = [f.requires_grad_() for f in pyramid()]
    for autocast in (False, True):
        head.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = head(features)
        outputs = [*out.cls_logits, *out.box_reg, *out.centerness]
        assert all(torch.isfinite(o.float()).all() for o in outputs)
        sum(o.float().square().mean() for o in outputs).backward()
        grads = {n: p.grad for n, p in head.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), variant
        assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("cls_logits"))


def test_initialisation_and_prior_bias():
    torch.manual_seed(0)
    head = FCOSHead(in_channels=256, num_classes=80, num_levels=5)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((80,), -4.59512), rtol=0, atol=1e-5)
    assert head.cls_logits.bias[0].item() == pytest.approx(-math.log(99), abs=1e-6)
    for name, m in head.named_modules():
        if isinstance(m, nn.Conv2d):
            assert abs(m.weight.std().item() - 0.01) < 1e-3, name
            if m is not head.cls_logits:
                assert torch.all(m.bias == 0), name
    assert all(s.scale.item() == 1.0 and s.scale.requires_grad for s in head.scales)
    fixed = FCOSHead(in_channels=32, num_classes=2, num_levels=3, use_scale=False)
    assert not any(p.requires_grad for p in fixed.scales.parameters())


RESNET50_CONV_PARAMS = 23_454_912  # ResNet-50 up to res5, no fc; its FrozenBN tensors are buffers


def conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


@pytest.mark.parametrize(
    ("norm", "num_classes", "top_levels", "shared"),
    [
        ("GN", 80, 2, False),
        ("GN", 91, 2, False),
        ("BN", 80, 0, False),
        ("SyncBN", 80, 0, True),
        ("none", 3, 1, False),
    ],
)
def test_parameter_counts_from_layer_shapes(norm, num_classes, top_levels, shared):
    in_channels, c = (512, 1024, 2048), 256
    fpn = FPN(in_channels, (8, 16, 32), c, top_levels)
    levels = 3 + top_levels
    convs = (0, 0, 4) if shared else (4, 4, 0)
    head = FCOSHead(c, num_classes, levels, *convs, norm=norm)
    tower_layers = sum(convs)
    norm_params = {"GN": 2 * c, "BN": 2 * c * levels, "SyncBN": 2 * c * levels, "none": 0}[norm]
    expected_fpn = sum(conv_params(ci, c, 1) for ci in in_channels) + (3 + top_levels) * conv_params(c, c, 3)
    expected_head = (
        tower_layers * (conv_params(c, c, 3) + norm_params)
        + conv_params(c, num_classes, 3)
        + conv_params(c, 4, 3)
        + conv_params(c, 1, 3)
        + levels  # one Scale per level
    )
    assert sum(p.numel() for p in fpn.parameters()) == expected_fpn
    assert sum(p.numel() for p in head.parameters()) == expected_head
    if (norm, num_classes, top_levels) == ("GN", 80, 2):
        resnet50_convs = 23_454_912  # ResNet-50 to res5 without fc; FrozenBN holds buffers, not parameters
        assert resnet50_convs + expected_fpn + expected_head == 32_244_250  # AdelaiDet's R-50 FCOS checkpoint
    if (norm, num_classes, top_levels) == ("GN", 91, 2):
        # torchvision's fcos_resnet50_fpn has the same layers without the 5 Scales
        assert resnet50_convs_plus(expected_fpn + expected_head - levels) == 32_269_600


def resnet50_convs_plus(count: int) -> int:
    return 23_454_912 + count
