"""The one COCO-format schema check, shared by the dataset (which stops at the first error) and ``validate_data``
(which reports every problem).

The schema is the structure and the references of an annotation file: an ``images`` list of entries with
integer ``id``, ``width``, ``height`` (positive) and a ``file_name``; ``categories`` with integer ``id`` and a
``name``; ``annotations`` with integer ``id``, ``image_id``, ``category_id`` and a 4-number ``bbox``; ids unique;
every annotation pointing to a listed image and category. What a box contains (NaN, zero size, outside its
image) is not schema: the dataset clips and drops such boxes, ``validate_data`` reports them
(:mod:`fcos_lightning.data.validate`).

:func:`check_coco` returns the entries that pass as columns (numpy arrays), and an :class:`Issue` per kind of
problem naming the ids concerned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MAX_IDS", "CocoTables", "Issue", "as_int", "check_coco", "is_crowd", "issue"]

MAX_IDS = 1000  # ids (and details) kept per issue; the count is always exact
SHOWN_IDS = 10  # ids shown per issue in text


@dataclass
class Issue:
    """One kind of defect in one annotation file: ``severity`` is ``error`` or ``warning``; ``ids`` the image or
    annotation ids concerned (``id_kind``), at most :data:`MAX_IDS` of ``count``; ``details`` one line each."""

    severity: str
    code: str
    message: str
    count: int = 1
    id_kind: str = ""
    ids: list[int] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def format(self) -> str:
        """The issue for a terminal report (ids and details cut at :data:`SHOWN_IDS`)."""
        text = f"[{self.severity.upper()}] {self.code}: {self.message}"
        if self.ids:
            more = f" ... (+{self.count - SHOWN_IDS})" if self.count > SHOWN_IDS else ""
            text += f"\n      {self.id_kind} ids: {self.ids[:SHOWN_IDS]}{more}"
        for d in self.details[:SHOWN_IDS]:
            text += f"\n      {d}"
        if len(self.details) > SHOWN_IDS:
            text += f"\n      ... {len(self.details) - SHOWN_IDS} more in the JSON report"
        return text

    def first(self) -> str:
        """One line naming the first offending entry, for a loader that stops at the first error."""
        if self.details:
            return f"{self.details[0]} ({self.message}; {self.count} in all)"
        if self.ids:
            more = " ..." if self.count > SHOWN_IDS else ""
            return f"{self.message}: {self.id_kind} ids {self.ids[:SHOWN_IDS]}{more}"
        return self.message


@dataclass
class CocoTables:
    """The entries of a COCO-format file that pass the schema, as columns, and the schema's issues.

    Images (first entry per id, json order): ``image_ids``, ``widths``, ``heights`` int64 ``[N]``, ``file_names``.
    Annotations of listed images and categories (json order): ``ann_ids``, ``ann_image_ids``,
    ``ann_category_ids`` int64 ``[A]``, ``bboxes`` float64 ``[A, 4]`` (COCO ``x, y, w, h``), ``iscrowd`` bool ``[A]``.
    """

    categories: dict[int, str] = field(default_factory=dict)
    image_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    widths: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    heights: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    file_names: list[str] = field(default_factory=list)
    ann_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    ann_image_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    ann_category_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    bboxes: np.ndarray = field(default_factory=lambda: np.empty((0, 4), dtype=np.float64))
    iscrowd: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def add(self, *args: Any, **kwargs: Any) -> None:
        """Record an :func:`issue`."""
        self.issues.append(issue(*args, **kwargs))


def issue(
    severity: str,
    code: str,
    message: str,
    ids: Iterable[int] = (),
    id_kind: str = "",
    details: Iterable[str] = (),
    count: int | None = None,
) -> Issue:
    """An :class:`Issue` keeping at most :data:`MAX_IDS` ids and details; ``count`` defaults to the number of
    ids (or of details, or 1)."""
    ids, details = [int(i) for i in ids], list(details)
    count = count if count is not None else len(ids) or len(details) or 1
    return Issue(severity, code, message, count, id_kind, ids[:MAX_IDS], details[:MAX_IDS])


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (integral floats included, booleans not), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def is_crowd(value: Any) -> bool | None:
    """COCO's ``iscrowd`` as meant: 0/1 numbers, booleans, or those written as strings (``"0"`` is not crowd);
    absent (None) is 0; anything else None (malformed)."""
    if value is None:
        return False
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool | int | float) and value in (0, 1):
        return bool(value)
    return None


def check_coco(data: Any) -> CocoTables:
    """The schema's issues and the entries of a parsed COCO-format file that pass it."""
    tables = CocoTables()
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        message = "not a COCO annotation file: expected an object with an 'images' list"
        tables.add("error", "annotation_file_invalid", message)
        return tables
    _categories(data.get("categories"), tables)
    _images(data["images"], tables)
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        tables.add("error", "annotations_invalid", "'annotations' is not a list")
        annotations = []
    _annotations(annotations, tables)
    return tables


