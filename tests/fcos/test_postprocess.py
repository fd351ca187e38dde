"""Post-processing on hand-built head outputs."""

from __future__ import annotations

import math

import pytest
import torch

from fcos_lightning.fcos.points import make_points
from fcos_lightning.fcos.postprocess import FCOSPostProcessor, best_per_image

NUM_CLASSES = 3
STRIDES = [8, 16]
SIZES = [(4, 6), (2, 3)]  # a 32 x 48 padded input; level-0 points at (8j + 4, 8i + 4)
NEG = -30.0  # a logit of probability ~1e-13


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class Outputs:
    """Per-level head outputs, all background, with a helper to place one prediction."""

    def __init__(self, batch: int = 1) -> None:
        self.cls = [torch.full((batch, NUM_CLASSES, h, w), NEG) for h, w in SIZES]
        self.reg = [torch.full((batch, 4, h, w), 0.25) for h, w in SIZES]
        self.ctr = [torch.full((batch, 1, h, w), 30.0) for h, w in SIZES]  # centerness probability 1
        self.points = make_points(SIZES, STRIDES, 0.5, "cpu")

    def put(self, image, level, row, col, label, cls_p, ctr_p=None, ltrb=(0.25, 0.25, 0.25, 0.25)):
        self.cls[level][image, label, row, col] = logit(cls_p)
        if ctr_p is not None:
            self.ctr[level][image, 0, row, col] = logit(ctr_p)
        self.reg[level][image, :, row, col] = torch.tensor(ltrb)

    def run(self, post, image_sizes=None, orig_sizes=None):
        batch = self.cls[0].shape[0]
        sizes = torch.tensor([[32, 48]] * batch) if image_sizes is None else image_sizes
        return post(self.cls, self.reg, self.ctr, self.points, STRIDES, sizes, orig_sizes)


def test_threshold_on_class_probability_before_centerness():
    out = Outputs()
    out.put(0, 0, 0, 0, label=0, cls_p=0.3, ctr_p=0.1)  # cls 0.3 > 0.05 but cls * ctr = 0.03 < 0.05
    out.put(0, 0, 2, 4, label=1, cls_p=0.04, ctr_p=0.99)  # cls 0.04 < 0.05: dropped whatever its centerness
    (res,) = out.run(FCOSPostProcessor(score_thresh=0.05))
    assert res["labels"].tolist() == [0]
    assert res["scores"].item() == pytest.approx(math.sqrt(0.3 * 0.1), rel=1e-5)  # score = sqrt(cls * ctr)
    (with_ctr,) = out.run(FCOSPostProcessor(score_thresh=0.05, thresh_with_ctr=True))
    assert len(with_ctr["labels"]) == 0  # thresholding cls * ctr drops both
    (low,) = out.run(FCOSPostProcessor(score_thresh=0.035, thresh_with_ctr=True))
    assert low["labels"].tolist() == [1]  # 0.04 * 0.99 > 0.035 > 0.03


def test_decode_in_pixels_from_points_and_stride():
    out = Outputs()
    out.put(0, 0, 2, 3, label=2, cls_p=0.9, ltrb=(1.0, 0.5, 2.0, 0.25))  # point (28, 20), stride 8
    out.put(0, 1, 1, 0, label=0, cls_p=0.8, ltrb=(0.5, 0.25, 1.0, 0.5))  # point (8, 24), stride 16
    (res,) = out.run(FCOSPostProcessor())
    assert res["labels"].tolist() == [2, 0]
    torch.testing.assert_close(res["boxes"], torch.tensor([[20.0, 16.0, 44.0, 22.0], [0.0, 20.0, 24.0, 32.0]]))
    torch.testing.assert_close(res["scores"], torch.tensor([0.9, 0.8]).sqrt())


