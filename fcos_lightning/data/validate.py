"""Dataset validation before training (``python validate_data.py``; USER_NEEDS §1.1, §1.3).

:func:`validate_split` reads a COCO-format json and its image folder and returns a :class:`SplitReport`: counts
(images, annotations, per class, images without boxes, crowd-only images), every defect found, each as an
:class:`Issue` naming the image / annotation ids, and how the boxes fall on the model's FPN levels at the test
resolution. It never stops at the first problem, unlike the training loader.

Errors (the run would crash, train on wrong targets or evaluate wrongly): malformed entries, duplicate image or
annotation ids, annotations of unknown images or categories, non-finite boxes, boxes with zero or negative
width or height, missing / undecodable image files and images whose decoded size (EXIF orientation applied)
differs from the json's. Warnings: boxes extending outside the image (clipped by the loader; by how much),
boxes left under 1 px after clipping (dropped), classes without boxes, and boxes that no location can take as
a positive (FCOS's best possible recall below 1).

The level statistics use the project's own :class:`TargetAssigner` on the json's boxes, scaled as the test
transform scales them, batched over images, without decoding any image.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fcos_lightning.files import write_json_atomic
from fcos_lightning.fcos.points import make_points
from fcos_lightning.fcos.targets import TargetAssigner, size_ranges

from .decode import BadImageError, decode_image_file, exif_orientation, transposes
from .transforms import ResizeShortestEdge

__all__ = [
    "IMAGE_CHECKS",
    "FPNGeometry",
    "Issue",
    "SplitReport",
    "ValidationReport",
    "check_image_file",
    "validate_split",
]

IMAGE_CHECKS = ("decode", "header", "none")
MAX_IDS = 1000  # ids kept per issue in the JSON report (the count is always exact)
SHOWN_IDS = 10  # ids shown per issue in the terminal
IMAGES_PER_CALL = 4  # images per TargetAssigner call in the level statistics


@dataclass
class Issue:
    """One kind of defect in one split: ``severity`` is ``error`` or ``warning``; ``ids`` the image or
    annotation ids concerned (``id_kind``), at most :data:`MAX_IDS` of ``count``."""

    severity: str
    code: str
    message: str
    count: int = 1
    id_kind: str = ""
    ids: list[int] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def format(self) -> str:
        text = f"[{self.severity.upper()}] {self.code}: {self.message}"
        if self.ids:
            more = f" ... (+{self.count - SHOWN_IDS})" if self.count > SHOWN_IDS else ""
            text += f"\n      {self.id_kind} ids: {self.ids[:SHOWN_IDS]}{more}"
        for d in self.details[:SHOWN_IDS]:
            text += f"\n      {d}"
        if len(self.details) > SHOWN_IDS:
            text += f"\n      ... {len(self.details) - SHOWN_IDS} more in the JSON report"
        return text


@dataclass(frozen=True)
class FPNGeometry:
    """What decides where boxes go: the model's strides and size ranges, centre sampling, test resolution."""

    strides: tuple[int, ...]
    sizes_of_interest: tuple[float, ...]
    center_sampling_radius: float = 1.5
    point_offset: float = 0.5
    test_min_size: int = 800
    test_max_size: int = 1333


