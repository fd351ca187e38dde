"""timm feature extractors adapted to detectron2/AdelaiDet backbone semantics.

:class:`TimmBackbone` wraps ``timm.create_model(name, features_only=True)`` and adds what AdelaiDet's
backbones do on top of a classification trunk: FrozenBN, ``FREEZE_AT``, the MSRA stride placement
(``STRIDE_IN_1X1``) and DCNv2 stages. Channels and strides come from timm's ``feature_info``.

Supported and tested: ``resnet18``, ``resnet50``, ``resnet101``, ``resnext101_32x8d``, ``resnext101_64x4d``
(use ``out_indices=(2, 3, 4)`` = res3, res4, res5: strides 8/16/32), ``dla34`` (timm's feature index ``i`` is
DLA's ``level{i}``; use ``out_indices=(3, 4, 5)`` = level3..level5: strides 8/16/32, channels 128/256/512) and
the eSE-VoVNets ``ese_vovnet39b``/``57b``/``99b`` (``out_indices=(2, 3, 4)`` = stage3..stage5: strides 8/16/32,
channels 512/768/1024).

Where timm's trunks differ from AdelaiDet's:

- timm's ``dla34`` omits the ``project`` layers of ``level3``/``level4`` that ucbdrive's/AdelaiDet's DLA builds
  but never uses (41,728 parameters); the function computed is the same.
- timm's eSE-VoVNet puts the eSE attention (a 1x1 conv with bias and a hard sigmoid gate) only on the last
  OSA block of each stage; AdelaiDet's (and vovnet-detectron2's) VoVNet builds one in every OSA block. With
  ``ese_every_block=True`` the missing ones are added, which makes the network AdelaiDet's: same layers, same
  function, same parameter count (V-39: 2 more eSE, 1,640,192 parameters; V-57: 5 more, 3,870,976; V-99:
  12 more, 7,349,248). Everything else matches: stem of three 3x3 convs (64, 64, 128; strides 2, 1, 2), OSA
  blocks of five 3x3 convs concatenated with the block input then a 1x1 conv, identity shortcuts on every
  block but a stage's first, 3x3/2 ceil-mode max pooling before stages 3-5, the same hard sigmoid
  (``relu6(x + 3) / 6``) on a global average pool.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import EffectiveSEModule
from timm.layers.norm_act import BatchNormAct2d
from timm.models.resnet import Bottleneck
from timm.models.vovnet import OsaBlock
from torch import Tensor, nn
from torchvision import ops

from fcos_lightning.files import safe_load
from fcos_lightning.modeling.dcn import ModulatedDeformConv2d

log = logging.getLogger(__name__)

#: backbone norms, spelled as detectron2/AdelaiDet (and the head) spell them.
NORMS = ("FrozenBN", "BN", "SyncBN")


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's FrozenBN computed in the input's dtype with one fused multiply-add.

    torchvision's version multiplies by fp32 buffers, which promotes bf16 autocast activations to fp32 after
    every backbone conv and costs a cast back before the next one (about a third of a ResNet-50's CPU time).
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return torch.addcmul(bias.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """:class:`FrozenBatchNorm2d` followed by the activation (and drop) of a timm ``BatchNormAct2d`` it replaces;
    same state-dict entries as the FrozenBN alone."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, act: nn.Module | None = None, drop: nn.Module | None = None
    ):
        super().__init__(num_features, eps=eps)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def frozen_batch_norm(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """A ``FrozenBatchNorm2d`` carrying ``bn``'s affine terms and running statistics (with its activation for a
    timm ``BatchNormAct2d``)."""
    if isinstance(bn, BatchNormAct2d):
        frozen: FrozenBatchNorm2d = FrozenBatchNormAct2d(bn.num_features, bn.eps, bn.act, bn.drop)
    else:
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen = frozen.to(bn.running_mean.device)
    if bn.affine:
        frozen.weight.copy_(bn.weight.detach())
        frozen.bias.copy_(bn.bias.detach())
    frozen.running_mean.copy_(bn.running_mean)
    frozen.running_var.copy_(bn.running_var)
    return frozen


def convert_frozen_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d``/``SyncBatchNorm`` inside ``module`` (or ``module`` itself) by FrozenBN.

    Returns the converted module (a new object only when ``module`` itself is a BN layer).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if type(module) not in (nn.BatchNorm2d, nn.SyncBatchNorm, BatchNormAct2d):
            raise TypeError(
                f"cannot freeze {type(module).__name__}: only plain BatchNorm2d/SyncBatchNorm or timm's BatchNormAct2d"
            )
        if module.running_mean is None:
            raise ValueError("cannot freeze a BatchNorm without running statistics")
        return frozen_batch_norm(module)
    for name, child in module.named_children():
        new = convert_frozen_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def plain(value: Any) -> Any:
    """Mappings and sequences (config containers included) as plain dicts and lists, recursively."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain(v) for v in value]
    return value


def load_trunk_weights(body: nn.Module, path: str | Path) -> None:
    """Load a local timm/torchvision-style state dict (bare, or under ``state_dict``/``model``) into ``body``.

    A leading ``module.`` (DDP) is stripped, and a classifier's ``stem.0.`` names become the ``stem_0.`` of a
    ``features_only`` trunk where timm flattened the Sequential. Missing and unexpected keys are logged (a
    classifier ``fc`` is expected to be unexpected); a file sharing no key with ``body`` is an error. Shape
    mismatches raise.
    """
    state = safe_load(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    own = body.state_dict().keys()
    # features_only flattens top-level Sequentials (timm VoVNet's stem.0 / stages.0 become stem_0 / stages_0)
    flat = {k: re.sub(r"^(\w+)\.(\d+)\.", r"\1_\2.", k) for k in state}
    state = {(flat[k] if k not in own and flat[k] in own else k): v for k, v in state.items()}
    if not own & state.keys():
        raise ValueError(f"{path}: no key matches the {type(body).__name__} trunk; is it the right file?")
    missing, unexpected = body.load_state_dict(state, strict=False)
    log.info("loaded %d tensors from %s", len(own & state.keys()), path)
    if missing:
        log.warning("%s: %d trunk keys missing (left as initialised): %s", path, len(missing), missing)
    if unexpected:
        log.info("%s: %d unused keys: %s", path, len(unexpected), unexpected)


class TimmBackbone(nn.Module):
    """A timm trunk returning the feature maps selected by ``out_indices``, finest first.

    Args:
        name: timm model name (see the module docstring for the tested ones).
        out_indices: timm feature indices; (2, 3, 4) = res3..res5 for ResNets, (3, 4, 5) = level3..5 for DLA.
        pretrained: let timm fetch/cache its ImageNet weights (honours ``HF_HUB_OFFLINE``, the local cache).
        weights: local timm/torchvision-style state-dict file, loaded before the stride/DCN/norm changes
            (plain trunk keys; see :func:`load_trunk_weights`).
        norm: ``"FrozenBN"`` (every BN frozen, as detectron2's ``FrozenBN``), ``"BN"`` or ``"SyncBN"``
            (trainable BN; the training code turns ``SyncBN`` into ``SyncBatchNorm`` under multi-GPU DDP).
            Layers of frozen stages are FrozenBN whatever ``norm`` says.
        freeze_at: detectron2 ``FREEZE_AT``: 0 or -1 nothing frozen, 1 the stem, k the stem and the first k-1
            stages. ResNets: stem = ``conv1``/``bn1``, stages = ``layer1..layer4`` (res2..res5). DLA: stem =
            ``base_layer``, stages = ``level0, level1, ..., level5``. VoVNet: stem = its three convs, stages =
            stage2..stage5. Frozen = no grad + FrozenBN.
        stride_in_1x1: MSRA/caffe2 ResNets (detectron2 ``STRIDE_IN_1X1``): the stride 2 of the first block of
            res3..res5 sits on the 1x1 ``conv1`` instead of the 3x3 ``conv2`` (timm/torchvision placement).
        dcn_stages: detectron2 stage numbers (2..5 = res2..res5) whose every block's 3x3 ``conv2`` becomes a
            :class:`ModulatedDeformConv2d` (AdelaiDet ``DEFORM_ON_PER_STAGE``, ``DEFORM_MODULATED``).
        dcn_deformable_groups: ``DEFORM_NUM_GROUPS``.
        ese_every_block: eSE-VoVNets only: add the eSE attention timm leaves out of every OSA block but a
            stage's last, as AdelaiDet's VoVNet has it (see the module docstring). timm's ImageNet weights have
            no such layers: with ``pretrained``/``weights`` they start from timm's random initialization.
        model_kwargs: extra ``timm.create_model`` arguments, e.g. ``{"channels": [16, 32, 64, 128]}`` for a
            narrow ResNet (the CPU demo and tests).
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (2, 3, 4),
        pretrained: bool = False,
        weights: str | None = None,
        norm: str = "FrozenBN",
        freeze_at: int = 2,
        stride_in_1x1: bool = False,
        dcn_stages: Sequence[int] = (),
        dcn_deformable_groups: int = 1,
        model_kwargs: Mapping[str, Any] | None = None,
        ese_every_block: bool = False,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.name = name
        self.norm = norm
        self._args = {
            "name": str(name),
            "out_indices": [int(i) for i in out_indices],
            "norm": str(norm),
            "freeze_at": int(freeze_at),
            "stride_in_1x1": bool(stride_in_1x1),
            "dcn_stages": [int(s) for s in dcn_stages],
            "dcn_deformable_groups": int(dcn_deformable_groups),
            "model_kwargs": plain(model_kwargs or {}),
            "ese_every_block": bool(ese_every_block),
        }
        self.body = timm.create_model(
            name,
            features_only=True,
            out_indices=tuple(out_indices),
            pretrained=pretrained,
            **(model_kwargs or {}),
        )
        if weights is not None:
            load_trunk_weights(self.body, weights)

        if stride_in_1x1:
            for block in self._first_blocks():
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
        for stage in dcn_stages:
            for block in self._resnet_stage(stage, "dcn_stages"):
                block.conv2 = ModulatedDeformConv2d.from_conv(block.conv2, deformable_groups=dcn_deformable_groups)
        if ese_every_block:
            added = self._add_ese_to_every_block()
            if added and (pretrained or weights is not None):
                log.warning(
                    "%s: %d eSE layers added to match AdelaiDet's VoVNet are not in the loaded ImageNet weights and "
                    "start from random initialization (model.backbone.ese_every_block=false keeps timm's layers)",
                    name,
                    added,
                )

        units = self._freeze_units()
        if not -1 <= freeze_at <= len(units):
            raise ValueError(f"freeze_at={freeze_at} outside [-1, {len(units)}] for {name} (stem + stages)")
        for unit in units[: max(freeze_at, 0)]:
            for attr in unit:
                module = getattr(self.body, attr).requires_grad_(False)
                setattr(self.body, attr, convert_frozen_batch_norm(module))
        if norm == "FrozenBN":
            convert_frozen_batch_norm(self.body)

        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())

    def _is_resnet(self) -> bool:
        return all(hasattr(self.body, n) for n in ("conv1", "bn1", "layer1")) and all(
            isinstance(b, Bottleneck) for b in self.body.layer1
        )

    def _resnet_stage(self, stage: int, what: str) -> nn.Sequential:
        """Blocks of detectron2 stage ``res{stage}`` (timm ``layer{stage - 1}``); ResNet family only."""
        if not self._is_resnet():
            raise ValueError(f"{what} needs a bottleneck ResNet/ResNeXt, not {self.name}")
        if stage not in (2, 3, 4, 5):
            raise ValueError(f"{what}: stages are 2..5 (res2..res5), got {stage}")
        layer = getattr(self.body, f"layer{stage - 1}", None)
        if layer is None:
            raise ValueError(f"{what}: res{stage} is not built for these out_indices")
        return layer

    def _add_ese_to_every_block(self) -> int:
        """Give every OSA block without attention an eSE module (initialized as timm initializes its convs);
        returns how many were added."""
        blocks = [m for m in self.body.modules() if isinstance(m, OsaBlock)]
        if not blocks:
            raise ValueError(f"ese_every_block needs an eSE-VoVNet (OSA blocks), not {self.name}")
        added = 0
        for block in blocks:
            if block.attn is None:
                channels = block.conv_concat.conv.out_channels
                block.attn = EffectiveSEModule(channels).to(block.conv_concat.conv.weight.device)
                nn.init.kaiming_normal_(block.attn.fc.weight, mode="fan_out", nonlinearity="relu")
                added += 1
            elif not isinstance(block.attn, EffectiveSEModule):
                raise ValueError(f"ese_every_block: {self.name} has {type(block.attn).__name__} attention, not eSE")
        return added

    def _first_blocks(self) -> list[Bottleneck]:
        """Block 0 of the built stages among res3..res5, where a ResNet downsamples with a stride-2 conv2."""
        if not self._is_resnet():
            raise ValueError(f"stride_in_1x1 needs a bottleneck ResNet/ResNeXt, not {self.name}")
        blocks = [getattr(self.body, f"layer{s - 1}")[0] for s in (3, 4, 5) if hasattr(self.body, f"layer{s - 1}")]
        for block in blocks:
            if block.conv1.stride != (1, 1) or block.conv2.stride != (2, 2):
                raise ValueError(f"stride_in_1x1: {self.name} does not downsample in conv2 (dilated/AA?)")
        return blocks

    def _freeze_units(self) -> list[list[str]]:
        """Trunk attribute names of ``[stem, stage 1, stage 2, ...]`` (``freeze_at`` order); [] if unknown."""
        if hasattr(self.body, "conv1") and hasattr(self.body, "layer1"):
            stem, stages = ["conv1", "bn1"], ["layer1", "layer2", "layer3", "layer4"]
        elif hasattr(self.body, "base_layer"):
            stem, stages = ["base_layer"], [f"level{i}" for i in range(6)]
        elif hasattr(self.body, "stem_0"):  # VoVNet, flattened by features_only: stem_0..2, stages_0..3
            stem = [n for n in ("stem_0", "stem_1", "stem_2") if hasattr(self.body, n)]
            stages = [f"stages_{i}" for i in range(4)]
        else:
            return []
        return [stem] + [[n] for n in stages if hasattr(self.body, n)]

    def constructor_args(self) -> dict[str, Any]:
        """The arguments that rebuild this trunk's architecture, as plain values. ``pretrained`` and ``weights``
        are left out: they only initialise the weights, which a checkpoint carries itself."""
        return dict(self._args)

    @property
    def size_divisibility(self) -> int:
        """Pad inputs to a multiple of this (the coarsest stride) so the FPN's top-down sums align."""
        return max(self.strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))


__all__ = [
    "FrozenBatchNorm2d",
    "FrozenBatchNormAct2d",
    "TimmBackbone",
    "convert_frozen_batch_norm",
    "frozen_batch_norm",
    "load_trunk_weights",
    "plain",
]
