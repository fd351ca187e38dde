"""Export a checkpoint to ONNX, verified with onnxruntime: ``python export.py ckpt_path=PATH [format=onnx]``."""

import hydra
from omegaconf import DictConfig

from fcos_lightning.app.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