@dataclass
class SplitReport:
    """Everything :func:`validate_split` found in one split."""

    split: str
    ann_file: str
    img_dir: str
    num_images: int = 0
    num_annotations: int = 0
    num_crowd: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    num_images_without_boxes: int = 0
    num_crowd_only_images: int = 0
    levels: list[dict[str, Any]] = field(default_factory=list)
    num_target_boxes: int = 0
    num_unassignable_boxes: int = 0
    best_possible_recall: float | None = None
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    def add(self, severity: str, code: str, message: str, ids: Sequence[int] = (), id_kind: str = "", **kw) -> None:
        ids = [int(i) for i in ids]
        count = kw.pop("count", len(ids) or 1)
        self.issues.append(Issue(severity, code, message, count, id_kind, ids[:MAX_IDS], **kw))

    def format(self) -> str:
        lines = [
            f"== {self.split}: {self.ann_file} (images in {self.img_dir})",
            f"   {self.num_images} images, {self.num_annotations} annotations ({self.num_crowd} crowd)",
            f"   per class: {self.per_class}",
            f"   images without boxes: {self.num_images_without_boxes}, crowd-only images: "
            f"{self.num_crowd_only_images}",
        ]
        if self.levels:
            lines.append("   boxes per FPN level (regression distance at the box centre = half the longer side, test size):")
            for lv in self.levels:
                lo, hi = lv["range"]
                span = f"{max(lo, 0):g}-{'inf' if hi is None else format(hi, 'g')} px"
                lines.append(f"     P{lv['level']} stride {lv['stride']:>3} ({span}): {lv['boxes']} boxes")
        if self.best_possible_recall is not None:
            lines.append(
                f"   best possible recall {self.best_possible_recall:.4f}: {self.num_unassignable_boxes} of "
                f"{self.num_target_boxes} target boxes get no positive location"
            )
        lines += [f"   {i.format()}" for i in self.errors + self.warnings]
        if not self.issues:
            lines.append("   no problems found")
        return "\n".join(lines)


@dataclass
class ValidationReport:
    """The reports of every split; :attr:`ok` is False when any split has an error."""

    splits: list[SplitReport]

    @property
    def ok(self) -> bool:
        return not any(s.errors for s in self.splits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "num_errors": sum(len(s.errors) for s in self.splits),
            "num_warnings": sum(len(s.warnings) for s in self.splits),
            "splits": [asdict(s) for s in self.splits],
        }

    def format(self) -> str:
        errors = sum(len(s.errors) for s in self.splits)
        warnings = sum(len(s.warnings) for s in self.splits)
        verdict = "OK" if self.ok else "FAILED"
        body = "\n".join(s.format() for s in self.splits)
        return f"{body}\n{verdict}: {errors} errors, {warnings} warnings"

    def write_json(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict(), indent=2)


def check_image_file(path: str, image_id: int, expected_hw: tuple[int, int], mode: str) -> str | None:
    """None if the file is usable, else why not. ``mode``: ``decode`` (full decode, as training does) or
    ``header`` (size from the header, EXIF orientation applied; fast, misses truncated files)."""
    if not os.path.isfile(path):
        return "missing"
    if mode == "decode":
        try:
            img = decode_image_file(path, image_id)
        except BadImageError as e:
            return f"unreadable: {e}"
        hw = (int(img.shape[-2]), int(img.shape[-1]))
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                hw = (im.height, im.width)
        except (OSError, ValueError, SyntaxError) as e:
            return f"unreadable: {e}"
        if transposes(exif_orientation(path)):
            hw = hw[::-1]
    if hw != tuple(expected_hw):
        return f"size (h, w) {hw} (EXIF orientation applied) but the json says {tuple(expected_hw)}"
    return None


def _check_image_job(job: tuple[str, int, tuple[int, int], str]) -> str | None:
    torch.set_num_threads(1)
    return check_image_file(*job)


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def validate_split(
    split: str,
    ann_file: str,
    img_dir: str,
    geometry: FPNGeometry | None = None,
    image_check: str = "decode",
    num_workers: int = 0,
) -> SplitReport:
    """Validate one COCO-format split; see the module docstring for what is an error and what a warning."""
    if image_check not in IMAGE_CHECKS:
        raise ValueError(f"image_check must be one of {list(IMAGE_CHECKS)}, got {image_check!r}")
    ann_file, img_dir = os.fspath(ann_file), os.fspath(img_dir)
    rep = SplitReport(split, ann_file, img_dir)
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        rep.add("error", "annotation_file_missing", f"annotation file not found: {ann_file}")
        return rep
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        rep.add("error", "annotation_file_invalid", f"{ann_file} is not valid json: {e}")
        return rep
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        rep.add("error", "annotation_file_invalid", f"{ann_file}: expected an object with an 'images' list")
        return rep
    if not os.path.isdir(img_dir):
        rep.add("error", "image_dir_missing", f"image directory not found: {img_dir}")

    cat_names = _categories(data.get("categories"), rep)
    images = _images(data["images"], rep)
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        rep.add("error", "annotations_invalid", "'annotations' is not a list")
        anns = []
    boxes_by_image = _annotations(anns, images, cat_names, rep)

    if image_check != "none" and os.path.isdir(img_dir):
        _check_files(images, img_dir, image_check, num_workers, rep)
    if geometry is not None:
        # many small tensor ops: one intra-op thread is faster, and far faster on a busy machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _fpn_levels(images, boxes_by_image, geometry, rep)
        finally:
            torch.set_num_threads(threads)
    return rep


