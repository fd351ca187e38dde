"""Dataset validation before training (``python validate_data.py``): every problem of a split, not the first.

:func:`validate_split` reads a COCO-format json and its image folder and returns a :class:`SplitReport`: counts
(images, annotations, per class, images without boxes, crowd-only images), every defect found, each as an
:class:`~fcos_lightning.data.schema.Issue` naming the image / annotation ids, and (given a coverage check) how
the boxes fall on the model's FPN levels at the test resolution. It never stops at the first problem, unlike
the training loader; both run the same schema check (:mod:`fcos_lightning.data.schema`).

Errors (the run would crash, train on wrong targets or evaluate wrongly): schema errors (malformed entries,
duplicate image or annotation ids, annotations of unknown images or categories), non-finite boxes, boxes with
zero or negative width or height, missing / undecodable image files and images whose decoded size (EXIF
orientation applied) differs from the json's. Warnings: boxes extending outside the image (clipped by the
loader; by how much), boxes left under 1 px after clipping (dropped), classes without boxes, and boxes that no
location can take as a positive (FCOS's best possible recall below 1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fcos_lightning.files import write_json_atomic

from .decode import BadImageError, decode_image_file, exif_orientation, size_mismatch_message, transposes
from .schema import MAX_IDS, CocoTables, Issue, check_coco, issue
from .transforms import too_thin

__all__ = [
    "IMAGE_CHECKS",
    "CoverageReport",
    "SplitReport",
    "ValidationReport",
    "check_image_file",
    "check_image_files",
    "no_batch_reason",
    "validate_split",
]

IMAGE_CHECKS = ("decode", "header", "none")


@dataclass
class CoverageReport:
    """What a coverage check (e.g. :class:`~fcos_lightning.evaluation.coverage.FPNCoverage`) found: target boxes
    per FPN level, how many boxes it saw, and ``(annotation id, detail)`` of the boxes no location can take."""

    levels: list[dict[str, Any]]
    num_target_boxes: int
    unassignable: list[tuple[int, str]]
    center_sampling_radius: float


#: a coverage check: (h, w) per image id and (annotation id, xyxy) target boxes per image id -> report
Coverage = Callable[[Mapping[int, tuple[int, int]], Mapping[int, Sequence[tuple[int, list[float]]]]], CoverageReport]


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

    def add(self, *args: Any, **kwargs: Any) -> None:
        """Record an :func:`~fcos_lightning.data.schema.issue`."""
        self.issues.append(issue(*args, **kwargs))

    def format(self) -> str:
        lines = [
            f"== {self.split}: {self.ann_file} (images in {self.img_dir})",
            f"   {self.num_images} images, {self.num_annotations} annotations ({self.num_crowd} crowd)",
            f"   per class: {self.per_class}",
            f"   images without boxes: {self.num_images_without_boxes}, crowd-only images: "
            f"{self.num_crowd_only_images}",
        ]
        if self.levels:
            lines.append(
                "   boxes per FPN level (regression distance at the box centre = half the longer side, test size):"
            )
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


def no_batch_reason(
    ann_file: str, num_images: int, num_usable: int, filter_empty: bool, batch_size: int, num_replicas: int = 1
) -> str | None:
    """Why a training split of ``num_images`` images, ``num_usable`` of them trainable (with a box, or any when
    not ``filter_empty``), yields no full batch of ``batch_size`` per process, and what to do; None if it does.
    Partial batches are dropped, so a run would otherwise end after 0 steps as if it had succeeded."""
    if num_images == 0:
        return f"{ann_file}: lists no images: nothing to train on"
    if num_usable == 0:
        return (
            f"{ann_file}: none of its {num_images} images has a box to train on (images without boxes are removed); "
            "add annotations, or set data.filter_empty=false to train on them as negatives"
        )
    per_process = -(-num_usable // num_replicas)
    if per_process >= batch_size:
        return None
    images = f"{num_usable} usable training images" + (f" ({per_process} per process)" if num_replicas > 1 else "")
    fix = f"set data.batch_size={per_process} or smaller"
    if filter_empty and num_images > num_usable:
        fix += f", or data.filter_empty=false to keep the {num_images - num_usable} images without boxes"
    return (
        f"{ann_file}: {images} make no full batch of data.batch_size={batch_size} (partial batches are dropped); {fix}"
    )


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
        return size_mismatch_message(path, image_id, hw, tuple(expected_hw))
    return None


def _check_image_job(job: tuple[str, int, tuple[int, int], str]) -> str | None:
    torch.set_num_threads(1)
    return check_image_file(*job)


def validate_split(
    split: str,
    ann_file: str,
    img_dir: str,
    coverage: Coverage | None = None,
    image_check: str = "decode",
    num_workers: int = 0,
    resize: tuple[int, int] | None = None,
) -> SplitReport:
    """Validate one COCO-format split; see the module docstring for what is an error and what a warning.
    ``coverage``: the model's view of the boxes (levels, unassignable boxes); None skips it. ``resize``:
    ``(short side, long side cap)`` the split is resized with, to find images too thin to resize."""
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
    if not os.path.isdir(img_dir):
        rep.add("error", "image_dir_missing", f"image directory not found: {img_dir}")
    tables = check_coco(data)
    rep.issues.extend(tables.issues)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return rep
    rep.num_images = len(tables.image_ids)
    annotations = data.get("annotations", [])
    rep.num_annotations = len(annotations) if isinstance(annotations, list) else 0
    boxes_by_image = _boxes(tables, rep)

    images = {
        int(i): {"file_name": name, "width": int(w), "height": int(h)}
        for i, name, w, h in zip(tables.image_ids, tables.file_names, tables.widths, tables.heights)
    }
    if image_check != "none" and os.path.isdir(img_dir):
        rep.issues.extend(check_image_files(images, img_dir, image_check, num_workers))
    if resize is not None:
        ids = list(images)
        thin = too_thin([images[i]["height"] for i in ids], [images[i]["width"] for i in ids], *resize)
        if thin:
            details = [f"image id {ids[k]}: {images[ids[k]]['width']}x{images[ids[k]]['height']}" for k in thin]
            message = (
                f"images too thin to resize: a side rounds to 0 px at short side {resize[0]}, long side <= {resize[1]}"
            )
            rep.add("error", "image_too_thin", message, [ids[k] for k in thin], "image", details=details)
            for k in thin:
                del images[ids[k]]
                boxes_by_image.pop(ids[k], None)
    if coverage is not None:
        sizes = {i: (im["height"], im["width"]) for i, im in images.items()}
        _add_coverage(coverage(sizes, boxes_by_image), rep)
    return rep


def _boxes(tables: CocoTables, rep: SplitReport) -> dict[int, list[tuple[int, list[float]]]]:
    """Box content checks on the annotations that passed the schema; the target boxes (clipped xyxy) per image."""
    ids, image_ids, cats = tables.ann_ids, tables.ann_image_ids, tables.ann_category_ids
    x, y, w, h = tables.bboxes.T
    finite = np.isfinite(tables.bboxes).all(axis=1)
    crowd = finite & tables.iscrowd
    degenerate = finite & ~crowd & ((w <= 0) | (h <= 0))
    rest = finite & ~crowd & ~degenerate
    order = np.argsort(tables.image_ids)
    row = order[np.searchsorted(tables.image_ids[order], image_ids)]  # every image id is listed (schema)
    width, height = tables.widths[row].astype(np.float64), tables.heights[row].astype(np.float64)
    overflow = np.maximum.reduce([np.zeros_like(x), -x, -y, x + w - width, y + h - height])
    x0, y0 = np.maximum(x, 0.0), np.maximum(y, 0.0)
    x1, y1 = np.minimum(x + w, width), np.minimum(y + h, height)
    outside = rest & (overflow > 0)
    tiny = rest & ((x1 - x0 < 1.0) | (y1 - y0 < 1.0))
    kept = rest & ~tiny

    rep.num_crowd = int(crowd.sum())
    names = tables.categories
    per_class = dict.fromkeys(sorted(names), 0)
    for c, n in zip(*np.unique(cats[kept], return_counts=True)):
        per_class[int(c)] = int(n)
    rep.per_class = {f"{names[c]} ({c})": n for c, n in per_class.items()}
    boxes_by_image: dict[int, list[tuple[int, list[float]]]] = {int(i): [] for i in tables.image_ids}
    for j in np.flatnonzero(kept):
        box = [float(x0[j]), float(y0[j]), float(x1[j]), float(y1[j])]
        boxes_by_image[int(image_ids[j])].append((int(ids[j]), box))
    empty = [i for i, boxes in boxes_by_image.items() if not boxes]
    crowd_images = set(image_ids[crowd].tolist())
    rep.num_images_without_boxes = len(empty)
    rep.num_crowd_only_images = sum(1 for i in empty if i in crowd_images)

    if (~finite).any():
        rep.add("error", "nonfinite_box", "boxes with NaN/Inf coordinates", ids[~finite], "annotation")
    if degenerate.any():
        rep.add("error", "degenerate_box", "boxes with zero or negative width or height (a classic NaN-loss cause)",
                ids[degenerate], "annotation")  # fmt: skip
    if outside.any():
        details = [
            f"annotation {ids[j]} (image {image_ids[j]}, width {int(width[j])}, height {int(height[j])}): bbox "
            f"{[float(v) for v in tables.bboxes[j]]} extends {overflow[j]:.1f} px outside"
            for j in np.flatnonzero(outside)[:MAX_IDS]
        ]
        worst = f"clipped by the loader; worst by {overflow[outside].max():.1f} px"
        rep.add("warning", "box_outside_image", f"boxes extending outside their image ({worst})", ids[outside],
                "annotation", details=details)  # fmt: skip
    if tiny.any():
        rep.add("warning", "box_dropped_after_clipping",
                "boxes under 1 px wide or high after clipping to the image (dropped by the loader)", ids[tiny],
                "annotation")  # fmt: skip
    no_boxes = [f"{names[c]} ({c})" for c, n in per_class.items() if not n]
    if no_boxes and len(tables.image_ids):
        rep.add("warning", "class_without_boxes", f"classes with no (non-crowd) box: {no_boxes}", count=len(no_boxes))
    return boxes_by_image


def _add_coverage(found: CoverageReport, rep: SplitReport) -> None:
    rep.levels = found.levels
    rep.num_target_boxes = found.num_target_boxes
    rep.num_unassignable_boxes = len(found.unassignable)
    if found.num_target_boxes:
        rep.best_possible_recall = 1.0 - len(found.unassignable) / found.num_target_boxes
    if found.unassignable:
        rep.add(
            "warning",
            "box_unassignable",
            f"{len(found.unassignable)} boxes get no positive location under centre sampling (radius "
            f"{found.center_sampling_radius}) at the test resolution: they can never be detected "
            f"(best possible recall {rep.best_possible_recall:.4f})",
            [i for i, _ in found.unassignable],
            "annotation",
            details=[d for _, d in found.unassignable],
        )


def check_image_files(
    images: Mapping[int, Mapping[str, Any]], img_dir: str, mode: str, num_workers: int = 0
) -> list[Issue]:
    """Errors for the images (``{id: {"file_name", "width", "height"}}``) whose file is missing, cannot be read
    (``mode`` as :func:`check_image_file`) or has another size than the json says; ``num_workers`` processes
    (decode) or threads (header)."""
    jobs = [
        (os.path.join(img_dir, im["file_name"]), iid, (im["height"], im["width"]), mode) for iid, im in images.items()
    ]
    if num_workers > 0 and len(jobs) > 64:
        if mode == "header":  # file reads: threads suffice (and must not touch torch's thread count)
            with ThreadPoolExecutor(num_workers) as pool:
                results = list(pool.map(lambda job: check_image_file(*job), jobs))
        else:
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
        found[kind][1].append(result if kind == "size" else f"image id {iid}: {path}: {result}")
    titles = {
        "missing": ("image_file_missing", "image files that do not exist"),
        "unreadable": ("image_file_unreadable", "image files that cannot be decoded (corrupt or truncated)"),
        "size": ("image_size_mismatch", "images whose decoded size differs from the json's width/height"),
    }
    return [
        issue("error", titles[kind][0], titles[kind][1], ids, "image", details=details[:MAX_IDS])
        for kind, (ids, details) in found.items()
        if ids
    ]
