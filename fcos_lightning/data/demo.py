"""The built-in demo dataset: synthetic COCO-format images a small detector learns from scratch on a CPU.

Three classes with non-contiguous category ids, each told apart by both colour and shape: red filled squares
(id 2), green filled discs (id 5) and blue rings (id 9), on a plain or mildly noisy background. Every box is
exact (shapes are integer-aligned and touch all four sides of their box). Object sizes run from 16 to 180 px,
log-uniformly, so they land on P3..P5 at the default sizes of interest. About 10% of the images have no object
and about a quarter are portrait (``image_size`` transposed), so empty images and aspect-ratio grouping are
exercised. Each split has exactly one crowd annotation (``iscrowd=1``) around a cluster of tiny discs. Images
alternate JPEG (quality 95) and PNG.

Generation is deterministic (a ``torch.Generator`` per split seeded from ``seed``) and idempotent: a stamp
file records the parameters and a second call with the same ones returns at once. Run it once (e.g. from
``prepare_data`` on rank 0) before several processes read the files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torchvision.io import encode_jpeg, encode_png

from fcos_lightning.files import write_json_atomic
from .coco import CategoryMap
from .decode import quiet_tv_io

__all__ = ["DEMO_CATEGORIES", "demo_paths", "make_demo_dataset"]

DEMO_CATEGORIES = CategoryMap(cat_ids=(2, 5, 9), names=("square", "disc", "ring"))
"""Demo classes: labels 0, 1, 2 are category ids 2, 5, 9."""

_VERSION = 1
_COLORS = {2: (220, 40, 40), 5: (40, 190, 60), 9: (50, 80, 230)}  # red square, green disc, blue ring
_MIN_OBJ, _MAX_OBJ = 16, 180
_STAMP = ".demo_stamp.json"


def demo_paths(root: str | Path) -> dict[str, str]:
    """Where :func:`make_demo_dataset` writes under ``root``: ``{"train_ann_file", "train_img_dir",
    "val_ann_file", "val_img_dir"}`` (absolute paths)."""
    root = Path(root).absolute()
    return {
        "train_ann_file": str(root / "annotations" / "instances_train.json"),
        "train_img_dir": str(root / "train"),
        "val_ann_file": str(root / "annotations" / "instances_val.json"),
        "val_img_dir": str(root / "val"),
    }


def make_demo_dataset(
    root: str | Path,
    num_train: int = 240,
    num_val: int = 40,
    image_size: tuple[int, int] = (256, 320),
    seed: int = 0,
) -> dict[str, str]:
    """Write the demo dataset under ``root`` (or reuse it) and return its paths.

    Layout: ``root/annotations/instances_{train,val}.json`` and ``root/{train,val}/demo_*.{jpg,png}``.
    ``image_size`` is ``(h, w)`` of landscape images; portrait ones use ``(w, h)``.
    Returns ``{"train_ann_file", "train_img_dir", "val_ann_file", "val_img_dir"}`` (absolute paths).
    """
    root = Path(root).absolute()
    h, w = (int(s) for s in image_size)
    if num_train < 2 or num_val < 2:
        raise ValueError("make_demo_dataset needs at least 2 images per split")
    if min(h, w) < _MAX_OBJ + 8:
        raise ValueError(f"image_size {image_size} too small for {_MAX_OBJ}px objects")
    paths = demo_paths(root)
    params = {
        "version": _VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": [h, w],
        "seed": seed,
    }
    stamp = root / _STAMP
    if stamp.is_file() and all(Path(p).exists() for p in paths.values()):
        try:
            if json.loads(stamp.read_text()) == params:
                return paths
        except json.JSONDecodeError:
            pass
    stamp.unlink(missing_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # Ops on one small image: extra threads only add contention (10x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
            img_dir = root / split
            img_dir.mkdir(exist_ok=True)
            for old in img_dir.glob("demo_*"):
                old.unlink()
            data = _make_split(split, n, (h, w), split_seed, img_dir)
            ann_file = Path(paths[f"{split}_ann_file"])
            write_json_atomic(ann_file, data, separators=(",", ":"))
    finally:
        torch.set_num_threads(threads)
    stamp.write_text(json.dumps(params))
    return paths


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]``."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g).item())


def _shape_mask(cat_id: int, d: int) -> torch.Tensor:
    """Bool ``[d, d]`` mask of the shape; every shape touches all four sides of its ``d x d`` box."""
    if cat_id == 2:
        return torch.ones(d, d, dtype=torch.bool)
    c = torch.arange(d, dtype=torch.float32) + 0.5 - d / 2.0
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    outer = r2 <= (d / 2.0) ** 2
    if cat_id == 5:
        return outer
    thickness = max(3.0, 0.2 * d)
    return outer & (r2 > (d / 2.0 - thickness) ** 2)


def _paint(img: torch.Tensor, mask: torch.Tensor, x0: int, y0: int, color: torch.Tensor) -> None:
    d_h, d_w = mask.shape
    region = img[:, y0 : y0 + d_h, x0 : x0 + d_w]
    region.copy_(torch.where(mask, color[:, None, None], region))


def _free(boxes: list[tuple[int, int, int, int]], x0: int, y0: int, x1: int, y1: int, gap: int = 3) -> bool:
    return all(
        x0 >= bx1 + gap or x1 + gap <= bx0 or y0 >= by1 + gap or y1 + gap <= by0
        for bx0, by0, bx1, by1 in boxes
    )


def _make_split(split: str, n: int, size: tuple[int, int], seed: int, img_dir: Path) -> dict[str, Any]:
    g = torch.Generator()
    g.manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    crowd_idx = order[0]
    empty = set(order[1 : 1 + max(1, round(0.1 * n))])
    portrait = set(torch.randperm(n, generator=g)[: round(0.25 * n)].tolist())
    log_lo, log_hi = math.log(_MIN_OBJ), math.log(_MAX_OBJ)
    cat_ids = list(DEMO_CATEGORIES.cat_ids)

    images, annotations = [], []
    for i in range(n):
        h, w = size[::-1] if i in portrait else size
        image_id = 3 * (i + 1)  # non-contiguous image ids too
        base = torch.randint(70, 200, (3, 1, 1), generator=g).float()
        base = base.mean() + 0.25 * (base - base.mean())  # near-grey, slightly tinted
        if torch.rand(1, generator=g).item() < 0.5:  # plain background
            img = base.round().to(torch.uint8).expand(3, h, w).contiguous()
        else:  # mildly noisy
            img = (base + torch.randn(1, h, w, generator=g) * 3.0).clamp(0, 255).to(torch.uint8)

        boxes: list[tuple[int, int, int, int]] = []
        num_obj = 0 if i in empty else _randint(g, 1, 4)
        for _ in range(num_obj):
            cat = cat_ids[_randint(g, 0, 2)]
            d = int(round(math.exp(log_lo + (log_hi - log_lo) * torch.rand(1, generator=g).item())))
            for _try in range(30):
                x0, y0 = _randint(g, 0, w - d), _randint(g, 0, h - d)
                if _free(boxes, x0, y0, x0 + d, y0 + d):
                    break
            else:
                continue
            jitter = torch.randint(-15, 16, (3,), generator=g)
            color = (torch.tensor(_COLORS[cat]) + jitter).clamp(0, 255).to(torch.uint8)
            _paint(img, _shape_mask(cat, d), x0, y0, color)
            boxes.append((x0, y0, x0 + d, y0 + d))
            annotations.append(_ann(len(annotations) + 1, image_id, cat, x0, y0, d, d, crowd=False))

        if i == crowd_idx:  # a 3x2 cluster of 7 px discs annotated only as one crowd region
            cw, ch = 3 * 7 + 2 * 3, 2 * 7 + 3
            for _try in range(200):
                cx0, cy0 = _randint(g, 0, w - cw), _randint(g, 0, h - ch)
                if _free(boxes, cx0, cy0, cx0 + cw, cy0 + ch):
                    break
            else:
                raise RuntimeError("demo: no room for the crowd cluster")  # cannot happen at >= 188 px
            color = torch.tensor(_COLORS[5], dtype=torch.uint8)
            for r in range(2):
                for c in range(3):
                    _paint(img, _shape_mask(5, 7), cx0 + c * 10, cy0 + r * 10, color)
            annotations.append(_ann(len(annotations) + 1, image_id, 5, cx0, cy0, cw, ch, crowd=True))

        png = i % 3 == 2
        file_name = f"demo_{split}_{i:05d}.{'png' if png else 'jpg'}"
        with quiet_tv_io():
            encoded = encode_png(img) if png else encode_jpeg(img, quality=95)
        (img_dir / file_name).write_bytes(encoded.numpy().tobytes())
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})

    return {
        "info": {"description": f"fcos_lightning demo dataset ({split})", "version": str(_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c, "name": nm, "supercategory": "shape"}
            for c, nm in zip(DEMO_CATEGORIES.cat_ids, DEMO_CATEGORIES.names)
        ],
    }


def _ann(
    ann_id: int, image_id: int, cat: int, x: int, y: int, bw: int, bh: int, crowd: bool
) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": [x, y, bw, bh],
        "area": bw * bh,
        "iscrowd": int(crowd),
        "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
    }
