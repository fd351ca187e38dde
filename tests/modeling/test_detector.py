"""FCOS network: micro-batched evaluation gives every image the outputs of a whole-batch forward."""

from __future__ import annotations

import functools

import pytest
import torch

from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead


def small_fcos(**kwargs) -> FCOS:
    narrow = {"channels": [16, 32, 64, 128], "stem_width": 16}
    backbone = TimmBackbone("resnet18", out_indices=(2, 3, 4), norm="BN", freeze_at=0, model_kwargs=narrow)
    head = functools.partial(FCOSHead, norm="GN", num_cls_convs=1, num_box_convs=1)
    return FCOS(backbone, head, 3, fpn_channels=64, top_levels=2, **kwargs)


@pytest.mark.parametrize("cpu_micro_batch", [1, 2])
def test_cpu_micro_batches_equal_the_whole_batch(cpu_micro_batch):
    torch.manual_seed(0)
    model = small_fcos().eval()
    images = torch.randint(0, 256, (5, 3, 96, 128), dtype=torch.uint8)
    sizes = torch.tensor([[96, 128], [80, 100], [96, 64], [50, 128], [96, 128]])
    with torch.no_grad():
        whole = model(images, sizes)
        model.cpu_micro_batch = cpu_micro_batch
        chunked = model(images, sizes)
        no_sizes = model(images)
        model.cpu_micro_batch = None
        whole_no_sizes = model(images)
    for expected, got in ((whole, chunked), (whole_no_sizes, no_sizes)):
        for field_expected, field_got in zip(expected, got, strict=True):
            assert len(field_got) == len(model.strides)
            for x, y in zip(field_expected, field_got, strict=True):
                assert y.shape == x.shape
                torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_training_ignores_cpu_micro_batch():
    """Training runs the whole batch: BN statistics are batch statistics."""
    model = small_fcos(cpu_micro_batch=1).train()
    calls = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    model(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    assert calls == [3, 1, 1, 1]
