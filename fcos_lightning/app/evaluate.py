"""``evaluate(cfg)``: COCO AP of a checkpoint on a val split (``evaluate.py``)."""

from __future__ import annotations

import json
import math
import time

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcos_lightning.app.config import build, check_config, check_output_dir
from fcos_lightning.app.train import build_module
from fcos_lightning.convert.checkpoint import load_checkpoint, model_state
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.evaluation.coco import METRIC_NAMES, format_table
from fcos_lightning.files import write_json_atomic
from fcos_lightning.lightning.module import FCOSLitModule
from fcos_lightning.runtime.optimize import optimize_for_inference
from fcos_lightning.runtime.precision import resolve_precision


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint on a val split; writes metrics.json and detections.json to ``cfg.output_dir``."""
    check_config(cfg)
    output_dir = check_output_dir(cfg.output_dir)
    ckpt = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(ckpt["fcos_config"])
    run_cfg.output_dir = str(output_dir)
    run_cfg.module.num_vis_images = cfg.num_pictures
    dm_cfg = run_cfg.data.datamodule
    overrides = {
        "val_ann_file": cfg.data.val.ann_file,
        "val_img_dir": cfg.data.val.img_dir,
        "val_batch_size": cfg.data.val_batch_size,
        "num_workers": cfg.data.num_workers,
        "test_min_size": cfg.data.test_min_size,
        "test_max_size": cfg.data.test_max_size,
    }
    dm_cfg.update({k: v for k, v in overrides.items() if v is not None})
    # The class map comes from the checkpoint; read categories from the val file (train data may be absent).
    dm_cfg.train_ann_file, dm_cfg.train_img_dir = dm_cfg.val_ann_file, dm_cfg.val_img_dir
    category_map = CategoryMap.from_dict(ckpt["category_map"])
    datamodule = build(dm_cfg)
    if datamodule.category_map != category_map:
        raise ValueError(
            f"{dm_cfg.val_ann_file}: categories {list(datamodule.category_map.cat_ids)} differ from the "
            f"checkpoint's {list(category_map.cat_ids)} ({cfg.ckpt_path})"
        )
    module: FCOSLitModule = build_module(run_cfg, category_map.num_classes, category_map, None)
    module.model.load_state_dict(model_state(ckpt))
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    # The fast inference path: BN folded into convs, channels-last, conv weights stored in the autocast dtype.
    optimize_for_inference(module.model, precision=precision, cpu_micro_batch=cfg.cpu_micro_batch)
    trainer: pl.Trainer = instantiate(cfg.trainer, precision=precision, logger=False, default_root_dir=str(output_dir))
    start = time.perf_counter()
    trainer.validate(module, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    metrics = dict(module.last_metrics)
    num_images = int(metrics.get("num_images", 0))
    metrics["images_per_second"] = num_images / elapsed if elapsed > 0 else math.nan
    if trainer.is_global_zero:
        (output_dir / "detections.json").write_text(json.dumps(module.last_results))
        summary = {k: metrics[k] for k in METRIC_NAMES}
        summary["per_class_AP"] = {k[3:]: v for k, v in metrics.items() if k.startswith("AP/")}
        summary.update(num_images=num_images, images_per_second=metrics["images_per_second"])
        write_json_atomic(output_dir / "metrics.json", summary, indent=2)
        print(format_table(metrics, category_map))
        print(f"{num_images} images in {elapsed:.1f} s: {metrics['images_per_second']:.2f} images/s end to end")
        print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'detections.json'}")
    return metrics
