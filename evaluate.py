"""Evaluate a checkpoint with COCO AP: ``python evaluate.py ckpt_path=PATH [data.val.ann_file=...]``."""

import hydra
from omegaconf import DictConfig

from fcos_lightning.app.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
