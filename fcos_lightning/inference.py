"""The fast inference path: uint8 images in, detections out.

:func:`optimize_for_inference` folds eval-mode batch norms into the convolutions before them and switches the
network to channels-last; :class:`Predictor` pads a batch, normalizes it on the model's device, runs the
network under the precision's autocast (bf16 on CPUs with native bf16 and on GPUs, by ``precision=auto``) and
post-processes the whole batch at once. ``evaluate.py`` and ``benchmark.py`` both use this path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from fcos_lightning.data.collate import pad_images
from fcos_lightning.fcos.points import make_points
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.precision import resolve_precision

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


class Predictor:
    """Detections for uint8 RGB images at the network's input resolution.

    Args:
        model: the network (prepare it with :func:`optimize_for_inference` for speed).
        postprocessor: decoding, NMS and rescaling settings.
        precision: a Lightning precision or ``auto`` (:func:`~fcos_lightning.precision.resolve_precision`).
        compile: wrap the network in ``torch.compile`` (the first calls compile; slower on the CPU measured, README).
    """

    def __init__(
        self,
        model: FCOS,
        postprocessor: FCOSPostProcessor | None = None,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        self.postprocessor = postprocessor or FCOSPostProcessor()
        device = next(model.parameters()).device
        self.device = device
        self.precision = resolve_precision(precision, "cpu" if device.type == "cpu" else "gpu")
        stray = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Conv2d)}
        stray -= {torch.float32, autocast_dtype(self.precision)}
        if stray:
            raise ValueError(
                f"the model's convolution weights are {sorted(map(str, stray))} but precision {self.precision!r} "
                "computes in another dtype; pass the same precision to optimize_for_inference(precision=...)"
            )
        self.network = torch.compile(model, dynamic=False) if compile else model

    def pad(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Zero-pad ``[3, H, W]`` uint8 images into one batch on the model's device (:func:`pad_images`)."""
        return pad_images(images, self.model.size_divisibility, self.device)

    @torch.no_grad()  # not inference_mode: under it autocast re-casts every weight at every use
    def __call__(
        self,
        images: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | None = None,
        orig_sizes: Tensor | None = None,
    ) -> list[dict[str, Tensor]]:
        """A list of ``[3, H, W]`` uint8 images (padded here), or an already padded ``[B, 3, H, W]`` batch with
        its ``image_sizes``; ``orig_sizes`` rescales the boxes to the images before resizing."""
        if isinstance(images, Tensor) and images.ndim == 4:
            if image_sizes is None:
                image_sizes = torch.tensor([images.shape[-2:]] * images.shape[0], device=self.device)
            batch = images.to(self.device, non_blocking=True)
        else:
            batch, image_sizes = self.pad(images)
        with autocast(self.precision, self.device):
            outputs = self.network(batch, image_sizes)
        sizes = [x.shape[-2:] for x in outputs.cls_logits]
        points = make_points(sizes, self.model.strides, self.model.point_offset, self.device)
        return self.postprocessor(
            outputs.cls_logits, outputs.box_reg, outputs.centerness, points, self.model.strides, image_sizes, orig_sizes
        )