def test_top_k_per_level_ranked_by_cls_times_ctr():
    out = Outputs()
    for col, p in enumerate([0.9, 0.8, 0.7, 0.6]):  # level 0: four separated candidates
        out.put(0, 0, 0, col, label=0, cls_p=p)
    for col, p in enumerate([0.65, 0.55, 0.5]):  # level 1: three
        out.put(0, 1, 1, col, label=0, cls_p=p)
    (res,) = out.run(FCOSPostProcessor(pre_nms_topk=2))
    # the two best of each level: level 0's 0.7 loses although it beats level 1's 0.65 and 0.55
    torch.testing.assert_close(res["scores"], torch.tensor([0.9, 0.8, 0.65, 0.55]).sqrt())

    ranked = Outputs()
    ranked.put(0, 0, 0, 0, label=0, cls_p=0.9, ctr_p=0.1)  # cls * ctr = 0.09
    ranked.put(0, 0, 3, 5, label=1, cls_p=0.5, ctr_p=0.9)  # cls * ctr = 0.45
    (top1,) = ranked.run(FCOSPostProcessor(pre_nms_topk=1))
    assert top1["labels"].tolist() == [1]


def test_class_aware_nms_and_images_are_separate():
    out = Outputs(batch=2)
    big = (4.0, 4.0, 4.0, 4.0)  # 64 px boxes: neighbours 8 px apart overlap with IoU 0.78
    out.put(0, 0, 1, 1, label=0, cls_p=0.9, ltrb=big)
    out.put(0, 0, 1, 2, label=0, cls_p=0.8, ltrb=big)  # same class, overlapping: suppressed
    out.put(0, 0, 2, 2, label=1, cls_p=0.7, ltrb=big)  # other class, overlapping: kept
    out.put(1, 0, 1, 2, label=0, cls_p=0.6, ltrb=big)  # the suppressed box, in another image: kept
    res = out.run(FCOSPostProcessor(nms_thresh=0.6))
    torch.testing.assert_close(res[0]["scores"], torch.tensor([0.9, 0.7]).sqrt())
    assert res[0]["labels"].tolist() == [0, 1]
    assert res[1]["labels"].tolist() == [0]
    torch.testing.assert_close(res[1]["boxes"], torch.tensor([[-12.0, -20.0, 52.0, 44.0]]))
    (loose,) = out.run(FCOSPostProcessor(nms_thresh=0.8))[:1]  # IoU 0.78 < 0.8: nothing suppressed
    assert len(loose["scores"]) == 3


def test_max_detections_per_image():
    out = Outputs(batch=2)
    for col in range(5):
        out.put(0, 0, 0, col, label=col % NUM_CLASSES, cls_p=0.5 - 0.05 * col)
        out.put(1, 0, 3, col, label=0, cls_p=0.95 - 0.05 * col)  # image 1 scores all higher
    res = out.run(FCOSPostProcessor(max_detections=3))
    torch.testing.assert_close(res[0]["scores"], torch.tensor([0.5, 0.45, 0.4]).sqrt())
    torch.testing.assert_close(res[1]["scores"], torch.tensor([0.95, 0.9, 0.85]).sqrt())


def test_rescale_to_original_size_clip_and_drop_empty():
    out = Outputs()
    out.put(0, 0, 2, 3, label=2, cls_p=0.9, ltrb=(1.0, 0.5, 2.0, 0.25))  # (20, 16, 44, 22)
    out.put(0, 1, 0, 2, label=1, cls_p=0.8, ltrb=(0.5, 1.0, 1.0, 0.5))  # (32, -8, 56, 16)
    out.put(0, 0, 3, 5, label=0, cls_p=0.7, ltrb=(0.1, 0.1, 0.1, 0.1))  # (43.2, 27.2, 44.8, 28.8): padding
    # the network input is 24 x 40 inside the 32 x 48 padded batch; the original image is 48 x 80 (scale 2)
    (res,) = out.run(FCOSPostProcessor(), image_sizes=torch.tensor([[24, 40]]), orig_sizes=torch.tensor([[48, 80]]))
    assert res["labels"].tolist() == [2, 1]  # the box in the padding is empty once clipped: dropped
    torch.testing.assert_close(res["boxes"], torch.tensor([[40.0, 32.0, 80.0, 44.0], [64.0, 0.0, 80.0, 32.0]]))


