"""Test-time augmentation in the Predictor: views merged per class, and mirror-consistent."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import box_iou

from fcos_lightning.runtime.optimize import optimize_for_inference
from fcos_lightning.runtime.predictor import Predictor, TestTimeAugmentation, mirror_boxes

pytestmark = pytest.mark.usefixtures("single_thread")

TTA = TestTimeAugmentation(min_sizes=(112, 128, 144), flip=True)


@pytest.fixture(scope="module")
def predictor(trained):
    model = optimize_for_inference(copy.deepcopy(trained[0]))
    return Predictor(model, precision="32-true", test_resize=(128, 400))


def matched(a: dict, b: dict, min_score: float = 0.5) -> torch.Tensor:
    """Best same-label IoU in ``b`` of each detection of ``a`` scoring >= ``min_score``."""
    keep = a["scores"] >= min_score
    iou = box_iou(a["boxes"][keep], b["boxes"])
    iou[a["labels"][keep][:, None] != b["labels"][None, :]] = 0
    return iou.max(dim=1).values


def test_tta_on_an_image_and_its_mirror_finds_mirrored_boxes(predictor, trained):
    _, images, gt_boxes, gt_labels = trained
    for image, boxes, labels in zip(images, gt_boxes, gt_labels, strict=True):
        det = predictor.detect([image], TTA)[0]
        mirrored = predictor.detect([image.flip(-1)], TTA)[0]
        back = mirror_boxes(mirrored, image.shape[-1])
        assert (matched(det, back) >= 0.9).all() and (matched(back, det) >= 0.9).all()
        gt = {"boxes": boxes, "labels": labels, "scores": torch.ones(len(boxes))}
        # every object is found; the kept box is the top-scoring view's (NMS), at other sizes than trained on
        assert (matched(gt, det) >= 0.6).all()


def test_tta_views_and_merge(predictor, trained, monkeypatch):
    """Each size runs once plain and once mirrored; the merge keeps at most max_detections per image."""
    _, images, _, _ = trained
    shapes = []
    network = predictor.network
    monkeypatch.setattr(predictor, "network", lambda b, s: shapes.append(tuple(s[0].tolist())) or network(b, s))
    dets = predictor.detect(list(images), TTA)
    assert shapes == [(112, 140), (112, 140), (128, 160), (128, 160), (144, 180), (144, 180)]
    assert len(dets) == 2 and all(len(d["scores"]) <= predictor.decoder.postprocessor.max_detections for d in dets)
    assert all(bool((d["scores"][:-1] >= d["scores"][1:]).all()) for d in dets)


def test_bad_tta_sizes_are_refused():
    with pytest.raises(ValueError, match="tta min_sizes"):
        TestTimeAugmentation(min_sizes=())
