"""Other frameworks' checkpoint files -> our network's weights: reading them, renaming their keys for the
network they describe, and fitting the result strictly to our model.

:func:`convert_state_dict` returns the renamed weights and the config overrides (``conf/train.yaml`` keys) that
build the matching network; ``fcos_lightning.app.convert`` composes those, builds the network and writes a
checkpoint of ours (:mod:`fcos_lightning.checkpoint`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fcos_lightning.convert.adelaidet import Conversion, adelaidet_to_fcos, detect_architecture
from fcos_lightning.convert.torchvision import TORCHVISION_CONVENTIONS, torchvision_to_fcos
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.data.coco_categories import coco_category_map
from fcos_lightning.files import safe_load

log = logging.getLogger("fcos_lightning.convert")

FORMATS = ("adelaidet", "torchvision")


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path``: bare, or under ``model``/``state_dict``; a leading ``module.`` is stripped.

    Loads with ``torch.load(weights_only=True)`` only: a file that needs arbitrary unpickling (e.g. a
    detectron2 ``.pkl``) is refused with the reason.
    """
    path = Path(path)
    obj = safe_load(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: expected a (non-empty) state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


@dataclass
class MatchReport:
    """What happened to each key when a converted dict met the model it is for."""

    filled: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


def match_to_model(conversion: Conversion, model_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], MatchReport]:
    """Strictly fit a conversion to a model's state dict.

    Only BatchNorm ``num_batches_tracked`` counters may differ (FrozenBN has none; a trainable BN without one
    in the file starts at 0). Any other key missing either side, or any shape mismatch, raises one
    ``ValueError`` naming every offending key (source and ours).
    """
    report = MatchReport(dropped=dict(conversion.dropped))
    state: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, value in conversion.state_dict.items():
        source = conversion.source_keys.get(key, key)
        if key not in model_state:
            if key.endswith("num_batches_tracked"):
                report.dropped[source] = "BatchNorm counter of a layer that is FrozenBN here"
            else:
                problems.append(f"{source} -> {key}: not in the model")
        elif value.shape != model_state[key].shape:
            problems.append(
                f"shape mismatch for {source} -> {key}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(model_state[key].shape)}"
            )
        else:
            state[key] = value.to(model_state[key].dtype)
    for key in model_state.keys() - conversion.state_dict.keys():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(model_state[key])
            report.filled.append(key)
        else:
            problems.append(f"{key}: in the model but nothing in the checkpoint maps to it")
    if problems:
        raise ValueError(f"{len(problems)} key problems: " + "; ".join(sorted(problems)))
    return state, report


def converted_category_map(num_classes: int) -> CategoryMap:
    """COCO's 80 classes for an 80-class classifier, ``class0..`` with ids ``1..`` otherwise."""
    if num_classes == 80:
        return coco_category_map()
    log.warning(
        "%d classes (not COCO's 80): names class0..class%d, ids 1..%d", num_classes, num_classes - 1, num_classes
    )
    return CategoryMap(cat_ids=tuple(range(1, num_classes + 1)), names=tuple(f"class{k}" for k in range(num_classes)))


def torchvision_overrides() -> list[str]:
    """Config overrides reproducing torchvision's ``fcos_resnet50_fpn`` (:data:`TORCHVISION_CONVENTIONS`)."""
    g = TORCHVISION_CONVENTIONS
    return [
        "model=r50",
        "data=coco",
        "data.datamodule.test_resize_style=torchvision",  # its detection transform's resize, not detectron2's
        "model.backbone.pretrained=false",
        "model.backbone.weights=null",
        "model.backbone.stride_in_1x1=false",
        f"model.point_offset={g.point_offset}",
        f"model.sizes_of_interest={list(g.sizes_of_interest)}",
        f"model.head.use_scale={str(g.use_scale).lower()}",
        f"++model.pixel_mean={list(g.pixel_mean)}",
        f"++model.pixel_std={list(g.pixel_std)}",
        f"module.center_sampling_radius={g.center_sampling_radius}",
        *(f"module.postprocessor.{k}={str(v).lower() if isinstance(v, bool) else v}"
          for k, v in g.postprocessor_kwargs().items()),
    ]  # fmt: skip


def convert_state_dict(
    source_format: str, state: Mapping[str, Tensor], stride_in_1x1: bool | None = None
) -> tuple[Conversion, list[str], int]:
    """``(conversion, config overrides, num_classes)`` for a source state dict."""
    if source_format == "adelaidet":
        arch = detect_architecture(state, stride_in_1x1)
        log.info("AdelaiDet architecture: %s", arch)
        conversion = adelaidet_to_fcos(state, arch)
        # the buffers carry the input convention; the config records it too (RGB order, 0-255 input)
        convention = [f"++model.{k}={conversion.state_dict[k].flatten().tolist()}" for k in ("pixel_mean", "pixel_std")]
        return conversion, [*arch.overrides(), *convention], arch.num_classes
    if source_format == "torchvision":
        if stride_in_1x1:
            raise ValueError("stride_in_1x1 does not apply to torchvision weights (3x3 stride placement)")
        converted = torchvision_to_fcos(state, num_classes=80)
        dropped = {k: "BatchNorm counter; the backbone is FrozenBN" for k in state if k.endswith("num_batches_tracked")}
        return Conversion(converted, {}, dropped), torchvision_overrides(), 80
    raise ValueError(f"unknown source format {source_format!r}; expected one of {FORMATS}")
