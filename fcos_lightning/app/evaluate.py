"""``evaluate(cfg)``: COCO AP of a checkpoint or an exported model on a val split (``evaluate.py``).

A checkpoint runs through Lightning's validation loop (any device and world size, validation losses, pictures);
an exported model (``.onnx``, OpenVINO ``.xml``), and any model with ``tta=true``, through the
:class:`~fcos_lightning.runtime.predictor.Predictor` on original images, which it resizes itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from fcos_lightning.analysis.complexity import ModelComplexity, model_complexity
from fcos_lightning.analysis.plots import write_plots
from fcos_lightning.app.config import build, check_config, check_output_dir
from fcos_lightning.app.train import build_evaluator
from fcos_lightning.checkpoint import load_checkpoint, load_network
from fcos_lightning.data.coco import CategoryMap, CocoDetection
from fcos_lightning.evaluation.coco import METRIC_NAMES, format_table
from fcos_lightning.evaluation.evaluator import COCOEvaluator
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.files import write_json_atomic
from fcos_lightning.lightning.datamodule import COCODataModule
from fcos_lightning.lightning.module import FCOSLitModule, validation_metrics
from fcos_lightning.runtime.exported import EXPORT_SUFFIXES, load_predictor, resize_style_of
from fcos_lightning.runtime.optimize import optimize_for_inference
from fcos_lightning.runtime.precision import resolve_precision
from fcos_lightning.runtime.predictor import TestTimeAugmentation


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.model_path`` (a checkpoint or an exported model) on a val split; prints the COCO table and,
    for a checkpoint, the model's size and FLOPs; writes metrics.json, detections.json and the evaluation pictures
    (``plots/``) to ``cfg.output_dir``."""
    check_config(cfg)
    output_dir = check_output_dir(cfg.output_dir)
    model_path = model_path_of(cfg)
    if cfg.tta or Path(model_path).suffix.lower() in EXPORT_SUFFIXES:
        return evaluate_predictor(cfg, model_path, output_dir)
    ckpt = load_checkpoint(model_path)
    category_map = CategoryMap.from_dict(ckpt["classes"])
    model = load_network(ckpt, cfg.weights)
    datamodule = val_datamodule(cfg, ckpt, model.size_divisibility)
    if datamodule.category_map != category_map:
        raise ValueError(
            f"{datamodule.val_ann_file}: categories {list(datamodule.category_map.cat_ids)} differ from the "
            f"checkpoint's {list(category_map.cat_ids)} ({model_path})"
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
    if trainer.is_global_zero:
        report(metrics, time.perf_counter() - start, category_map, output_dir, evaluator, complexity)
    return metrics


def report(
    metrics: dict[str, float],
    elapsed: float,
    category_map: CategoryMap,
    output_dir: Path,
    evaluator: COCOEvaluator,
    complexity: ModelComplexity | None = None,
) -> None:
    """Print the AP table, the model's size and FLOPs (a checkpoint's network only), the F1-best score threshold
    and the speed; write metrics.json (with the analysis behind the pictures)."""
    num_images = int(metrics.get("num_images", 0))
    metrics["images_per_second"] = num_images / elapsed if elapsed > 0 else math.nan
    summary = {k: metrics[k] for k in METRIC_NAMES}
    summary["per_class_AP"] = {k[3:]: v for k, v in metrics.items() if k.startswith("AP/")}
    summary.update(num_images=num_images, images_per_second=metrics["images_per_second"])
    if complexity is not None:
        summary["model"] = {**asdict(complexity), "gmacs": complexity.gmacs}
    if evaluator.analysis is not None:
        summary["analysis"] = evaluator.analysis.to_dict()
    write_json_atomic(output_dir / "metrics.json", summary, indent=2)
    print(format_table(metrics, category_map))
    if complexity is not None:
        print(f"model: {complexity.summary()}")
    if evaluator.score_thresholds is not None:
        print(f"score threshold with the best mean F1 at IoU 0.5: {evaluator.score_thresholds['global']:.3f}")
    print(f"{num_images} images in {elapsed:.1f} s: {metrics['images_per_second']:.2f} images/s end to end")
    written = [output_dir / "metrics.json", output_dir / "detections.json"]
    if evaluator.analysis is not None:
        written.append(output_dir / "plots")
    print(f"wrote {', '.join(map(str, written))}")


def model_path_of(cfg: DictConfig) -> str:
    """``model_path`` (``ckpt_path`` is its older name)."""
    path = cfg.get("model_path") or cfg.get("ckpt_path")
    if not path:
        raise ValueError("set model_path=... (a checkpoint, or a model written by export.py)")
    return str(path)


def tta_of(cfg: DictConfig, test_resize: tuple[int, int] | None) -> TestTimeAugmentation | None:
    """``cfg.tta``'s views: ``tta_min_sizes``, or the test size times 0.8, 1 and 1.2 (multiples of 32)."""
    if not cfg.tta:
        return None
    sizes = cfg.get("tta_min_sizes")
    if sizes is None:
        if test_resize is None:
            raise ValueError("tta=true: the model records no test resize; set tta_min_sizes=[...]")
        sizes = sorted({max(32, round(test_resize[0] * f / 32) * 32) for f in (0.8, 1.0, 1.2)})
    return TestTimeAugmentation(tuple(int(s) for s in sizes), flip=bool(cfg.get("tta_flip", True)))


def evaluate_predictor(cfg: DictConfig, model_path: str, output_dir: Path) -> dict[str, float]:
    """COCO AP of ``model_path`` run by the :class:`Predictor` (exported models, TTA), one process."""
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    loaded = load_predictor(model_path, precision=precision, cpu_micro_batch=cfg.cpu_micro_batch)
    predictor, category_map = loaded.predictor, loaded.classes
    datamodule = val_datamodule(cfg, loaded.description, predictor.size_divisibility, model_path)
    predictor.test_resize = (datamodule.test_min_size, datamodule.test_max_size)
    tta = tta_of(cfg, predictor.test_resize)
    dataset = CocoDetection(datamodule.val_ann_file, datamodule.val_img_dir, train=False)
    if dataset.category_map != category_map:
        raise ValueError(
            f"{datamodule.val_ann_file}: categories {list(dataset.category_map.cat_ids)} differ from the "
            f"model's {list(category_map.cat_ids)} ({model_path})"
        )
    evaluator = build_evaluator(cfg, dataset.coco, category_map, results_file=str(output_dir / "detections.json"))
    loader = DataLoader(dataset, batch_size=datamodule.val_batch_size, num_workers=datamodule.num_workers,
                        collate_fn=list)  # fmt: skip
    start = time.perf_counter()
    with torch.no_grad():
        show = cfg.trainer.get("enable_progress_bar", True)
        for samples in tqdm(loader, desc=f"evaluate {Path(model_path).name}", disable=not show):
            images = [s["image"].as_subclass(torch.Tensor) for s in samples]
            evaluator.update(predictor.detect(images, tta), [s["image_id"] for s in samples])
    metrics = evaluator.compute()
    if evaluator.analysis is not None:  # what the LightningModule writes after a validation round
        write_plots(evaluator.analysis, output_dir / "plots")
    report(metrics, time.perf_counter() - start, category_map, output_dir, evaluator)
    return metrics


def val_datamodule(
    cfg: DictConfig, ckpt: dict, size_divisibility: int, model_path: str | None = None
) -> COCODataModule:
    """The val split of ``cfg.data`` (each null key: what the checkpoint or sidecar ``ckpt`` records), resized
    as the checkpoint's test pipeline (its sizes and ``style``). The class map is read from the val file, as the
    train files may be absent."""
    recorded = ckpt["source"].get("data", {})
    resize = ckpt["test_resize"] or {}

    def pick(value, recorded_value, key: str):
        if value is None and recorded_value is None:
            raise ValueError(f"{model_path or model_path_of(cfg)} records no {key}: set {key}=...")
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
        test_resize_style=resize_style_of(ckpt),
        val_batch_size=pick(cfg.data.val_batch_size, recorded.get("val_batch_size", 1), "data.val_batch_size"),
        num_workers=pick(cfg.data.num_workers, recorded.get("num_workers", 2), "data.num_workers"),
        size_divisibility=size_divisibility,
    )
