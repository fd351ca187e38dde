"""Parity with torchvision's FCOS: a randomly perturbed ``fcos_resnet50_fpn`` converted into our FCOS computes
the same per-level outputs and, with :data:`TORCHVISION_CONVENTIONS`, the same detections.

Tolerances, per level and output: ``max |ours - torchvision| <= 1e-4 * max(1, max |torchvision|)`` for class
logits, centerness logits and box regression in pixels; detections: identical count and labels (matched one to
one), boxes within 1e-3 px, scores within 1e-4. Measured on a 2-core CPU (torch 2.14.1): logits 4.9e-5 (values
up to ~7), centerness 7.5e-6, boxes 7.0e-4 px (distances up to ~320 px); detections 4.6e-4 px and 2.1e-6.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from fcos_lightning.convert import (
    COCO80_TO_TORCHVISION91,
    TORCHVISION_CONVENTIONS,
    check_shapes,
    load_torchvision_weights,
    torchvision_to_fcos,
)
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.fcos.points import flatten_level, make_points
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead

HEIGHT, WIDTH = 512, 640  # multiples of 128: torchvision's anchor strides are then exactly 8..128
SELECTED_CLASSES = [1, 3, 17, 44, 62]  # classes made likely, so NMS has same-class overlaps to suppress


def build_ours(num_classes: int = 91) -> FCOS:
    backbone = TimmBackbone("resnet50", out_indices=(2, 3, 4), pretrained=False, norm="FrozenBN", freeze_at=2)
    head = functools.partial(FCOSHead, norm="GN", use_scale=TORCHVISION_CONVENTIONS.use_scale)
    return FCOS(backbone, head, num_classes=num_classes, top_levels=2).eval()


@pytest.fixture(scope="module")
def tv_model(perturbed_tv_fcos):
    return perturbed_tv_fcos(HEIGHT, WIDTH, tuple(SELECTED_CLASSES))


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(2)
    noise = torch.rand(2, 3, HEIGHT, WIDTH, generator=g) * 255
    yy, xx = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    noise[1] = 0.5 * noise[1] + 0.5 * (xx + yy).remainder(256)  # different content in image 1
    noise[0, :, 100:300, 200:400] = 40.0  # a flat block in image 0
    return noise.round().to(torch.uint8)


@pytest.fixture(scope="module")
def run(tv_model, images):
    """torchvision's full eval forward (capturing its network input, head outputs and anchors) and ours."""
    captured = {}
    hooks = [
        tv_model.backbone.register_forward_pre_hook(lambda m, a: captured.__setitem__("input", a[0])),
        tv_model.head.register_forward_hook(lambda m, a, o: captured.__setitem__("head", o)),
        tv_model.anchor_generator.register_forward_hook(lambda m, a, o: captured.__setitem__("anchors", o)),
    ]
    with torch.no_grad():
        detections = tv_model([im.float() / 255 for im in images])
    for h in hooks:
        h.remove()
    ours = build_ours()
    load_torchvision_weights(ours, tv_model.state_dict())
    with torch.no_grad():
        outputs = ours.forward_features(captured["input"])
    return {"tv_detections": detections, "ours": ours, "outputs": outputs, **captured}