def _categories(categories: Any, tables: CocoTables) -> None:
    if not isinstance(categories, list) or not categories:
        tables.add("error", "no_categories", "no 'categories' (missing or empty)")
        return
    malformed, duplicates = [], []
    for i, c in enumerate(categories):
        cid = as_int(c.get("id")) if isinstance(c, dict) else None
        if cid is None or not isinstance(c.get("name"), str):
            malformed.append(f"category #{i}: {c!r}")
            continue
        if cid in tables.categories:
            duplicates.append(cid)
        tables.categories[cid] = c["name"]
    if malformed:
        tables.add("error", "malformed_category", "category entries without an integer 'id' and a 'name'",
                   details=malformed)  # fmt: skip
    if duplicates:
        tables.add("error", "duplicate_category_id", "category ids used more than once", sorted(set(duplicates)),
                   "category")  # fmt: skip


def _images(entries: list, tables: CocoTables) -> None:
    ids, widths, heights, names = [], [], [], []
    seen: set[int] = set()
    malformed, bad_size, duplicates = [], [], []
    for i, im in enumerate(entries):
        iid = as_int(im.get("id")) if isinstance(im, dict) else None
        w = as_int(im.get("width")) if isinstance(im, dict) else None
        h = as_int(im.get("height")) if isinstance(im, dict) else None
        if iid is None or w is None or h is None or not isinstance(im.get("file_name"), str):
            if not isinstance(im, dict):
                malformed.append(f"image entry #{i}: {im!r} is not an object")
                continue
            bad = [f"{k} {im.get(k)!r}" for k, v in (("id", iid), ("width", w), ("height", h)) if v is None]
            bad += [] if isinstance(im.get("file_name"), str) else [f"file_name {im.get('file_name')!r}"]
            malformed.append(f"image entry #{i} (id={im.get('id')!r}): {', '.join(bad)}")
            continue
        if iid in seen:
            duplicates.append(iid)
            continue
        if w <= 0 or h <= 0:
            bad_size.append(iid)
        seen.add(iid)
        ids.append(iid)
        widths.append(w)
        heights.append(h)
        names.append(im["file_name"])
    tables.image_ids = np.asarray(ids, dtype=np.int64)
    tables.widths = np.asarray(widths, dtype=np.int64)
    tables.heights = np.asarray(heights, dtype=np.int64)
    tables.file_names = names
    if malformed:
        tables.add("error", "malformed_image", "image entries need integer id/width/height and a file_name",
                   details=malformed)  # fmt: skip
    if bad_size:
        tables.add("error", "image_size_invalid", "images with zero or negative width/height in the json",
                   bad_size, "image", details=[f"image id {i}" for i in bad_size])  # fmt: skip
    if duplicates:
        tables.add("error", "duplicate_image_id", "image ids used by more than one image entry",
                   sorted(set(duplicates)), "image")  # fmt: skip
    if not ids:
        tables.add("error", "no_images", "the file lists no usable image")


