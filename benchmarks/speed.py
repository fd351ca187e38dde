"""Speed of this FCOS against torchvision's, measured in one process on the same machine (``make bench``).

Both detectors run the same weights: torchvision's randomly initialised model, converted into ours with
:func:`~fcos_lightning.convert.torchvision_to_fcos`. Sections (each a row of the table, ours | torchvision | ratio):

- inference, ResNet-50 FPN P3-P7 at 800x1333 and FCOS_RT DLA-34 P3-P5 at 512x683, batch 1 and 8, end to end:
  uint8 image in, detections out. Ours: :class:`~fcos_lightning.runtime.predictor.Predictor` (pad, normalize on device,
  network under our default CPU precision, batched post-processing) on a model prepared by
  :func:`~fcos_lightning.runtime.optimize.optimize_for_inference`. torchvision: ``model([image / 255])`` in fp32
  (its transform: normalize, resize, batch; then network and post-processing).
- runtimes, the same two models and batches, end to end through the one
  :class:`~fcos_lightning.runtime.predictor.Predictor` (resize-free uint8 images in, detections out), only the
  backend differing: ours PyTorch in our CPU precision, OpenVINO bf16 and int8 (NNCF post-training quantization
  calibrated on ``--calib-images`` generated images), onnxruntime fp32; each row's ratio is against
  torchvision fp32 timed in the same interleaved loop. OpenVINO options: ``--ov-hint``, ``--ov-streams``,
  ``--ov-static`` (graph compiled for the benchmark's padded shape).
- training, batch 2, same models and sizes: forward, loss, backward, SGD step (ours under the Lightning
  ``precision=auto`` default and the preset's memory format, torchvision fp32).
- target assignment for 10, 100, 1000 boxes on one 800x1333 image: time and peak-RSS growth
  (``benchmarks/assign_targets.py``, one subprocess per measurement of memory).
- data loading per worker on generated 640x480 JPEGs through the multi-scale pipeline (shortest side 640-800,
  max 1333, flip): ours = decode + resize + flip + sanitize + collate into a padded uint8 batch; torchvision's
  reference recipe (``DetectionPresetTrain("multiscale")``, PIL backend) = PIL decode + resize + flip + to float.
- COCO evaluation of a generated result set: ours scores with faster-coco-eval (validation's scorer, with per-class
  AP), torchvision's reference with pycocotools.

Timings: warm-up first, then the implementations alternate run by run and the table shows medians, so a
busy machine slows both alike. A first row measures the peak throughput of a 3x3 convolution in our precision
and in fp32; each inference model then gets the GFLOP/s both sides achieve and the ceiling: the ratio ours would
reach if all its FLOPs ran at that peak. ``--device cuda`` runs the model sections on a GPU (with the issue's
H100 targets). ``--quick`` is a short smoke run (one repeat; batch 8, R50 training and the
variants left out). Results go to ``bench_results/speed.json``. Not a test: numbers depend on the machine.

    python -m benchmarks.speed [--quick] [--repeats N] [--device cpu|cuda] [--output bench_results/speed.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks import assign_targets
from fcos_lightning.app.config import build
from fcos_lightning.app.convert import compose_config
from fcos_lightning.convert import torchvision_to_fcos
from fcos_lightning.convert.checkpoint import torchvision_overrides
from fcos_lightning.data.collate import pad_images
from fcos_lightning.fcos.criterion import FCOSCriterion
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.runtime.optimize import autocast, autocast_dtype, optimize_for_inference
from fcos_lightning.runtime.precision import resolve_precision
from fcos_lightning.runtime.predictor import Predictor

TARGETS = {
    "inference": 3.0,
    "training": 2.0,
    "openvino bf16": 3.0,
    "openvino int8": 6.0,
}  # the project's speed targets: ratios against torchvision fp32
# GPU (H100) minimums for ours: (section, model, batch) -> images/s. R-50 batch 1 <= 14 ms per image.
ABSOLUTE_TARGETS = {
    ("inference", "R50-FPN", 1): 1000 / 14,
    ("inference", "R50-FPN", 8): 600.0,
    ("inference", "DLA34-RT", 1): 250.0,
    ("training", "R50-FPN"): 150.0,  # with AMP, at --train-batch
}


CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device = CPU
) -> dict[str, dict]:
    """Median seconds per call of each function; calls alternate so load changes hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


# ---- models ------------------------------------------------------------------------------------------------


