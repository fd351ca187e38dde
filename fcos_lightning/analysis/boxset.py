"""Ground truth and detections of one evaluated split as flat arrays, in COCOeval's order.

Every analysis (F1 curves, confusion matrix, error breakdown) reads these arrays, so COCO json is parsed once.
Detections are kept as COCOeval keeps them: the ``max_dets`` highest-scoring per image and class, and sorted
the way COCOeval's ``accumulate`` ranks them (score descending; ties by image id, then by position in the results
list), so index order is rank order. Boxes are ``xyxy`` pixels (from COCO ``xywh``), labels ``0..C-1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

# CategoryMap for annotations only: importing fcos_lightning.data still loads the LightningDataModule
if TYPE_CHECKING:
    from fcos_lightning.data.coco import CategoryMap


@dataclass(frozen=True)
class BoxSet:
    """``G`` ground-truth boxes and ``D`` detections on ``num_images`` images (image index = position in the
    sorted evaluated image ids). Crowd regions are ground truth with ``gt_crowd`` set."""

    image_ids: np.ndarray  # [I] sorted evaluated image ids
    class_names: tuple[str, ...]
    gt_image: np.ndarray  # [G] int64 image index
    gt_boxes: np.ndarray  # [G, 4] float64 xyxy
    gt_labels: np.ndarray  # [G] int64
    gt_crowd: np.ndarray  # [G] bool
    dt_image: np.ndarray  # [D] int64 image index
    dt_boxes: np.ndarray  # [D, 4] float64 xyxy
    dt_labels: np.ndarray  # [D] int64
    dt_scores: np.ndarray  # [D] float64, non-increasing

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_gt_per_class(self) -> np.ndarray:
        """[C] non-crowd ground-truth boxes per class (COCOeval's ``npig``)."""
        return np.bincount(self.gt_labels[~self.gt_crowd], minlength=self.num_classes)

    @classmethod
    def from_coco(
        cls,
        gt: Mapping[str, Any] | Any,
        results: Sequence[Mapping[str, Any]],
        image_ids: Sequence[int],
        category_map: CategoryMap,
        max_dets: int = 100,
    ) -> BoxSet:
        """From a COCO json dict (or ``COCO`` object) and COCO-format results, restricted to ``image_ids``."""
        dataset = gt if isinstance(gt, Mapping) else gt.dataset
        ids = np.unique(np.asarray([int(i) for i in image_ids], dtype=np.int64))
        label_of = {c: k for k, c in enumerate(category_map.cat_ids)}

        def lookup(objs: Sequence[Mapping[str, Any]], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            img = np.fromiter((int(o["image_id"]) for o in objs), dtype=np.int64, count=len(objs))
            try:
                label = np.fromiter((label_of[int(o["category_id"])] for o in objs), dtype=np.int64, count=len(objs))
            except KeyError as e:
                raise ValueError(
                    f"{what}: category_id {e.args[0]} is not one of {list(category_map.cat_ids)}"
                ) from None
            box = np.asarray([o["bbox"] for o in objs], dtype=np.float64).reshape(-1, 4)
            box[:, 2:] += box[:, :2]
            return img, label, box

        anns = dataset["annotations"]
        a_img, a_label, a_box = lookup(anns, "ground truth")
        a_crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), dtype=bool, count=len(anns))
        keep = np.isin(a_img, ids)
        gt_image = np.searchsorted(ids, a_img[keep])

        r_img, r_label, r_box = lookup(results, "results")
        r_score = np.fromiter((float(r["score"]) for r in results), dtype=np.float64, count=len(results))
        stray = ~np.isin(r_img, ids)
        if stray.any():
            raise ValueError(f"results for image ids {np.unique(r_img[stray])[:10].tolist()} that are not evaluated")
        dt_image = np.searchsorted(ids, r_img)
        # COCOeval keeps the max_dets best per image and class (stable in results order) ...
        order = np.lexsort((np.arange(len(r_img)), -r_score, r_label, dt_image))
        group = dt_image[order] * len(category_map.cat_ids) + r_label[order]
        rank_in_group = np.arange(len(order)) - np.searchsorted(group, group)
        kept = order[rank_in_group < max_dets]
        # ... and ranks them by score, ties by image then by results order.
        kept = kept[np.lexsort((kept, dt_image[kept], -r_score[kept]))]
        return cls(
            image_ids=ids,
            class_names=tuple(category_map.names),
            gt_image=gt_image,
            gt_boxes=a_box[keep],
            gt_labels=a_label[keep],
            gt_crowd=a_crowd[keep],
            dt_image=dt_image[kept],
            dt_boxes=r_box[kept],
            dt_labels=r_label[kept],
            dt_scores=r_score[kept],
        )