def _annotation_columns(anns: list) -> tuple[list[int], list[int], list[int], np.ndarray, list[bool], list[str]]:
    """``(ids, image_ids, category_ids, xywh [A, 4], iscrowd, malformed)`` of the well-formed annotations."""
    if not anns:
        return [], [], [], np.empty((0, 4), dtype=np.float64), [], []
    try:  # fast path: a well-formed file (one pass per column, no per-entry Python checks)
        cols = [[a[k] for a in anns] for k in ("id", "image_id", "category_id")]
        bboxes = [a["bbox"] for a in anns]
        crowd = [a.get("iscrowd", 0) for a in anns]
        plain = set(map(type, crowd)) <= {int} and set(crowd) <= {0, 1}
        if plain and all(set(map(type, col)) <= {int} for col in cols) and set(map(type, bboxes)) <= {list}:
            xywh = np.asarray(bboxes, dtype=np.float64).reshape(len(anns), -1)
            if xywh.shape == (len(anns), 4):
                return *cols, xywh, [c == 1 for c in crowd], []
    except (KeyError, TypeError, ValueError):
        pass
    ids, image_ids, category_ids, boxes, crowd, malformed = [], [], [], [], [], []
    for i, a in enumerate(anns):
        aid, iid, cid, bbox = (
            (as_int(a.get("id")), as_int(a.get("image_id")), as_int(a.get("category_id")), a.get("bbox"))
            if isinstance(a, dict)
            else (None, None, None, None)
        )
        if aid is None or iid is None or cid is None or not isinstance(bbox, list) or len(bbox) != 4:
            shown = a.get("id") if isinstance(a, dict) else None
            malformed.append(
                f"annotation #{i} (id={shown}) needs integer 'id', 'image_id', 'category_id' and a 4-number 'bbox'"
            )
            continue
        try:
            box = [float(v) for v in bbox]
        except (TypeError, ValueError):
            malformed.append(f"annotation #{i} (id={aid}): bbox {bbox!r} is not 4 numbers")
            continue
        crowd_flag = is_crowd(a.get("iscrowd"))
        if crowd_flag is None:
            malformed.append(f"annotation #{i} (id={aid}): iscrowd {a.get('iscrowd')!r} is not 0 or 1")
            continue
        ids.append(aid)
        image_ids.append(iid)
        category_ids.append(cid)
        boxes.append(box)
        crowd.append(crowd_flag)
    return ids, image_ids, category_ids, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), crowd, malformed


def _annotations(anns: list, tables: CocoTables) -> None:
    ids, image_ids, category_ids, xywh, crowd, malformed = _annotation_columns(anns)
    ann_ids = np.asarray(ids, dtype=np.int64)
    ann_img = np.asarray(image_ids, dtype=np.int64)
    ann_cat = np.asarray(category_ids, dtype=np.int64)
    if malformed:
        message = "malformed annotations (need integer id/image_id/category_id, a 4-number bbox, iscrowd 0/1)"
        tables.add("error", "malformed_annotation", message, details=malformed)
    uniq, counts = np.unique(ann_ids, return_counts=True)
    if (counts > 1).any():
        tables.add("error", "duplicate_annotation_id", "annotation ids used more than once", uniq[counts > 1],
                   "annotation")  # fmt: skip
    known_image = np.isin(ann_img, tables.image_ids)
    if not known_image.all():
        bad = np.flatnonzero(~known_image)
        details = [f"annotation id {ann_ids[i]} refers to image id {ann_img[i]}" for i in bad[:MAX_IDS]]
        message = "annotations whose image_id is not in 'images'"
        tables.add("error", "unknown_image_id", message, ann_ids[bad], "annotation", details=details)
    cat_ids = sorted(tables.categories)
    known_category = np.isin(ann_cat, np.asarray(cat_ids, dtype=np.int64))
    if (known_image & ~known_category).any():
        bad = np.flatnonzero(known_image & ~known_category)
        details = [
            f"annotation id {ann_ids[i]} (image id {ann_img[i]}) has category_id {ann_cat[i]}" for i in bad[:MAX_IDS]
        ]
        unknown = sorted(set(ann_cat[bad].tolist()))
        message = f"annotations with category_id {unknown[:SHOWN_IDS]}, not in 'categories' {cat_ids}"
        tables.add("error", "unknown_category_id", message, ann_ids[bad], "annotation", details=details)
    keep = known_image & known_category
    tables.ann_ids, tables.ann_image_ids, tables.ann_category_ids = ann_ids[keep], ann_img[keep], ann_cat[keep]
    tables.bboxes = xywh[keep]
    tables.iscrowd = np.asarray(crowd, dtype=bool).reshape(-1)[keep]