def _categories(categories: Any, rep: SplitReport) -> dict[int, str]:
    names: dict[int, str] = {}
    if not isinstance(categories, list) or not categories:
        rep.add("error", "no_categories", "'categories' is missing or empty")
        return names
    dup = []
    for c in categories:
        cid = _as_int(c.get("id")) if isinstance(c, dict) else None
        if cid is None:
            rep.add("error", "malformed_category", f"category entry {c!r} needs an integer 'id' and a 'name'")
            continue
        if cid in names:
            dup.append(cid)
        names[cid] = str(c.get("name", cid))
    if dup:
        rep.add("error", "duplicate_category_id", "duplicate category ids", dup, "category")
    return names


def _images(entries: list, rep: SplitReport) -> dict[int, dict]:
    images: dict[int, dict] = {}
    malformed, bad_size, dup = [], [], []
    for i, im in enumerate(entries):
        iid = _as_int(im.get("id")) if isinstance(im, dict) else None
        w = _as_int(im.get("width")) if isinstance(im, dict) else None
        h = _as_int(im.get("height")) if isinstance(im, dict) else None
        if iid is None or w is None or h is None or not isinstance(im.get("file_name"), str):
            malformed.append(f"image entry #{i} (id={im.get('id') if isinstance(im, dict) else None})")
            continue
        if w <= 0 or h <= 0:
            bad_size.append(iid)
        if iid in images:
            dup.append(iid)
            continue
        images[iid] = {"file_name": im["file_name"], "width": w, "height": h}
    rep.num_images = len(images)
    if malformed:
        rep.add("error", "malformed_image", "image entries without integer id/width/height and a file_name",
                count=len(malformed), details=malformed)
    if bad_size:
        rep.add("error", "image_size_invalid", "images with zero or negative width/height in the json",
                bad_size, "image")
    if dup:
        rep.add("error", "duplicate_image_id", "image ids used by more than one image entry", sorted(set(dup)),
                "image")
    if not images:
        rep.add("error", "no_images", "the split has no usable image")
    return images


