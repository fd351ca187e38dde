"""FCOSLitModule: the FCOS network, its criterion and its decoder under Lightning.

One forward of the network serves both: training computes the loss; validation computes the loss and the
detections, which the evaluator it is handed scores over the whole validation split at the end of the round.
The metrics leave through Lightning's logging (``trainer.validate`` returns them, ``trainer.callback_metrics``
holds them after ``fit``): :func:`validation_metrics` reads them back by name.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
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
from fcos_lightning.lightning.syncbn import apply_sync_batchnorm, should_sync_batchnorm
from fcos_lightning.modeling.detector import FCOS

log = logging.getLogger(__name__)

NORM_TYPES = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def warmup_multistep(step: int, warmup_iters: int, warmup_factor: float, milestones: Sequence[int], gamma: float):
    """detectron2's WarmupMultiStepLR factor: linear warmup from ``warmup_factor`` then step decay."""
    factor = gamma ** bisect.bisect_right(list(milestones), step)
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


class FCOSLitModule(pl.LightningModule):
    """Trains and evaluates an :class:`FCOS` network.

    Args:
        model: the network (its ``strides``, ``sizes_of_interest`` and ``point_offset`` define the geometry).
        category_map: ``CategoryMap.to_dict()`` of the training data; saved in every checkpoint.
        postprocessor: inference settings (AdelaiDet defaults when None).
        center_sampling_radius, inclusive_ranges, box_loss_type, focal_alpha, focal_gamma: target and loss
            settings (:class:`~fcos_lightning.fcos.criterion.FCOSCriterion`).
        lr: learning rate after warmup (already scaled to the global batch by the caller).
        momentum, weight_decay: SGD settings; ``weight_decay_norm`` applies to norm layers (0 in AdelaiDet).
        warmup_iters, warmup_factor, milestones, gamma: the WarmupMultiStepLR schedule, in optimizer steps.
        test_resize: ``{"min_size", "max_size"}`` of the evaluation resize, and source: where the weights come
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
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        weight_decay_norm: float = 0.0,
        warmup_iters: int = 1000,
        warmup_factor: float = 1e-3,
        milestones: Sequence[int] = (60000, 80000),
        gamma: float = 0.1,
        test_resize: Mapping[str, int] | None = None,
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
        self.lr, self.momentum = lr, momentum
        self.weight_decay, self.weight_decay_norm = weight_decay, weight_decay_norm
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor
        self.milestones, self.gamma = list(milestones), gamma
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

    def compute_loss(self, outputs, targets: list[dict]) -> dict[str, Tensor]:
        """The criterion's loss terms and their sum ``loss``."""
        losses = self.criterion(outputs, targets)
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
        outputs = self(batch["images"], batch["image_sizes"])
        losses = self.compute_loss(outputs, batch["targets"])
        bs = batch["images"].shape[0]
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=bs, sync_dist=True)
        if self.evaluator is None:
            return
        detections = self.decoder(outputs, batch["image_sizes"], batch["orig_sizes"])
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
            self._vis.append((batch["images"][i, :, :h, :w].cpu(), gt, pred))

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
        groups = [{"params": decay, "weight_decay": self.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": self.weight_decay_norm})
        optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_multistep(step, self.warmup_iters, self.warmup_factor, self.milestones, self.gamma),
        )
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
        """A resumed run keeps the thresholds of the validation before it until its own first one."""
        self.score_thresholds = checkpoint.get("score_thresholds")


def validation_metrics(logged: Mapping[str, Any]) -> dict[str, float]:
    """The evaluator's metrics (and the validation losses) from what the module logged: an element of what
    ``trainer.validate`` returns, or ``trainer.callback_metrics`` after ``fit``; ``val/`` prefix removed."""
    return {k.removeprefix("val/"): float(v) for k, v in logged.items() if k.startswith("val/")}
