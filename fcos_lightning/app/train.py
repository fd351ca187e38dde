"""``train(cfg)``: build everything from a composed Hydra config and train (``train.py``)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from fcos_lightning.app.config import ConfigError, build, check_config, check_output_dir
from fcos_lightning.app.init_from import init_from_checkpoint
from fcos_lightning.app.launch import check_world_size, result_channel, run_multirun_job_with_ddp, send_result
from fcos_lightning.data.coco import CategoryMap, CocoDetection
from fcos_lightning.data.demo import demo_paths, make_demo_dataset
from fcos_lightning.data.validate import check_image_files
from fcos_lightning.evaluation.coco import format_table
from fcos_lightning.evaluation.evaluator import COCOEvaluator
from fcos_lightning.lightning.checkpoint_io import remove_stale_temp_files
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

    def step_counts(self) -> dict[str, int | list[int]]:
        """The counts a learning-rate schedule may take, in optimizer steps (its config gives reference
        iterations under the same names)."""
        return {"max_steps": self.max_steps, "milestones": self.milestones, "warmup_iters": self.warmup_iters}

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
    elif isinstance(devices, int) and devices > 0:
        n = devices
    else:
        raise ConfigError(f"trainer.devices: expected a count, a list of device ids or 'auto', got {devices!r}")
    return n * int(trainer_cfg.get("num_nodes", 1))


def make_schedule(schedule_cfg: DictConfig, global_batch: int, base_lr: float) -> Schedule:
    """Linear scaling of ``base_lr`` (the optimizer's at the reference batch) with the global batch; iterations
    scaled inversely when ``scale_iterations``."""
    ratio = global_batch / schedule_cfg.reference_batch_size
    steps = (lambda it: max(1, round(it / ratio))) if schedule_cfg.scale_iterations else (lambda it: int(it))
    return Schedule(
        global_batch=global_batch,
        lr=base_lr * ratio,
        max_steps=steps(schedule_cfg.max_iter),
        milestones=[steps(m) for m in schedule_cfg.milestones],
        warmup_iters=steps(schedule_cfg.warmup_iters) if schedule_cfg.warmup_iters else 0,
        val_interval=steps(schedule_cfg.val_interval),
    )


#: Trainer arguments train() sets itself, and the keys that decide them
SET_BY_APP = {
    "max_steps": "schedule.max_iter (scaled to the global batch)",
    "max_epochs": "schedule.max_iter (scaled to the global batch)",
    "val_check_interval": "schedule.val_interval",
    "callbacks": "callbacks.*",
    "logger": "logger",
    "default_root_dir": "hydra.run.dir",
}


def check_trainer_keys(trainer_cfg: DictConfig) -> None:
    """A ``trainer.*`` key that train() sets itself would be silently ignored: a :class:`ConfigError` instead."""
    for key, instead in SET_BY_APP.items():
        if key in trainer_cfg:
            raise ConfigError(f"trainer.{key}={trainer_cfg[key]!r} would be ignored: train.py sets it from {instead}")


def check_schedule(schedule_cfg: DictConfig) -> None:
    """:class:`ConfigError` naming the first ``schedule.*`` value that is not a number (positive where needed)."""
    positive = ("reference_batch_size", "max_iter", "val_interval")
    for key in ("base_lr", "warmup_iters", "warmup_factor", "gamma", *positive):
        _number(f"schedule.{key}", schedule_cfg[key], positive=key in positive)
    if not OmegaConf.is_list(schedule_cfg.milestones):
        raise ConfigError(f"schedule.milestones: expected a list of steps, got {schedule_cfg.milestones!r}")
    for i, m in enumerate(schedule_cfg.milestones):
        _number(f"schedule.milestones[{i}]", m)


def _number(key: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or (positive and value <= 0):
        raise ConfigError(f"{key}: expected a {'positive ' if positive else ''}number, got {value!r}")


def prepare_data(data_cfg: DictConfig) -> None:
    """Build the generated demo dataset on first use (``data.generate_demo``), unless every ``data.train.*`` and
    ``data.val.*`` path points elsewhere (one's own data with the demo's recipe)."""
    if not data_cfg.get("generate_demo", False):
        return
    configured = {
        "train_ann_file": data_cfg.train.ann_file,
        "train_img_dir": data_cfg.train.img_dir,
        "val_ann_file": data_cfg.val.ann_file,
        "val_img_dir": data_cfg.val.img_dir,
    }
    demo = demo_paths(data_cfg.root)
    if all(Path(path).resolve() != Path(demo[key]).resolve() for key, path in configured.items()):
        log.info("data.train.* and data.val.* are not the demo's: not generating it (data.generate_demo=false)")
        return
    make_demo_dataset(data_cfg.root)


def check_val_images(val: CocoDetection, num_workers: int) -> None:
    """Decode every val image now: one that cannot be decoded would otherwise stop the run at its first
    validation, after training."""
    images = {int(i): val.img_info(k) for k, i in enumerate(val.image_ids)}
    problems = check_image_files(images, val.img_dir, "decode", num_workers)
    if problems:
        raise ValueError(
            f"{val.ann_file}: {problems[0].first()}; fix it before training (validation scores every image)"
        )


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
        steps = {k: v for k, v in schedule.step_counts().items() if k in cfg.lr_schedule}
        extra = {"optimizer": build(cfg.optimizer, lr=schedule.lr), "lr_schedule": build(cfg.lr_schedule, **steps)}
    return build(cfg.module, _partial_=True)(
        model=model,
        category_map=category_map.to_dict(),
        test_resize={"min_size": dm.test_min_size, "max_size": dm.test_max_size, "style": dm.test_resize_style},
        source=source,
        evaluator=evaluator,
        output_dir=cfg.output_dir,
        **extra,
    )


def gradient_clip_val(cfg: DictConfig) -> tuple[float | None, str]:
    """The max gradient norm of the run, and why: ``trainer.gradient_clip_val`` when set, else
    ``auto_gradient_clip_val`` when training is fragile (a backbone without ImageNet weights, or fine-tuning from
    ``init_from``), else none (AdelaiDet's recipe from ImageNet weights does not clip)."""
    if cfg.trainer.gradient_clip_val is not None:
        return float(cfg.trainer.gradient_clip_val), f"{cfg.trainer.gradient_clip_val:g} (trainer.gradient_clip_val)"
    auto = cfg.get("auto_gradient_clip_val")
    backbone = cfg.model.backbone
    if cfg.get("init_from"):
        reason = "fine-tuning from init_from"
    elif not backbone.get("pretrained") and not backbone.get("weights"):
        reason = "the backbone starts from random weights"
    else:
        return None, "off (ImageNet weights; trainer.gradient_clip_val=... to clip)"
    if auto is None:
        return None, f"off (auto_gradient_clip_val=null; {reason})"
    return float(auto), f"{auto:g} ({reason}: auto_gradient_clip_val; trainer.gradient_clip_val=... to change)"


def build_evaluator(cfg: DictConfig, ground_truth, category_map: CategoryMap, **kwargs) -> COCOEvaluator | None:
    """The validation scorer of ``cfg.evaluator`` (``conf/evaluator``) for the val split's ground truth; None when
    the run's config has no evaluator (validation then computes the losses only)."""
    if not cfg.get("evaluator"):
        return None
    # objects passed after instantiate: Hydra would turn the CategoryMap dataclass into a dict
    return build(cfg.evaluator, _partial_=True)(ground_truth=ground_truth, category_map=category_map, **kwargs)


def build_loggers(logger_cfg: DictConfig | None) -> list[pl.loggers.Logger]:
    """The run's loggers: none without a logger node (``~logger``; Hydra rejects ``logger=null`` for a group), one
    for a logger node (``_target_``), one per entry of a node of logger nodes (``logger=many_loggers``; an entry
    set to null is left out)."""
    if not logger_cfg:
        return []
    if "_target_" in logger_cfg:
        return [build(logger_cfg)]
    return [build(node) for node in logger_cfg.values() if node]


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
    check_schedule(cfg.schedule)  # first: lr_schedule.* and optimizer.lr interpolate these keys
    check_config(cfg)
    check_trainer_keys(cfg.trainer)
    world = world_size(cfg.trainer)
    output_dir = check_output_dir(cfg.output_dir)
    remove_stale_temp_files(output_dir / "checkpoints")
    pl.seed_everything(cfg.seed, workers=True)
    prepare_data(cfg.data)
    datamodule = build(cfg.data.datamodule)
    datamodule.setup("validate")  # the val split's ground truth, for the evaluator
    check_val_images(datamodule.val_dataset, int(cfg.data.datamodule.num_workers))
    evaluator = build_evaluator(cfg, datamodule.val_dataset.coco, datamodule.category_map)
    global_batch = world * cfg.data.batch_size * cfg.trainer.get("accumulate_grad_batches", 1)
    schedule = make_schedule(cfg.schedule, global_batch, cfg.optimizer.lr)
    module = build_module(cfg, datamodule.num_classes, datamodule.category_map, schedule, evaluator=evaluator)
    if cfg.get("init_from"):
        if cfg.ckpt_path:
            raise ValueError("init_from= (weights only, fine-tuning) and ckpt_path= (full resume) exclude each other")
        init_from_checkpoint(module.model, cfg.init_from, datamodule.category_map)

    callbacks = [build(c) for c in cfg.get("callbacks", {}).values()]
    if cfg.ema:
        callbacks.append(build(cfg.ema_callback))
    loggers = build_loggers(cfg.get("logger"))
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    clip, clip_reason = gradient_clip_val(cfg)
    trainer: pl.Trainer = build(
        cfg.trainer,
        precision=precision,
        gradient_clip_val=clip,
        max_steps=schedule.max_steps,
        val_check_interval=schedule.val_interval,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(output_dir),
    )
    check_world_size(trainer, world)
    job_ap = run_multirun_job_with_ddp(trainer, sys.argv[0], str(output_dir))
    if job_ap is not None:
        return job_ap
    if trainer.is_global_zero:
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        log.info(
            "FCOS %s: %d classes %s | %s | %s, %s | precision %s | gradient clipping: %s | EMA: %s",
            cfg.model.backbone.name,
            datamodule.num_classes,
            list(datamodule.class_names),
            schedule.summary(),
            cfg.optimizer._target_.rsplit(".", 1)[-1],
            cfg.lr_schedule._target_.rsplit(".", 1)[-1],
            precision,
            clip_reason,
            f"decay {cfg.ema_callback.decay:g}, tau {cfg.ema_callback.tau:g} steps" if cfg.ema else "off",
        )
        hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
        for logger in loggers:
            logger.log_hyperparams(hparams)

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
        log.info("run dir: %s (evaluation pictures in %s)", output_dir, output_dir / "plots")
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
