"""A tiny hand-made COCO dataset whose every quirk has a known expected outcome.

Categories are listed unsorted with non-contiguous ids: 3 "cat" -> label 0, 7 "dog" -> 1, 11 "bird" -> 2.

==========  =======  ==========  ===============================================================
image id    (h, w)   file        annotations (id: category, COCO xywh) -> expected target
==========  =======  ==========  ===============================================================
11          40x60    RGB PNG     1: 7 [5,6,20,10] -> [5,6,25,16]; 2: crowd; 3: 11 [50,30,20,20]
                                 -> clipped [50,30,60,40]
22          60x40    RGB JPEG    4: 3 w=0.5 -> dropped; 5: 3 [-5,50,10,10] -> [0,50,5,60];
                                 6: 11 [45,5,10,10] -> outside, dropped
33          32x32    gray PNG    7: 7 [4,4,8,8]
44          24x36    RGBA PNG    8: 11 [1,1,10,10]
55          30x30    palette     9: 7 [2,2,5,5]
66          20x20    RGB PNG     none (negative)
77          20x30    RGB PNG     10: crowd only (negative in training)
==========  =======  ==========  ===============================================================
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CATEGORIES = [{"id": 11, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
# id, (h, w), PIL mode, extension
IMAGES = [
    (11, (40, 60), "RGB", "png"),
    (22, (60, 40), "RGB", "jpg"),
    (33, (32, 32), "L", "png"),
    (44, (24, 36), "RGBA", "png"),
    (55, (30, 30), "P", "png"),
    (66, (20, 20), "RGB", "png"),
    (77, (20, 30), "RGB", "png"),
]
# id, image id, category id, bbox, iscrowd
ANNOTATIONS = [
    (1, 11, 7, [5, 6, 20, 10], 0),
    (2, 11, 3, [0, 0, 30, 30], 1),
    (3, 11, 11, [50, 30, 20, 20], 0),
    (4, 22, 3, [10, 10, 0.5, 20], 0),
    (5, 22, 3, [-5, 50, 10, 10], 0),
    (6, 22, 11, [45, 5, 10, 10], 0),
    (7, 33, 7, [4, 4, 8, 8], 0),
    (8, 44, 11, [1, 1, 10, 10], 0),
    (9, 55, 7, [2, 2, 5, 5], 0),
    (10, 77, 3, [0, 0, 10, 10], 1),
]


@dataclass
class SmallCoco:
    root: Path
    ann_file: str
    img_dir: str
    data: dict

    def write(self, data: dict, name: str = "modified.json") -> str:
        """Write another annotation file (e.g. a changed ``copy.deepcopy(self.data)``); return its path."""
        path = self.root / name
        path.write_text(json.dumps(data))
        return str(path)

    def file_of(self, image_id: int) -> Path:
        name = next(im["file_name"] for im in self.data["images"] if im["id"] == image_id)
        return Path(self.img_dir) / name


def _write_image(path: Path, h: int, w: int, mode: str, rng: np.random.Generator) -> None:
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8)).convert("P")
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    else:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr)  # mode inferred: L, RGB, RGBA
        assert img.mode == mode
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)


@pytest.fixture
def small_coco(tmp_path: Path) -> SmallCoco:
    """The dataset in the module docstring, written under ``tmp_path``."""
    rng = np.random.default_rng(0)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images = []
    for image_id, (h, w), mode, ext in IMAGES:
        name = f"img_{image_id}.{ext}"
        _write_image(img_dir / name, h, w, mode, rng)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    annotations = [
        {
            "id": ann_id,
            "image_id": image_id,
            "category_id": cat,
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": crowd,
        }
        for ann_id, image_id, cat, bbox, crowd in ANNOTATIONS
    ]
    data = {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    return SmallCoco(root=tmp_path, ann_file=str(ann_file), img_dir=str(img_dir), data=data)
