"""Validate a COCO-format dataset before training: ``python validate_data.py [experiment=...] [data.*=...]``.

Prints a report, writes ``validation.json`` to the run dir and exits 1 when the data has errors.
"""

import sys

import hydra
from omegaconf import DictConfig

from fcos_lightning.app.validate_data import validate_data


@hydra.main(version_base="1.3", config_path="conf", config_name="validate_data")
def main(cfg: DictConfig) -> None:
    if not validate_data(cfg).ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