def test_clip_before_nms():
    out = Outputs()
    out.put(0, 0, 0, 0, label=0, cls_p=0.9, ltrb=(4.0, 4.0, 1.0, 1.0))  # (-28, -28, 12, 12)
    out.put(0, 0, 1, 0, label=0, cls_p=0.8, ltrb=(1.0, 1.0, 1.0, 0.0))  # (-4, 4, 12, 12)
    (plain,) = out.run(FCOSPostProcessor())  # IoU 128 / 1600: both kept, unclipped
    assert len(plain["scores"]) == 2 and plain["boxes"][0, 0] == -28
    (clipped,) = out.run(FCOSPostProcessor(clip_before_nms=True))  # clipped IoU 96 / 144 > 0.6
    assert len(clipped["scores"]) == 1
    torch.testing.assert_close(clipped["boxes"], torch.tensor([[0.0, 0.0, 12.0, 12.0]]))


def test_no_detections():
    res = Outputs(batch=2).run(FCOSPostProcessor())
    assert len(res) == 2
    for r in res:
        assert r["boxes"].shape == (0, 4) and r["scores"].shape == (0,) and r["labels"].shape == (0,)


def test_bf16_inputs_match_fp32():
    g = torch.Generator().manual_seed(0)
    cls = [torch.randn(2, NUM_CLASSES, h, w, generator=g) * 2 - 2 for h, w in SIZES]
    reg = [torch.rand(2, 4, h, w, generator=g) * 3 for h, w in SIZES]
    ctr = [torch.randn(2, 1, h, w, generator=g) for h, w in SIZES]
    points = make_points(SIZES, STRIDES, 0.5, "cpu")
    sizes = torch.tensor([[32, 48], [32, 48]])
    post = FCOSPostProcessor(nms_thresh=0.5)

    def run(dtype):
        return post(*[[x.bfloat16().to(dtype) for x in xs] for xs in (cls, reg, ctr)], points, STRIDES, sizes)

    low, full = run(torch.bfloat16), run(torch.float32)
    assert sum(len(r["scores"]) for r in full) > 10
    for a, b in zip(low, full, strict=True):
        assert a["boxes"].dtype == torch.float32 and a["scores"].dtype == torch.float32
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6)


def test_best_per_image_keeps_the_given_order_per_image_and_pads():
    boxes = torch.arange(24, dtype=torch.float).reshape(6, 4)
    scores = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])  # in NMS order; a tie keeps its order
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    det = best_per_image(boxes, scores, labels, torch.tensor([1, 0, 1, 1, 0, 2]), batch=4, k=2)
    assert det.counts.tolist() == [2, 2, 1, 0]
    assert det.labels.tolist() == [[1, 1], [0, 2], [2, -1], [-1, -1]]
    torch.testing.assert_close(det.scores, torch.tensor([[0.8, 0.6], [0.9, 0.8], [0.5, 0.0], [0.0, 0.0]]))
    assert torch.equal(det.boxes[1], boxes[[0, 2]]) and torch.equal(det.boxes[2, 0], boxes[5])
    assert not det.boxes[2, 1].any() and not det.boxes[3].any()
    lists = det.unpad()
    assert [len(d["boxes"]) for d in lists] == [2, 2, 1, 0]
    assert torch.equal(lists[2]["boxes"], boxes[[5]])
    empty = best_per_image(boxes[:0], scores[:0], labels[:0], labels[:0], batch=2, k=3)
    assert empty.counts.tolist() == [0, 0] and empty.boxes.shape == (2, 3, 4)
