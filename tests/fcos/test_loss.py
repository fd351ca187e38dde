"""FCOS loss against values computed by hand, for both quality branches (centerness and IoU)."""

from __future__ import annotations

import math

import pytest
import torch

from fcos_lightning.fcos.loss import FCOSLoss, centerness_targets, iou_loss
from fcos_lightning.modeling.head import FCOSHead


def focal(logit: float, target: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Sigmoid focal loss of one logit, from its definition."""
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target else 1 - p
    alpha_t = alpha if target else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


def bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


# one positive: target (l, t, r, b) = (1, 2, 3, 2), prediction (0.5, 1, 1, 3), in stride units
TARGET = [1.0, 2.0, 3.0, 2.0]
PRED = [0.5, 1.0, 1.0, 3.0]
# by hand: areas 4 * 4 = 16 and 1.5 * 4 = 6; intersection (0.5 + 1) * (1 + 2) = 4.5; union 17.5;
# enclosing (1 + 3) * (2 + 3) = 20; smoothed IoU (4.5 + 1) / (17.5 + 1)
IOU = 5.5 / 18.5
GIOU = IOU - (20 - 17.5) / 20
CTR_TARGET = math.sqrt(1 / 3 * 2 / 2)


def test_iou_family_by_hand():
    pred, target = torch.tensor([PRED]), torch.tensor([TARGET])
    assert iou_loss(pred, target, "giou").item() == pytest.approx(1 - GIOU, rel=1e-6)
    assert iou_loss(pred, target, "iou").item() == pytest.approx(-math.log(IOU), rel=1e-6)
    assert iou_loss(pred, target, "linear_iou").item() == pytest.approx(1 - IOU, rel=1e-6)
    # a perfect prediction: IoU 1 (the +1 smoothing keeps it exactly 1), zero loss for every type
    for kind in ("giou", "iou", "linear_iou"):
        assert iou_loss(target, target, kind).item() == pytest.approx(0.0, abs=1e-7)
    # the +1 smoothing matters for tiny boxes: disjoint-looking 0.1-unit boxes still have IoU > 0
    tiny = iou_loss(torch.tensor([[0.1, 0.1, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.1, 0.1]]), "linear_iou")
    assert tiny.item() == pytest.approx(1 - 1 / 1.02, rel=1e-5)
    with pytest.raises(ValueError, match="unknown box loss"):
        iou_loss(pred, target, "smooth_l1")  # type: ignore[arg-type]


def test_centerness_targets_by_hand():
    ctr = centerness_targets(torch.tensor([TARGET, [2.0, 2.0, 2.0, 2.0], [1.0, 4.0, 4.0, 1.0]]))
    torch.testing.assert_close(ctr, torch.tensor([CTR_TARGET, 1.0, 0.25]))


def one_positive_case():
    """One image, three points, two classes; point 0 is positive for class 1, points 1 and 2 background."""
    cls_logits = torch.tensor([[[0.3, -1.2], [-2.0, 0.7], [1.5, -0.4]]])  # [B=1, R=3, C=2]
    box_reg = torch.tensor([[PRED, [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]])
    centerness = torch.tensor([[0.8, -0.3, 0.1]])
    labels = torch.tensor([[1, 2, 2]])
    reg_targets = torch.tensor([[TARGET, [0.0] * 4, [0.0] * 4]])
    return cls_logits, box_reg, centerness, labels, reg_targets


@pytest.mark.parametrize("kind", ["giou", "iou", "linear_iou"])
def test_one_positive_by_hand(kind):
    losses = FCOSLoss(num_classes=2, box_loss_type=kind)(*one_positive_case())
    logits = [[0.3, -1.2], [-2.0, 0.7], [1.5, -0.4]]
    onehot = [[0, 1], [0, 0], [0, 0]]
    expected_cls = sum(focal(z, y) for row, ys in zip(logits, onehot) for z, y in zip(row, ys)) / 1
    expected_box = {"giou": 1 - GIOU, "iou": -math.log(IOU), "linear_iou": 1 - IOU}[kind]  # weight c / sum c = 1
    expected_ctr = bce(0.8, CTR_TARGET) / 1
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(expected_box, rel=1e-5)
    assert losses["loss_ctr"].item() == pytest.approx(expected_ctr, rel=1e-5)


def test_two_positives_weighting_and_normalizers():
    """Box loss = sum(loss_i * c_i) / sum(c_i); cls and ctr losses: sums over the number of positives."""
    t2, p2 = [1.0, 4.0, 4.0, 1.0], [1.0, 4.0, 4.0, 1.0]  # a perfect prediction with centerness target 0.25
    cls_logits = torch.tensor([[[0.3, -1.2], [-2.0, 0.7]], [[1.5, -0.4], [0.0, 0.0]]])  # B=2, R=2
    box_reg = torch.tensor([[PRED, [1.0] * 4], [p2, [1.0] * 4]])
    centerness = torch.tensor([[0.8, -0.3], [0.1, 0.2]])
    labels = torch.tensor([[1, 2], [0, 2]])
    reg_targets = torch.tensor([[TARGET, [0.0] * 4], [t2, [0.0] * 4]])
    losses = FCOSLoss(num_classes=2)(cls_logits, box_reg, centerness, labels, reg_targets)
    c1, c2 = CTR_TARGET, 0.25
    assert losses["loss_box"].item() == pytest.approx(((1 - GIOU) * c1 + 0.0 * c2) / (c1 + c2), rel=1e-5)
    assert losses["loss_ctr"].item() == pytest.approx((bce(0.8, c1) + bce(0.1, c2)) / 2, rel=1e-5)
    logits = [[0.3, -1.2], [-2.0, 0.7], [1.5, -0.4], [0.0, 0.0]]
    onehot = [[0, 1], [0, 0], [1, 0], [0, 0]]
    expected_cls = sum(focal(z, y) for row, ys in zip(logits, onehot) for z, y in zip(row, ys)) / 2
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)


def test_iou_quality_by_hand():
    """BOX_QUALITY=iou on two positives, one per image, worked out by hand.

    Positive 1: prediction PRED = (0.5, 1, 1, 3), target TARGET = (1, 2, 3, 2): smoothed IoU 5.5 / 18.5 =
    0.297297, GIoU 0.297297 - (20 - 17.5) / 20 = 0.172297, GIoU loss 0.827703 (see IOU and GIOU above).
    Positive 2: prediction = target = (1, 4, 4, 1): area 5 x 5 = 25 = intersection = union, IoU (25 + 1) /
    (25 + 1) = 1 exactly, GIoU 1, loss 0.
    Box loss, unweighted over the 2 positives: (0.827703 + 0) / 2 = 0.413851 (with ``ctrness`` it would be
    0.827703 * sqrt(1/3) / (sqrt(1/3) + 0.25) = 0.577596: the centerness weights are gone).
    Quality loss, BCE of the quality logits against the IoUs, over the 2 positives:
    logit 0.8 -> p = 0.689974, log p = -0.371101, log(1 - p) = -1.171101;
    BCE(0.8, 0.297297) = -(0.297297 x -0.371101 + 0.702703 x -1.171101) = 0.110327 + 0.822936 = 0.933263;
    BCE(0.1, 1) = log(1 + exp(-0.1)) = 0.644397; (0.933263 + 0.644397) / 2 = 0.788830.
    The classification loss does not depend on the quality branch.
    """
    t2 = [1.0, 4.0, 4.0, 1.0]
    cls_logits = torch.tensor([[[0.3, -1.2], [-2.0, 0.7]], [[1.5, -0.4], [0.0, 0.0]]])  # B=2, R=2
    box_reg = torch.tensor([[PRED, [1.0] * 4], [t2, [1.0] * 4]], requires_grad=True)
    centerness = torch.tensor([[0.8, -0.3], [0.1, 0.2]], requires_grad=True)
    labels = torch.tensor([[1, 2], [0, 2]])
    reg_targets = torch.tensor([[TARGET, [0.0] * 4], [t2, [0.0] * 4]])
    iou_mode = FCOSLoss(num_classes=2, box_quality="iou")(cls_logits, box_reg, centerness, labels, reg_targets)
    ctr_mode = FCOSLoss(num_classes=2)(cls_logits, box_reg, centerness, labels, reg_targets)
    assert iou_mode["loss_box"].item() == pytest.approx(0.413851, abs=1e-6)
    assert ctr_mode["loss_box"].item() == pytest.approx(0.577596, abs=1e-6)
    assert iou_mode["loss_ctr"].item() == pytest.approx(0.788830, abs=1e-6)
    assert iou_mode["loss_cls"].item() == ctr_mode["loss_cls"].item()
    # the same numbers from the helpers above, to full precision
    assert iou_mode["loss_box"].item() == pytest.approx((1 - GIOU) / 2, rel=1e-6)
    assert iou_mode["loss_ctr"].item() == pytest.approx((bce(0.8, IOU) + bce(0.1, 1.0)) / 2, rel=1e-6)

    # the IoU target is detached: the quality loss moves the quality logits only, never the boxes
    iou_mode["loss_ctr"].backward(retain_graph=True)
    assert box_reg.grad is None or torch.all(box_reg.grad == 0)
    # d/dz BCE(z, t) = sigmoid(z) - t, over 2 positives; background points get nothing
    expected = torch.tensor([[(1 / (1 + math.exp(-0.8)) - IOU) / 2, 0.0], [(1 / (1 + math.exp(-0.1)) - 1) / 2, 0.0]])
    torch.testing.assert_close(centerness.grad, expected)
    centerness.grad = None
    iou_mode["loss_box"].backward()
    assert centerness.grad is None or torch.all(centerness.grad == 0)
    assert box_reg.grad[0, 0].abs().sum() > 0


def test_unknown_box_quality():
    with pytest.raises(ValueError, match=r"unknown box_quality 'centerness'; expected one of \['ctrness', 'iou'\]"):
        FCOSLoss(num_classes=2, box_quality="centerness")  # type: ignore[arg-type]


@pytest.mark.parametrize("box_quality", ["ctrness", "iou"])
def test_batch_without_positives(box_quality):
    cls_logits, box_reg, centerness, _, _ = one_positive_case()
    labels = torch.full((1, 3), 2)
    losses = FCOSLoss(num_classes=2, box_quality=box_quality)(
        cls_logits, box_reg, centerness, labels, torch.zeros(1, 3, 4)
    )
    expected_cls = sum(focal(z, 0) for z in (0.3, -1.2, -2.0, 0.7, 1.5, -0.4)) / 1  # num_pos clamped to 1
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_box"].item() == 0.0 and losses["loss_ctr"].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("box_quality", ["ctrness", "iou"])
def test_images_without_boxes_give_defined_gradients_for_every_head_parameter(box_quality):
    torch.manual_seed(0)
    head = FCOSHead(in_channels=32, num_classes=3, num_levels=2, num_cls_convs=2, num_box_convs=2)
    features = [torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)]
    out = head(features)

    def flat(levels):
        return torch.cat([x.permute(0, 2, 3, 1).reshape(2, -1, x.shape[1]) for x in levels], dim=1)

    num_points = 8 * 8 + 4 * 4
    labels = torch.full((2, num_points), 3)  # both images without boxes: all background
    losses = FCOSLoss(num_classes=3, box_quality=box_quality)(
        flat(out.cls_logits),
        flat(out.box_reg),
        flat(out.centerness)[..., 0],
        labels,
        torch.zeros(2, num_points, 4),
    )
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    assert losses["loss_box"].item() == 0.0 and losses["loss_ctr"].item() == 0.0
    sum(losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), name
    assert torch.all(head.bbox_pred.weight.grad == 0) and torch.all(head.centerness.weight.grad == 0)
    assert head.cls_logits.weight.grad.abs().sum() > 0


def test_bf16_inputs():
    cls_logits, box_reg, centerness, labels, reg_targets = one_positive_case()
    loss = FCOSLoss(num_classes=2)
    low = loss(cls_logits.bfloat16(), box_reg.bfloat16(), centerness.bfloat16(), labels, reg_targets)
    rounded = loss(
        cls_logits.bfloat16().float(),
        box_reg.bfloat16().float(),
        centerness.bfloat16().float(),
        labels,
        reg_targets,
    )
    full = loss(cls_logits, box_reg, centerness, labels, reg_targets)
    for key in full:
        assert low[key].dtype == torch.float32, key  # computed in fp32 whatever the input precision
        assert low[key].item() == rounded[key].item(), key
        assert low[key].item() == pytest.approx(full[key].item(), rel=2e-2), key


def test_unknown_box_loss_type():
    with pytest.raises(ValueError, match="unknown box loss"):
        FCOSLoss(num_classes=2, box_loss_type="l1")  # type: ignore[arg-type]
