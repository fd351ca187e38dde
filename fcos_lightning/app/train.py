"""``train(cfg)``: build everything from a composed Hydra config and train (``train.py``)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from fcos_lightning.app.config import build, check_config, check_output_dir
from fcos_lightning.app.init_from import init_from_checkpoint
from fcos_lightning.app.launch import check_world_size, result_channel, run_multirun_job_with_ddp, send_result
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.data.demo import make_demo_dataset
from fcos_lightning.evaluation.coco import format_table
from fcos_lightning.evaluation.evaluator import COCOEvaluator
from fcos_lightning.lightning.module import validation_metrics
from fcos_lightning.runtime.precision import resolve_precision

log = logging.getLogger("fcos_lightning")


@dataclass(frozen=True)
class Schedule:
    """The optimizer schedule in actual optimizer steps for the run's global batch."""

    global_batch: int
    lr: float
    max_steps: int
    milestones: list[int]
    warmup_iters: int
    val_interval: int

    def summary(self) -> str:
        return (
            f"global batch {self.global_batch} | lr {self.lr:g} | {self.max_steps} steps "
            f"(~{self.max_steps * self.global_batch} images) | milestones {self.milestones} | "
            f"warmup {self.warmup_iters} steps | validation every {self.val_interval} steps"
        )


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes a Trainer config will run: devices x nodes (``auto``/-1 devices count visible GPUs)."""
    devices = trainer_cfg.get("devices", 1)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif devices in ("auto", -1):
        gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
        n = max(gpus, 1)
    else:
        n = int(devices)
    return n * int(trainer_cfg.get("num_nodes", 1))


def make_schedule(schedule_cfg: DictConfig, global_batch: int) -> Schedule:
    """Linear LR scaling with the global batch; iterations scaled inversely when ``scale_iterations``."""
    ratio = global_batch / schedule_cfg.reference_batch_size
    steps = (lambda it: max(1, round(it / ratio))) if schedule_cfg.scale_iterations else (lambda it: int(it))
    return Schedule(
        global_batch=global_batch,
        lr=schedule_cfg.base_lr * ratio,
        max_steps=steps(schedule_cfg.max_iter),
        milestones=[steps(m) for m in schedule_cfg.milestones],
        warmup_iters=steps(schedule_cfg.warmup_iters) if schedule_cfg.warmup_iters else 0,
        val_interval=steps(schedule_cfg.val_interval),
    )


def prepare_data(data_cfg: DictConfig) -> None:
    """Build the generated demo dataset on first use (``data.generate_demo``)."""
    if data_cfg.get("generate_demo", False):
        paths = make_demo_dataset(data_cfg.root)
        expected = {
            "train_ann_file": data_cfg.train.ann_file,
            "train_img_dir": data_cfg.train.img_dir,
            "val_ann_file": data_cfg.val.ann_file,
            "val_img_dir": data_cfg.val.img_dir,
        }
        for key, path in expected.items():
            if Path(paths[key]).resolve() != Path(path).resolve():
                raise ValueError(f"demo dataset wrote {key}={paths[key]} but the config expects {path}")


def data_source(data_cfg: DictConfig) -> dict:
    """The val split and loader settings a checkpoint records (``evaluate.py``'s defaults for it), and the
    training set (``export.py precision=int8`` calibrates on it)."""
    dm = data_cfg.datamodule
    return {
        "train_ann_file": str(dm.train_ann_file),
        "train_img_dir": str(dm.train_img_dir),
        "val_ann_file": str(dm.val_ann_file),
        "val_img_dir": str(dm.val_img_dir),
        "val_batch_size": int(dm.val_batch_size),
        "num_workers": int(dm.num_workers),
    }


def build_module(
    cfg: DictConfig,
    num_classes: int,
    category_map: CategoryMap,
    schedule: Schedule | None,
    source: dict | None = None,
    evaluator: COCOEvaluator | None = None,
):
    """The LightningModule for ``cfg`` with a freshly initialised network. ``source``: where its weights come
    from, recorded in its checkpoints (a trained run by default); ``evaluator``: scores its validation."""
    model = build(cfg.model, num_classes=num_classes)
    if source is None:
        source = {"kind": "trained", "output_dir": str(cfg.output_dir), "init_from": cfg.get("init_from")}
    source = {**source, "data": data_source(cfg.data)}
    dm = cfg.data.datamodule
    extra = {}
    if schedule is not None:
        extra = {
            "lr": schedule.lr,
            "milestones": schedule.milestones,
            "warmup_iters": schedule.warmup_iters,
            "warmup_factor": cfg.schedule.warmup_factor,
            "gamma": cfg.schedule.gamma,
        }
    return build(cfg.module, _partial_=True)(
        model=model,
        category_map=category_map.to_dict(),
        test_resize={"min_size": int(dm.test_min_size), "max_size": int(dm.test_max_size)},
        source=source,
        evaluator=evaluator,
        output_dir=cfg.output_dir,
        **extra,
    )


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``last``: the run dir's last.ckpt (must exist); ``auto``: last.ckpt if it exists, else a fresh start."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        path = Path(output_dir) / "checkpoints" / "last.ckpt"
        return str(path) if path.is_file() else None
    if ckpt_path == "last":
        path = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path=last but {path} does not exist (set hydra.run.dir to the run)")
        return str(path)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    return ckpt_path


def train(cfg: DictConfig) -> float:
    """Train ``cfg``; returns the final ``val/AP`` (percent) so that sweepers can optimize it."""
    result = result_channel()
    check_config(cfg)
    output_dir = check_output_dir(cfg.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    prepare_data(cfg.data)
    datamodule = build(cfg.data.datamodule)
    datamodule.setup("validate")  # the val split's ground truth, for the evaluator
    evaluator = COCOEvaluator(datamodule.val_dataset.coco, datamodule.category_map)
    global_batch = world_size(cfg.trainer) * cfg.data.batch_size * cfg.trainer.get("accumulate_grad_batches", 1)
    schedule = make_schedule(cfg.schedule, global_batch)
    module = build_module(cfg, datamodule.num_classes, datamodule.category_map, schedule, evaluator=evaluator)
    if cfg.get("init_from"):
        if cfg.ckpt_path:
            raise ValueError("init_from= (weights only, fine-tuning) and ckpt_path= (full resume) exclude each other")
        init_from_checkpoint(module.model, cfg.init_from, datamodule.category_map)

    callbacks = [build(c) for c in cfg.get("callbacks", {}).values()]
    logger = build(cfg.logger) if cfg.get("logger") else False
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    trainer: pl.Trainer = build(
        cfg.trainer,
        precision=precision,
        max_steps=schedule.max_steps,
        val_check_interval=schedule.val_interval,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(output_dir),
    )
    check_world_size(trainer, world_size(cfg.trainer))
    job_ap = run_multirun_job_with_ddp(trainer, sys.argv[0], str(output_dir))
    if job_ap is not None:
        return job_ap
    if trainer.is_global_zero:
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        log.info(
            "FCOS %s: %d classes %s | %s | precision %s",
            cfg.model.backbone.name,
            datamodule.num_classes,
            list(datamodule.class_names),
            schedule.summary(),
            precision,
        )
        if logger:
            logger.log_hyperparams(flatten(OmegaConf.to_container(cfg, resolve=True)))

    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, str(output_dir)))
    metrics = validation_metrics(trainer.callback_metrics)  # fit returns nothing; its last validation's
    if metrics.get("step") != trainer.global_step:
        metrics = validation_metrics(trainer.validate(module, datamodule=datamodule)[0])
    ap = float(metrics.get("AP", float("nan")))
    if trainer.is_global_zero:
        send_result(result, ap)
        log.info(
            "final validation at step %d:\n%s",
            trainer.global_step,
            format_table(metrics, module.category_map),
        )
        log.info("run dir: %s (TensorBoard: tensorboard --logdir %s)", output_dir, output_dir / "tensorboard")
    return ap


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"a/b": value}`` for TensorBoard hparams."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = str(v) if isinstance(v, list) else v
    return out
