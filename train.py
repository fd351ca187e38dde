"""Train FCOS: ``python train.py experiment=MS_R_50_2x`` (see conf/ and README.md)."""

import hydra
from omegaconf import DictConfig

from fcos_lightning.app.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