def _annotations(anns: list, images: dict[int, dict], cat_names: dict[int, str], rep: SplitReport):
    seen: set[int] = set()
    dup, unknown_img, unknown_cat, malformed, nonfinite, degenerate = [], [], [], [], [], []
    outside, tiny = [], []
    outside_details: list[str] = []
    worst_overflow = 0.0
    per_class: Counter[int] = Counter()
    crowd_per_image: Counter[int] = Counter()
    boxes_by_image: dict[int, list[tuple[int, list[float]]]] = defaultdict(list)
    rep.num_annotations = len(anns)
    for i, a in enumerate(anns):
        aid = _as_int(a.get("id")) if isinstance(a, dict) else None
        iid = _as_int(a.get("image_id")) if isinstance(a, dict) else None
        cid = _as_int(a.get("category_id")) if isinstance(a, dict) else None
        bbox = a.get("bbox") if isinstance(a, dict) else None
        if aid is None or iid is None or cid is None or not isinstance(bbox, list) or len(bbox) != 4:
            malformed.append(f"annotation #{i} (id={a.get('id') if isinstance(a, dict) else None})")
            continue
        if aid in seen:
            dup.append(aid)
        seen.add(aid)
        if iid not in images:
            unknown_img.append(aid)
            continue
        if cid not in cat_names:
            unknown_cat.append(aid)
            continue
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            malformed.append(f"annotation #{i} (id={aid}): bbox {bbox!r}")
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            nonfinite.append(aid)
            continue
        crowd = bool(a.get("iscrowd", 0))
        if crowd:
            rep.num_crowd += 1
            crowd_per_image[iid] += 1
            continue
        if w <= 0 or h <= 0:
            degenerate.append(aid)
            continue
        W, H = images[iid]["width"], images[iid]["height"]
        over = max(0.0, -x, -y, x + w - W, y + h - H)
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
        if over > 0:
            worst_overflow = max(worst_overflow, over)
            outside.append(aid)
            outside_details.append(
                f"annotation {aid} (image {iid}, width {W}, height {H}): bbox {[x, y, w, h]} extends {over:.1f} px outside"
            )
        if x1 - x0 < 1.0 or y1 - y0 < 1.0:
            tiny.append(aid)
            continue
        per_class[cid] += 1
        boxes_by_image[iid].append((aid, [x0, y0, x1, y1]))

    rep.per_class = {f"{cat_names[c]} ({c})": per_class.get(c, 0) for c in sorted(cat_names)}
    empty = [i for i in images if not boxes_by_image.get(i)]
    rep.num_images_without_boxes = len(empty)
    rep.num_crowd_only_images = sum(1 for i in empty if crowd_per_image.get(i))
    if malformed:
        rep.add("error", "malformed_annotation",
                "annotations without integer id/image_id/category_id and a 4-number bbox",
                count=len(malformed), details=malformed)
    if dup:
        rep.add("error", "duplicate_annotation_id", "annotation ids used more than once", sorted(set(dup)),
                "annotation")
    if unknown_img:
        rep.add("error", "unknown_image_id", "annotations whose image_id is not in 'images'", unknown_img,
                "annotation")
    if unknown_cat:
        rep.add("error", "unknown_category_id", "annotations whose category_id is not in 'categories' "
                f"{sorted(cat_names)}", unknown_cat, "annotation")
    if nonfinite:
        rep.add("error", "nonfinite_box", "boxes with NaN/Inf coordinates", nonfinite, "annotation")
    if degenerate:
        rep.add("error", "degenerate_box", "boxes with zero or negative width or height (a classic NaN-loss cause)",
                degenerate, "annotation")
    if outside:
        rep.add("warning", "box_outside_image",
                f"boxes extending outside their image (clipped by the loader; worst by {worst_overflow:.1f} px)",
                outside, "annotation", details=outside_details[:MAX_IDS])
    if tiny:
        rep.add("warning", "box_dropped_after_clipping",
                "boxes under 1 px wide or high after clipping to the image (dropped by the loader)", tiny,
                "annotation")
    no_boxes = [f"{cat_names[c]} ({c})" for c in sorted(cat_names) if not per_class.get(c)]
    if no_boxes and images:
        rep.add("warning", "class_without_boxes", f"classes with no (non-crowd) box: {no_boxes}",
                count=len(no_boxes))
    return {i: boxes_by_image.get(i, []) for i in images}


def _check_files(images: dict[int, dict], img_dir: str, mode: str, num_workers: int, rep: SplitReport) -> None:
    jobs = [
        (os.path.join(img_dir, im["file_name"]), iid, (im["height"], im["width"]), mode)
        for iid, im in images.items()
    ]
    if num_workers > 0 and len(jobs) > 64:
        with ProcessPoolExecutor(num_workers) as pool:
            results = list(pool.map(_check_image_job, jobs, chunksize=64))
    else:
        results = [check_image_file(*job) for job in jobs]
    found: dict[str, tuple[list[int], list[str]]] = {"missing": ([], []), "unreadable": ([], []), "size": ([], [])}
    for (path, iid, _, _), result in zip(jobs, results):
        if result is None:
            continue
        kind = result.split(":")[0] if result.startswith(("missing", "unreadable")) else "size"
        found[kind][0].append(iid)
        found[kind][1].append(f"image {iid}: {path}: {result}")
    titles = {
        "missing": ("image_file_missing", "image files that do not exist"),
        "unreadable": ("image_file_unreadable", "image files that cannot be decoded (corrupt or truncated)"),
        "size": ("image_size_mismatch", "images whose decoded size differs from the json's width/height"),
    }
    for kind, (ids, details) in found.items():
        if ids:
            code, msg = titles[kind]
            rep.add("error", code, msg, ids, "image", details=details[:MAX_IDS])