def load_converted(ours: FCOS, tv_model: nn.Module) -> None:
    """torchvision's weights into ours; only our BN step counters and unused P6/P7 scales may be left over."""
    converted = torchvision_to_fcos(tv_model.state_dict())
    own = ours.state_dict()
    missing, unexpected = ours.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False)
    if [k for k in missing if not k.endswith("num_batches_tracked")] or not set(converted) - set(own) <= {
        f"head.scales.{i}.scale" for i in range(5)
    }:
        raise RuntimeError(f"weights do not match: missing {missing}, unexpected {set(converted) - set(own)}")


def preset(overrides: list[str], num_classes: int) -> tuple[FCOS, FCOSPostProcessor]:
    """Our network (random weights, nothing downloaded) and post-processing as ``conf/train.yaml`` composes them
    with ``overrides``: the same presets ``train.py`` runs, memory format included."""
    cfg = OmegaConf.create(compose_config(overrides))
    return build(cfg.model, num_classes=num_classes), build(cfg.module.postprocessor)


def resnet50_pair(train: bool) -> tuple[nn.Module, FCOS, FCOSPostProcessor]:
    """torchvision ``fcos_resnet50_fpn`` and ours: the ``r50`` preset with torchvision's conventions (the
    overrides ``convert.py`` uses for torchvision's weights), so both find the same detections.

    Inference uses ``fcos_resnet50_fpn(weights=None, weights_backbone=None)`` (BN in eval mode). Training
    builds what that function builds with an ImageNet backbone (the reference recipe): FrozenBN, conv1 and
    layer1 frozen, as our ``freeze_at=2``; without backbone weights torchvision would train every BN layer."""
    from torchvision.models import resnet50
    from torchvision.models.detection import fcos_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.fcos import FCOS as TVFCOS
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    if train:
        trunk = resnet50(norm_layer=FrozenBatchNorm2d)
        tv = TVFCOS(_resnet_fpn_extractor(trunk, 3, [2, 3, 4], LastLevelP6P7(256, 256)), num_classes=91)
    else:
        tv = fcos_resnet50_fpn(weights=None, weights_backbone=None)
    ours, postprocessor = preset(torchvision_overrides(), num_classes=91)
    load_converted(ours, tv)
    return tv, ours, postprocessor


class TimmFPN(nn.Module):
    """timm ``dla34`` levels 3-5 + torchvision's FPN on them, no extra blocks: torchvision's FCOS backbone
    for FCOS_RT DLA-34 (torchvision ships no DLA)."""

    def __init__(self) -> None:
        super().__init__()
        import timm
        from torchvision.ops import FeaturePyramidNetwork

        self.body = timm.create_model("dla34", features_only=True, out_indices=(3, 4, 5))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), 256)
        self.out_channels = 256

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def dla34_pair(train: bool) -> tuple[nn.Module, FCOS, FCOSPostProcessor]:
    """torchvision's FCOS around timm DLA-34 + FPN P3-P5 (anchors 8/16/32, 512/736 resize) and our
    ``dla34_rt`` preset (AdelaiDet's conventions: points at s/2, Scales, its thresholds), same weights."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOS as TVFCOS

    torch.manual_seed(0)
    anchors = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)
    tv = TVFCOS(TimmFPN(), num_classes=80, min_size=512, max_size=736, anchor_generator=anchors)
    ours, postprocessor = preset(["model=dla34_rt", "data=coco_rt"], num_classes=80)
    load_converted(ours, tv)
    return tv, ours, postprocessor


MODELS = {
    "R50-FPN 800x1333": (resnet50_pair, (800, 1333)),
    "DLA34-RT 512x683": (dla34_pair, (512, 683)),
}


def scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``size`` times ``scale`` (the smoke run's small images), at least 64 pixels a side."""
    return (max(64, round(size[0] * scale)), max(64, round(size[1] * scale))) if scale != 1 else size


def images(n: int, size: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g) for _ in range(n)]


