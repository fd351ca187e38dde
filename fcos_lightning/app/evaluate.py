"""``evaluate(cfg)``: COCO AP of a checkpoint on a val split (``evaluate.py``)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import pytorch_lightning as pl
from omegaconf import DictConfig

from fcos_lightning.analysis.complexity import model_complexity
from fcos_lightning.app.config import build, check_config, check_output_dir
from fcos_lightning.app.train import build_evaluator
from fcos_lightning.checkpoint import load_checkpoint, load_network
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.evaluation.coco import METRIC_NAMES, format_table
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.files import write_json_atomic
from fcos_lightning.lightning.datamodule import COCODataModule
from fcos_lightning.lightning.module import FCOSLitModule, validation_metrics
from fcos_lightning.runtime.optimize import optimize_for_inference
from fcos_lightning.runtime.precision import resolve_precision


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint on a val split; prints the COCO table and the model's size and FLOPs, and writes
    metrics.json, detections.json and the evaluation pictures (``plots/``) to ``cfg.output_dir``."""
    check_config(cfg)
    output_dir = check_output_dir(cfg.output_dir)
    ckpt = load_checkpoint(cfg.ckpt_path)
    category_map = CategoryMap.from_dict(ckpt["classes"])
    model = load_network(ckpt, cfg.weights)
    datamodule = val_datamodule(cfg, ckpt, model.size_divisibility)
    if datamodule.category_map != category_map:
        raise ValueError(
            f"{datamodule.val_ann_file}: categories {list(datamodule.category_map.cat_ids)} differ from the "
            f"checkpoint's {list(category_map.cat_ids)} ({cfg.ckpt_path})"
        )
    datamodule.setup("validate")
    evaluator = build_evaluator(
        cfg, datamodule.val_dataset.coco, category_map, results_file=str(output_dir / "detections.json")
    )
    module = FCOSLitModule(
        model,
        category_map.to_dict(),
        postprocessor=FCOSPostProcessor(**ckpt["postprocess"]),
        **ckpt["criterion"],
        evaluator=evaluator,
        num_vis_images=cfg.num_pictures,
        output_dir=str(output_dir),
    )
    # at the largest input the test resize makes (mmdetection's get_flops convention), before BN folding
    complexity = model_complexity(model, datamodule.test_min_size, datamodule.test_max_size)
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    # The fast inference path: BN folded into convs, channels-last, conv weights stored in the autocast dtype.
    optimize_for_inference(module.model, precision=precision, cpu_micro_batch=cfg.cpu_micro_batch)
    trainer: pl.Trainer = build(cfg.trainer, precision=precision, logger=False, default_root_dir=str(output_dir))
    start = time.perf_counter()
    metrics = validation_metrics(trainer.validate(module, datamodule=datamodule)[0])
    elapsed = time.perf_counter() - start
    num_images = int(metrics.get("num_images", 0))
    metrics["images_per_second"] = num_images / elapsed if elapsed > 0 else math.nan
    if trainer.is_global_zero:
        summary = {k: metrics[k] for k in METRIC_NAMES}
        summary["per_class_AP"] = {k[3:]: v for k, v in metrics.items() if k.startswith("AP/")}
        summary.update(num_images=num_images, images_per_second=metrics["images_per_second"])
        summary["model"] = {**asdict(complexity), "gmacs": complexity.gmacs}
        if evaluator.analysis is not None:
            summary["analysis"] = evaluator.analysis.to_dict()
        write_json_atomic(output_dir / "metrics.json", summary, indent=2)
        print(format_table(metrics, category_map))
        print(f"model: {complexity.summary()}")
        if evaluator.score_thresholds is not None:
            print(f"score threshold with the best mean F1 at IoU 0.5: {evaluator.score_thresholds['global']:.3f}")
        print(f"{num_images} images in {elapsed:.1f} s: {metrics['images_per_second']:.2f} images/s end to end")
        written = [output_dir / "metrics.json", output_dir / "detections.json"]
        if evaluator.analysis is not None:
            written.append(output_dir / "plots")
        print(f"wrote {', '.join(map(str, written))}")
    return metrics


def val_datamodule(cfg: DictConfig, ckpt: dict, size_divisibility: int) -> COCODataModule:
    """The val split of ``cfg.data`` (each null key: what the checkpoint records), resized as the checkpoint's
    test pipeline. The class map is read from the val file, as the train files may be absent."""
    recorded = ckpt["source"].get("data", {})
    resize = ckpt["test_resize"] or {}

    def pick(value, recorded_value, key: str):
        if value is None and recorded_value is None:
            raise ValueError(f"{cfg.ckpt_path} records no {key}: set {key}=...")
        return recorded_value if value is None else value

    ann_file = pick(cfg.data.val.ann_file, recorded.get("val_ann_file"), "data.val.ann_file")
    img_dir = pick(cfg.data.val.img_dir, recorded.get("val_img_dir"), "data.val.img_dir")
    return COCODataModule(
        train_ann_file=ann_file,
        train_img_dir=img_dir,
        val_ann_file=ann_file,
        val_img_dir=img_dir,
        test_min_size=pick(cfg.data.test_min_size, resize.get("min_size"), "data.test_min_size"),
        test_max_size=pick(cfg.data.test_max_size, resize.get("max_size"), "data.test_max_size"),
        val_batch_size=pick(cfg.data.val_batch_size, recorded.get("val_batch_size", 1), "data.val_batch_size"),
        num_workers=pick(cfg.data.num_workers, recorded.get("num_workers", 2), "data.num_workers"),
        size_divisibility=size_divisibility,
    )