def test_converter_uses_every_key_and_maps_classes(tv_model, run):
    state = tv_model.state_dict()
    target = run["ours"].state_dict()
    converted = torchvision_to_fcos(state)
    assert set(converted) == set(target)
    params = sum(p.numel() for p in run["ours"].parameters())
    assert params == 32_269_600 + 5  # torchvision's num_params, plus our 5 fixed Scales
    check_shapes(converted, target)
    assert torch.equal(converted["head.cls_logits.weight"], state["head.classification_head.cls_logits.weight"])
    assert torch.equal(converted["fpn.lateral_convs.2.weight"], state["backbone.fpn.inner_blocks.2.0.weight"])
    assert torch.equal(converted["fpn.top_convs.1.bias"], state["backbone.fpn.extra_blocks.p7.bias"])
    assert torch.equal(converted["head.cls_tower.2.conv.bias"], state["head.classification_head.conv.6.bias"])
    assert torch.equal(converted["head.box_tower.3.norm.weight"], state["head.regression_head.conv.10.weight"])
    assert torch.equal(converted["head.centerness.weight"], state["head.regression_head.bbox_ctrness.weight"])
    assert torch.equal(
        converted["backbone.body.layer3.5.bn2.running_var"], state["backbone.body.layer3.5.bn2.running_var"]
    )
    assert all(converted[f"head.scales.{level}.scale"].item() == 1.0 for level in range(5))
    torch.testing.assert_close(converted["pixel_std"].flatten(), torch.tensor([58.395, 57.12, 57.375]))

    coco80 = torchvision_to_fcos(state, num_classes=80)
    bias91 = state["head.classification_head.cls_logits.bias"]
    assert torch.equal(coco80["head.cls_logits.bias"], bias91[list(COCO80_TO_TORCHVISION91)])
    weight91 = state["head.classification_head.cls_logits.weight"]
    assert torch.equal(coco80["head.cls_logits.weight"][11], weight91[13])  # "stop sign": COCO id 13
    assert len(set(COCO80_TO_TORCHVISION91)) == 80 and not {0, 12, 26, 83} & set(COCO80_TO_TORCHVISION91)
    target80 = {**target, "head.cls_logits.weight": coco80["head.cls_logits.weight"]}
    target80["head.cls_logits.bias"] = coco80["head.cls_logits.bias"]
    check_shapes(coco80, target80)

    # the pre-0.13 FPN layout (inner_blocks.{i}.weight) converts to the same dict
    old = {re.sub(r"_blocks\.(\d)\.0\.", r"_blocks.\1.", k): v for k, v in state.items()}
    assert "backbone.fpn.inner_blocks.0.weight" in old
    assert torchvision_to_fcos(old).keys() == converted.keys()


def test_converter_is_strict(tv_model, run):
    state = dict(tv_model.state_dict())
    with pytest.raises(ValueError, match=r"head\.regression_head\.extra\.weight"):
        torchvision_to_fcos({**state, "head.regression_head.extra.weight": torch.zeros(1)})
    bad = {**state, "backbone.fpn.layer_blocks.1.0.weight": torch.zeros(256, 256, 1, 1)}
    with pytest.raises(ValueError, match=r"shape mismatch for fpn\.output_convs\.1\.weight"):
        load_torchvision_weights(run["ours"], bad)
    with pytest.raises(ValueError, match=r"head\.bbox_pred\.weight"):
        torchvision_to_fcos({**state, "head.regression_head.bbox_reg.weight": torch.zeros(5, 256, 3, 3)})
    with pytest.raises(ValueError, match="only None or 80"):
        torchvision_to_fcos(state, num_classes=20)
    missing = {k: v for k, v in state.items() if not k.startswith("backbone.fpn.extra_blocks.p7")}
    with pytest.raises(ValueError, match=r"fpn\.top_convs\.1\.weight"):
        load_torchvision_weights(run["ours"], missing)


def test_input_is_not_resized_and_normalization_matches(tv_model, images, run):
    image = images[0].float() / 255
    resized, _ = tv_model.transform.resize(image, None)
    assert torch.equal(resized, image)  # scale 1.0 leaves the image bit-identical
    assert run["input"].shape == (2, 3, HEIGHT, WIDTH)
    ours = run["ours"]
    torch.testing.assert_close(ours.normalize(images), run["input"], rtol=0, atol=1e-5)