def random_targets(n: int, size: tuple[int, int], num_classes: int, boxes: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        wh = torch.rand(boxes, 2, generator=g) * torch.tensor([size[1] / 2, size[0] / 2]) + 16
        xy = torch.rand(boxes, 2, generator=g) * (torch.tensor([size[1], size[0]]) - wh)
        labels = torch.randint(1 if num_classes == 91 else 0, num_classes, (boxes,), generator=g)
        out.append({"boxes": torch.cat((xy, xy + wh), 1), "labels": labels})
    return out


# ---- sections ----------------------------------------------------------------------------------------------


def accelerator(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else "gpu"


def network_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations (2 per multiply-add) of the convolutions and matmuls ``fn`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def print_profile(what: str, fn: Callable[[], object], device: torch.device, rows: int = 15) -> None:
    """The operators ``fn`` spends its time in (one call after the warm-up), device time first on a GPU, and
    host against device time in total: a host-bound call spends more time launching than computing."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {what}")
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))


def bench_conv_peak(device: torch.device, warmup: int, repeats: int) -> list[dict]:
    """The machine's best throughput on the head's dominant layer (3x3 conv, 256 channels, at P3 of an
    800x1333 image, channels-last), in our precision (weights stored in it, as ours runs) and in fp32: the
    ceiling for both detectors, whose time is mostly such convolutions. Fastest of the runs, not the median."""
    precision = resolve_precision("auto", accelerator(device))
    conv = nn.Conv2d(256, 256, 3, padding=1).to(device, memory_format=torch.channels_last).eval()
    low = copy.deepcopy(conv).to(autocast_dtype(precision) or torch.float32)
    x = torch.randn(1, 256, 100, 168, device=device).to(memory_format=torch.channels_last)
    flops = 2 * 256 * 256 * 9 * 100 * 168

    def run(layer: nn.Module, layer_precision: str) -> None:
        with torch.no_grad(), autocast(layer_precision, device):
            layer(x)

    fns = {"ours": functools.partial(run, low, precision), "torchvision": functools.partial(run, conv, "32-true")}
    t = interleaved(fns, warmup, repeats, device)
    gflops = {k: flops / min(v["times_s"]) / 1e9 for k, v in t.items()}
    label = f"peak 3x3 conv 256ch ({precision} | fp32)"
    return [row(label, "GFLOP/s", gflops["ours"], gflops["torchvision"], True, None, t)]


def bench_inference(
    name: str,
    batches: list[int],
    warmup: int,
    repeats: int,
    variants: bool,
    compiled: str | None,
    device: torch.device,
    peak: float | None,
    scale: float = 1.0,
    profile: bool = False,
) -> list[dict]:
    make_pair, size = MODELS[name]
    size = scaled(size, scale)
    tv, model, postprocessor = make_pair(train=False)
    tv.eval().to(device)
    precision = resolve_precision("auto", accelerator(device))
    baseline = copy.deepcopy(model).eval().to(device)
    fast = optimize_for_inference(model.to(device), precision=precision)
    ours = Predictor(fast, postprocessor, precision)
    rows = []
    for batch in batches:
        imgs = images(batch, size)  # uint8 in host memory: end to end includes the transfer

        def run_tv(imgs=imgs):
            with torch.no_grad():
                return tv([im.to(device, non_blocking=True).float() / 255 for im in imgs])

        fns = {"ours": lambda imgs=imgs: ours(imgs), "torchvision": run_tv}
        if variants and batch == 1:
            plain = Predictor(baseline, postprocessor, precision)
            fp32 = Predictor(optimize_for_inference(copy.deepcopy(baseline)), postprocessor, "32-true")
            fns[f"ours {precision}, no BN folding/channels-last"] = functools.partial(plain, imgs)
            fns["ours fp32"] = functools.partial(fp32, imgs)
        if compiled and batch == 1:
            net = optimize_for_inference(copy.deepcopy(baseline), precision=precision)
            fns[f"ours torch.compile {compiled}"] = functools.partial(
                Predictor(net, postprocessor, compile=compiled), imgs
            )
        t = interleaved(fns, warmup, repeats, device)
        if profile:
            print_profile(f"ours, inference {name} batch {batch}", fns["ours"], device)
        label = f"inference {name} batch {batch}"
        absolute = ABSOLUTE_TARGETS.get(("inference", name.split()[0], batch)) if device.type == "cuda" else None
        rows.append(row(label, "images/s", batch / t["ours"]["median_s"], batch / t["torchvision"]["median_s"],
                        True, "inference", t, absolute))  # fmt: skip
        for k in fns:
            if k.startswith("ours "):
                rows.append(row(f"  variant: {k}", "images/s", batch / t[k]["median_s"], None, True, None, {}))
        if peak and batch == 1:
            flops = {"ours": network_flops(fns["ours"]), "torchvision": network_flops(run_tv)}
            achieved = {k: flops[k] / t[k]["median_s"] / 1e9 for k in flops}
            rows.append(row(f"  achieved, {flops['ours'] / 1e9:.0f} GFLOP per image", "GFLOP/s", achieved["ours"],
                            achieved["torchvision"], True, None, {}))  # fmt: skip
            ceiling = t["torchvision"]["median_s"] / (flops["ours"] / 1e9 / peak)
            rows.append(row("  ceiling: ratio if all of it ran at the peak", "x", ceiling, None, True, None, {}))
    return rows


def bench_runtimes(name: str, batches: list[int], warmup: int, repeats: int, opts: argparse.Namespace) -> list[dict]:
    """Ours through each runtime vs torchvision fp32, interleaved per batch size (module docstring)."""
    import nncf
    import openvino as ov

    from fcos_lightning.fcos.decoder import FCOSDecoder
    from fcos_lightning.runtime.backends import OnnxRuntimeBackend, OpenVINOBackend
    from fcos_lightning.runtime.onnx import export_onnx

    make_pair, size = MODELS[name]
    tv, model, postprocessor = make_pair(train=False)
    tv.eval()
    precision = resolve_precision("auto", "cpu")
    decoder = FCOSDecoder.for_model(model, postprocessor)
    d = model.size_divisibility
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model.eval(), Path(tmp) / "model.onnx")
        ov.save_model(ov.convert_model(str(onnx_path)), str(Path(tmp) / "fp32.xml"), compress_to_fp16=False)
        calib = [pad_images([im], d) for im in images(opts.calib_images, size, seed=1)]
        feed = [{"images": b.float().numpy(), "image_sizes": s.numpy()} for b, s in calib]
        int8 = nncf.quantize(ov.convert_model(str(onnx_path)), nncf.Dataset(feed), subset_size=len(feed),
                             preset=nncf.QuantizationPreset(opts.nncf_preset))  # fmt: skip
        ov.save_model(int8, str(Path(tmp) / "int8.xml"), compress_to_fp16=False)
        ours = Predictor(optimize_for_inference(copy.deepcopy(model), precision=precision), postprocessor, precision)
        for batch in batches:
            imgs = images(batch, size)
            padded = pad_images(imgs, d)[0].shape
            ov_args = {"hint": opts.ov_hint, "num_streams": opts.ov_streams}
            if opts.ov_static:
                ov_args["static_shape"] = (batch, padded[-2], padded[-1])
            backends = {
                "ours OpenVINO bf16": OpenVINOBackend(Path(tmp) / "fp32.xml", d, "bf16", **ov_args),
                "ours OpenVINO int8": OpenVINOBackend(Path(tmp) / "int8.xml", d, None, **ov_args),
                "ours onnxruntime fp32": OnnxRuntimeBackend(onnx_path, d),
            }
            runtimes = {f"ours PyTorch {precision}": ours}
            runtimes.update({k: Predictor(b, decoder=decoder) for k, b in backends.items()})

            def run_tv(imgs=imgs):
                with torch.no_grad():
                    return tv([im.float() / 255 for im in imgs])

            fns = {k: functools.partial(p, imgs) for k, p in runtimes.items()}
            t = interleaved({**fns, "torchvision": run_tv}, warmup, repeats)
            tv_ips = batch / t["torchvision"]["median_s"]
            for k in fns:
                kind = k.removeprefix("ours ").replace("OpenVINO", "openvino") if batch == 1 else None
                label = f"runtimes {name} batch {batch}: {k}"
                rows.append(row(label, "images/s", batch / t[k]["median_s"], tv_ips, True, kind,
                                {k: t[k], "torchvision": t["torchvision"]}))  # fmt: skip
    return rows


def bench_training(
    name: str, warmup: int, repeats: int, variants: bool, device: torch.device, batch: int = 2, scale: float = 1.0
) -> list[dict]:
    make_pair, size = MODELS[name]
    size = scaled(size, scale)
    tv, model, _ = make_pair(train=True)
    tv.to(device)
    model.to(device)
    num_classes = model.num_classes
    precision = resolve_precision("auto", accelerator(device))
    imgs = [im.to(device) for im in images(batch, size)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(batch, size, num_classes)]

    def ours_step(channels_last: bool) -> Callable[[], None]:
        net = copy.deepcopy(model)
        net.channels_last = channels_last
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        criterion = FCOSCriterion.for_model(net)
        net.train()
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        batch_images, sizes = pad_images(imgs, max(net.backbone.strides), device)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")

        def step() -> None:
            with autocast(precision, device):
                loss = sum(criterion(net(batch_images, sizes), targets).values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return step

    tv.train()
    tv_optimizer = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def tv_step() -> None:
        losses = tv([im.float() / 255 for im in imgs], targets)
        tv_optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        tv_optimizer.step()

    default_cl = model.channels_last
    fns = {"ours": ours_step(default_cl), "torchvision": tv_step}
    if variants:
        fns[f"ours channels_last={not default_cl}"] = ours_step(not default_cl)
    t = interleaved(fns, warmup, repeats, device)
    absolute = ABSOLUTE_TARGETS.get(("training", name.split()[0])) if device.type == "cuda" else None
    rows = [
        row(
            f"training {name} batch {batch}",
            "images/s",
            batch / t["ours"]["median_s"],
            batch / t["torchvision"]["median_s"],
            True,
            "training",
            t,
            absolute,
        )  # fmt: skip
    ]
    for k in fns:
        if k.startswith("ours "):
            rows.append(row(f"  variant: {k}", "images/s", batch / t[k]["median_s"], None, True, None, {}))
    return rows


def bench_assignment(repeats: int) -> list[dict]:
    impls = {"ours": assign_targets.Ours(), "torchvision": assign_targets.Torchvision()}
    rows = []
    for num_boxes in (10, 100, 1000):
        boxes, labels = assign_targets.random_boxes(num_boxes)
        fns = {k: functools.partial(impl, boxes, labels) for k, impl in impls.items()}
        t = interleaved(fns, 1, repeats)
        mem = {k: assign_targets.peak_memory(k, num_boxes, None)["peak_delta_bytes"] / 2**20 for k in impls}
        label = f"target assignment {num_boxes} boxes"
        rows.append(row(label, "ms", 1e3 * t["ours"]["median_s"], 1e3 * t["torchvision"]["median_s"], False, None, t))
        rows.append(row(f"{label}, peak RSS growth", "MB", mem["ours"], mem["torchvision"], False, None, {}))
    return rows


def write_jpeg_dataset(root: Path, n: int, size: tuple[int, int] = (480, 640)) -> tuple[Path, Path]:
    """``n`` noisy 640x480 JPEGs with 8 boxes each and their COCO json (80 categories)."""
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    imgs, anns = [], []
    for i in range(n):
        img = (torch.rand(3, *size, generator=g) * 255).to(torch.uint8)
        img = (img.float() * 0.3 + torch.linspace(0, 170, size[1])).to(torch.uint8)  # compressible, like a photo
        (root / "img" / f"{i:04d}.jpg").write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
        imgs.append({"id": i + 1, "file_name": f"{i:04d}.jpg", "height": size[0], "width": size[1]})
        for b in random_targets(1, size, 80)[0]["boxes"].tolist():
            x0, y0, x1, y1 = b
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + len(anns) % 80,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})  # fmt: skip
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return ann_file, root / "img"


class ReferenceDataset(torch.utils.data.Dataset):
    """torchvision's detection reference loading (``CocoDetection`` + ``DetectionPresetTrain("multiscale")``,
    v2 transforms, PIL backend): PIL decode, random shortest side from ``sizes`` (max 1333), random horizontal
    flip, PILToTensor, to float in [0, 1], sanitize boxes. The same work as ours (which keeps uint8 and
    collates into a padded batch) except the normalization, which both do later, on the device."""

    def __init__(self, ann_file: Path, img_dir: Path, sizes: tuple[int, ...]) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.tv_tensors = tv_tensors
        data = json.loads(Path(ann_file).read_text())
        self.images = data["images"]
        self.boxes: dict[int, list] = {}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            self.boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
        self.img_dir = Path(img_dir)
        steps = [
            v2.RandomShortestSize(min_size=list(sizes), max_size=1333),
            v2.RandomHorizontalFlip(0.5),
            v2.PILToTensor(),
            v2.ToDtype(torch.float, scale=True),
            v2.SanitizeBoundingBoxes(labels_getter=None),
        ]
        self.transforms = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        from PIL import Image

        info = self.images[idx]
        image = Image.open(self.img_dir / info["file_name"]).convert("RGB")
        boxes = self.tv_tensors.BoundingBoxes(self.boxes[info["id"]], format="XYXY", canvas_size=image.size[::-1])
        return self.transforms(image, {"boxes": boxes, "image_id": info["id"]})


def bench_data(num_images: int, repeats: int) -> list[dict]:
    from torch.utils.data import DataLoader

    from fcos_lightning.data.coco import CocoDetection
    from fcos_lightning.data.collate import Collator
    from fcos_lightning.data.transforms import build_train_transforms

    with tempfile.TemporaryDirectory() as tmp:
        ann_file, img_dir = write_jpeg_dataset(Path(tmp), num_images)
        train_sizes = (640, 672, 704, 736, 768, 800)  # AdelaiDet's multi-scale training (MS_R_50_2x)
        ours = CocoDetection(str(ann_file), str(img_dir), build_train_transforms(train_sizes, 1333), train=True)
        reference = ReferenceDataset(ann_file, img_dir, train_sizes)
        loaders = {
            "ours": DataLoader(ours, batch_size=2, num_workers=0, collate_fn=Collator(32)),
            "torchvision": DataLoader(reference, batch_size=2, num_workers=0, collate_fn=lambda b: tuple(zip(*b))),
        }
        fns = {k: functools.partial(lambda loader: sum(1 for _ in loader), v) for k, v in loaders.items()}
        t = interleaved(fns, 1, repeats)
    return [
        row(
            "data loading, per worker (640x480 JPEG)",
            "images/s",
            num_images / t["ours"]["median_s"],
            num_images / t["torchvision"]["median_s"],
            True,
            None,
            t,
        )  # fmt: skip
    ]


def bench_coco_eval(num_images: int, repeats: int) -> list[dict]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from fcos_lightning.analysis.scoring import CocoScorer
    from fcos_lightning.data.coco import CategoryMap

    size = (480, 640)
    g = torch.Generator().manual_seed(3)
    gt_images = [{"id": i + 1, "height": size[0], "width": size[1], "file_name": f"{i}.jpg"} for i in range(num_images)]
    anns, results = [], []
    for i in range(num_images):
        for b in random_targets(1, size, 80, boxes=7)[0]["boxes"].tolist():
            cat = 1 + len(anns) % 80
            x0, y0, x1, y1 = b
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})  # fmt: skip
        for _ in range(100):  # 100 detections per image, some near a ground-truth box
            j = int(torch.randint(len(anns) - 7, len(anns), (1,), generator=g))
            x, y, w, h = (v * float(1 + 0.2 * torch.randn(1, generator=g)) for v in anns[j]["bbox"])
            cat = anns[j]["category_id"] if torch.rand(1, generator=g) < 0.5 else int(torch.randint(1, 81, (1,)))
            results.append({"image_id": i + 1, "category_id": cat, "bbox": [x, y, abs(w) + 1, abs(h) + 1],
                            "score": float(torch.rand(1, generator=g))})  # fmt: skip
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": gt_images, "annotations": anns, "categories": cats}
        coco.createIndex()
    category_map = CategoryMap.from_categories(cats)
    ids = [im["id"] for im in gt_images]
    scorer = CocoScorer(coco, category_map)  # validation's scorer: faster-coco-eval, ground-truth index built once

    def reference() -> None:  # torchvision references/detection/coco_eval.py: CocoEvaluator does the same
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco, coco.loadRes(results), iouType="bbox")
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()

    t = interleaved({"ours": lambda: scorer.score(results, ids), "torchvision": reference}, 1, repeats)
    return [
        row(
            f"COCO eval, {num_images} images x 100 dets (faster-coco-eval vs pycocotools)",
            "s",
            t["ours"]["median_s"],
            t["torchvision"]["median_s"],
            False,
            None,
            t,
        )  # fmt: skip
    ]


# ---- report ------------------------------------------------------------------------------------------------


def row(
    what: str,
    unit: str,
    ours: float,
    tv: float | None,
    higher_better: bool,
    target_kind,
    timing,
    absolute: float | None = None,
) -> dict:
    """One table line; ``target_kind`` names a ratio target (``TARGETS``), ``absolute`` a minimum of ``ours``."""
    speedup = None
    if tv is not None and min(ours, tv) > 0:
        speedup = ours / tv if higher_better else tv / ours
    target = TARGETS.get(target_kind)
    out = {"what": what, "unit": unit, "ours": ours, "torchvision": tv, "speedup": speedup, "target": target}
    out["absolute_target"] = absolute
    out["timing"] = dict(timing)
    print(format_row(out), flush=True)
    return out


def format_row(r: dict) -> str:
    tv = "" if r["torchvision"] is None else f"{r['torchvision']:10.3g}"
    speedup = "" if r["speedup"] is None else f"{r['speedup']:6.2f}x"
    target = (
        ""
        if r["target"] is None
        else f"target {r['target']:.0f}x: {'met' if r['speedup'] >= r['target'] else 'MISSED'}"
    )
    if r.get("absolute_target"):
        met = "met" if r["ours"] >= r["absolute_target"] else "MISSED"
        target += f"; target {r['absolute_target']:.4g} {r['unit']}: {met}"
    return f"{r['what']:<52} {r['unit']:>8} {r['ours']:10.3g} {tv:>10} {speedup:>8}  {target}"


def machine() -> dict:
    from fcos_lightning.runtime.precision import cpu_has_native_bf16

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "our_precision_cpu": resolve_precision("auto", "cpu"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run: 1 repeat, batch 1, fewer sections")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5, quick 1)")
    parser.add_argument(
        "--sections", nargs="*", default=["inference", "runtimes", "training", "assign", "data", "eval"]
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        help="add a torch.compile variant at batch 1, optionally its mode (reduce-overhead: CUDA graphs); compiles "
        "for minutes",
    )
    parser.add_argument("--profile", action="store_true", help="print where ours spends each inference call")
    parser.add_argument("--output", default="bench_results/speed.json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (assignment, data and eval stay on CPU)")
    parser.add_argument("--train-batch", type=int, default=2, help="images per training step (default 2)")
    parser.add_argument("--models", nargs="*", default=None, help="model rows to run (name prefixes; default all)")
    parser.add_argument("--image-scale", type=float, default=1.0, help="scale the image sizes (smoke runs)")
    parser.add_argument("--calib-images", type=int, default=8, help="runtimes: NNCF calibration images (generated)")
    parser.add_argument("--nncf-preset", default="performance", help="runtimes: performance | mixed")
    parser.add_argument("--ov-hint", default="LATENCY", help="runtimes: OpenVINO PERFORMANCE_HINT")
    parser.add_argument("--ov-streams", type=int, default=None, help="runtimes: OpenVINO NUM_STREAMS")
    parser.add_argument("--ov-static", action="store_true", help="runtimes: compile OpenVINO for the padded shape")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = 1
    info = machine()
    print(json.dumps(info), flush=True)
    print(f"{'':<52} {'unit':>8} {'ours':>10} {'torchvis.':>10} {'ratio':>8}")
    rows: list[dict] = []
    sections = set(args.sections)
    selected = [m for m in MODELS if not args.models or any(m.startswith(p) for p in args.models)]
    models = selected if not args.quick else [m for m in selected if m.startswith("DLA34")]
    peak = None
    if "inference" in sections:
        rows += bench_conv_peak(device, warmup, max(repeats, 10))
        peak = rows[-1]["ours"]
        for name in selected:
            batches = [1] if args.quick else [1, 8]
            rows += bench_inference(
                name, batches, warmup, repeats, not args.quick, args.compile, device, peak, args.image_scale,
                args.profile,
            )  # fmt: skip
    if "runtimes" in sections:
        for name in selected:
            rows += bench_runtimes(name, [1] if args.quick else [1, 8], warmup, repeats, args)
    if "training" in sections:
        for name in models:
            rows += bench_training(name, warmup, repeats, not args.quick, device, args.train_batch, args.image_scale)
    if "assign" in sections:
        rows += bench_assignment(max(repeats, 3))
    if "data" in sections:
        rows += bench_data(8 if args.quick else 48, repeats)
    if "eval" in sections:
        rows += bench_coco_eval(50 if args.quick else 500, repeats)

    print("\nratio = how many times faster (or smaller) ours is. ceiling = the ratio ours would reach if every FLOP")
    print("ran at the measured peak conv throughput of our precision: no implementation of the same FLOPs beats it.")
    gpu = f", {info['cuda']}" if device.type == "cuda" else ""
    print(f"machine: {info['cpu']}, {info['cores']} cores{gpu}, torch {info['torch']}, device {device}")
    for r in rows:
        print(format_row(r))
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": info,
        "repeats": repeats,
        "warmup": warmup,
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
