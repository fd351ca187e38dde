"""AdelaiDet FCOS checkpoints (every zoo row) -> :class:`~fcos_lightning.modeling.detector.FCOS` keys.

The architecture is read from the keys themselves (:func:`detect_architecture`): ResNet-50/101 (MSRA,
``stride_in_1x1``), ResNeXt-101 32x8d / 64x4d, DCNv2 stages and head, DLA-34, P6/P7 or none (FCOS_RT), GN /
BN / no-norm heads, shared towers. Keys are renamed one to one (``_rename``). Two conversions besides renaming:

- input convention: AdelaiDet feeds BGR 0-255 minus ``pixel_mean`` divided by ``pixel_std`` (both stored in
  its checkpoints, in BGR order). Our model normalizes RGB, so the first conv's input channels are reversed
  and ``pixel_mean``/``pixel_std`` are stored reversed (RGB): the network computes exactly the same function.
- DLA-34: AdelaiDet's (ucbdrive's) DLA builds ``project`` layers in ``level3`` and ``level4`` that its forward
  never uses; timm's ``dla34`` omits them, so those keys are dropped and reported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

HEAD = "proposal_generator.fcos_head."
BOTTOM_UP = "backbone.bottom_up."
#: detectron2's default BGR mean; AdelaiDet's X-101-32x8d configs also divide by the ImageNet std.
D2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
D2_IMAGENET_STD_BGR = (57.375, 57.120, 58.395)
#: timm names of the ResNet(-Xt) trunks by (depth, groups, width per group of res2).
RESNETS = {
    (50, 1, 64): "resnet50",
    (101, 1, 64): "resnet101",
    (101, 32, 8): "resnext101_32x8d",
    (101, 64, 4): "resnext101_64x4d",
}
#: our model preset (conf/model) for each trunk with P6/P7; FCOS_RT (no P6/P7) rows use the ``_rt`` presets.
PRESETS = {
    "resnet50": "r50",
    "resnet101": "r101",
    "resnext101_32x8d": "x101_32x8d",
    "resnext101_64x4d": "x101_64x4d",
}
DLA_UNUSED = re.compile(r"level[34]\.project\.")
TOWERS = {"cls_tower": "cls_tower", "bbox_tower": "box_tower", "share_tower": "share_tower"}

_RES = re.compile(r"res(\d)\.(\d+)\.(conv\d|shortcut|conv2_offset)\.(?:(norm)\.)?(\w+)")
_FPN = re.compile(r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)")
_TOP = re.compile(r"backbone\.top_block\.p(6|7)\.(weight|bias)")
_TOWER = re.compile(r"(cls_tower|bbox_tower|share_tower)\.(\d+)\.(.+)")


@dataclass(frozen=True)
class AdelaiDetArch:
    """The network an AdelaiDet checkpoint was trained as, inferred from its keys and shapes."""

    backbone: str
    backbone_norm: str
    dcn_stages: tuple[int, ...]
    stride_in_1x1: bool
    top_levels: int
    fpn_channels: int
    head_norm: str
    num_cls_convs: int
    num_box_convs: int
    num_share_convs: int
    head_deformable: bool
    num_classes: int

    @property
    def is_rt(self) -> bool:
        return self.top_levels == 0

    def overrides(self) -> list[str]:
        """Hydra overrides of ``conf/train.yaml`` that build this network (test sizes of its zoo rows)."""
        if self.backbone == "dla34":
            preset = "dla34_rt"
        elif self.is_rt:
            if self.backbone != "resnet50":
                raise ValueError(f"no FCOS_RT preset for {self.backbone} (AdelaiDet has RT rows for R-50, DLA-34)")
            preset = "r50_rt"
        else:
            preset = PRESETS[self.backbone]
        out = [
            f"model={preset}",
            f"data={'coco_rt' if self.is_rt else 'coco_ms'}",
            f"model.fpn_channels={self.fpn_channels}",
            f"model.top_levels={self.top_levels}",
            f"model.sizes_of_interest={[64, 128] if self.is_rt else [64, 128, 256, 512]}",
            "model.point_offset=0.5",
            "model.backbone.pretrained=false",
            "model.backbone.weights=null",
            f"model.backbone.norm={self.backbone_norm}",
            f"model.backbone.stride_in_1x1={str(self.stride_in_1x1).lower()}",
            f"model.backbone.dcn_stages={list(self.dcn_stages)}",
            f"model.head.norm={self.head_norm}",
            f"model.head.num_cls_convs={self.num_cls_convs}",
            f"model.head.num_box_convs={self.num_box_convs}",
            f"model.head.num_share_convs={self.num_share_convs}",
            f"model.head.use_deformable={str(self.head_deformable).lower()}",
            "model.head.use_scale=true",
        ]
        return out


@dataclass
class Conversion:
    """A converted state dict with the source key of each entry, and the source keys deliberately dropped."""

    state_dict: dict[str, Tensor]
    source_keys: dict[str, str]
    dropped: dict[str, str] = field(default_factory=dict)


def _tower_layout(state: Mapping[str, Tensor], tower: str) -> tuple[str, int, bool]:
    """``(norm, num_convs, last_is_deformable)`` of one head tower from its keys."""
    prefix = f"{HEAD}{tower}."
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    if not indices:
        return "none", 0, False
    if f"{prefix}1.weight" in state:
        norm, step = "GN", 3
    elif f"{prefix}1.0.running_mean" in state:
        norm, step = "SyncBN", 3
    else:
        norm, step = "none", 2
    num_convs = max(indices) // step + 1
    deformable = f"{prefix}{(num_convs - 1) * step}.offset.weight" in state
    return norm, num_convs, deformable


def detect_architecture(state: Mapping[str, Tensor], stride_in_1x1: bool | None = None) -> AdelaiDetArch:
    """Infer the AdelaiDet network from a state dict (``module.`` already stripped).

    ``stride_in_1x1`` cannot be seen in the keys: by default True for ResNet-50/101 (AdelaiDet's MSRA
    weights) and False for ResNeXt (FAIR weights), as in every zoo config.
    """
    if f"{HEAD}cls_logits.weight" not in state:
        raise ValueError(f"not an AdelaiDet FCOS state dict: no {HEAD}cls_logits.weight")
    if f"{BOTTOM_UP}base_layer.0.weight" in state:
        backbone, norm, dcn = "dla34", "SyncBN", ()
        default_s1 = False
    elif f"{BOTTOM_UP}stem.conv1.weight" in state:
        blocks = {int(m[1]) for k in state if (m := re.match(rf"{BOTTOM_UP}res4\.(\d+)\.", k))}
        depth = {6: 50, 23: 101}.get(len(blocks))
        conv2 = state.get(f"{BOTTOM_UP}res2.0.conv2.weight")
        if depth is None or conv2 is None:
            raise ValueError(f"unsupported ResNet: {len(blocks)} res4 blocks (50: 6, 101: 23)")
        width, per_group = conv2.shape[0], conv2.shape[1]
        key = (depth, width // per_group, per_group) if width != per_group else (depth, 1, width)
        if key not in RESNETS:
            raise ValueError(
                f"unsupported ResNet: depth {depth}, res2.0.conv2.weight {tuple(conv2.shape)}; supported: "
                f"{sorted(RESNETS.values())}"
            )
        backbone = RESNETS[key]
        dcn = tuple(s for s in (2, 3, 4, 5) if f"{BOTTOM_UP}res{s}.0.conv2_offset.weight" in state)
        trainable_bn = any(k.startswith(f"{BOTTOM_UP}res") and k.endswith("num_batches_tracked") for k in state)
        norm = "SyncBN" if trainable_bn else "FrozenBN"
        default_s1 = backbone in ("resnet50", "resnet101")
    else:
        raise ValueError(f"unknown AdelaiDet backbone: neither {BOTTOM_UP}stem.* nor {BOTTOM_UP}base_layer.*")

    layouts = {t: _tower_layout(state, t) for t in TOWERS}
    norms = {n for n, convs, _ in layouts.values() if convs}
    if len(norms) > 1:
        raise ValueError(f"head towers with different norms: {layouts}")
    return AdelaiDetArch(
        backbone=backbone,
        backbone_norm=norm,
        dcn_stages=dcn,
        stride_in_1x1=default_s1 if stride_in_1x1 is None else stride_in_1x1,
        top_levels=sum(f"backbone.top_block.p{p}.weight" in state for p in (6, 7)),
        fpn_channels=int(state["backbone.fpn_lateral3.weight"].shape[0]),
        head_norm=norms.pop() if norms else "none",
        num_cls_convs=layouts["cls_tower"][1],
        num_box_convs=layouts["bbox_tower"][1],
        num_share_convs=layouts["share_tower"][1],
        head_deformable=layouts["cls_tower"][2] or layouts["bbox_tower"][2],
        num_classes=int(state[f"{HEAD}cls_logits.weight"].shape[0]),
    )


def _rename(key: str, arch: AdelaiDetArch) -> str | None:
    """Our key for an AdelaiDet key, or None when there is no counterpart."""
    if key in ("pixel_mean", "pixel_std"):
        return key
    if key.startswith(BOTTOM_UP):
        rest = key[len(BOTTOM_UP) :]
        if arch.backbone == "dla34":
            return f"backbone.body.{rest}"
        if rest.startswith("stem.conv1."):
            leaf = rest[len("stem.conv1.") :]
            return "backbone.body.conv1.weight" if leaf == "weight" else f"backbone.body.bn1.{leaf[len('norm.') :]}"
        if m := _RES.fullmatch(rest):
            stage, block, conv, norm, leaf = m[1], m[2], m[3], m[4], m[5]
            base = f"backbone.body.layer{int(stage) - 1}.{block}"
            if conv == "conv2_offset":
                return f"{base}.conv2.offset.{leaf}" if norm is None else None
            if conv == "shortcut":
                return f"{base}.downsample.{1 if norm else 0}.{leaf}"
            return f"{base}.bn{conv[-1]}.{leaf}" if norm else f"{base}.{conv}.{leaf}"
        return None
    if m := _FPN.fullmatch(key):
        kind = "lateral_convs" if m[1] == "lateral" else "output_convs"
        return f"fpn.{kind}.{int(m[2]) - 3}.{m[3]}"
    if m := _TOP.fullmatch(key):
        return f"fpn.top_convs.{int(m[1]) - 6}.{m[2]}"
    if not key.startswith(HEAD):
        return None
    rest = key[len(HEAD) :]
    if m := _TOWER.fullmatch(rest):
        tower, index, leaf = m[1], int(m[2]), m[3]
        step = 2 if arch.head_norm == "none" else 3
        layer, kind = divmod(index, step)
        if kind == 0:  # a plain conv's weight/bias; DFConv2d's conv.{weight,bias} and offset.* (ours: conv.offset.*)
            return f"head.{TOWERS[tower]}.{layer}.conv.{leaf.removeprefix('conv.')}"
        if kind == 1 and step == 3:
            return f"head.{TOWERS[tower]}.{layer}.norm.{leaf}"
        return None
    predictor, _, leaf = rest.partition(".")
    if predictor in ("ctrness", "centerness"):
        return f"head.centerness.{leaf}"
    if predictor in ("cls_logits", "bbox_pred", "scales"):
        return f"head.{rest}"
    return None


def adelaidet_to_fcos(state_dict: Mapping[str, Tensor], arch: AdelaiDetArch) -> Conversion:
    """Rename an AdelaiDet state dict to :class:`FCOS` keys for ``arch`` (see :func:`detect_architecture`).

    Every source key is either mapped or listed in ``dropped`` with the reason (only DLA's unused
    ``project`` layers); any other key without a counterpart raises a ``ValueError`` listing them all. The
    first conv is converted from BGR to RGB input and ``pixel_mean``/``pixel_std`` (taken from the checkpoint,
    or detectron2's defaults for the architecture when absent) are stored in RGB order ``[1, 3, 1, 1]``.
    """
    out: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if arch.backbone == "dla34" and key.startswith(BOTTOM_UP) and DLA_UNUSED.match(key[len(BOTTOM_UP) :]):
            dropped[key] = "unused by AdelaiDet's DLA-34 forward; timm's dla34 has no such layer"
            continue
        new = _rename(key, arch)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"{key} and {sources[new]} both map to {new} (ctrness and centerness together?)")
        out[new] = value.detach()
        sources[new] = key
    if unknown:
        raise ValueError(f"{len(unknown)} AdelaiDet keys have no FCOS counterpart: {unknown}")

    first = "backbone.body.base_layer.0.weight" if arch.backbone == "dla34" else "backbone.body.conv1.weight"
    if first not in out or out[first].shape[1] != 3:
        raise ValueError(f"{sources.get(first, first)}: expected a first conv with 3 input channels")
    out[first] = out[first].flip(1).contiguous()  # BGR -> RGB input channels
    std_bgr = D2_IMAGENET_STD_BGR if arch.backbone == "resnext101_32x8d" else (1.0, 1.0, 1.0)
    for name, default in (("pixel_mean", D2_PIXEL_MEAN_BGR), ("pixel_std", std_bgr)):
        bgr = out.get(name, torch.tensor(default)).detach().float().reshape(-1)
        if bgr.numel() != 3:
            raise ValueError(f"{name}: expected 3 values, got shape {tuple(state_dict[name].shape)}")
        out[name] = bgr.flip(0).reshape(1, 3, 1, 1).clone()
        sources.setdefault(name, f"{name} (detectron2 default, not in the checkpoint)")
    return Conversion(out, sources, dropped)
