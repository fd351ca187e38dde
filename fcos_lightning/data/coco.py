"""COCO-format json -> detection samples.

Policy (AdelaiDet / detectron2):

- crowd annotations (``iscrowd=1``) are never targets; the model has no ignore regions, so points inside a
  crowd box are ordinary negatives. They stay in :attr:`CocoDetection.coco`, where COCOeval uses them to
  ignore matches;
- boxes are clipped to the image and boxes narrower or shorter than 1 px after clipping are dropped (counted
  and logged once, at construction, from the json alone);
- in training, images left without a box are removed when ``filter_empty`` (detectron2's
  ``FILTER_EMPTY_ANNOTATIONS``) or kept as negatives otherwise; evaluation keeps every image;
- category ids need not be contiguous: :class:`CategoryMap` maps the k-th smallest ``category_id`` to
  label ``k``.

Per-image boxes live in a few flat numpy arrays rather than a list of dicts, so forked DataLoader workers do
not copy the annotation set page by page (Python refcounts touch every object they read).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision import tv_tensors

from .schema import CocoTables, check_coco, is_crowd
from .validate import check_image_files
from .decode import BadImageError, ImageSizeMismatchError, decode_image_file, size_mismatch_message

logger = logging.getLogger("fcos_lightning.data")

__all__ = ["ON_BAD_IMAGE", "CategoryMap", "CocoDetection", "load_coco_json", "read_coco_categories", "read_image"]

OnBadImage = Literal["error", "skip"]
ON_BAD_IMAGE = get_args(OnBadImage)


@dataclass(frozen=True)
class CategoryMap:
    """Bijection between dataset ``category_id`` values and contiguous labels ``0..C-1``.

    ``cat_ids`` are strictly increasing, so label ``k`` is the k-th smallest id (detectron2's convention).
    Stored in checkpoints as :meth:`to_dict` so predictions can be written with the original ids and names.
    """

    cat_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        cat_ids = tuple(int(c) for c in self.cat_ids)
        names = tuple(str(n) for n in self.names)
        if len(cat_ids) != len(names):
            raise ValueError(f"CategoryMap: {len(cat_ids)} cat_ids but {len(names)} names")
        if not cat_ids:
            raise ValueError("CategoryMap: no categories")
        if any(a >= b for a, b in zip(cat_ids, cat_ids[1:])):
            raise ValueError(f"CategoryMap: cat_ids must be unique and sorted ascending, got {list(cat_ids)}")
        object.__setattr__(self, "cat_ids", cat_ids)
        object.__setattr__(self, "names", names)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes ``C`` (no background class)."""
        return len(self.cat_ids)

    @cached_property
    def _label_of(self) -> dict[int, int]:
        return {c: k for k, c in enumerate(self.cat_ids)}

    @cached_property
    def _cat_id_table(self) -> torch.Tensor:
        return torch.tensor(self.cat_ids, dtype=torch.int64)

    def to_contiguous(self, cat_id: int) -> int:
        """Dataset ``category_id`` -> label in ``0..C-1``; KeyError for an unknown id."""
        try:
            return self._label_of[int(cat_id)]
        except KeyError:
            raise KeyError(f"category_id {cat_id} is not one of {list(self.cat_ids)}") from None

    def to_cat_id(self, label: int) -> int:
        """Label in ``0..C-1`` -> dataset ``category_id``."""
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise IndexError(f"label {label} out of range 0..{self.num_classes - 1}")
        return self.cat_ids[label]

    def labels_to_cat_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Vectorised :meth:`to_cat_id`: int64 tensor of the same shape and device as ``labels``."""
        return self._cat_id_table.to(labels.device)[labels.long()]

    def to_dict(self) -> dict[str, list]:
        """Plain ``{"cat_ids": [...], "names": [...]}``; safe for ``torch.load(weights_only=True)``."""
        return {"cat_ids": list(self.cat_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence]) -> CategoryMap:
        """Inverse of :meth:`to_dict`."""
        return cls(cat_ids=tuple(d["cat_ids"]), names=tuple(d["names"]))

    @classmethod
    def from_categories(cls, categories: Sequence[Mapping[str, Any]], source: str = "categories") -> CategoryMap:
        """From a COCO ``categories`` list (any order); duplicate ids are an error."""
        try:
            pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed 'categories' entry ({e!r})") from e
        ids = [p[0] for p in pairs]
        dup = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
        if dup:
            raise ValueError(f"{source}: duplicate category ids {dup}")
        if not pairs:
            raise ValueError(f"{source}: 'categories' is empty")
        return cls(cat_ids=tuple(ids), names=tuple(p[1] for p in pairs))

    @classmethod
    def from_coco_json(cls, ann_file: str | os.PathLike) -> CategoryMap:
        """Categories of a COCO annotation file, sorted by id (see :func:`read_coco_categories`)."""
        return cls.from_categories(read_coco_categories(ann_file), source=os.fspath(ann_file))


def load_coco_json(ann_file: str | os.PathLike) -> dict:
    """Parse a COCO annotation file; FileNotFoundError / ValueError name the file."""
    ann_file = os.fspath(ann_file)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}: not valid json ({e})") from e
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{ann_file}: not a COCO annotation file (expected an object with an 'images' list)")
    return data


_CATEGORIES_KEY = re.compile(rb'"categories"\s*:\s*')


def read_coco_categories(ann_file: str | os.PathLike) -> list[dict]:
    """The ``categories`` list of a COCO annotation file.

    COCO train's json is ~450 MB and takes seconds to parse, so this only decodes the ``categories`` value
    when the key occurs exactly once in the file (a ``"categories":`` match cannot lie inside a json string,
    whose quotes are escaped, so a single match is the top-level key). Otherwise it parses the whole file.
    """
    ann_file = os.fspath(ann_file)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    with open(ann_file, "rb") as f:
        raw = f.read()
    matches = list(itertools.islice(_CATEGORIES_KEY.finditer(raw), 2))
    if len(matches) == 1:
        start, chunk = matches[0].end(), 1 << 20
        while True:
            text = raw[start : start + chunk].decode("utf-8", errors="ignore")
            try:
                value, _ = json.JSONDecoder().raw_decode(text)
            except json.JSONDecodeError:
                if start + chunk >= len(raw):
                    break
                chunk *= 4
                continue
            if isinstance(value, list):
                return value
            break
    data = load_coco_json(ann_file)
    if "categories" not in data:
        raise ValueError(f"{ann_file}: no 'categories' key")
    return data["categories"]


def read_image(path: str, image_id: int | None = None) -> torch.Tensor:
    """Decode ``path`` to uint8 RGB ``[3,H,W]`` (EXIF orientation applied; gray/RGBA/palette/CMYK/16-bit ->
    RGB); :class:`~fcos_lightning.data.decode.BadImageError` names the file (and the image id when given)."""
    return decode_image_file(path, image_id)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset returning uint8 images and ``xyxy`` boxes with contiguous labels.

    Each sample is ``{"image": tv_tensors.Image uint8 [3,H,W], "boxes": tv_tensors.BoundingBoxes float32
    [M,4] XYXY, "labels": int64 [M], "image_id": int, "orig_size": (h, w)}`` before ``transforms`` (a
    callable taking and returning that dict, e.g. a ``v2.Compose``). Crowd boxes are never among the targets,
    in either mode; ``train`` only decides whether images without targets are removed (module docstring).
    """

    def __init__(
        self,
        ann_file: str,
        img_dir: str,
        transforms: Callable | None = None,
        train: bool = False,
        filter_empty: bool = True,
        on_bad_image: OnBadImage = "error",
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {list(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        self.ann_file = os.fspath(ann_file)
        self.img_dir = os.fspath(img_dir)
        if not os.path.isfile(self.ann_file):
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}")
        if not os.path.isdir(self.img_dir):
            raise FileNotFoundError(f"image directory not found: {self.img_dir}")
        self.transforms = transforms
        self.train = bool(train)
        self.filter_empty = bool(filter_empty)

        data = load_coco_json(self.ann_file)
        tables = check_coco(data)
        if tables.errors:
            raise ValueError(f"{self.ann_file}: {tables.errors[0].first()}")
        names = tables.categories
        self.category_map = CategoryMap(cat_ids=tuple(sorted(names)), names=tuple(names[c] for c in sorted(names)))
        data.setdefault("annotations", [])
        self._index(tables)
        self._check_files()
        # The json dict is large (COCO train: ~1 GB as Python objects); keep it only for evaluation.
        self._coco: COCO | None = self._make_coco(data) if not self.train else None

    # ------------------------------------------------------------------ construction
    def _check_files(self) -> None:
        """Fail at start, not hours into a run, when image files are missing (one directory listing per folder),
        unreadable or of another size than the json says (swapped width/height included; image headers read in
        threads). With ``on_bad_image=skip`` they are logged here and skipped when drawn."""
        listings: dict[str, set[str] | None] = {}
        missing = []
        for idx, name in enumerate(self._file_names.tolist()):
            folder, base = os.path.split(name)
            if folder not in listings:
                path = os.path.join(self.img_dir, folder)
                listings[folder] = set(os.listdir(path)) if os.path.isdir(path) else None
            if listings[folder] is None or base not in listings[folder]:
                missing.append(idx)
        if missing:
            self._missing_files(missing)
        present = np.setdiff1d(np.arange(len(self)), missing)
        images = {int(self._img_ids[i]): self.img_info(int(i)) for i in present}
        problems = check_image_files(images, self.img_dir, "header", num_workers=min(8, os.cpu_count() or 1))
        if not problems:
            return
        shown = "; ".join(d for p in problems for d in p.details[:3])
        count = sum(p.count for p in problems)
        message = f"{self.ann_file}: {count} images unreadable or not of the json's size: {shown}"
        if self.on_bad_image == "error":
            hint = "data.on_bad_image=skip skips them" if self.train else "validation scores every image: fix them"
            raise ValueError(f"{message} ({hint})")
        logger.warning("%s; on_bad_image=skip: they will be skipped", message)

    def _missing_files(self, missing: list[int]) -> None:
        shown = ", ".join(
            f"{os.path.join(self.img_dir, str(self._file_names[i]))} (image id {int(self._img_ids[i])})"
            for i in missing[:5]
        )
        message = f"{self.ann_file}: {len(missing)} of {len(self)} image files not found in {self.img_dir}: {shown}"
        if self.on_bad_image == "error":
            raise FileNotFoundError(
                f"{message}{', ...' if len(missing) > 5 else ''} (data.on_bad_image=skip skips them)"
            )
        logger.warning("%s; on_bad_image=skip: they will be skipped", message)

    # ------------------------------------------------------------------ construction
    def _index(self, tables: CocoTables) -> None:
        """Per-image boxes as flat arrays from the schema-checked columns (crowd and sub-pixel boxes dropped)."""
        src = self.ann_file
        img_ids, widths, heights, file_names = tables.image_ids, tables.widths, tables.heights, tables.file_names
        n_img = len(img_ids)
        ann_img, ann_cat, xywh, crowd = tables.ann_image_ids, tables.ann_category_ids, tables.bboxes, tables.iscrowd
        cmap_ids = np.asarray(self.category_map.cat_ids, dtype=np.int64)
        order = np.argsort(img_ids, kind="stable")
        ann_img_idx = order[np.searchsorted(img_ids[order], ann_img)]  # every image id is listed (schema)

        # COCO xywh -> xyxy, clipped to the json's image size.
        w_img = widths[ann_img_idx].astype(np.float64)
        h_img = heights[ann_img_idx].astype(np.float64)
        x0 = np.clip(xywh[:, 0], 0.0, w_img)
        y0 = np.clip(xywh[:, 1], 0.0, h_img)
        x1 = np.clip(xywh[:, 0] + xywh[:, 2], 0.0, w_img)
        y1 = np.clip(xywh[:, 1] + xywh[:, 3], 0.0, h_img)
        big_enough = (x1 - x0 >= 1.0) & (y1 - y0 >= 1.0)  # False for NaN too
        keep = ~crowd & big_enough
        self.num_crowd_boxes = int(crowd.sum())
        self.num_dropped_boxes = int((~crowd & ~big_enough).sum())

        kept = np.flatnonzero(keep)
        kept = kept[np.argsort(ann_img_idx[kept], kind="stable")]  # grouped by image, json order inside
        per_image = np.bincount(ann_img_idx[kept], minlength=n_img)
        offsets = np.zeros(n_img + 1, dtype=np.int64)
        np.cumsum(per_image, out=offsets[1:])
        self._boxes = np.stack([x0, y0, x1, y1], axis=1)[kept].astype(np.float32).reshape(-1, 4)
        self._labels = np.searchsorted(cmap_ids, ann_cat[kept]).astype(np.int64)

        filtering = self.train and self.filter_empty
        img_keep = np.flatnonzero(per_image > 0) if filtering else np.arange(n_img)
        self.num_removed_images = n_img - len(img_keep)
        self._starts = offsets[img_keep]
        self._ends = offsets[img_keep + 1]
        self._img_ids = img_ids[img_keep]
        self._widths = widths[img_keep]
        self._heights = heights[img_keep]
        self._file_names = np.asarray([file_names[i] for i in img_keep], dtype=np.str_)
        self.image_ids: list[int] = self._img_ids.tolist()
        self.aspect_ratios: list[float] = (self._widths / self._heights).tolist()

        msg = (
            f"{src}: {len(img_keep)} of {n_img} images ({'train' if self.train else 'eval'} mode"
            f"{', empty images removed' if filtering else ''}), {len(kept)} target boxes; not targets: "
            f"{self.num_crowd_boxes} crowd boxes, {self.num_dropped_boxes} boxes under 1 px after clipping "
            f"to the image; {self.num_removed_images} images removed for having no target box"
        )
        logger.log(logging.WARNING if self.num_dropped_boxes else logging.INFO, msg)

    @staticmethod
    def _make_coco(data: dict) -> COCO:
        # COCOeval reads 'iscrowd' (as a truth value: "0" would be crowd) and 'area'; set them as the dataset
        # reads them and fill them for hand-made files, so evaluation neither KeyErrors nor ignores wrong boxes.
        for a in data.get("annotations", []):
            a["iscrowd"] = int(bool(is_crowd(a.get("iscrowd"))))
            if "area" not in a:
                a["area"] = float(a["bbox"][2] * a["bbox"][3])
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
        return coco

    @property
    def coco(self) -> COCO:
        """pycocotools ``COCO`` over the whole json (all images, crowd annotations included), for COCOeval.

        Built at construction in eval mode; in train mode built from the file on first access.
        """
        if self._coco is None:
            self._coco = self._make_coco(load_coco_json(self.ann_file))
        return self._coco

    def __getstate__(self) -> dict:
        # DataLoader workers never evaluate; do not ship the COCO index to them (rebuilt lazily if touched).
        state = self.__dict__.copy()
        state["_coco"] = None
        return state

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._img_ids)

    def img_info(self, idx: int) -> dict[str, Any]:
        """The json's ``{"id", "file_name", "width", "height"}`` of sample ``idx``."""
        return {
            "id": int(self._img_ids[idx]),
            "file_name": str(self._file_names[idx]),
            "width": int(self._widths[idx]),
            "height": int(self._heights[idx]),
        }

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if self.on_bad_image == "error":
            return self._transformed(self.load(idx))
        skipped: list[int] = []
        for attempt in range(len(self)):
            j = (idx + attempt) % len(self)
            try:
                sample = self.load(j)
            except BadImageError as e:
                logger.warning("on_bad_image=skip: %s", e)
                skipped.append(int(self._img_ids[j]))
                continue
            sample = self._transformed(sample)
            sample["skipped_image_ids"] = skipped
            return sample
        raise BadImageError(f"{self.ann_file}: every image is unreadable (on_bad_image=skip)", self.img_dir)

    def _transformed(self, sample: dict[str, Any]) -> dict[str, Any]:
        return sample if self.transforms is None else self.transforms(sample)

    def load(self, idx: int) -> dict[str, Any]:
        """Sample ``idx`` before ``transforms``; :class:`BadImageError` if its file is unusable."""
        image_id = int(self._img_ids[idx])
        path = os.path.join(self.img_dir, str(self._file_names[idx]))
        img = read_image(path, image_id)
        h, w = int(img.shape[-2]), int(img.shape[-1])
        jh, jw = int(self._heights[idx]), int(self._widths[idx])
        if (h, w) != (jh, jw):
            raise ImageSizeMismatchError(size_mismatch_message(path, image_id, (h, w), (jh, jw)), path, image_id)
        s, e = int(self._starts[idx]), int(self._ends[idx])
        return {
            "image": tv_tensors.Image(img),
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(self._boxes[s:e].copy()), format="XYXY", canvas_size=(h, w)
            ),
            "labels": torch.from_numpy(self._labels[s:e].copy()),
            "image_id": image_id,
            "orig_size": (h, w),
        }