def _fpn_levels(images: dict[int, dict], boxes_by_image: dict[int, list], geo: FPNGeometry, rep: SplitReport):
    """Boxes per level and boxes no location can take, with :class:`TargetAssigner` at the test resolution."""
    strides = list(geo.strides)
    ranges = size_ranges(geo.sizes_of_interest, len(strides))
    assigner = TargetAssigner(strides, geo.sizes_of_interest, geo.center_sampling_radius)
    per_level = np.zeros(len(strides), dtype=np.int64)
    groups: dict[tuple[int, int], list[tuple[list[int], torch.Tensor]]] = defaultdict(list)
    ann_count = 0
    for iid, entries in boxes_by_image.items():
        if not entries:
            continue
        ann_ids, boxes = [e[0] for e in entries], [e[1] for e in entries]
        im = images[iid]
        nh, nw = ResizeShortestEdge.get_output_shape(im["height"], im["width"], geo.test_min_size, geo.test_max_size)
        scale = torch.tensor([nw / im["width"], nh / im["height"]] * 2, dtype=torch.float32)
        b = torch.tensor(boxes, dtype=torch.float32) * scale
        half_long = (torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / 2).numpy()
        for k, (lo, hi) in enumerate(ranges):
            per_level[k] += int(((half_long >= lo) & (half_long <= hi)).sum())
        groups[(nh, nw)].append((ann_ids, b))
        ann_count += len(boxes)

    unassigned: list[str] = []
    unassigned_ids: list[int] = []
    for (h, w), items in groups.items():
        sizes = [(-(-h // s), -(-w // s)) for s in strides]
        grid = make_points(sizes, strides, geo.point_offset, "cpu")
        items.sort(key=lambda t: len(t[1]))
        for start in range(0, len(items), IMAGES_PER_CALL):
            chunk = items[start : start + IMAGES_PER_CALL]
            boxes = [b for _, b in chunk]
            labels = [torch.zeros(len(b), dtype=torch.int64) for b in boxes]
            matched = assigner(grid, boxes, labels, num_classes=1).matched_idx
            for row, (ann_ids, b) in enumerate(chunk):
                hit = torch.zeros(len(b), dtype=torch.bool)
                hit[matched[row][matched[row] >= 0]] = True
                for j in torch.nonzero(~hit).flatten().tolist():
                    x0, y0, x1, y1 = b[j].tolist()
                    unassigned.append(
                        f"annotation {ann_ids[j]}: {x1 - x0:.1f}x{y1 - y0:.1f} px (w x h) at test size (h, w) = ({h}, {w})"
                    )
                    unassigned_ids.append(ann_ids[j])
    rep.levels = [
        {"level": int(round(math.log2(s))), "stride": s, "range": [lo, None if hi >= 1e8 else hi], "boxes": int(n)}
        for s, (lo, hi), n in zip(strides, ranges, per_level)
    ]
    rep.num_target_boxes = ann_count
    rep.num_unassignable_boxes = len(unassigned)
    rep.best_possible_recall = 1.0 - len(unassigned) / ann_count if ann_count else None
    if unassigned:
        rep.add(
            "warning",
            "box_unassignable",
            f"{len(unassigned)} boxes get no positive location under centre sampling (radius "
            f"{geo.center_sampling_radius}) at the test resolution: they can never be detected "
            f"(best possible recall {rep.best_possible_recall:.4f})",
            unassigned_ids,
            "annotation",
            details=unassigned[:MAX_IDS],
        )
