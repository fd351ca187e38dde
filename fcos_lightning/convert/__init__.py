"""Checkpoint converters from other FCOS implementations into this package's :class:`FCOS` keys."""

from fcos_lightning.convert.adelaidet import AdelaiDetArch, adelaidet_to_fcos, detect_architecture
from fcos_lightning.convert.torchvision import (
    COCO80_TO_TORCHVISION91,
    TORCHVISION_CONVENTIONS,
    TorchvisionConventions,
    check_shapes,
    load_torchvision_weights,
    torchvision_to_fcos,
)

__all__ = [
    "AdelaiDetArch",
    "adelaidet_to_fcos",
    "detect_architecture",
    "COCO80_TO_TORCHVISION91",
    "TORCHVISION_CONVENTIONS",
    "TorchvisionConventions",
    "check_shapes",
    "load_torchvision_weights",
    "torchvision_to_fcos",
]
