"""Target assignment parity.

1. torchvision conventions: :class:`TargetAssigner` with ``inclusive_ranges=False`` and points at offset 0.0
   picks the same positives and the same matched box as torchvision's ``FCOS.compute_loss``, over hundreds of
   seeded random cases. The one allowed difference: torchvision ranks candidate boxes by the float32 key
   ``1e8 - area``, which merges areas closer than the float32 spacing at 1e8 (8 px^2); where the two pick
   different boxes, both boxes must have the same float32 key (we then pick the truly smaller one).
2. AdelaiDet conventions (offset 0.5, inclusive ranges) against a slow reference that follows AdelaiDet's rules
   literally with Python loops, on coordinates exact in float32.
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from torch import nn
from torchvision.models.detection.fcos import FCOS as TorchvisionFCOS
from torchvision.models.detection.image_list import ImageList

from fcos_lightning.convert import TORCHVISION_CONVENTIONS
from fcos_lightning.fcos.points import make_points
from fcos_lightning.fcos.targets import TargetAssigner

STRIDES = (8, 16, 32, 64, 128)
SIZES = (64, 128, 256, 512)
NUM_CLASSES = 7


pytestmark = pytest.mark.usefixtures("single_thread")


class _NoBackbone(nn.Module):
    """torchvision's FCOS needs a backbone object; the matching never runs it."""

    out_channels = 32


@pytest.fixture(scope="module")
def tv_fcos() -> TorchvisionFCOS:
    return TorchvisionFCOS(_NoBackbone(), num_classes=NUM_CLASSES, center_sampling_radius=1.5)


