import pickle

import pytest
import torch
from torchvision import tv_tensors

from fcos_lightning.data import ResizeShortestEdge, build_test_transforms, build_train_transforms


def _sample(h: int, w: int, boxes, labels=None) -> dict:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {
        "image": tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(len(boxes)) if labels is None else torch.tensor(labels),
        "image_id": 7,
        "orig_size": (h, w),
    }


# (h, w, short side, max size) -> expected (h, w), worked out by hand with detectron2's rule
@pytest.mark.parametrize(
    ("h", "w", "short", "max_size", "expected"),
    [
        (480, 640, 800, 1333, (800, 1067)),  # 640 * 800/480 = 1066.67
        (640, 480, 800, 1333, (1067, 800)),
        (427, 640, 800, 1333, (800, 1199)),  # 1199.06
        (100, 400, 800, 1333, (333, 1333)),  # long side capped: 800 * 1333/3200 = 333.25
        (400, 100, 800, 1333, (1333, 333)),
        (500, 500, 600, 1000, (600, 600)),
        (256, 320, 224, 400, (224, 280)),
        (1000, 3000, 800, 1333, (444, 1333)),  # 444.33
    ],
)
def test_output_shape_follows_detectron2(h, w, short, max_size, expected):
    assert ResizeShortestEdge.get_output_shape(h, w, short, max_size) == expected
    out = ResizeShortestEdge((short,), max_size, sample=False)(_sample(h, w, [[0, 0, 10, 10]]))
    assert tuple(out["image"].shape[-2:]) == expected
    assert out["boxes"].canvas_size == expected


@pytest.mark.parametrize(("h", "w", "short", "max_size"), [(1024, 1280, 800, 1333), (1280, 720, 320, 512),
                                                          (427, 640, 800, 1333), (100, 400, 800, 1333)])  # fmt: skip
def test_torchvision_style_resizes_as_torchvision(h, w, short, max_size):
    """Same size and, on the 0-255 float image, the same pixels as torchvision's detection transform (which
    normalizes first: bilinear weights sum to 1, so resize and normalization commute up to rounding)."""
    from torchvision.models.detection.transform import _resize_image_and_masks

    sample = _sample(h, w, [[10, 20, 50, 60]])
    out = ResizeShortestEdge((short,), max_size, sample=False, style="torchvision")(sample)
    theirs, _ = _resize_image_and_masks(sample["image"].as_subclass(torch.Tensor).float(), short, max_size)
    assert out["image"].dtype == torch.float32 and out["image"].shape == theirs.shape
    assert ResizeShortestEdge.get_output_shape(h, w, short, max_size, "torchvision") == tuple(theirs.shape[-2:])
    assert torch.equal(out["image"].as_subclass(torch.Tensor), theirs)
    ratio = torch.tensor([theirs.shape[-1] / w, theirs.shape[-2] / h] * 2)  # torchvision's resize_boxes
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor)[0], torch.tensor([10.0, 20, 50, 60]) * ratio)
    antialiased = ResizeShortestEdge((short,), max_size, sample=False)(sample)["image"]
    assert antialiased.dtype == torch.uint8


def test_unknown_resize_style_is_refused():
    with pytest.raises(ValueError, match="resize style must be one of .*'detectron2', 'torchvision'.*'pil'"):
        ResizeShortestEdge((10,), 100, sample=False, style="pil")


def test_resize_scales_boxes_and_passes_other_keys_through():
    sample = _sample(40, 60, [[6, 4, 30, 20], [0, 0, 60, 40]], labels=[2, 0])
    out = ResizeShortestEdge((80,), 1000, sample=False)(sample)
    assert out["image"].shape == (3, 80, 120) and out["image"].dtype == torch.uint8
    assert isinstance(out["image"], tv_tensors.Image)
    assert isinstance(out["boxes"], tv_tensors.BoundingBoxes)
    assert out["boxes"].tolist() == [[12, 8, 60, 40], [0, 0, 120, 80]]
    assert out["labels"].tolist() == [2, 0]
    assert out["image_id"] == 7 and out["orig_size"] == (40, 60)


def test_sampling_draws_from_min_sizes_and_fixed_mode_uses_the_first():
    t = ResizeShortestEdge((20, 30, 40), 1000, sample=True)
    torch.manual_seed(0)
    shorts = {int(t(_sample(10, 20, [[0, 0, 5, 5]]))["image"].shape[-2]) for _ in range(40)}
    assert shorts == {20, 30, 40}
    fixed = ResizeShortestEdge((20, 30, 40), 1000, sample=False)
    assert {int(fixed(_sample(10, 20, [[0, 0, 5, 5]]))["image"].shape[-2]) for _ in range(5)} == {20}


def test_hflip_mirrors_boxes_and_image():
    sample = _sample(40, 60, [[5, 6, 25, 16], [50, 30, 60, 40]], labels=[1, 2])
    out = build_train_transforms((40,), 1000, hflip_prob=1.0)(sample)  # scale 1: only the flip acts
    assert torch.equal(out["image"], sample["image"].flip(-1))
    # x0' = W - x1, x1' = W - x0
    assert out["boxes"].tolist() == [[35, 6, 55, 16], [0, 30, 10, 40]]
    assert out["labels"].tolist() == [1, 2]


def test_sanitize_drops_small_boxes_and_keeps_labels_aligned():
    boxes = [[0, 0, 10, 10], [5, 5, 5.5, 20], [20, 20, 30, 35], [55, 10, 70, 20], [70, 0, 80, 10]]
    sample = _sample(40, 60, boxes, labels=[0, 1, 2, 1, 0])
    out = build_train_transforms((40,), 1000, hflip_prob=0.0)(sample)
    # the 0.5 px wide box goes; the box sticking out is clamped to x1 = 60; the box fully outside goes
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 35], [55, 10, 60, 20]]
    assert out["labels"].tolist() == [0, 2, 1]


def test_sanitize_after_downscaling_can_empty_a_sample():
    out = build_train_transforms((10,), 1000, hflip_prob=0.0)(_sample(100, 100, [[0, 0, 5, 5]], labels=[1]))
    assert out["image"].shape == (3, 10, 10)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_test_transforms_resize_only():
    t = build_test_transforms(20, 25)
    out = t(_sample(40, 60, [[6, 4, 30, 20]]))
    assert out["image"].shape == (3, 17, 25)  # short 20 -> long 30 > 25 -> scale 25/60
    assert out["boxes"].shape == (1, 4)
    assert torch.allclose(out["boxes"], torch.tensor([[6, 4, 30, 20]]) * torch.tensor([25 / 60, 17 / 40] * 2))


def test_pipelines_pickle_for_dataloader_workers():
    for t in (build_train_transforms((32, 48), 100), build_test_transforms(32, 100)):
        clone = pickle.loads(pickle.dumps(t))
        out = clone(_sample(40, 60, [[6, 4, 30, 20]]))
        assert out["image"].shape[-2] in (32, 48)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ResizeShortestEdge((), 100, sample=True)
    with pytest.raises(ValueError):
        ResizeShortestEdge((10,), 0, sample=True)
