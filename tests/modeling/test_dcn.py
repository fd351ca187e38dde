"""ModulatedDeformConv2d: AdelaiDet's offset/mask layout, fresh-module identity, slow reference, autocast."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcos_lightning.modeling.dcn import ModulatedDeformConv2d


def bilinear(img: list[list[float]], y: float, x: float) -> float:
    """Bilinear sample of a 2-D list at (y, x); zero outside, as mmcv/torchvision DCN kernels do."""
    h, w = len(img), len(img[0])
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * img[yy][xx]
    return total


def reference_dcn(dcn: ModulatedDeformConv2d, x: torch.Tensor) -> torch.Tensor:
    """DCNv2 from its definition, with explicit loops, reading the raw offset-conv output in the mmcv layout:
    ``[o1 | o2 | mask logits]`` where ``cat(o1, o2)`` holds group-major ``(dy, dx)`` pairs at channels
    ``(2k, 2k + 1)`` for tap ``k = i * kw + j``.
    """
    raw = dcn.offset(x).double()
    b_sz, c_in, _, _ = x.shape
    kh, kw = dcn.kernel_size
    taps = kh * kw
    dg = dcn.deformable_groups
    sh, sw = dcn.stride
    ph, pw = dcn.padding
    dh, dw = dcn.dilation
    c_per_dg = c_in // dg
    cin_g = c_in // dcn.groups
    cout_g = dcn.out_channels // dcn.groups
    offsets = raw[:, : 2 * dg * taps]
    masks = torch.sigmoid(raw[:, 2 * dg * taps :])
    out = torch.zeros(b_sz, dcn.out_channels, raw.shape[2], raw.shape[3], dtype=torch.float64)
    xs, ws = x.double().tolist(), dcn.weight.double().tolist()
    for b in range(b_sz):
        for ho in range(raw.shape[2]):
            for wo in range(raw.shape[3]):
                cols = [[0.0] * taps for _ in range(c_in)]
                for c in range(c_in):
                    g = c // c_per_dg
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = offsets[b, g * 2 * taps + 2 * k, ho, wo].item()
                            dx = offsets[b, g * 2 * taps + 2 * k + 1, ho, wo].item()
                            m = masks[b, g * taps + k, ho, wo].item()
                            y = ho * sh - ph + i * dh + dy
                            xx = wo * sw - pw + j * dw + dx
                            cols[c][k] = m * bilinear(xs[b][c], y, xx)
                for o in range(dcn.out_channels):
                    g = o // cout_g
                    acc = 0.0 if dcn.bias is None else dcn.bias[o].item()
                    for ci in range(cin_g):
                        for i in range(kh):
                            for j in range(kw):
                                acc += ws[o][ci][i][j] * cols[g * cin_g + ci][i * kw + j]
                    out[b, o, ho, wo] = acc
    return out


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups"),
    [(1, 1, 1, 1), (2, 1, 1, 2), (1, 2, 2, 1), (2, 0, 1, 4)],
)
def test_fresh_dcn_is_half_the_plain_conv(stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True)
    dcn = ModulatedDeformConv2d.from_conv(conv)
    assert (dcn.stride, dcn.padding, dcn.dilation, dcn.groups) == (
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )
    assert torch.equal(dcn.weight, conv.weight) and torch.equal(dcn.bias, conv.bias)
    assert not dcn.offset.weight.any() and not dcn.offset.bias.any()
    x = torch.randn(2, 8, 11, 9)
    # zero offsets sample the regular grid; mask logits 0 -> 0.5 scales the sampled values, not the bias
    expected = 0.5 * F.conv2d(x, conv.weight, None, stride, padding, dilation, groups) + conv.bias[:, None, None]
    torch.testing.assert_close(dcn(x), expected, rtol=1e-5, atol=1e-5)


def test_parameters_and_layout():
    dcn = ModulatedDeformConv2d(16, 32, kernel_size=3, groups=4, deformable_groups=2, bias=False)
    assert dcn.bias is None
    assert dcn.weight.shape == (32, 4, 3, 3)
    assert dcn.offset.weight.shape == (2 * 3 * 9, 16, 3, 3) and dcn.offset.bias.shape == (54,)
    assert {n for n, _ in dcn.named_parameters()} == {"weight", "offset.weight", "offset.bias"}
    no_bias = ModulatedDeformConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, bias=False))
    assert no_bias.bias is None


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "groups", "deformable_groups", "bias"),
    [(1, 1, 1, 1, 1, True), (2, 1, 1, 2, 2, False), (1, 2, 2, 1, 2, True)],
)
def test_matches_slow_reference(stride, padding, dilation, groups, deformable_groups, bias):
    torch.manual_seed(1)
    dcn = ModulatedDeformConv2d(4, 6, 3, stride, padding, dilation, groups, deformable_groups, bias).double()
    with torch.no_grad():
        # offsets of a few pixels (some samples fall outside the image) and masks away from 0.5
        dcn.offset.weight.normal_(0, 0.6)
        dcn.offset.bias.normal_(0, 1.0)
        if bias:
            dcn.bias.normal_()
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    raw = dcn.offset(x)
    assert raw.abs().max() > 2  # the test exercises real displacements
    torch.testing.assert_close(dcn(x), reference_dcn(dcn, x), rtol=1e-9, atol=1e-9)


def test_backward_reaches_every_parameter():
    torch.manual_seed(2)
    dcn = ModulatedDeformConv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        dcn.offset.weight.normal_(0, 0.1)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    dcn(x).square().sum().backward()
    for name, p in [*dcn.named_parameters(), ("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bfloat16(input_dtype):
    torch.manual_seed(3)
    dcn = ModulatedDeformConv2d(8, 8, 3, padding=1)
    with torch.no_grad():
        dcn.offset.weight.normal_(0, 0.05)
    x = torch.randn(1, 8, 10, 12)
    expected = dcn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dcn(x.to(input_dtype))
    assert out.dtype == input_dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert dcn.weight.grad is not None and dcn.offset.weight.grad is not None


def test_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="groups"):
        ModulatedDeformConv2d(6, 8, groups=4)
    with pytest.raises(ValueError, match="deformable_groups"):
        ModulatedDeformConv2d(6, 8, deformable_groups=4)