def torchvision_matched_idxs(model: TorchvisionFCOS, boxes: list[torch.Tensor], height: int, width: int):
    """torchvision's ``matched_idxs`` (and anchors) for one batch, captured from ``FCOS.compute_loss``."""
    batch = len(boxes)
    images = ImageList(torch.zeros(batch, 3, height, width), [(height, width)] * batch)
    features = [torch.zeros(batch, 1, height // s, width // s) for s in STRIDES]
    anchors = model.anchor_generator(images, features)
    num_per_level = [f.shape[2] * f.shape[3] for f in features]
    captured = []

    def capture(targets, head_outputs, anchors, matched_idxs):
        captured.append(matched_idxs)
        return {}

    model.head.compute_loss = capture  # instance attribute: FCOS.compute_loss calls self.head.compute_loss
    try:
        targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.int64)} for b in boxes]
        model.compute_loss(targets, {}, anchors, num_per_level)
    finally:
        del model.head.compute_loss
    return torch.stack(captured[0]), anchors, [(height // s, width // s) for s in STRIDES]


def random_boxes(rng: random.Random, num: int, height: int, width: int) -> torch.Tensor:
    """Random float boxes: free, nested, overlapping shifted copies, near-duplicates and exact duplicates."""
    boxes: list[list[float]] = []
    while len(boxes) < num:
        kind = rng.random()
        if boxes and kind < 0.15:  # nested inside an existing box
            x0, y0, x1, y1 = rng.choice(boxes)
            fx, fy = rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.9)
            w, h = (x1 - x0) * fx, (y1 - y0) * fy
            nx, ny = x0 + rng.uniform(0, x1 - x0 - w), y0 + rng.uniform(0, y1 - y0 - h)
            boxes.append([nx, ny, nx + w, ny + h])
        elif boxes and kind < 0.3:  # overlapping: shifted copy
            x0, y0, x1, y1 = rng.choice(boxes)
            dx, dy = rng.uniform(-0.5, 0.5) * (x1 - x0), rng.uniform(-0.5, 0.5) * (y1 - y0)
            boxes.append([x0 + dx, y0 + dy, x1 + dx, y1 + dy])
        elif boxes and kind < 0.4:  # near-duplicate: area differs by far less than 8 px^2
            x0, y0, x1, y1 = rng.choice(boxes)
            boxes.append([c + rng.uniform(-0.01, 0.01) for c in (x0, y0, x1, y1)])
        elif boxes and kind < 0.45:  # exact duplicate: tie broken by index in both implementations
            boxes.append(list(rng.choice(boxes)))
        else:
            w = min(width, 2 ** rng.uniform(1, 10))
            h = min(height, w * 2 ** rng.uniform(-2, 2))
            x0, y0 = (
                rng.uniform(-0.05 * width, width - 0.5 * w),
                rng.uniform(-0.05 * height, height - 0.5 * h),
            )
            boxes.append([x0, y0, x0 + w, y0 + h])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def test_matches_torchvision(tv_fcos):
    rng = random.Random(0)
    assigner = TargetAssigner(STRIDES, **TORCHVISION_CONVENTIONS.assigner_kwargs())
    assert assigner.inclusive_ranges is False
    image_sizes = [(128, 128), (128, 256), (256, 128), (256, 384), (384, 256), (512, 640), (768, 1024)]
    trials = 350
    positives = float32_ties = exact_duplicate_cases = 0
    for trial in range(trials):
        height, width = image_sizes[trial % len(image_sizes)]
        batch = rng.choice([1, 2, 3])
        counts = [rng.choice([0, rng.randint(1, 10), rng.randint(1, 50)]) for _ in range(batch)]
        boxes = [random_boxes(rng, n, height, width) for n in counts]
        labels = [torch.randint(0, NUM_CLASSES, (n,)) for n in counts]

        tv_idx, anchors, sizes = torchvision_matched_idxs(tv_fcos, boxes, height, width)
        points = make_points(sizes, STRIDES, TORCHVISION_CONVENTIONS.point_offset, "cpu")
        flat = torch.cat(points)
        assert torch.equal(flat, (anchors[0][:, :2] + anchors[0][:, 2:]) / 2)  # same locations
        ours = assigner(points, boxes, labels, NUM_CLASSES)

        assert torch.equal(ours.matched_idx >= 0, tv_idx >= 0), f"trial {trial}: positives differ"
        positives += int((tv_idx >= 0).sum())
        for i in range(batch):
            differ = ours.matched_idx[i] != tv_idx[i]
            if differ.any():
                areas = (boxes[i][:, 2] - boxes[i][:, 0]) * (boxes[i][:, 3] - boxes[i][:, 1])
                key = 1e8 - areas  # torchvision's float32 ranking key
                ours_key, tv_key = key[ours.matched_idx[i][differ]], key[tv_idx[i][differ]]
                assert torch.equal(ours_key, tv_key), f"trial {trial}: different boxes with different keys"
                # only truly different areas may disagree (exact duplicates: both take the first index)
                assert torch.all(areas[ours.matched_idx[i][differ]] < areas[tv_idx[i][differ]])
                float32_ties += int(differ.sum())
            pos = tv_idx[i] >= 0
            same = pos & ~differ
            assert torch.equal(ours.labels[i][same], labels[i][tv_idx[i][same]])
            assert torch.all(ours.labels[i][~pos] == NUM_CLASSES)
            # positives whose box has an exact duplicate at a higher index: the exact-tie path
            if counts[i]:
                same_box = (boxes[i][:, None] == boxes[i][None]).all(dim=2).triu(diagonal=1).any(dim=1)
                exact_duplicate_cases += int(same_box[tv_idx[i][pos]].sum())
    print(f"\n{trials} trials, {positives} torchvision positives, {float32_ties} float32-tie disagreements")
    assert positives > 10_000
    assert float32_ties > 0  # the near-duplicate boxes exercise the float32 tie path
    assert exact_duplicate_cases > 0


# ----------------------------------------------------------------------------------------------------------
# AdelaiDet conventions against a literal reference


def reference_targets(points_per_level, boxes, labels, crowd, radius, num_classes):
    """AdelaiDet's assignment rules with plain loops: per point, candidate boxes are non-crowd boxes whose centre region
    (``radius * stride`` around the box centre, clipped to the box; strict) contains the point and whose
    ``max(l, t, r, b)`` lies in the level's range, both ends inclusive; the min-area candidate wins, first
    index on ties. AdelaiDet's quirk (no positives at all when the first box's centre x is 0) is not
    reproduced."""
    ranges = [(-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8)]
    out_labels, out_reg, out_idx = [], [], []
    for level, pts in enumerate(points_per_level):
        stride = STRIDES[level]
        lo, hi = ranges[level]
        for x, y in pts.tolist():
            best, best_area = -1, None
            for m, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                if crowd[m]:
                    continue
                l, t, r, b = x - x0, y - y0, x1 - x, y1 - y
                if radius > 0:
                    cx, cy, rad = (x0 + x1) / 2, (y0 + y1) / 2, radius * stride
                    sx0, sy0 = max(cx - rad, x0), max(cy - rad, y0)
                    sx1, sy1 = min(cx + rad, x1), min(cy + rad, y1)
                    inside = min(x - sx0, y - sy0, sx1 - x, sy1 - y) > 0
                else:
                    inside = min(l, t, r, b) > 0
                in_range = lo <= max(l, t, r, b) <= hi
                area = (x1 - x0) * (y1 - y0)
                if inside and in_range and (best_area is None or area < best_area):
                    best, best_area = m, area
            out_idx.append(best)
            if best < 0:
                out_labels.append(num_classes)
                out_reg.append([0.0] * 4)
            else:
                x0, y0, x1, y1 = boxes[best].tolist()
                out_labels.append(int(labels[best]))
                out_reg.append([(x - x0) / stride, (y - y0) / stride, (x1 - x) / stride, (y1 - y) / stride])
    return torch.tensor(out_labels), torch.tensor(out_reg, dtype=torch.float64), torch.tensor(out_idx)


def grid_boxes(rng: random.Random, num: int, height: int, width: int) -> torch.Tensor:
    """Boxes on a 0.5 px grid (exact in float32, so float32 and Python float agree on every comparison), with
    some whose largest distance from a point is exactly a range boundary."""
    boxes = []
    for _ in range(num):
        if rng.random() < 0.3:  # a box around a level-l point with max(l, t, r, b) == a boundary
            level = rng.randrange(4)
            stride, bound = STRIDES[level], SIZES[level]
            px = stride * rng.randrange(max(1, width // stride)) + stride // 2
            py = stride * rng.randrange(max(1, height // stride)) + stride // 2
            near = [rng.randrange(1, 2 * stride) / 2 for _ in range(3)]
            l, t, r, b = bound, *near
            sides = [l, t, r, b]
            rng.shuffle(sides)
            boxes.append([px - sides[0], py - sides[1], px + sides[2], py + sides[3]])
        else:
            w = rng.randrange(2, 2 * width) / 2
            h = rng.randrange(2, 2 * height) / 2
            x0 = rng.randrange(0, int(2 * (width - w)) + 1) / 2
            y0 = rng.randrange(0, int(2 * (height - h)) + 1) / 2
            boxes.append([x0, y0, x0 + w, y0 + h])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


@pytest.mark.parametrize("radius", [1.5, 0.0])
def test_adelaidet_matches_reference(radius):
    rng = random.Random(1)
    assigner = TargetAssigner(STRIDES, SIZES, center_sampling_radius=radius, inclusive_ranges=True)
    on_boundary = positives = 0
    for trial in range(24):
        height, width = [(128, 128), (128, 256), (256, 128), (256, 256)][trial % 4]
        batch = rng.choice([1, 2, 3])
        counts = [rng.choice([0, rng.randint(1, 4), rng.randint(1, 10)]) for _ in range(batch)]
        if trial == 0:
            counts = [0, 5, 0]  # a batch mixing empty and non-empty images
        boxes = [grid_boxes(rng, n, height, width) for n in counts]
        labels = [torch.randint(0, NUM_CLASSES, (n,)) for n in counts]
        crowd = [torch.rand(n) < 0.2 for n in counts]
        points = make_points([(height // s, width // s) for s in STRIDES], STRIDES, 0.5, "cpu")
        ours = assigner(points, boxes, labels, NUM_CLASSES, gt_crowd=crowd)
        for i in range(batch):
            ref_labels, ref_reg, ref_idx = reference_targets(
                points, boxes[i], labels[i], crowd[i].tolist(), radius, NUM_CLASSES
            )
            assert torch.equal(ours.matched_idx[i], ref_idx), f"trial {trial} image {i}"
            assert torch.equal(ours.labels[i], ref_labels)
            torch.testing.assert_close(ours.reg_targets[i].double(), ref_reg, rtol=0, atol=1e-6)
            if counts[i] == 0:
                assert torch.all(ours.matched_idx[i] == -1) and torch.all(ours.reg_targets[i] == 0)
            if crowd[i].any():
                assert not torch.isin(ours.matched_idx[i], crowd[i].nonzero().flatten()).any()
            pos = ref_idx >= 0
            positives += int(pos.sum())
            full = torch.cat(points)[pos]
            chosen = boxes[i][ref_idx[pos]]
            ltrb = torch.cat((full - chosen[:, :2], chosen[:, 2:] - full), dim=1)
            on_boundary += int(torch.isin(ltrb.amax(dim=1), torch.tensor([64.0, 128.0, 256.0])).sum())
    assert positives > 200
    assert on_boundary > 0  # positives whose max distance is exactly a range end: inclusiveness is exercised


def test_inclusive_range_boundaries():
    """Hand-made: max(l, t, r, b) == 64 is positive at P3 (upper end) and at P4 (lower end), only when the
    ranges are inclusive."""
    points = make_points([(256 // s, 256 // s) for s in STRIDES], STRIDES, 0.5, "cpu")
    flat = torch.cat(points)
    # P3 point (68, 68): box with l = 64, r = 64, t = b = 40 -> max 64, centre (68, 68)
    # P4 point (72, 72): box with l = t = 64, r = b = 60 -> max 64, centre (70, 70), 2 px from the point
    boxes = [torch.tensor([[4.0, 28.0, 132.0, 108.0]]), torch.tensor([[8.0, 8.0, 132.0, 132.0]])]
    labels = [torch.tensor([3]), torch.tensor([5])]
    p3 = int(((flat[:1024] == torch.tensor([68.0, 68.0])).all(dim=1)).nonzero())
    p4 = 1024 + int(((flat[1024:1280] == torch.tensor([72.0, 72.0])).all(dim=1)).nonzero())
    inclusive = TargetAssigner(STRIDES, SIZES, 1.5, inclusive_ranges=True)(points, boxes, labels, NUM_CLASSES)
    strict = TargetAssigner(STRIDES, SIZES, 1.5, inclusive_ranges=False)(points, boxes, labels, NUM_CLASSES)
    assert inclusive.labels[0, p3] == 3 and strict.labels[0, p3] == NUM_CLASSES
    assert inclusive.labels[1, p4] == 5 and strict.labels[1, p4] == NUM_CLASSES
    torch.testing.assert_close(inclusive.reg_targets[0, p3], torch.tensor([8.0, 5.0, 8.0, 5.0]))
    torch.testing.assert_close(inclusive.reg_targets[1, p4], torch.tensor([4.0, 4.0, 3.75, 3.75]))


def test_crowd_boxes_are_never_positive():
    points = make_points([(128 // s, 128 // s) for s in STRIDES], STRIDES, 0.5, "cpu")
    box = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
    labels = [torch.tensor([2])]
    assigner = TargetAssigner(STRIDES, SIZES)
    normal = assigner(points, [box], labels, NUM_CLASSES, gt_crowd=[torch.tensor([False])])
    crowd = assigner(points, [box], labels, NUM_CLASSES, gt_crowd=[torch.tensor([True])])
    assert (normal.labels == 2).sum() > 0
    assert torch.all(crowd.labels == NUM_CLASSES) and torch.all(crowd.matched_idx == -1)
    # a crowd box nested in a normal one: the points go to the normal box, not to background
    nested = torch.tensor([[10.0, 10.0, 60.0, 50.0], [20.0, 15.0, 50.0, 45.0]])
    both = assigner(points, [nested], [torch.tensor([2, 4])], NUM_CLASSES, gt_crowd=[torch.tensor([False, True])])
    assert torch.equal(both.matched_idx, normal.matched_idx)


def test_images_without_boxes():
    points = make_points([(128 // s, 256 // s) for s in STRIDES], STRIDES, 0.5, "cpu")
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    out = TargetAssigner(STRIDES, SIZES)(points, empty, [torch.zeros(0, dtype=torch.int64)] * 2, NUM_CLASSES)
    num_points = sum(p.shape[0] for p in points)
    assert out.labels.shape == (2, num_points) and torch.all(out.labels == NUM_CLASSES)
    assert out.reg_targets.shape == (2, num_points, 4) and torch.all(out.reg_targets == 0)
    assert torch.all(out.matched_idx == -1)


def test_chunking_gives_identical_targets():
    rng = random.Random(2)
    height, width = 128, 128
    counts = [0, 17, 40]
    boxes = [random_boxes(rng, n, height, width) for n in counts]
    labels = [torch.randint(0, NUM_CLASSES, (n,)) for n in counts]
    crowd = [torch.rand(n) < 0.1 for n in counts]
    points = make_points([(height // s, width // s) for s in STRIDES], STRIDES, 0.5, "cpu")
    # without centre sampling every point inside a box is a candidate: the dense, chunked path
    tiny = TargetAssigner(STRIDES, SIZES, 0.0, chunk_elements=1)(points, boxes, labels, NUM_CLASSES, crowd)
    odd = TargetAssigner(STRIDES, SIZES, 0.0, chunk_elements=13 * 3 * 40)(points, boxes, labels, NUM_CLASSES, crowd)
    huge = TargetAssigner(STRIDES, SIZES, 0.0, chunk_elements=1 << 40)(points, boxes, labels, NUM_CLASSES, crowd)
    assert (huge.matched_idx >= 0).sum() > 30
    for a, b in ((tiny, huge), (odd, huge)):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.matched_idx, b.matched_idx)
        assert torch.equal(a.reg_targets, b.reg_targets)


def test_crowded_image_with_ties_matches_reference():
    """Many small, overlapping boxes (exact duplicates and equal areas included): every point's centre-region
    candidates collide, so the min-area, first-index rule decides most positives."""
    rng = random.Random(3)
    height, width = 128, 128
    base = grid_boxes(rng, 60, height, width)
    shifted = base[:30] + torch.tensor([4.0, 0.0, 4.0, 0.0])  # same areas, shifted by half a P3 cell
    boxes = torch.cat((base, base[:20], shifted)).clamp(max=127.5)  # base[:20] again: exact duplicates
    labels = torch.randint(0, NUM_CLASSES, (len(boxes),))
    crowd = torch.rand(len(boxes)) < 0.1
    crowd[:20] = crowd[60:80] = False
    points = make_points([(height // s, width // s) for s in STRIDES], STRIDES, 0.5, "cpu")
    ours = TargetAssigner(STRIDES, SIZES)(points, [boxes], [labels], NUM_CLASSES, gt_crowd=[crowd])
    ref_labels, ref_reg, ref_idx = reference_targets(points, boxes, labels, crowd.tolist(), 1.5, NUM_CLASSES)
    assert (ref_idx >= 0).sum() > 50
    assert torch.isin(ref_idx, torch.arange(60, 80)).sum() == 0  # duplicates never beat their earlier twin
    assert torch.equal(ours.matched_idx[0], ref_idx)
    assert torch.equal(ours.labels[0], ref_labels)
    torch.testing.assert_close(ours.reg_targets[0].double(), ref_reg, rtol=0, atol=1e-6)


def test_points_must_be_full_grids():
    points = make_points([(128 // s, 128 // s) for s in STRIDES], STRIDES, 0.5, "cpu")
    points[0] = points[0][1:]  # a level with one point missing
    boxes, labels = [torch.tensor([[10.0, 10.0, 60.0, 50.0]])], [torch.tensor([1])]
    with pytest.raises(ValueError, match="stride 8 are not a full row-major grid"):
        TargetAssigner(STRIDES, SIZES)(points, boxes, labels, NUM_CLASSES)


def test_grid_check_is_per_points_tensor_and_survives_pickling():
    """The grid check runs once per points tensor (cached by identity): a different tensor of the same shape
    that is not a grid is still refused, and the assigner pickles (DDP spawn) with its cache dropped."""
    assigner = TargetAssigner(STRIDES, SIZES)
    points = make_points([(128 // s, 128 // s) for s in STRIDES], STRIDES, 0.5, "cpu")
    boxes, labels = [torch.tensor([[10.0, 10.0, 60.0, 50.0]])], [torch.tensor([1])]
    first = assigner(points, boxes, labels, NUM_CLASSES)
    assert torch.equal(assigner(points, boxes, labels, NUM_CLASSES).matched_idx, first.matched_idx)
    shuffled = list(points)
    shuffled[0] = points[0].flip(0)  # same shape and values, decreasing x and y
    with pytest.raises(ValueError, match="stride 8 are not a full row-major grid"):
        assigner(shuffled, boxes, labels, NUM_CLASSES)
    restored = pickle.loads(pickle.dumps(assigner))
    assert torch.equal(restored(points, boxes, labels, NUM_CLASSES).matched_idx, first.matched_idx)
