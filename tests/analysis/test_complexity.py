"""Parameter count and FLOPs: exact on a one-conv model, consistent on the demo detector."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from fcos_lightning.analysis.complexity import model_complexity


class _OneConv(nn.Module):
    size_divisibility = 32

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.frozen = nn.Parameter(torch.zeros(5), requires_grad=False)

    def forward(self, images):
        return self.conv(images.float())


def test_one_conv_by_hand():
    model = _OneConv()
    c = model_complexity(model, 40, 50)
    assert c.input_size == (64, 64)  # padded to multiples of 32
    assert (c.parameters, c.trainable_parameters) == (8 * 3 * 9 + 8 + 5, 8 * 3 * 9 + 8)
    # 2 FLOPs per multiply-add: 64 * 64 outputs x 8 channels x (3 x 3 x 3) inputs (the bias is not counted)
    assert c.flops == 2 * 64 * 64 * 8 * 27
    assert c.gmacs == pytest.approx(64 * 64 * 8 * 27 / 1e9)
    assert "GMACs per 64x64 image" in c.summary()
    with pytest.raises(ValueError, match="input size must be positive, got 0x50"):
        model_complexity(model, 0, 50)


def test_demo_detector_flops_scale_with_pixels(compose_cfg, tmp_path, single_thread):
    model = instantiate(compose_cfg("train", ["experiment=demo"], tmp_path).model, num_classes=3)
    model.train()
    small = model_complexity(model, 224, 320)
    large = model_complexity(model, 448, 640)
    assert model.training  # left as it was
    assert small.parameters == sum(p.numel() for p in model.parameters()) > 1e6
    assert small.input_size == (224, 320) and large.input_size == (448, 640)
    assert large.flops == pytest.approx(4 * small.flops, rel=0.02)  # convolutions only: cost grows with the area
