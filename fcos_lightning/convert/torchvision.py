"""torchvision ``fcos_resnet50_fpn`` state dict -> :class:`~fcos_lightning.modeling.detector.FCOS` keys.

Target model: ``FCOS(TimmBackbone("resnet50", out_indices=(2, 3, 4), norm="FrozenBN", stride_in_1x1=False),
partial(FCOSHead, norm="GN", use_scale=False), num_classes=91 or 80, top_levels=2)``. timm's ResNet-50 uses
torchvision's parameter names and stride placement, so backbone keys copy over unchanged. The converted
network computes what torchvision's does; to reproduce torchvision's *detections* and *targets* the pipeline
also needs torchvision's conventions (:data:`TORCHVISION_CONVENTIONS`): points at the cell corner, strict size
ranges, its score threshold and clipping before NMS. Proven in ``tests/parity/test_torchvision_model.py`` and
``tests/parity/test_torchvision_targets.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.fcos.targets import TargetAssigner

#: torchvision's 91-slot COCO index of each of the 80 COCO classes, in contiguous (category-id sorted) order.
#: Slots 0 (background) and 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 ("N/A") hold no class.
COCO80_TO_TORCHVISION91: tuple[int, ...] = (
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
)

#: torchvision's ImageNet normalization of [0, 1] RGB input, expressed on 0-255 RGB input.
TORCHVISION_PIXEL_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCHVISION_PIXEL_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

NUM_LEVELS = 5


@dataclass(frozen=True)
class TorchvisionConventions:
    """torchvision's conventions: the settings under which this package's points, targets and post-processing
    reproduce torchvision's FCOS.

    - ``point_offset``: torchvision's anchor centres sit at ``i * s``: ``make_points(..., offset=0.0)``.
    - ``use_scale``/``scale``: no per-level Scale: ``FCOSHead(use_scale=False)``, every scale 1.0.
    - ``sizes_of_interest``, ``inclusive_ranges``, ``center_sampling_radius``: torchvision keeps a point for a
      box when ``4s < max(l, t, r, b) < 8s`` (lower bound 0 on P3, upper inf on P7, strict) and
      ``|p - c|_inf < 1.5 s``: ``TargetAssigner(strides, **assigner_kwargs())``. Area ties are broken
      differently: torchvision ranks by float32 ``1e8 - area``, which merges areas closer than 8 px^2.
    - ``score_thresh``, ``thresh_with_ctr``: torchvision keeps ``sqrt(cls * ctr) > 0.2``, i.e.
      ``cls * ctr > 0.04``; ``clip_before_nms``: it clips to the resized image before NMS:
      ``FCOSPostProcessor(**postprocessor_kwargs())``. torchvision does not drop empty boxes afterwards, so
      compare without ``orig_sizes``.
    - ``pixel_mean``, ``pixel_std``: RGB ImageNet statistics on 0-255 input.
    """

    point_offset: float = 0.0
    use_scale: bool = False
    scale: float = 1.0
    sizes_of_interest: tuple[float, ...] = (64, 128, 256, 512)
    inclusive_ranges: bool = False
    center_sampling_radius: float = 1.5
    score_thresh: float = 0.2**2
    thresh_with_ctr: bool = True
    pre_nms_topk: int = 1000
    nms_thresh: float = 0.6
    max_detections: int = 100
    clip_before_nms: bool = True
    pixel_mean: tuple[float, float, float] = TORCHVISION_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = TORCHVISION_PIXEL_STD

    def assigner_kwargs(self) -> dict:
        """Keyword arguments of :class:`~fcos_lightning.fcos.targets.TargetAssigner` besides ``strides``."""
        return self._arguments_of(TargetAssigner)

    def postprocessor_kwargs(self) -> dict:
        """Keyword arguments of :class:`~fcos_lightning.fcos.postprocess.FCOSPostProcessor`."""
        return self._arguments_of(FCOSPostProcessor)

    def _arguments_of(self, cls: type) -> dict:
        parameters = inspect.signature(cls).parameters
        return {k: v for k, v in dataclasses.asdict(self).items() if k in parameters}


TORCHVISION_CONVENTIONS = TorchvisionConventions()

_FPN = re.compile(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(?:0\.)?(weight|bias)")
_EXTRA = re.compile(r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)")
_TOWER = re.compile(r"head\.(classification_head|regression_head)\.conv\.(\d+)\.(weight|bias)")
_PREDICTORS = {
    "head.classification_head.cls_logits": "head.cls_logits",
    "head.regression_head.bbox_reg": "head.bbox_pred",
    "head.regression_head.bbox_ctrness": "head.centerness",
}


def _rename(key: str) -> str | None:
    """Our key for a torchvision key, or None when it has no counterpart."""
    if key.startswith("backbone.body."):
        return key
    if m := _FPN.fullmatch(key):
        kind = "lateral_convs" if m[1] == "inner_blocks" else "output_convs"
        return f"fpn.{kind}.{m[2]}.{m[3]}"
    if m := _EXTRA.fullmatch(key):
        return f"fpn.top_convs.{0 if m[1] == 'p6' else 1}.{m[2]}"
    if m := _TOWER.fullmatch(key):
        tower = "cls_tower" if m[1] == "classification_head" else "box_tower"
        layer, kind = divmod(int(m[2]), 3)  # nn.Sequential of (conv, norm, ReLU) triples
        if kind == 2:
            return None  # a ReLU has no state: such a key is not torchvision's
        return f"head.{tower}.{layer}.{'conv' if kind == 0 else 'norm'}.{m[3]}"
    prefix, _, leaf = key.rpartition(".")
    if prefix in _PREDICTORS and leaf in ("weight", "bias"):
        return f"{_PREDICTORS[prefix]}.{leaf}"
    return None


def torchvision_to_fcos(state_dict: Mapping[str, Tensor], num_classes: int | None = None) -> dict[str, Tensor]:
    """Map a torchvision ``fcos_resnet50_fpn`` state dict to :class:`FCOS` keys.

    Args:
        state_dict: torchvision's ``model.state_dict()``, FPN keys in the current ``inner_blocks.{i}.0.*`` or
            the pre-0.13 ``inner_blocks.{i}.*`` layout. ``num_batches_tracked`` buffers (torchvision builds
            the backbone with plain BatchNorm when no weights are given) are dropped: FrozenBN has none.
        num_classes: ``None`` keeps every classifier row (91: torchvision's COCO slots, background and "N/A"
            included); ``80`` keeps the 80 COCO classes in contiguous order (:data:`COCO80_TO_TORCHVISION91`).

    Returns a new dict for ``load_state_dict(strict=True)`` (sharing the tensors of ``state_dict``), with
    ``head.scales.{l}.scale`` = 1.0 and ``pixel_mean``/``pixel_std`` in torchvision's RGB ImageNet convention
    on 0-255 input. A source key with no counterpart is an error listing all such keys; so is a predictor of
    the wrong shape.
    """
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, value in state_dict.items():
        if key.endswith(".num_batches_tracked"):
            continue
        new = _rename(key)
        if new is None:
            unused.append(key)
        elif new in out:
            raise ValueError(f"{key} maps to {new}, already filled by another key (mixed FPN layouts?)")
        else:
            out[new] = value.detach()
    if unused:
        raise ValueError(f"{len(unused)} torchvision keys have no FCOS counterpart: {unused}")

    for key in ("head.cls_logits.bias", "head.cls_logits.weight"):
        if key not in out:
            raise ValueError(f"not a torchvision FCOS state dict: nothing maps to {key}")
    rows = out["head.cls_logits.bias"].shape[0]
    expected_rows = {"head.cls_logits": rows, "head.bbox_pred": 4, "head.centerness": 1}
    for prefix, n in expected_rows.items():
        for leaf in ("weight", "bias"):
            key = f"{prefix}.{leaf}"
            if key not in out:
                raise ValueError(f"not a torchvision FCOS state dict: nothing maps to {key}")
            if out[key].shape[0] != n:
                raise ValueError(f"{key}: shape {tuple(out[key].shape)} does not have {n} output rows")
    if num_classes is not None and num_classes != rows:
        if num_classes != 80 or rows != 91:
            raise ValueError(f"num_classes={num_classes} from {rows} classifier rows: only None or 80 of 91")
        for leaf in ("weight", "bias"):
            key = f"head.cls_logits.{leaf}"
            out[key] = out[key][list(COCO80_TO_TORCHVISION91)].clone()

    dtype = out["head.cls_logits.bias"].dtype
    for level in range(NUM_LEVELS):
        out[f"head.scales.{level}.scale"] = torch.ones(1, dtype=dtype)
    out["pixel_mean"] = torch.tensor(TORCHVISION_PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    out["pixel_std"] = torch.tensor(TORCHVISION_PIXEL_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return out


def check_shapes(converted: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
    """Raise a ``ValueError`` naming every key whose shape differs between ``converted`` and ``target`` (a
    model's state dict), and the keys either side lacks."""
    problems = [
        f"shape mismatch for {k}: converted {tuple(v.shape)}, model {tuple(target[k].shape)}"
        for k, v in converted.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing := sorted(set(target) - set(converted)):
        problems.append(f"missing from the converted dict: {missing}")
    if unexpected := sorted(set(converted) - set(target)):
        problems.append(f"not in the model: {unexpected}")
    if problems:
        raise ValueError("; ".join(problems))


def load_torchvision_weights(
    model: nn.Module, state_dict: Mapping[str, Tensor], num_classes: int | None = None
) -> None:
    """:func:`torchvision_to_fcos`, then a strict load into ``model``; mismatches raise naming the keys."""
    converted = torchvision_to_fcos(state_dict, num_classes)
    check_shapes(converted, model.state_dict())
    model.load_state_dict(converted, strict=True)
