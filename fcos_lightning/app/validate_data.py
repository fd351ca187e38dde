"""``validate_data(cfg)``: check a dataset before training (``validate_data.py``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fcos_lightning.app.config import build, check_config, check_output_dir
from fcos_lightning.app.train import prepare_data, world_size
from fcos_lightning.data.validate import ValidationReport, no_batch_reason, validate_split
from fcos_lightning.evaluation.coverage import FPNCoverage


def validate_data(cfg: DictConfig) -> ValidationReport:
    """Validate the configured splits (``validate_data.py``); prints the report, writes validation.json."""
    check_config(cfg)
    output_dir = check_output_dir(cfg.output_dir)
    prepare_data(cfg.data)
    model = build(cfg.model, num_classes=1)  # only its geometry is used
    dm = cfg.data.datamodule
    coverage = FPNCoverage(
        strides=tuple(model.strides),
        sizes_of_interest=tuple(model.sizes_of_interest),
        center_sampling_radius=cfg.module.center_sampling_radius,
        point_offset=model.point_offset,
        test_min_size=dm.test_min_size,
        test_max_size=dm.test_max_size,
    )
    v = cfg.validate
    train_short = min(dm.train_min_sizes) if OmegaConf.is_list(dm.train_min_sizes) else dm.train_min_sizes
    resize = {"train": (train_short, dm.train_max_size), "val": (dm.test_min_size, dm.test_max_size)}
    splits = [
        validate_split(s, cfg.data[s].ann_file, cfg.data[s].img_dir, coverage, v.images, v.num_workers, resize[s])
        for s in v.splits
    ]
    for rep in splits:
        if rep.split == "train" and rep.num_images:  # no images at all: already a schema error
            usable = rep.num_images - rep.num_images_without_boxes if dm.filter_empty else rep.num_images
            reason = no_batch_reason(
                rep.ann_file, rep.num_images, usable, dm.filter_empty, dm.batch_size, world_size(cfg.trainer)
            )
            if reason:
                rep.add("error", "no_training_batch", reason)
    report = ValidationReport(splits)
    report.write_json(output_dir / "validation.json")
    print(report.format())
    print(f"wrote {output_dir / 'validation.json'}")
    return report
