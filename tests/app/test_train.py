"""What train.py builds from the config besides the model: the validation evaluator (``conf/evaluator``, its scorer
backend chosen by one key) and the loggers (none, one, or the list ``logger=many_loggers`` describes)."""

from __future__ import annotations

from collections import defaultdict

import faster_coco_eval
import pycocotools.coco
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from fcos_lightning.analysis.synthetic import make_synthetic_coco
from fcos_lightning.app.config import ConfigError, check_config
from fcos_lightning.app.train import build_evaluator, build_loggers


def _detections(results: list[dict], category_map) -> tuple[list[dict], list[int]]:
    """COCO results -> the per-image ``{"boxes" xyxy, "scores", "labels"}`` the module hands the evaluator."""
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    label = {c: k for k, c in enumerate(category_map.cat_ids)}
    ids, dets = sorted(by_image), []
    for i in ids:
        xywh = torch.tensor([r["bbox"] for r in by_image[i]], dtype=torch.float64)
        dets.append({
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "scores": torch.tensor([r["score"] for r in by_image[i]]),
            "labels": torch.tensor([label[r["category_id"]] for r in by_image[i]]),
        })  # fmt: skip
    return dets, ids


@pytest.mark.parametrize(
    ("overrides", "index_type"),
    [([], faster_coco_eval.COCO), (["evaluator.backend=pycocotools"], pycocotools.coco.COCO)],
)
def test_evaluator_backend_key_picks_the_scorer(compose_cfg, tmp_path, overrides, index_type):
    gt, results, category_map = make_synthetic_coco(num_images=30, dets_per_image=20, num_classes=3, seed=4)
    cfg = compose_cfg("train", ["experiment=demo", *overrides], tmp_path)
    evaluator = build_evaluator(cfg, gt, category_map)
    detections, image_ids = _detections(results, category_map)
    evaluator.update(detections, image_ids)
    metrics = evaluator.compute()
    assert isinstance(evaluator.scorer()._coco, index_type)
    assert evaluator.backend == ("pycocotools" if overrides else "faster")
    assert 20 < metrics["AP"] < 90 and metrics["num_images"] == len(image_ids)
    assert evaluator.analysis is not None and evaluator.analysis.metrics == {
        k: v for k, v in metrics.items() if k != "num_images"
    }


def test_unknown_backend_fails_at_start_naming_the_key(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["experiment=demo", "evaluator.backend=pycoco"], tmp_path)
    with pytest.raises(ConfigError, match=r"evaluator\.backend.*'pycoco'"):
        check_config(cfg)


def test_no_evaluator_node_means_no_evaluator(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["experiment=demo", "~evaluator"], tmp_path)
    assert build_evaluator(cfg, {}, None) is None


@pytest.mark.parametrize(
    ("overrides", "types"),
    [
        (["~logger"], []),
        (["logger=csv"], [CSVLogger]),
        (["logger=many_loggers"], [TensorBoardLogger, CSVLogger]),
        (["logger=many_loggers", "logger.tensorboard=null"], [CSVLogger]),
    ],
)
def test_loggers_none_one_or_a_list(compose_cfg, tmp_path, overrides, types):
    cfg = compose_cfg("train", ["experiment=demo", *overrides], tmp_path)
    loggers = build_loggers(cfg.get("logger"))
    assert sorted(type(x).__name__ for x in loggers) == sorted(t.__name__ for t in types)
    assert all(str(x.save_dir) == str(tmp_path) for x in loggers)  # each writes into the run dir
