"""Export a checkpoint to ONNX or OpenVINO (fp32/bf16/int8), checked against PyTorch:
``python export.py ckpt_path=PATH [format=onnx|openvino] [precision=fp32|bf16|int8]``."""

import hydra
from omegaconf import DictConfig

from fcos_lightning.app.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
