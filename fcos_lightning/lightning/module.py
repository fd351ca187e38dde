"""FCOSLitModule: the FCOS network, its criterion and its decoder under Lightning.

One forward of the network serves both: training computes the loss; validation computes the loss and the
detections, which the evaluator it is handed scores over the whole validation split at the end of the round.
The metrics leave through Lightning's logging (``trainer.validate`` returns them, ``trainer.callback_metrics``
holds them after ``fit``): :func:`validation_metrics` reads them back by name.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import WeightAveraging
from torch import Tensor, nn

from fcos_lightning.analysis.plots import plot_images
from fcos_lightning.analysis.report import Analysis
from fcos_lightning.checkpoint import checkpoint_header
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.evaluation.evaluator import COCOEvaluator
from fcos_lightning.evaluation.visualize import detection_grid
from fcos_lightning.fcos.criterion import FCOSCriterion
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.fcos.loss import BoxQuality
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.files import write_json_atomic
from fcos_lightning.lightning.loggers import log_images
from fcos_lightning.lightning.nonfinite import (
    ON_NONFINITE_LOSS,
    NonFiniteLossError,
    OnNonFiniteLoss,
    describe_nonfinite,
)
from fcos_lightning.lightning.optim import WarmupMultiStep
from fcos_lightning.lightning.syncbn import apply_sync_batchnorm, should_sync_batchnorm
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.runtime.own_padding import detect_own_padded

log = logging.getLogger(__name__)

NORM_TYPES = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


#: makes the optimizer from parameter groups (``[{"params": [...]}, {"params": [...], "weight_decay": ...}]``)
OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
#: AdelaiDet's optimizer
ADELAIDET_SGD: OptimizerFactory = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4)
#: AdelaiDet's 1x learning-rate schedule
ADELAIDET_1X = WarmupMultiStep()


class FCOSLitModule(pl.LightningModule):
    """Trains and evaluates an :class:`FCOS` network.

    Args:
        model: the network (its ``strides``, ``sizes_of_interest`` and ``point_offset`` define the geometry).
        category_map: ``CategoryMap.to_dict()`` of the training data; saved in every checkpoint.
        postprocessor: inference settings (AdelaiDet defaults when None).
        center_sampling_radius, inclusive_ranges, box_loss_type, focal_alpha, focal_gamma: target and loss
            settings (:class:`~fcos_lightning.fcos.criterion.FCOSCriterion`).
        optimizer: makes the optimizer from two parameter groups (e.g. a ``functools.partial`` of
            ``torch.optim.SGD`` with its learning rate, already scaled to the global batch, and weight decay);
            default: AdelaiDet's SGD at lr 0.01.
        weight_decay_norm: the weight decay of norm layers' parameters (0 in AdelaiDet); the others take the
            optimizer's.
        lr_schedule: the factor of the learning rate at each optimizer step
            (:mod:`fcos_lightning.lightning.optim`); default: AdelaiDet's 1x multi-step schedule.
        test_resize: ``{"min_size", "max_size", "style"}`` of the evaluation resize, and source: where the weights come
            from (:mod:`fcos_lightning.checkpoint`); both saved in every checkpoint with the network's
            description, so that ``evaluate.py`` and ``predict.py`` rebuild the model from the checkpoint alone.
        evaluator: scores the validation detections (update / compute / reset); None: validation computes the
            losses only.
        num_vis_images: validation images drawn into one picture with their ground truth and detections at each
            round (``detections/`` in the run dir and every logger).
        output_dir: where ``metrics.json`` of the last validation and the pictures are written (None: not); the
            evaluator's analysis, when it made one, adds the evaluation pictures (``plots/``) and their numbers.
        box_quality: what the quality output learns (:class:`~fcos_lightning.fcos.loss.FCOSLoss`): ``ctrness``
            or ``iou``.
        on_nonfinite_loss: ``stop`` raises on a NaN/Inf training loss naming the batch's image ids and the
            loss terms; ``skip`` logs that and skips the step (:mod:`fcos_lightning.lightning.nonfinite`).
    """

    def __init__(
        self,
        model: FCOS,
        category_map: dict,
        postprocessor: FCOSPostProcessor | None = None,
        center_sampling_radius: float = 1.5,
        inclusive_ranges: bool = True,
        box_loss_type: str = "giou",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        optimizer: OptimizerFactory = ADELAIDET_SGD,
        weight_decay_norm: float = 0.0,
        lr_schedule: Callable[[int], float] = ADELAIDET_1X,
        test_resize: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        evaluator: COCOEvaluator | None = None,
        num_vis_images: int = 4,
        output_dir: str | None = None,
        on_nonfinite_loss: OnNonFiniteLoss = "stop",
        box_quality: BoxQuality = "ctrness",
    ) -> None:
        super().__init__()
        if on_nonfinite_loss not in ON_NONFINITE_LOSS:
            raise ValueError(f"on_nonfinite_loss must be one of {list(ON_NONFINITE_LOSS)}, got {on_nonfinite_loss!r}")
        self.on_nonfinite_loss = on_nonfinite_loss
        self.num_nonfinite_steps = 0
        self.model = model
        self.category_map = CategoryMap.from_dict(category_map)
        if self.category_map.num_classes != model.num_classes:
            raise ValueError(
                f"the model has {model.num_classes} classes but the category map has {self.category_map.num_classes}"
            )
        self.criterion = FCOSCriterion.for_model(
            model,
            center_sampling_radius=center_sampling_radius,
            inclusive_ranges=inclusive_ranges,
            box_loss_type=box_loss_type,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            box_quality=box_quality,
        )
        self.decoder = FCOSDecoder.for_model(model, postprocessor)
        self.optimizer, self.weight_decay_norm, self.lr_schedule = optimizer, weight_decay_norm, lr_schedule
        self.test_resize = test_resize
        self.source = dict(source or {"kind": "trained"})
        self.evaluator = evaluator
        self.num_vis_images = num_vis_images
        self.output_dir = output_dir
        self._vis: list[tuple[Tensor, dict, dict]] = []
        #: the F1-best score thresholds of the last analysed validation, saved in every checkpoint
        self.score_thresholds: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """Before DDP wraps the model: declared-SyncBN layers become SyncBatchNorm under multi-GPU DDP."""
        if stage == "fit":
            apply_sync_batchnorm(self.model, *should_sync_batchnorm(self.trainer), verbose=self.global_rank == 0)

    # ---- the shared forward -------------------------------------------------------------------------------
    def forward(self, images: Tensor, image_sizes: Tensor | None = None):
        return self.model(images, image_sizes)

    def compute_loss(self, outputs, targets: list[dict], sync: bool = True) -> dict[str, Tensor]:
        """The criterion's loss terms and their sum ``loss`` (``sync``: normalizers averaged over ranks)."""
        losses = self.criterion(outputs, targets, sync)
        losses["loss"] = losses["loss_cls"] + losses["loss_box"] + losses["loss_ctr"]
        return losses

    # ---- training -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        outputs = self(batch["images"], batch["image_sizes"])
        losses = self.compute_loss(outputs, batch["targets"])
        if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(losses["loss"])), all=False):
            return self._nonfinite_loss(batch, losses)
        bs = batch["images"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False, batch_size=bs)
        self.log("loss", losses["loss"].detach(), prog_bar=True, logger=False, batch_size=bs)
        return losses["loss"]

    def _nonfinite_loss(self, batch: dict, losses: dict[str, Tensor]) -> None:
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else None
        report = describe_nonfinite(self.global_step, batch["image_ids"].tolist(), losses, lr)
        if self.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(f"{report}; stopping (module.on_nonfinite_loss=skip skips such steps)")
        self.num_nonfinite_steps += 1
        log.warning("%s; step skipped (%d so far)", report, self.num_nonfinite_steps)
        return None

    # ---- validation ---------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._vis = []
        if self.evaluator is not None:
            self.evaluator.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Each image is seen padded to its own stride multiple only (:func:`detect_own_padded`), so detections
        and AP do not depend on the batch size or the number of processes; the losses are the sub-batches'
        losses weighted by their number of images, each normalized on this process alone: ranks hold different
        numbers of sizes, so a cross-rank reduction per sub-batch would wait forever (the logged means are
        averaged over ranks once per step by ``sync_dist``)."""
        images, sizes = batch["images"], batch["image_sizes"]
        detections, groups = detect_own_padded(
            self, self.decoder, images, sizes, self.model.size_divisibility, batch["orig_sizes"]
        )
        bs = images.shape[0]
        losses: dict[str, Tensor] = {}
        for index, outputs in groups:
            group = self.compute_loss(outputs, [batch["targets"][i] for i in index.tolist()], sync=False)
            for k, v in group.items():
                losses[k] = losses.get(k, 0) + v * (len(index) / bs)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=bs, sync_dist=True)
        if self.evaluator is None:
            return
        self.evaluator.update(detections, batch["image_ids"])
        if self.global_rank == 0 and len(self._vis) < self.num_vis_images:
            self._keep_for_visualization(batch, detections)

    def on_validation_epoch_end(self) -> None:
        if self.evaluator is None:
            return
        sanity = self.trainer.sanity_checking
        metrics = self.evaluator.compute(analyze=not sanity)  # the same on every rank
        # float64: what Lightning returns is then exactly what the scorer computed (its float32 default is not)
        self.log_dict({f"val/{k}": torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()}, sync_dist=False)
        # the step of this validation, for callback_metrics after fit (not a curve worth plotting)
        self.log("val/step", float(self.global_step), logger=False, sync_dist=False)
        metrics["step"] = float(self.global_step)
        self.log("val_AP", metrics["AP"], prog_bar=True, logger=False)
        if not sanity and self.evaluator.score_thresholds is not None:
            self.score_thresholds = {**self.evaluator.score_thresholds, "step": self.global_step}
        if self.global_rank == 0 and not sanity:
            analysis = self.evaluator.analysis
            self._write_metrics(metrics, analysis)
            start = time.perf_counter()
            self._log_images(analysis)
            seconds = {**self.evaluator.seconds, "pictures": time.perf_counter() - start}
            log.info(
                "validation at step %d: %d images, %s (%s scorer)",
                self.global_step,
                int(metrics["num_images"]),
                ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()),
                self.evaluator.backend,
            )

    def _keep_for_visualization(self, batch: dict, detections: list[dict]) -> None:
        for i, det in enumerate(detections):
            if len(self._vis) >= self.num_vis_images:
                return
            h, w = batch["image_sizes"][i].tolist()
            scale = (batch["image_sizes"][i].float() / batch["orig_sizes"][i].float()).flip(0).repeat(2)
            pred = {k: v.detach().cpu() for k, v in det.items()}
            pred["boxes"] = pred["boxes"] * scale.cpu()  # back to the resized image the picture shows
            gt = {k: v.detach().cpu() for k, v in batch["targets"][i].items()}
            image = batch["images"][i, :, :h, :w].cpu()
            if image.is_floating_point():  # a torchvision-style resize keeps 0-255 floats
                image = image.round().clamp(0, 255).to(torch.uint8)
            self._vis.append((image, gt, pred))

    def _log_images(self, analysis: Analysis | None) -> None:
        """The detection grid and the evaluation pictures to every logger, and as PNG files in the run dir:
        ``detections/val_step<N>.png`` (one per round) and ``plots/<name>.png`` (overwritten each round)."""
        images = {}
        if self._vis:
            # detections drawn above the F1-best threshold of this round once there is one (0.3 before)
            thresh = (self.score_thresholds or {}).get("global", 0.3)
            images["val/detections"] = detection_grid(self._vis, self.category_map.names, thresh).numpy()
        if analysis is not None:
            images.update({f"val/plots/{name}": image for name, image in plot_images(analysis).items()})
        log_images(self.loggers, images, self.global_step)
        if not self.output_dir:
            return
        for key, image in images.items():
            if key == "val/detections":
                path = Path(self.output_dir) / "detections" / f"val_step{self.global_step:07d}.png"
            else:
                path = Path(self.output_dir) / "plots" / f"{key.rpartition('/')[2]}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(path)

    def _write_metrics(self, metrics: dict[str, float], analysis: Analysis | None) -> None:
        """``metrics.json``: the round's metrics, and the numbers behind the pictures under ``analysis``."""
        if not self.output_dir:
            return
        path = Path(self.output_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        content = dict(metrics)
        if analysis is not None:
            content["analysis"] = analysis.to_dict()
        write_json_atomic(path, content, indent=2)

    # ---- optimization -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    (no_decay if isinstance(module, NORM_TYPES) else decay).append(p)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": self.weight_decay_norm})
        optimizer = self.optimizer(groups)
        # a lambda, not the schedule object: LambdaLR would save a callable object's fields in the checkpoint and
        # put them back on resume, overriding the run's configuration
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_schedule(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------------------
    def checkpoint_header(self) -> dict[str, Any]:
        """What every checkpoint carries besides the tensors (:mod:`fcos_lightning.checkpoint`)."""
        return checkpoint_header(
            self.model,
            self.category_map,
            self.decoder.postprocessor,
            self.criterion.settings(),
            self.test_resize,
            self.source,
            self.score_thresholds,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.checkpoint_header())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a resume on data with other category ids (it would silently train label k as another class);
        resuming a checkpoint of an ``ema=true`` run without EMA continues from its trained weights, not the
        averaged ones its ``state_dict`` holds (:mod:`fcos_lightning.lightning.ema`). A resumed run keeps the
        score thresholds of the validation before it until its own first one."""
        self.score_thresholds = checkpoint.get("score_thresholds")
        saved = checkpoint.get("classes") or checkpoint.get("category_map")  # format 1, format 0
        if saved is not None and CategoryMap.from_dict(saved) != self.category_map:
            raise ValueError(
                f"{self.trainer.ckpt_path}: trained on category ids {list(saved['cat_ids'])} {list(saved['names'])}, "
                f"but the data has {list(self.category_map.cat_ids)} {list(self.category_map.names)}; resume on the "
                "same categories, or fine-tune with init_from= instead of ckpt_path="
            )
        averaging = any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks)
        if "current_model_state" in checkpoint and not averaging:
            log.warning("resuming the trained weights of an EMA checkpoint without EMA (ema=false): the average ends")
            checkpoint["state_dict"] = checkpoint["current_model_state"]


def validation_metrics(logged: Mapping[str, Any]) -> dict[str, float]:
    """The evaluator's metrics (and the validation losses) from what the module logged: an element of what
    ``trainer.validate`` returns, or ``trainer.callback_metrics`` after ``fit``; ``val/`` prefix removed."""
    return {k.removeprefix("val/"): float(v) for k, v in logged.items() if k.startswith("val/")}