def _check(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    diff = (ours - theirs).abs().max().item()
    bound = 1e-4 * max(1.0, theirs.abs().max().item())
    assert diff <= bound, f"{what}: max abs diff {diff} > {bound}"
    return diff


def test_per_level_outputs_match(run):
    ours, outputs, head = run["ours"], run["outputs"], run["head"]
    sizes = [x.shape[-2] * x.shape[-1] for x in outputs.cls_logits]
    anchors = run["anchors"][0].split(sizes)
    tv_cls = head["cls_logits"].split(sizes, dim=1)
    tv_reg = head["bbox_regression"].split(sizes, dim=1)
    tv_ctr = head["bbox_ctrness"].split(sizes, dim=1)
    points = make_points([x.shape[-2:] for x in outputs.cls_logits], ours.strides, 0.0, "cpu")
    worst = {"cls": 0.0, "ctr": 0.0, "box_px": 0.0}
    for level, stride in enumerate(ours.strides):
        anchor_size = anchors[level][:, 2:] - anchors[level][:, :2]
        assert torch.all(anchor_size == stride)
        assert torch.equal((anchors[level][:, :2] + anchors[level][:, 2:]) / 2, points[level])  # offset 0.0
        cls_diff = _check(flatten_level(outputs.cls_logits[level]), tv_cls[level], f"cls P{level + 3}")
        ctr_diff = _check(flatten_level(outputs.centerness[level]), tv_ctr[level], f"ctr P{level + 3}")
        ours_px = flatten_level(outputs.box_reg[level]) * stride
        tv_px = tv_reg[level] * anchor_size.repeat(1, 2)
        assert tv_px.abs().max() > 2 * stride  # regression is not vacuous
        box_diff = _check(ours_px, tv_px, f"box P{level + 3}")
        for key, diff in (("cls", cls_diff), ("ctr", ctr_diff), ("box_px", box_diff)):
            worst[key] = max(worst[key], diff)
    print(f"\nmax abs differences over P3-P7: {worst}")


def _postprocess(run, **overrides):
    ours, outputs = run["ours"], run["outputs"]
    post = FCOSPostProcessor(**{**TORCHVISION_CONVENTIONS.postprocessor_kwargs(), **overrides})
    decoder = FCOSDecoder(ours.strides, TORCHVISION_CONVENTIONS.point_offset, post)
    return decoder(outputs, torch.tensor([[HEIGHT, WIDTH]] * 2))


def test_detections_match(run):
    results = _postprocess(run)
    without_nms = _postprocess(run, nms_thresh=1.0, max_detections=10_000)
    for theirs, mine, unsuppressed in zip(run["tv_detections"], results, without_nms, strict=True):
        n = len(theirs["boxes"])
        assert 20 <= n < 100  # tens of detections, below the cap (which the unit tests cover)
        assert len(unsuppressed["boxes"]) > 1.5 * n  # NMS did real work
        assert len(mine["boxes"]) == n
        # one-to-one matching (robust to near-equal scores swapping places)
        available = torch.ones(n, dtype=torch.bool)
        for box, score, label in zip(theirs["boxes"], theirs["scores"], theirs["labels"], strict=True):
            close = (
                available
                & (mine["labels"] == label)
                & ((mine["boxes"] - box).abs().amax(dim=1) <= 1e-3)
                & ((mine["scores"] - score).abs() <= 1e-4)
            )
            assert close.any(), f"torchvision detection {box.tolist()} {score.item()} {label.item()} unmatched"
            available[close.nonzero()[0, 0]] = False
        assert torch.equal(mine["labels"].sort().values, theirs["labels"].sort().values)
        order = torch.argsort(mine["scores"], descending=True)
        theirs_order = torch.argsort(theirs["scores"], descending=True)
        box_diff = (mine["boxes"][order] - theirs["boxes"][theirs_order]).abs().max().item()
        score_diff = (mine["scores"][order] - theirs["scores"][theirs_order]).abs().max().item()
        print(f"\n{n} detections ({len(unsuppressed['boxes'])} before NMS); score-sorted max abs diff: "
              f"boxes {box_diff:.2e} px, scores {score_diff:.2e}")  # fmt: skip
    assert not torch.equal(run["tv_detections"][0]["boxes"][:5], run["tv_detections"][1]["boxes"][:5])
