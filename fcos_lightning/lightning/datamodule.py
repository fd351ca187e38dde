"""LightningDataModule for COCO-format data: datasets, self-sharding samplers, loaders.

Create the Trainer with ``use_distributed_sampler=False``: the samplers here shard for DDP themselves (a batch
sampler cannot be wrapped by Lightning's DistributedSampler).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from fcos_lightning.data.coco import ON_BAD_IMAGE, CategoryMap, CocoDetection, OnBadImage
from fcos_lightning.data.collate import Collator
from fcos_lightning.data.samplers import AspectRatioGroupedBatchSampler, InferenceSampler, dist_info
from fcos_lightning.data.transforms import (
    RESIZE_STYLES,
    ResizeStyle,
    build_test_transforms,
    build_train_transforms,
    too_thin,
)
from fcos_lightning.data.validate import no_batch_reason

__all__ = ["COCODataModule"]


class COCODataModule(pl.LightningDataModule):
    """Train/val COCO-format datasets with AdelaiDet's input pipeline.

    ``category_map``, ``num_classes`` and ``class_names`` come from the train json's ``categories`` at
    construction, so the model can be sized before :meth:`setup`. ``val_dataset.coco`` is the pycocotools
    object for COCOeval. Validation shards contiguously with repeats to equal length
    (:class:`InferenceSampler`): de-duplicate predictions by image id. ``on_bad_image`` (``error`` | ``skip``)
    applies to training images; a bad validation image always stops (skipping it would bias AP).
    ``test_resize_style``: how validation images are resized (``style`` of
    :class:`~fcos_lightning.data.transforms.ResizeShortestEdge`; ``torchvision`` for converted torchvision checkpoints).
    """

    def __init__(
        self,
        train_ann_file: str,
        train_img_dir: str,
        val_ann_file: str,
        val_img_dir: str,
        train_min_sizes: Sequence[int] = (800,),
        train_max_size: int = 1333,
        test_min_size: int = 800,
        test_max_size: int = 1333,
        test_resize_style: ResizeStyle = "detectron2",
        hflip_prob: float = 0.5,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 2,
        filter_empty: bool = True,
        aspect_ratio_grouping: bool = True,
        size_divisibility: int = 32,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        on_bad_image: OnBadImage = "error",
    ) -> None:
        super().__init__()
        self.train_ann_file = os.fspath(train_ann_file)
        self.train_img_dir = os.fspath(train_img_dir)
        self.val_ann_file = os.fspath(val_ann_file)
        self.val_img_dir = os.fspath(val_img_dir)
        self.train_min_sizes = (
            (int(train_min_sizes),) if isinstance(train_min_sizes, int) else tuple(int(s) for s in train_min_sizes)
        )
        self.train_max_size = int(train_max_size)
        self.test_min_size = int(test_min_size)
        self.test_max_size = int(test_max_size)
        if test_resize_style not in RESIZE_STYLES:
            raise ValueError(
                f"data.datamodule.test_resize_style must be one of {list(RESIZE_STYLES)}, got {test_resize_style!r}"
            )
        self.test_resize_style: ResizeStyle = test_resize_style
        self.hflip_prob = float(hflip_prob)
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {val_batch_size}")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.num_workers = int(num_workers)
        self.filter_empty = bool(filter_empty)
        self.aspect_ratio_grouping = bool(aspect_ratio_grouping)
        self.size_divisibility = int(size_divisibility)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(seed)
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {list(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        self.on_bad_image = on_bad_image

        self.category_map: CategoryMap = CategoryMap.from_coco_json(self.train_ann_file)
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None
        self.collator = Collator(self.size_divisibility)

    @property
    def num_classes(self) -> int:
        """Foreground classes ``C`` (no background), from the train json."""
        return self.category_map.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names by contiguous label."""
        return list(self.category_map.names)

    def setup(self, stage: str | None = None) -> None:
        """Build the train dataset for ``fit`` and the val dataset for every stage (once each)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = CocoDetection(
                self.train_ann_file,
                self.train_img_dir,
                transforms=build_train_transforms(self.train_min_sizes, self.train_max_size, self.hflip_prob),
                train=True,
                filter_empty=self.filter_empty,
                on_bad_image=self.on_bad_image,
            )
            short = min(self.train_min_sizes)
            _check_resizable(self.train_dataset, short, self.train_max_size, "train_min_sizes", "train_max_size")
        if self.val_dataset is None:
            val = CocoDetection(
                self.val_ann_file,
                self.val_img_dir,
                transforms=build_test_transforms(self.test_min_size, self.test_max_size, self.test_resize_style),
                train=False,
            )
            if val.category_map != self.category_map:
                raise ValueError(
                    f"categories differ between {self.train_ann_file} {self.category_map.to_dict()} and "
                    f"{self.val_ann_file} {val.category_map.to_dict()}"
                )
            self.val_dataset = val
            _check_resizable(
                val, self.test_min_size, self.test_max_size, "test_min_size", "test_max_size", self.test_resize_style
            )

    def _loader_kwargs(self) -> dict:
        workers = self.num_workers > 0
        return {
            "num_workers": self.num_workers,
            "collate_fn": self.collator,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and workers,
        }

    def train_dataloader(self) -> DataLoader:
        """Aspect-ratio-grouped (or plain shuffled) batches of ``batch_size`` per rank; no partial batches."""
        if self.train_dataset is None:
            self.setup("fit")
        ds = self.train_dataset
        num_replicas, rank = dist_info()
        total = len(ds) + ds.num_removed_images
        reason = no_batch_reason(self.train_ann_file, total, len(ds), self.filter_empty, self.batch_size, num_replicas)
        if reason:
            raise ValueError(reason)
        if self.aspect_ratio_grouping:
            batch_sampler = AspectRatioGroupedBatchSampler(
                ds.aspect_ratios,
                self.batch_size,
                shuffle=True,
                seed=self.seed,
                num_replicas=num_replicas,
                rank=rank,
                drop_last=True,
            )
        else:
            sampler = DistributedSampler(ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=self.seed)
            batch_sampler = BatchSampler(sampler, self.batch_size, drop_last=True)
        return DataLoader(ds, batch_sampler=batch_sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """Every val image once per rank shard (padded by repeats), ``val_batch_size`` per batch."""
        if self.val_dataset is None:
            self.setup("validate")
        sampler = InferenceSampler(len(self.val_dataset))
        return DataLoader(
            self.val_dataset,
            sampler=sampler,
            batch_size=self.val_batch_size,
            shuffle=False,
            drop_last=False,
            **self._loader_kwargs(),
        )


def _check_resizable(
    ds: CocoDetection,
    short_edge: int,
    max_size: int,
    short_key: str,
    max_key: str,
    style: ResizeStyle = "detectron2",
) -> None:
    """ValueError naming the images whose resized side would round to 0 px (:func:`too_thin`)."""
    infos = [ds.img_info(i) for i in range(len(ds))]
    heights, widths = [im["height"] for im in infos], [im["width"] for im in infos]
    bad = [infos[i] for i in too_thin(heights, widths, short_edge, max_size, style)]
    if bad:
        shown = ", ".join(f"image id {im['id']} ({im['width']}x{im['height']})" for im in bad[:5])
        raise ValueError(
            f"{ds.ann_file}: {len(bad)} images too thin to resize: a side rounds to 0 px at data.datamodule."
            f"{short_key}={short_edge}, {max_key}={max_size}: {shown}; remove them"
        )
