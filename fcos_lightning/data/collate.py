"""Batching of variable-size detection samples: one padded uint8 batch, targets kept per image.

Images are zero-padded bottom/right to a common size divisible by the FPN's largest stride, as detectron2's
``ImageList.from_tensors`` does; each image's valid size is carried so the model can ignore the padding and
map detections back. Targets stay a list (never stacked: images have different box counts, possibly zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Collator", "pad_images"]


def pad_images(images: Sequence[Tensor], divisor: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``[3, H, W]`` images (uint8, or float32 0-255 from a torchvision-style resize) zero-padded bottom/right into
    a ``[B, 3, H', W']`` batch on ``device`` whose sides are multiples of ``divisor`` (no rounding for 0 or 1),
    and their ``[B, 2]`` (h, w) sizes. The batch is float32 if any image is."""
    sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.int64)
    d = max(int(divisor), 1)
    h, w = (-(-int(s) // d) * d for s in sizes.max(dim=0).values)
    dtype = torch.float32 if any(img.is_floating_point() for img in images) else torch.uint8
    batch = torch.zeros((len(images), 3, h, w), dtype=dtype, device=device)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img, non_blocking=True)
    return batch, sizes.to(device)


class Collator:
    """``DataLoader`` ``collate_fn`` (a plain class, so it pickles into worker processes).

    Output (plain tensors, lists and dicts, so Lightning moves it to the device):

    - ``images`` uint8 ``[B,3,Hp,Wp]`` (float32 0-255 after a torchvision-style resize), zero-padded bottom/right
      to multiples of ``size_divisibility``;
    - ``image_sizes`` int64 ``[B,2]``: (h, w) of each resized image before padding;
    - ``orig_sizes`` int64 ``[B,2]``: (h, w) of each decoded image before resizing;
    - ``image_ids`` int64 ``[B]``;
    - ``targets``: list of ``{"boxes": float32 [M,4] xyxy, "labels": int64 [M]}`` (``M`` may be 0);
    - ``skipped_image_ids`` int64 ``[K]``, only when samples carry it (``on_bad_image=skip``): the ids of
      unreadable images replaced by other samples in this batch, so the main process can count them.
    """

    def __init__(self, size_divisibility: int = 32) -> None:
        if size_divisibility < 0:
            raise ValueError(f"size_divisibility must be >= 0, got {size_divisibility}")
        self.size_divisibility = int(size_divisibility)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("Collator got an empty list of samples")
        images = [s["image"] for s in samples]
        for s, img in zip(samples, images):
            if img.dtype not in (torch.uint8, torch.float32) or img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"image id {s.get('image_id')}: expected a uint8 or float32 [3,H,W] image, got {img.dtype} "
                    f"{list(img.shape)}"
                )
        batch, image_sizes = pad_images(images, self.size_divisibility)
        targets = [
            {
                "boxes": s["boxes"].as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(s["labels"], dtype=torch.int64).reshape(-1),
            }
            for s in samples
        ]
        out = {
            "images": batch,
            "image_sizes": image_sizes,
            "orig_sizes": torch.tensor([tuple(s["orig_size"]) for s in samples], dtype=torch.int64),
            "image_ids": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.int64),
            "targets": targets,
        }
        if any("skipped_image_ids" in s for s in samples):
            skipped = [int(i) for s in samples for i in s.get("skipped_image_ids", ())]
            out["skipped_image_ids"] = torch.tensor(skipped, dtype=torch.int64)
        return out
