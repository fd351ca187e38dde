"""Detect objects in images: ``python predict.py ckpt_path=PATH input=FILE_OR_DIR output=DIR [score_thresh=0.3]``."""

import hydra
from omegaconf import DictConfig

from fcos_lightning.app.predict import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
