import pickle

import pytest
import torch
from torchvision import tv_tensors

from fcos_lightning.data import Collator


def _sample(h: int, w: int, n_boxes: int, image_id: int, orig=(0, 0)) -> dict:
    img = torch.randint(1, 256, (3, h, w), dtype=torch.uint8)  # no zeros, so padding is recognisable
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).repeat(n_boxes, 1)
    return {
        "image": tv_tensors.Image(img),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(n_boxes, dtype=torch.int64),
        "image_id": image_id,
        "orig_size": orig,
    }


def test_pads_to_multiple_of_32_and_carries_sizes():
    samples = [_sample(50, 70, 2, 11, (100, 140)), _sample(64, 33, 0, 22, (128, 66))]
    batch = Collator(32)(samples)
    assert set(batch) == {"images", "image_sizes", "orig_sizes", "image_ids", "targets"}
    images = batch["images"]
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 96)
    assert type(images) is torch.Tensor
    for i, s in enumerate(samples):
        h, w = s["image"].shape[-2:]
        assert torch.equal(images[i, :, :h, :w], s["image"])
        assert images[i, :, h:, :].sum() == 0 and images[i, :, :, w:].sum() == 0
    assert batch["image_sizes"].dtype == torch.int64 and batch["image_sizes"].tolist() == [[50, 70], [64, 33]]
    assert batch["orig_sizes"].dtype == torch.int64 and batch["orig_sizes"].tolist() == [
        [100, 140],
        [128, 66],
    ]
    assert batch["image_ids"].dtype == torch.int64 and batch["image_ids"].tolist() == [11, 22]


def test_targets_are_plain_tensors_and_empty_ones_have_shape_0_4():
    batch = Collator()([_sample(32, 32, 3, 1), _sample(32, 32, 0, 2)])
    t0, t1 = batch["targets"]
    assert type(t0["boxes"]) is torch.Tensor and type(t0["labels"]) is torch.Tensor
    assert t0["boxes"].dtype == torch.float32 and t0["boxes"].shape == (3, 4)
    assert t0["labels"].dtype == torch.int64 and t0["labels"].tolist() == [0, 1, 2]
    assert t1["boxes"].shape == (0, 4) and t1["labels"].shape == (0,)
    assert batch["images"].shape == (2, 3, 32, 32)  # already a multiple: no extra padding


def test_size_divisibility_zero_pads_to_batch_max_only():
    batch = Collator(0)([_sample(50, 70, 1, 1), _sample(61, 33, 1, 2)])
    assert batch["images"].shape == (2, 3, 61, 70)


def test_picklable_and_rejects_other_image_dtypes():
    clone = pickle.loads(pickle.dumps(Collator(128)))
    assert clone([_sample(10, 200, 1, 1)])["images"].shape == (1, 3, 128, 256)
    resized = _sample(10, 10, 1, 1)  # a torchvision-style resize gives float32 0-255: kept, padded with 0
    resized["image"] = resized["image"].float() + 0.5
    images = Collator(32)([resized])["images"]
    assert images.dtype == torch.float32 and torch.equal(images[0, :, :10, :10], resized["image"])
    assert not images[0, :, 10:].any() and not images[0, :, :, 10:].any()
    bad = _sample(10, 10, 1, 1)
    bad["image"] = bad["image"].double()
    with pytest.raises(ValueError, match="uint8 or float32 .*torch.float64"):
        Collator()([bad])
