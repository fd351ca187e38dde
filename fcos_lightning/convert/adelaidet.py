"""AdelaiDet FCOS checkpoints (every zoo row) -> :class:`~fcos_lightning.modeling.detector.FCOS` keys.

The architecture is read from the keys themselves (:func:`detect_architecture`): ResNet-18 (detectron2's
BasicBlock), ResNet-50/101 (MSRA, ``stride_in_1x1``), ResNeXt-101 32x8d / 64x4d, DCNv2 stages and head, DLA-34,
eSE-VoVNet-39/57/99 (AdelaiDet's ``vovnet.py`` names: ``stem.stem_1/conv``, ``stage2.OSA2_1.layers.0.OSA2_1_0/norm``,
``...concat.OSA2_1_concat/conv``, ``...ese.fc``), FrozenBN or trainable (Sync)BN backbones and which stages are
frozen, FPNs with a norm (``fpn_lateral3.norm.*``, ``top_block.p6.norm.*``), P6/P7 or none (FCOS_RT), GN / BN /
no-norm heads, shared towers. Two conversions besides renaming:

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
    (18, 1, 64): "resnet18",
    (50, 1, 64): "resnet50",
    (101, 1, 64): "resnet101",
    (101, 32, 8): "resnext101_32x8d",
    (101, 64, 4): "resnext101_64x4d",
}
#: timm names of AdelaiDet's eSE-VoVNets by OSA blocks per stage (stage2..stage5).
VOVNETS = {(1, 1, 2, 2): "ese_vovnet39b", (1, 1, 4, 3): "ese_vovnet57b", (1, 3, 9, 3): "ese_vovnet99b"}
#: our model preset (conf/model) for each trunk with P6/P7; FCOS_RT (no P6/P7) rows use the ``_rt`` presets.
PRESETS = {
    "resnet18": "r18_full_syncbn",
    "resnet50": "r50",
    "resnet101": "r101",
    "resnext101_32x8d": "x101_32x8d",
    "resnext101_64x4d": "x101_64x4d",
    "ese_vovnet39b": "v39",
    "ese_vovnet57b": "v57",
    "ese_vovnet99b": "v99",
}
#: our first conv (its input channels go BGR -> RGB) by trunk; ResNets: backbone.body.conv1.weight
FIRST_CONV = {
    "dla34": "backbone.body.base_layer.0.weight",
    **dict.fromkeys(VOVNETS.values(), "backbone.body.stem_0.conv.weight"),
}
DLA_UNUSED = re.compile(r"level[34]\.project\.")
TOWERS = {"cls_tower": "cls_tower", "bbox_tower": "box_tower", "share_tower": "share_tower"}

_RES = re.compile(r"res(\d)\.(\d+)\.(conv\d|shortcut|conv2_offset)\.(?:(norm)\.)?(\w+)")
_FPN = re.compile(r"backbone\.fpn_(lateral|output)(\d)\.(?:(norm)\.)?(\w+)")
_TOP = re.compile(r"backbone\.top_block\.p(6|7)\.(?:(norm)\.)?(\w+)")
_VOV_STEM = re.compile(r"stem\.stem_([123])/(conv|norm)\.(\w+)")
_VOV_BLOCK = re.compile(r"stage(\d)\.OSA(\d)_(\d+)\.(.+)")
_VOV_LAYER = re.compile(r"layers\.(\d+)\.OSA(\d)_(\d+)_(\d+)/(conv|norm)\.(\w+)")
_VOV_CONCAT = re.compile(r"concat\.OSA(\d)_(\d+)_concat/(conv|norm)\.(\w+)")
_VOV_ESE = re.compile(r"ese\.fc\.(weight|bias)")
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
    freeze_at: int = 2
    fpn_norm: str = "none"
    fpn_relu: bool = False
    ese_every_block: bool = False

    @property
    def is_rt(self) -> bool:
        return self.top_levels == 0

    @property
    def is_vovnet(self) -> bool:
        return self.backbone in VOVNETS.values()

    def overrides(self) -> list[str]:
        """Hydra overrides of ``conf/train.yaml`` that build this network (test sizes of its zoo rows)."""
        if self.backbone == "dla34":
            preset = "dla34_rt"
        elif self.is_rt and self.backbone == "resnet50":
            preset = "r50_rt"
        elif self.is_rt and self.backbone.startswith(("resnet101", "resnext")):
            raise ValueError(f"no FCOS_RT preset for {self.backbone} (AdelaiDet has RT rows for R-50, DLA-34)")
        else:  # every setting that differs between rows is overridden below
            preset = PRESETS[self.backbone]
        out = [
            f"model={preset}",
            f"data={'coco_rt' if self.is_rt else 'coco_ms'}",
            f"model.fpn_channels={self.fpn_channels}",
            f"model.top_levels={self.top_levels}",
            f"model.fpn_norm={self.fpn_norm}",
            f"model.fpn_relu={str(self.fpn_relu).lower()}",
            f"model.sizes_of_interest={[64, 128] if self.is_rt else [64, 128, 256, 512]}",
            "model.point_offset=0.5",
            "model.backbone.pretrained=false",
            "model.backbone.weights=null",
            f"model.backbone.norm={self.backbone_norm}",
            f"model.backbone.freeze_at={self.freeze_at}",
            f"model.backbone.stride_in_1x1={str(self.stride_in_1x1).lower()}",
            f"model.backbone.dcn_stages={list(self.dcn_stages)}",
            f"model.head.norm={self.head_norm}",
            f"model.head.num_cls_convs={self.num_cls_convs}",
            f"model.head.num_box_convs={self.num_box_convs}",
            f"model.head.num_share_convs={self.num_share_convs}",
            f"model.head.use_deformable={str(self.head_deformable).lower()}",
            "model.head.use_scale=true",
        ]
        if self.is_vovnet:
            out.append(f"model.backbone.ese_every_block={str(self.ese_every_block).lower()}")
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


def _vovnet_layout(state: Mapping[str, Tensor]) -> tuple[str, str, bool]:
    """``(timm name, norm, ese_every_block)`` of an AdelaiDet VoVNet from its ``stage{s}.OSA{s}_{b}`` keys."""
    blocks: dict[int, set[int]] = {s: set() for s in (2, 3, 4, 5)}
    with_ese: set[tuple[int, int]] = set()
    for key in state:
        if key.startswith(BOTTOM_UP) and (m := _VOV_BLOCK.match(key[len(BOTTOM_UP) :])):
            blocks.setdefault(int(m[1]), set()).add(int(m[3]))
            if _VOV_ESE.fullmatch(m[4]):
                with_ese.add((int(m[1]), int(m[3])))
    layout = tuple(len(blocks[s]) for s in sorted(blocks))
    if layout not in VOVNETS:
        raise ValueError(
            f"unsupported VoVNet: OSA blocks per stage {layout}; supported V-39 (1, 1, 2, 2), V-57 (1, 1, 4, 3), "
            "V-99 (1, 3, 9, 3)"
        )
    every = {(s, b) for s, bs in blocks.items() for b in bs}
    last = {(s, max(bs)) for s, bs in blocks.items()}
    if with_ese not in (every, last):
        raise ValueError(f"VoVNet with eSE on blocks {sorted(with_ese)}: expected every OSA block or each stage's last")
    trainable_bn = any(k.startswith(BOTTOM_UP) and k.endswith("num_batches_tracked") for k in state)
    return VOVNETS[layout], "SyncBN" if trainable_bn else "FrozenBN", with_ese == every


def _fpn_norm(state: Mapping[str, Tensor]) -> str:
    """The FPN's norm: BN statistics (AdelaiDet's full-SyncBN configs use SyncBN), GN affine terms only, or none."""
    if "backbone.fpn_lateral3.norm.running_mean" in state:
        return "SyncBN"
    return "GN" if "backbone.fpn_lateral3.norm.weight" in state else "none"


def detect_architecture(
    state: Mapping[str, Tensor], stride_in_1x1: bool | None = None, fpn_relu: bool | None = None
) -> AdelaiDetArch:
    """Infer the AdelaiDet network from a state dict (``module.`` already stripped).

    ``stride_in_1x1`` cannot be seen in the keys: by default True for ResNet-50/101 (AdelaiDet's MSRA
    weights) and False for ResNeXt (FAIR weights), as in every zoo config. Neither can the FPN's ReLU
    (``FPN.USE_RELU``): by default on exactly when the FPN has a norm, as in AdelaiDet's two configs with one.
    Frozen stages: the ResNet stem's norm carries ``num_batches_tracked`` only when it trained (``FREEZE_AT 0``);
    otherwise AdelaiDet's default ``FREEZE_AT 2``. VoVNets: ``FREEZE_AT 0`` as in their configs; DLA-34: -1.
    """
    if f"{HEAD}cls_logits.weight" not in state:
        raise ValueError(f"not an AdelaiDet FCOS state dict: no {HEAD}cls_logits.weight")
    ese_every_block = False
    if f"{BOTTOM_UP}base_layer.0.weight" in state:
        backbone, norm, dcn = "dla34", "SyncBN", ()
        default_s1, freeze_at = False, -1
    elif f"{BOTTOM_UP}stem.stem_1/conv.weight" in state:
        backbone, norm, ese_every_block = _vovnet_layout(state)
        dcn, default_s1, freeze_at = (), False, 0
    elif f"{BOTTOM_UP}stem.conv1.weight" in state:
        blocks = {int(m[1]) for k in state if (m := re.match(rf"{BOTTOM_UP}res4\.(\d+)\.", k))}
        basic = f"{BOTTOM_UP}res2.0.conv3.weight" not in state  # BasicBlock (R-18/34) vs bottleneck
        depth = ({2: 18} if basic else {6: 50, 23: 101}).get(len(blocks))
        conv2 = state.get(f"{BOTTOM_UP}res2.0.conv2.weight")
        if depth is None or conv2 is None:
            kind = "basic-block" if basic else "bottleneck"
            raise ValueError(f"unsupported {kind} ResNet: {len(blocks)} res4 blocks (18: 2; 50: 6, 101: 23)")
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
        freeze_at = 0 if f"{BOTTOM_UP}stem.conv1.norm.num_batches_tracked" in state else 2
    else:
        raise ValueError(
            f"unknown AdelaiDet backbone: none of {BOTTOM_UP}stem.conv1.* (ResNet), {BOTTOM_UP}base_layer.* (DLA), "
            f"{BOTTOM_UP}stem.stem_1/conv.* (VoVNet)"
        )

    layouts = {t: _tower_layout(state, t) for t in TOWERS}
    norms = {n for n, convs, _ in layouts.values() if convs}
    if len(norms) > 1:
        raise ValueError(f"head towers with different norms: {layouts}")
    fpn_norm = _fpn_norm(state)
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
        freeze_at=freeze_at,
        fpn_norm=fpn_norm,
        fpn_relu=fpn_norm != "none" if fpn_relu is None else fpn_relu,
        ese_every_block=ese_every_block,
    )


def _rename(key: str, arch: AdelaiDetArch) -> str | None:
    """Our key for an AdelaiDet key, or None when there is no counterpart."""
    if key in ("pixel_mean", "pixel_std"):
        return key
    if key.startswith(BOTTOM_UP):
        rest = key[len(BOTTOM_UP) :]
        if arch.backbone == "dla34":
            return f"backbone.body.{rest}"
        if arch.is_vovnet:
            return _rename_vovnet(rest)
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
        kind = f"{m[1]}_{'norms' if m[3] else 'convs'}"
        return f"fpn.{kind}.{int(m[2]) - 3}.{m[4]}"
    if m := _TOP.fullmatch(key):
        return f"fpn.top_{'norms' if m[2] else 'convs'}.{int(m[1]) - 6}.{m[3]}"
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


def _rename_vovnet(rest: str) -> str | None:
    """timm ``ese_vovnet*b`` (features_only: ``stem_0..2``, ``stages_0..3``) key for an AdelaiDet VoVNet key
    below ``backbone.bottom_up.``; None when it has no counterpart."""
    body = "backbone.body."
    if m := _VOV_STEM.fullmatch(rest):
        return f"{body}stem_{int(m[1]) - 1}.{'conv' if m[2] == 'conv' else 'bn'}.{m[3]}"
    if not (m := _VOV_BLOCK.fullmatch(rest)) or m[1] != m[2]:
        return None
    stage, block, inner = int(m[1]), int(m[3]), m[4]
    base = f"{body}stages_{stage - 2}.blocks.{block - 1}"
    if (layer := _VOV_LAYER.fullmatch(inner)) and (int(layer[2]), int(layer[3])) == (stage, block):
        if layer[1] != layer[4]:
            return None
        return f"{base}.conv_mid.{layer[1]}.{'conv' if layer[5] == 'conv' else 'bn'}.{layer[6]}"
    if (concat := _VOV_CONCAT.fullmatch(inner)) and (int(concat[1]), int(concat[2])) == (stage, block):
        return f"{base}.conv_concat.{'conv' if concat[3] == 'conv' else 'bn'}.{concat[4]}"
    if ese := _VOV_ESE.fullmatch(inner):
        return f"{base}.attn.fc.{ese[1]}"
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

    first = FIRST_CONV.get(arch.backbone, "backbone.body.conv1.weight")
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
