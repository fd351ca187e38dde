"""The fast inference path: BN folding computes the same function, and bf16 autocast finds the same objects."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import box_iou

from fcos_lightning.data.collate import pad_images
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.runtime.optimize import fold_batch_norms, optimize_for_inference
from fcos_lightning.runtime.own_padding import own_padded_groups
from fcos_lightning.runtime.predictor import Predictor

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", ["resnet18", "ese_vovnet19b_slim"])  # VoVNet: timm's BN+ReLU in one module
@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_folding_batch_norms_keeps_the_function(norm, name, two_images, tiny_fcos):
    torch.manual_seed(1)
    model = tiny_fcos(norm, name).eval()
    for m in model.modules():  # non-trivial statistics, so folding has something to get right
        if hasattr(m, "running_var") and m.running_var is not None:
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    images = two_images[0]
    folded = copy.deepcopy(model)
    count = fold_batch_norms(folded)
    assert count == sum(1 for m in model.backbone.modules() if hasattr(m, "running_var"))
    assert not any(hasattr(m, "running_var") for m in folded.modules())
    with torch.no_grad():
        for a, b in zip(model(images), folded(images), strict=True):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_predictor_pads_and_matches_the_batched_input(tiny_fcos):
    model = optimize_for_inference(tiny_fcos())
    predictor = Predictor(model, precision="32-true")
    images = [
        torch.randint(0, 256, (3, 100, 130), dtype=torch.uint8),
        torch.randint(0, 256, (3, 64, 70), dtype=torch.uint8),
    ]
    batch, sizes = pad_images(images, 32, "cpu")
    assert batch.shape == (2, 3, 128, 160) and sizes.tolist() == [[100, 130], [64, 70]]
    assert torch.equal(batch[1, :, :64, :70], images[1]) and batch[1, :, 64:].eq(0).all()
    assert model.channels_last and model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.cpu_micro_batch == 1  # CPU: the network runs image by image, post-processing on the whole batch
    from_list = predictor(images)
    from_batch = predictor(batch, sizes)
    for a, b in zip(from_list, from_batch, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_bf16_finds_the_same_top_detections_as_fp32(trained):
    model, images, boxes, labels = trained
    fp32 = Predictor(optimize_for_inference(copy.deepcopy(model)), precision="32-true")(images)
    fast = optimize_for_inference(copy.deepcopy(model), precision="bf16-mixed")  # what evaluate.py runs
    bf16 = Predictor(fast, precision="bf16-mixed")(images)
    for ref, low, gt_boxes, gt_labels in zip(fp32, bf16, boxes, labels, strict=True):
        confident = ref["scores"] > 0.5
        assert confident.sum() == len(gt_boxes)  # one confident detection per object: a meaningful comparison
        top = {k: v[confident] for k, v in ref.items()}
        gt_iou = box_iou(top["boxes"], gt_boxes)
        gt_iou[top["labels"][:, None] != gt_labels[None, :]] = 0
        assert (gt_iou.max(dim=1).values > 0.5).all()
        iou = box_iou(top["boxes"], low["boxes"])
        iou[top["labels"][:, None] != low["labels"][None, :]] = 0
        best = iou.max(dim=1)
        assert (best.values >= 0.9).all(), best.values
        torch.testing.assert_close(low["scores"][best.indices], top["scores"], rtol=0, atol=0.05)


def test_weights_stored_in_the_autocast_dtype_give_identical_outputs(tiny_fcos):
    """Casting conv weights once equals autocast casting them at every call, bit for bit; a model so cast
    is refused by a full-precision Predictor instead of failing inside a convolution."""
    model = optimize_for_inference(tiny_fcos())
    cast = optimize_for_inference(copy.deepcopy(model), precision="bf16-mixed")
    assert cast.backbone.body.conv1.weight.dtype == torch.bfloat16
    images = [torch.randint(0, 256, (3, 96, 120), dtype=torch.uint8) for _ in range(2)]
    batch, sizes = pad_images(images, 32, "cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(batch, sizes), cast(batch, sizes)
    for a, b in zip(expected, got, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="precision '32-true'"):
        Predictor(cast, precision="32-true")


def test_detections_do_not_depend_on_the_batch(tiny_fcos):
    """Images of different sizes get the same detections alone and in one batch: each is seen padded to its
    own stride multiple only (padding to the batch's largest image changes GroupNorm statistics and borders)."""
    torch.manual_seed(2)
    model = tiny_fcos()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(-3.0)  # some detections to compare
    predictor = Predictor(optimize_for_inference(model), FCOSPostProcessor(score_thresh=0.05), precision="32-true")
    sizes = [(96, 128), (64, 70), (128, 96), (100, 130), (64, 64), (33, 200), (96, 120), (70, 64)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes]
    alone = [predictor([img])[0] for img in images]
    together = predictor(images)
    assert sum(len(d["scores"]) for d in alone) > 20
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-5)


def test_own_padded_groups_keep_batch_order():
    sizes = torch.tensor([[100, 130], [64, 70], [90, 150], [60, 90], [128, 160]])
    groups = own_padded_groups(sizes, 32)
    expected = [([0, 4], 128, 160), ([1, 3], 64, 96), ([2], 96, 160)]
    assert [(idx.tolist(), h, w) for idx, h, w in groups] == expected
    assert [(idx.tolist(), h, w) for idx, h, w in own_padded_groups(sizes[:1], 0)] == [([0], 100, 130)]
