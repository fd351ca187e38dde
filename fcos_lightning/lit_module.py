"""FCOSLitModule: the FCOS network, its loss and its post-processing under Lightning.

One forward of the network serves both: training computes the loss; validation computes the loss and the
detections, which are scored by COCO AP over the whole validation split at the end of the round.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fcos_lightning.checkpointing import write_json_atomic
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.distributed import apply_sync_batchnorm, should_sync_batchnorm
from fcos_lightning.evaluation import METRIC_NAMES, evaluate_coco, gather_detections, to_coco_results
from fcos_lightning.fcos.loss import BoxQuality, FCOSLoss
from fcos_lightning.fcos.points import make_points
from fcos_lightning.fcos.postprocess import FCOSPostProcessor, flatten_level
from fcos_lightning.fcos.targets import TargetAssigner
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.nonfinite import ON_NONFINITE_LOSS, NonFiniteLossError, OnNonFiniteLoss, describe_nonfinite
from fcos_lightning.visualize import detection_grid

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
        center_sampling_radius, box_loss_type, focal_alpha, focal_gamma: target and loss settings.
        lr: learning rate after warmup (already scaled to the global batch by the caller).
        momentum, weight_decay: SGD settings; ``weight_decay_norm`` applies to norm layers (0 in AdelaiDet).
        warmup_iters, warmup_factor, milestones, gamma: the WarmupMultiStepLR schedule, in optimizer steps.
        run_config: the resolved run configuration (plain containers), saved in checkpoints so that
            ``evaluate.py`` and ``predict.py`` rebuild the model from the checkpoint alone.
        num_vis_images: validation images drawn to TensorBoard at each round.
        output_dir: where ``metrics.json`` of the last validation is written (None: not written).
        box_quality: what the quality output learns (:class:`FCOSLoss`): ``ctrness`` or ``iou``.
        on_nonfinite_loss: ``stop`` raises on a NaN/Inf training loss naming the batch's image ids and the
            loss terms; ``skip`` logs that and skips the step (:mod:`fcos_lightning.nonfinite`).
    """

    def __init__(
        self,
        model: FCOS,
        category_map: dict,
        postprocessor: FCOSPostProcessor | None = None,
        center_sampling_radius: float = 1.5,
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
        run_config: dict | None = None,
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
        self.assigner = TargetAssigner(model.strides, model.sizes_of_interest, center_sampling_radius)
        self.loss_fn = FCOSLoss(model.num_classes, box_loss_type, focal_alpha, focal_gamma, box_quality)
        self.postprocessor = postprocessor or FCOSPostProcessor()
        self.lr, self.momentum = lr, momentum
        self.weight_decay, self.weight_decay_norm = weight_decay, weight_decay_norm
        self.warmup_iters, self.warmup_factor = warmup_iters, warmup_factor
        self.milestones, self.gamma = list(milestones), gamma
        self.run_config = run_config
        self.num_vis_images = num_vis_images
        self.output_dir = output_dir
        self.last_metrics: dict[str, float] = {}
        self.last_results: list[dict] = []
        self._val_results: list[dict] = []
        self._val_image_ids: list[int] = []
        self._vis: list[tuple[Tensor, dict, dict]] = []

    def setup(self, stage: str) -> None:
        """Before DDP wraps the model: declared-SyncBN layers become SyncBatchNorm under multi-GPU DDP."""
        if stage == "fit":
            apply_sync_batchnorm(self.model, *should_sync_batchnorm(self.trainer), verbose=self.global_rank == 0)

    # ---- the shared forward -------------------------------------------------------------------------------
    def forward(self, images: Tensor, image_sizes: Tensor | None = None):
        return self.model(images, image_sizes)

    def points(self, outputs) -> list[Tensor]:
        sizes = [x.shape[-2:] for x in outputs.cls_logits]
        return make_points(sizes, self.model.strides, self.model.point_offset, outputs.cls_logits[0].device)

    def compute_loss(self, outputs, points: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        gt = self.assigner(
            points,
            [t["boxes"] for t in targets],
            [t["labels"] for t in targets],
            self.model.num_classes,
            [t["iscrowd"] for t in targets] if targets and "iscrowd" in targets[0] else None,
        )

        def cat(levels: list[Tensor]) -> Tensor:
            return torch.cat([flatten_level(x) for x in levels], dim=1)

        losses = self.loss_fn(
            cat(outputs.cls_logits),
            cat(outputs.box_reg),
            cat(outputs.centerness)[..., 0],
            gt.labels,
            gt.reg_targets,
        )
        losses["loss"] = losses["loss_cls"] + losses["loss_box"] + losses["loss_ctr"]
        return losses

    def detect(self, outputs, points: list[Tensor], image_sizes: Tensor, orig_sizes: Tensor | None):
        return self.postprocessor(
            outputs.cls_logits,
            outputs.box_reg,
            outputs.centerness,
            points,
            self.model.strides,
            image_sizes,
            orig_sizes,
        )

    # ---- training -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        outputs = self(batch["images"], batch["image_sizes"])
        losses = self.compute_loss(outputs, self.points(outputs), batch["targets"])
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
        self._val_results, self._val_image_ids, self._vis = [], [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        outputs = self(batch["images"], batch["image_sizes"])
        points = self.points(outputs)
        losses = self.compute_loss(outputs, points, batch["targets"])
        bs = batch["images"].shape[0]
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=bs, sync_dist=True)
        detections = self.detect(outputs, points, batch["image_sizes"], batch["orig_sizes"])
        ids = batch["image_ids"].tolist()
        self._val_results.extend(to_coco_results(ids, detections, self.category_map))
        self._val_image_ids.extend(ids)
        if self.global_rank == 0 and len(self._vis) < self.num_vis_images:
            self._keep_for_visualization(batch, detections)

    def on_validation_epoch_end(self) -> None:
        results, image_ids = gather_detections(self._val_results, self._val_image_ids)
        metrics = None
        if self.global_rank == 0:
            val_dataset = self.trainer.datamodule.val_dataset
            if len(image_ids) != len(val_dataset) and not self.trainer.sanity_checking:
                log.warning("validation scored %d of the %d val images", len(image_ids), len(val_dataset))
            metrics = evaluate_coco(val_dataset.coco, results, image_ids, self.category_map)
            metrics["num_images"] = float(len(image_ids))
            metrics["step"] = float(self.global_step)
        metrics = broadcast_object(metrics)
        self.last_metrics = metrics
        self.last_results = results
        self.log_dict({f"val/{k}": metrics[k] for k in METRIC_NAMES}, prog_bar=False, sync_dist=False)
        self.log("val_AP", metrics["AP"], prog_bar=True, logger=False)
        if self.global_rank == 0 and not self.trainer.sanity_checking:
            self._write_metrics(metrics)
            self._log_images()
        self._val_results, self._val_image_ids = [], []

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

    def _log_images(self) -> None:
        if not self._vis:
            return
        grid = detection_grid(self._vis, self.category_map.names)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image("val/detections", grid, global_step=self.global_step)
        if self.output_dir:
            from torchvision.io import write_png

            out = Path(self.output_dir) / "detections"
            out.mkdir(parents=True, exist_ok=True)
            write_png(grid, str(out / f"val_step{self.global_step:07d}.png"))

    def _write_metrics(self, metrics: dict[str, float]) -> None:
        if not self.output_dir:
            return
        path = Path(self.output_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, metrics, indent=2)

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
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["category_map"] = self.category_map.to_dict()
        checkpoint["fcos_config"] = self.run_config


def broadcast_object(obj: Any) -> Any:
    """rank 0's object on every rank (identity without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj
