"""Convert an AdelaiDet or torchvision FCOS checkpoint into ours:
``python convert.py --from adelaidet|torchvision INPUT OUTPUT`` (see README.md, "Converting weights")."""

import argparse
import logging

from fcos_lightning.app.convert import convert_checkpoint
from fcos_lightning.convert.checkpoint import FORMATS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--from", dest="source", choices=FORMATS, required=True, help="source framework")
    parser.add_argument("input", help="source checkpoint (state dict, {'model': ...}, module.-prefixed keys)")
    parser.add_argument("output", help="checkpoint of ours to write (for evaluate.py, predict.py, init_from=)")
    parser.add_argument(
        "--stride-in-1x1",
        choices=("auto", "true", "false"),
        default="auto",
        help="AdelaiDet ResNets: MSRA stride placement (auto: true for R-50/R-101, false for ResNeXt)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stride_in_1x1 = None if args.stride_in_1x1 == "auto" else args.stride_in_1x1 == "true"
    convert_checkpoint(args.source, args.input, args.output, stride_in_1x1)


if __name__ == "__main__":
    main()
