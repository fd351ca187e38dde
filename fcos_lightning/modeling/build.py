"""A network from its description and back: the plain-value model description that checkpoints carry.

``model_description(model)`` lists the constructor arguments of an :class:`FCOS` and of its backbone and head
(``{"backbone": {"type": "timm", ...}, "head": {...}, "num_classes": ..., ...}``); ``build_model(description)``
builds the same architecture with fresh weights. Neither needs a config system: a checkpoint rebuilds its
network from this description alone, and renaming a config key cannot break it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import nn

from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead

__all__ = ["BACKBONES", "build_model", "model_description"]

#: backbone classes by the ``type`` a description names them with.
BACKBONES: dict[str, type[nn.Module]] = {"timm": TimmBackbone}


def model_description(model: FCOS) -> dict[str, Any]:
    """Plain values that rebuild ``model``'s architecture with :func:`build_model` (the weights aside)."""
    kinds = [k for k, cls in BACKBONES.items() if type(model.backbone) is cls]
    if not kinds:
        raise TypeError(f"{type(model.backbone).__name__} is not a registered backbone ({sorted(BACKBONES)})")
    return {
        "backbone": {"type": kinds[0], **model.backbone.constructor_args()},
        "head": model.head.constructor_args(),
        **model.constructor_args(),
    }


def build_model(description: Mapping[str, Any]) -> FCOS:
    """The network a :func:`model_description` describes, with freshly initialised weights."""
    args = dict(description)
    backbone_args = dict(args.pop("backbone"))
    kind = backbone_args.pop("type")
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone type {kind!r}; known: {sorted(BACKBONES)}")
    head = functools.partial(FCOSHead, **args.pop("head"))
    return FCOS(BACKBONES[kind](**backbone_args), head, **args)
