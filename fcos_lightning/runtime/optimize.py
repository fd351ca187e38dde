"""The fast inference path's network preparation: batch norms folded into the convolutions, channels-last
memory, conv weights stored in the autocast dtype; and the autocast context a Lightning precision means.
``evaluate.py``, ``predict.py`` and the benchmark all run networks prepared here."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fcos_lightning.modeling.detector import FCOS

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype ``precision``'s autocast computes convolutions in (None for full-precision settings)."""
    return AUTOCAST_DTYPES.get(precision)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context Lightning uses for ``precision`` (a null context for full-precision settings)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _foldable(bn: nn.Module) -> bool:
    if isinstance(bn, FrozenBatchNorm2d):
        return True
    return isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None


def _fold(conv: nn.Conv2d, bn: nn.Module) -> None:
    """``bn(conv(x))`` -> ``conv'(x)``: scale the conv's output channels, move the shift into its bias."""
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    scale = weight * (bn.running_var + bn.eps).rsqrt()
    shift = bias - bn.running_mean * scale
    with torch.no_grad():
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every frozen or eval-mode BatchNorm that directly follows a Conv2d into it, in place; returns how
    many were folded. Pairs are found structurally: consecutive ``nn.Sequential`` entries, and sibling
    attributes ``conv{k}``/``bn{k}`` (timm ResNet and DLA blocks). The module can no longer be trained as before
    (the BN statistics are gone), so use it for inference only."""
    folded = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        pairs = []
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs = list(zip(names, names[1:]))
        pairs += [(name, "bn" + name[4:]) for name in children if name.startswith("conv")]
        for conv_name, bn_name in pairs:
            conv, bn = children.get(conv_name), children.get(bn_name)
            matches = bn is not None and _foldable(bn) and bn.running_mean.numel() == getattr(conv, "out_channels", -1)
            if type(conv) is nn.Conv2d and matches:
                _fold(conv, bn)
                setattr(parent, bn_name, getattr(bn, "act", nn.Identity()))  # timm's BN+act layers keep the act
                children[bn_name] = parent._modules[bn_name]
                folded += 1
    return folded


def optimize_for_inference(
    model: FCOS,
    channels_last: bool = True,
    fold_bn: bool = True,
    precision: str | None = None,
    cpu_micro_batch: int | None = 1,
) -> FCOS:
    """Put ``model`` in eval mode, fold its batch norms (``fold_bn``) and use channels-last memory
    (``channels_last``: faster convolutions with oneDNN on CPU and with cuDNN on GPUs), in place.

    ``precision``: the (resolved) Lightning precision the model will run under. A mixed one stores the
    convolution weights in its autocast dtype once: autocast would otherwise cast every weight again at every
    call (2% of a CPU forward), with the same result. Such a model then runs only under that precision (the
    :class:`Predictor` checks). ``cpu_micro_batch`` sets
    :attr:`FCOS.cpu_micro_batch`: on CPUs the network runs image by image by default (ResNet-50 at 800x1333:
    8 images 1.18x faster one by one than as one batch, whose activations do not fit in cache)."""
    model.cpu_micro_batch = cpu_micro_batch
    model.eval()
    if fold_bn:
        fold_batch_norms(model)
    if channels_last:
        model.channels_last = True
        model.to(memory_format=torch.channels_last)
    weight_dtype = autocast_dtype(precision) if precision else None
    if weight_dtype is not None:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.to(weight_dtype)
    return model
