"""COCO box AP from either scorer: faster-coco-eval (default) or pycocotools.

faster-coco-eval runs pycocotools' ``evaluate``/``accumulate`` in C++ and gives the same twelve summary numbers and
the same ``precision`` array (see tests/analysis/test_scoring.py); pycocotools stays selectable as the reference.
The ground-truth index is built once per :class:`CocoScorer`, so a validation round only loads its results.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

# CategoryMap for annotations only: importing fcos_lightning.data still loads the LightningDataModule
if TYPE_CHECKING:
    from fcos_lightning.data.coco import CategoryMap

log = logging.getLogger(__name__)


Backend = Literal["faster", "pycocotools"]
BACKENDS: tuple[str, ...] = ("faster", "pycocotools")

#: COCOeval's twelve summary numbers, in ``COCOeval.stats`` order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass(frozen=True)
class CocoScores:
    """One COCO evaluation: summary metrics (percent) and the interpolated precision behind them.

    ``precision[t, r, k]`` is COCOeval's ``eval["precision"]`` for IoU threshold ``t``, recall threshold ``r`` and
    class label ``k`` (area "all", 100 detections), -1 for a class without ground truth in the evaluated images.
    """

    metrics: dict[str, float]
    precision: np.ndarray  # [T, R, C]
    iou_thresholds: np.ndarray  # [T]
    recall_thresholds: np.ndarray  # [R]


def _gt_dataset(gt: Mapping[str, Any] | Any) -> dict:
    """A COCO json dict, or the ``dataset`` dict of a pycocotools/faster-coco-eval ``COCO`` object."""
    dataset = gt if isinstance(gt, Mapping) else getattr(gt, "dataset", None)
    if not isinstance(dataset, Mapping) or "images" not in dataset or "annotations" not in dataset:
        raise TypeError(f"expected a COCO json dict or a COCO object with a .dataset dict, got {type(gt).__name__}")
    return dict(dataset)


class CocoScorer:
    """Scores COCO-format box results against one ground-truth set with the chosen backend.

    ``gt``: the ground truth as a COCO json dict or a ``COCO`` object (its ``dataset`` is reused without copying).
    ``category_map``: the dataset's classes; per-class AP is reported as ``AP/<name>``.
    """

    def __init__(self, gt: Mapping[str, Any] | Any, category_map: CategoryMap, backend: Backend = "faster"):
        if backend not in BACKENDS:
            raise ValueError(f"COCO scorer backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.category_map = category_map
        dataset = _gt_dataset(gt)
        gt_cat_ids = sorted(int(c["id"]) for c in dataset.get("categories", []))
        if gt_cat_ids != list(category_map.cat_ids):
            raise ValueError(
                f"the ground truth's category ids {gt_cat_ids} differ from the class map's {list(category_map.cat_ids)}"
            )
        self._image_ids = {int(img["id"]) for img in dataset["images"]}
        self._scored_images = {int(a["image_id"]) for a in dataset.get("annotations", []) if not a.get("iscrowd")}
        if backend == "faster":
            from faster_coco_eval import COCO

            self._coco = COCO(dataset)
        else:
            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO()
                self._coco.dataset = dataset
                self._coco.createIndex()

    @property
    def image_ids(self) -> frozenset[int]:
        """The ground truth's image ids."""
        return frozenset(self._image_ids)

    def _check(self, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int]) -> None:
        unknown = set(image_ids) - self._image_ids
        if unknown:
            raise ValueError(f"COCO scoring: image ids {sorted(unknown)[:10]} are not in the ground truth")
        res_images = {int(r["image_id"]) for r in results}
        stray = res_images - set(image_ids)
        if stray:
            raise ValueError(f"COCO scoring: results for image ids {sorted(stray)[:10]} that are not being evaluated")
        res_cats = {int(r["category_id"]) for r in results} - set(self.category_map.cat_ids)
        if res_cats:
            raise ValueError(
                f"COCO scoring: results with category ids {sorted(res_cats)} that are not in "
                f"{list(self.category_map.cat_ids)}"
            )

    def _evaluator(self, results: list[dict], image_ids: list[int]):
        if self.backend == "faster":
            from faster_coco_eval import COCOeval_faster

            evaluator = COCOeval_faster(
                self._coco, self._coco.loadRes(results), iouType="bbox", print_function=lambda *a, **k: None
            )
        else:
            from pycocotools.cocoeval import COCOeval

            evaluator = COCOeval(self._coco, self._coco.loadRes(results), iouType="bbox")
        evaluator.params.imgIds = image_ids
        return evaluator

    def score(self, results: Sequence[Mapping[str, Any]], image_ids: Sequence[int]) -> CocoScores:
        """COCO box AP over ``image_ids`` for ``results`` (COCO result dicts: image_id, category_id, xywh bbox,
        score). Empty ``results`` score 0 without running COCOeval (pycocotools cannot load an empty list)."""
        image_ids = sorted({int(i) for i in image_ids})
        self._check(results, image_ids)
        names = self.category_map.names
        if image_ids and not self._scored_images.intersection(image_ids):
            log.warning(
                "COCO evaluation: the %d evaluated images have no annotation that is not crowd: AP is undefined "
                "(reported as 0); add non-crowd boxes to the val set",
                len(image_ids),
            )
        if not image_ids or not results:
            return self._empty(image_ids)
        # loadRes writes id/area/iscrowd into each result dict: give it copies.
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = self._evaluator([dict(r) for r in results], image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = np.asarray(evaluator.stats[: len(STAT_NAMES)], dtype=np.float64)
        metrics = {k: float(max(v, 0.0) * 100) for k, v in zip(STAT_NAMES, stats, strict=True)}
        cat_index = [list(evaluator.params.catIds).index(c) for c in self.category_map.cat_ids]
        # eval["precision"]: [T, R, K, A, M]; area "all" (0), the largest maxDets (-1).
        precision = np.asarray(evaluator.eval["precision"], dtype=np.float64)[:, :, cat_index, 0, -1]
        for k, name in enumerate(names):
            p = precision[:, :, k]
            p = p[p > -1]
            metrics[f"AP/{name}"] = float(np.mean(p) * 100) if p.size else 0.0
        return CocoScores(
            metrics=metrics,
            precision=precision,
            iou_thresholds=np.asarray(evaluator.params.iouThrs, dtype=np.float64),
            recall_thresholds=np.asarray(evaluator.params.recThrs, dtype=np.float64),
        )

    def _empty(self, image_ids: list[int]) -> CocoScores:
        """No detections: every metric 0; precision 0 for classes with ground truth, -1 for the others."""
        iou_thresholds = np.linspace(0.5, 0.95, 10)
        recall_thresholds = np.linspace(0.0, 1.0, 101)
        ann_ids = self._coco.getAnnIds(imgIds=image_ids) if image_ids else []
        present = {int(a["category_id"]) for a in self._coco.loadAnns(ann_ids) if not a.get("iscrowd", 0)}
        has_gt = np.array([c in present for c in self.category_map.cat_ids])
        precision = np.where(has_gt, 0.0, -1.0)[None, None, :].repeat(10, 0).repeat(101, 1)
        metrics = dict.fromkeys(STAT_NAMES, 0.0)
        metrics.update({f"AP/{name}": 0.0 for name in self.category_map.names})
        return CocoScores(metrics, precision, iou_thresholds, recall_thresholds)


def score(
    gt: Mapping[str, Any] | Any,
    results: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    category_map: CategoryMap,
    backend: Backend = "faster",
) -> CocoScores:
    """One-off COCO box AP (see :class:`CocoScorer`, which keeps the ground-truth index between rounds)."""
    return CocoScorer(gt, category_map, backend).score(results, image_ids)
