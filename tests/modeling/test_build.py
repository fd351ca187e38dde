"""A network's description rebuilds the same network, and it covers every constructor argument: one added to
FCOS, a backbone or the head without a place in the description would be lost from every checkpoint."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

from fcos_lightning.modeling.build import BACKBONES, build_model, model_description
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead

#: arguments a description leaves out on purpose, and why
NOT_DESCRIBED = {
    FCOS: {"backbone", "head", "cpu_micro_batch"},  # described by their own classes / how it runs, not what it is
    FCOSHead: {"in_channels", "num_classes", "num_levels"},  # given by the detector
    **dict.fromkeys(BACKBONES.values(), {"pretrained", "weights"}),  # initial weights only: a checkpoint has its own
}


def tiny_network(**kwargs) -> FCOS:
    backbone = BACKBONES["timm"](
        "resnet18", (2, 3, 4), norm="BN", freeze_at=1, model_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}
    )
    head = functools.partial(FCOSHead, num_cls_convs=1, num_box_convs=2, norm="GN", use_scale=False)
    return FCOS(backbone, head, 4, fpn_channels=32, top_levels=1, sizes_of_interest=(48, 96, 192), **kwargs)


@pytest.mark.parametrize("cls", [FCOS, FCOSHead, *BACKBONES.values()], ids=lambda c: c.__name__)
def test_description_covers_every_constructor_argument(cls):
    network = tiny_network()
    instance = {FCOS: network, FCOSHead: network.head}.get(cls, network.backbone)
    parameters = set(inspect.signature(cls).parameters) - {"self"}
    assert set(instance.constructor_args()) == parameters - NOT_DESCRIBED[cls]


def test_description_rebuilds_the_same_network():
    torch.manual_seed(0)
    network = tiny_network(point_offset=0.0, pixel_mean=(1.0, 2.0, 3.0), channels_last=True).eval()
    description = model_description(network)
    assert description["backbone"]["type"] == "timm" and description["head"]["use_scale"] is False
    rebuilt = build_model(description).eval()
    assert model_description(rebuilt) == description
    rebuilt.load_state_dict(network.state_dict())  # strict: same tensors, same shapes
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(network(images), rebuilt(images), strict=True):
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y)


def test_unknown_backbone_type_is_named():
    description = model_description(tiny_network())
    description["backbone"]["type"] = "vovnet"
    with pytest.raises(ValueError, match=r"unknown backbone type 'vovnet'; known: \['timm'\]"):
        build_model(description)
