"""CUDA against CPU: the network, target assignment and post-processing compute the same on both devices; every
zoo backbone family trains under both mixed precisions and memory formats; the training step synchronizes with the
host only where documented. Skipped without CUDA; ``make gpu-check`` runs them on a GPU."""

from __future__ import annotations

import copy
import glob
import os
import traceback
import warnings
from fnmatch import fnmatch
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torchvision.ops import box_iou

from fcos_lightning.app.train import build_module
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.data.demo import make_demo_dataset
from fcos_lightning.fcos.criterion import FCOSCriterion
from fcos_lightning.fcos.points import make_points
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.fcos.targets import TargetAssigner
from fcos_lightning.runtime.optimize import autocast

pytestmark = pytest.mark.gpu

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
DEVICES = {"cpu": CPU, "cuda": CUDA}
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MODEL_PRESETS = sorted(Path(p).stem for p in glob.glob(os.path.join(CONF_DIR, "model", "*.yaml")))
CATEGORIES = CategoryMap(cat_ids=(1, 3, 7), names=("a", "b", "c"))

# Host synchronizations a training step is allowed: site pattern -> (most per step, why) (README "GPU"). Sites are
# "<path from the package root>:<function>" of the innermost frame of this project, else of the innermost frame.
DOCUMENTED_SYNCS = {
    "fcos_lightning/lightning/module.py:training_step": (1, "the non-finite loss guard reads one boolean"),
    "fcos_lightning/fcos/loss.py:__call__": (1, "selecting the positives: their number decides the loss's shapes"),
    "torch/amp/grad_scaler.py:*": (1, "16-mixed only: GradScaler reads whether gradients overflowed, to skip the step"),
    "fcos_lightning/fcos/targets.py:_grid_axes": (None, "at each new feature-map size only: the grid is checked once"),
}


@pytest.fixture(autouse=True)
def full_fp32():
    """fp32 means fp32: no TF32 in matmuls and convolutions, as the CPU computes."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build_preset(compose_cfg, preset: str, num_classes: int = CATEGORIES.num_classes, *overrides: str):
    cfg = compose_cfg("train", [f"model={preset}", *overrides])
    return instantiate(cfg.model, num_classes=num_classes)


def random_targets(batch: int, size: tuple[int, int], num_boxes: int, seed: int) -> list[dict]:
    """Boxes from 4 px to the whole image, some sharing corners (ties in area), labels ``0..2``."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(batch):
        m = max(0, num_boxes - 3 * i)  # different counts per image, the last may be empty
        wh = torch.rand(m, 2, generator=g) ** 2 * torch.tensor([size[1], size[0]]) + 4
        xy = torch.rand(m, 2, generator=g) * (torch.tensor([size[1], size[0]]) - wh).clamp(min=1)
        boxes = torch.cat((xy, xy + wh), 1).round()
        if m > 1:
            boxes[1] = boxes[0]  # a duplicate: the first index must win on CPU and CUDA alike
        targets.append({"boxes": boxes, "labels": torch.randint(0, 3, (m,), generator=g)})
    return targets


def on(device: torch.device, targets: list[dict]) -> list[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


@pytest.mark.parametrize(("preset", "size"), [("r50", (480, 640)), ("dla34_rt", (512, 672))])
def test_network_outputs_on_cuda_match_cpu_in_fp32(compose_cfg, preset, size):
    torch.manual_seed(0)
    model = build_preset(compose_cfg, preset, 80).eval()
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    image_sizes = torch.tensor([size, (size[0] - 64, size[1] - 96)])
    with torch.no_grad():
        cpu = model(images, image_sizes)
        gpu = model.to(CUDA)(images.to(CUDA), image_sizes.to(CUDA))
    for field in cpu._fields:
        for level, (c, g) in enumerate(zip(getattr(cpu, field), getattr(gpu, field), strict=True)):
            err = (g.cpu() - c).abs().max().item()
            scale = max(1.0, c.abs().max().item())
            assert err <= 1e-4 * scale, (
                f"{preset} {field}[{level}]: max |cuda - cpu| = {err:.3g} (max |cpu| {scale:.3g})"
            )


@pytest.mark.parametrize("radius", [1.5, 0.0], ids=["center_sampling", "whole_box"])
def test_target_assignment_on_cuda_equals_cpu(radius):
    size, strides = (800, 1216), (8, 16, 32, 64, 128)
    feature_sizes = [(-(-size[0] // s), -(-size[1] // s)) for s in strides]
    assigner = TargetAssigner(strides, (64, 128, 256, 512), radius)
    targets = random_targets(4, size, 60, seed=1)
    out = {}
    for name, device in DEVICES.items():
        points = make_points(feature_sizes, strides, 0.5, device)
        t = on(device, targets)
        out[name] = assigner(points, [x["boxes"] for x in t], [x["labels"] for x in t], 3)
    cpu, gpu = out["cpu"], out["cuda"]
    assert (cpu.labels < 3).sum() > 100, "too few positives to compare"
    assert torch.equal(gpu.labels.cpu(), cpu.labels), "positives or their classes differ"
    assert torch.equal(gpu.matched_idx.cpu(), cpu.matched_idx), "matched boxes differ"
    diff = (gpu.reg_targets.cpu() - cpu.reg_targets).abs().max().item()
    assert torch.equal(gpu.reg_targets.cpu(), cpu.reg_targets), f"regression targets differ by up to {diff}"


def test_postprocessing_on_cuda_equals_cpu():
    torch.manual_seed(0)
    strides, num_classes, batch = (8, 16, 32, 64, 128), 80, 3
    image_sizes = torch.tensor([[800, 1216], [640, 1216], [800, 960]])
    orig_sizes = torch.tensor([[480, 730], [427, 811], [1000, 1200]])
    feature_sizes = [(-(-800 // s), -(-1216 // s)) for s in strides]
    logits = [torch.randn(batch, num_classes, h, w) * 2 - 4 for h, w in feature_sizes]
    reg = [torch.rand(batch, 4, h, w) * 8 for h, w in feature_sizes]
    ctr = [torch.randn(batch, 1, h, w) for h, w in feature_sizes]
    post = FCOSPostProcessor()  # AdelaiDet: threshold 0.05, top 1000 per level, NMS 0.6, 100 per image
    out = {}
    for name, device in DEVICES.items():
        args = [[x.to(device) for x in level] for level in (logits, reg, ctr)]
        points = make_points(feature_sizes, strides, 0.5, device)
        out[name] = post(*args, points, strides, image_sizes.to(device), orig_sizes.to(device))
    for i, (c, g) in enumerate(zip(out["cpu"], out["cuda"], strict=True)):
        g = {k: v.cpu() for k, v in g.items()}
        assert len(c["boxes"]) == len(g["boxes"]) > 50, f"image {i}: {len(c['boxes'])} vs {len(g['boxes'])} detections"
        # Same detections: each CPU box has a CUDA box of the same class at IoU ~1 with the same score (the
        # devices' sigmoid may differ in the last bit, which can swap the order of equal-looking scores).
        same_class = c["labels"][:, None] == g["labels"][None, :]
        iou = box_iou(c["boxes"], g["boxes"]) * same_class
        score_gap = (c["scores"][:, None] - g["scores"][None, :]).abs()
        match = (iou > 1 - 1e-5) & (score_gap < 1e-5)
        assert match.any(1).all() and match.any(0).all(), f"image {i}: detections differ"


@pytest.fixture(scope="module")
def cuda_step_inputs():
    size = (320, 416)
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, device=CUDA)
    image_sizes = torch.tensor([size, (288, 384)], device=CUDA)
    return images, image_sizes, on(CUDA, random_targets(2, (288, 384), 6, seed=2))


@pytest.fixture(scope="module")
def preset_models():
    """Each preset built once on the CPU (random weights); tests train copies."""
    cache: dict[str, torch.nn.Module] = {}

    def get(compose_cfg, preset: str) -> torch.nn.Module:
        if preset not in cache:
            torch.manual_seed(0)
            cache[preset] = build_preset(compose_cfg, preset, CATEGORIES.num_classes)
        return copy.deepcopy(cache[preset])

    return get


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_training_step_under_mixed_precision(compose_cfg, preset_models, cuda_step_inputs, preset, precision,
                                             channels_last):  # fmt: skip
    model = preset_models(compose_cfg, preset)
    model.channels_last = channels_last
    model.to(CUDA, memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    criterion = FCOSCriterion.for_model(model)
    images, image_sizes, targets = cuda_step_inputs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "16-mixed")  # Lightning's 16-mixed scaler
    finite_grads = []
    for _ in range(4):
        with autocast(precision, CUDA):
            outputs = model(images, image_sizes)
            losses = criterion(outputs, targets)
            losses["loss"] = losses["loss_cls"] + losses["loss_box"] + losses["loss_ctr"]
        assert all(torch.isfinite(v) for v in losses.values()), f"{preset} {precision}: {losses}"
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.unscale_(optimizer)
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        finite_grads.append(not bad)
        scaler.step(optimizer)
        scaler.update()
    # GradScaler starts at a scale of 2**16 that can overflow fp16 gradients: it then skips the step and halves
    # the scale, which is how 16-mixed works. bf16 needs no scaling: every step must be finite.
    assert all(finite_grads) if precision == "bf16-mixed" else finite_grads[-1], f"{preset}: {finite_grads} {bad[:5]}"
    assert sum(p.grad.abs().sum() for p in params if p.grad is not None) > 0
    if channels_last:
        assert outputs.cls_logits[0].is_contiguous(memory_format=torch.channels_last)


class SyncProbe(pl.Callback):
    """Records where the training steps after the first ``skip`` ones synchronize with the host."""

    def __init__(self, skip: int = 2) -> None:
        self.skip = skip
        self.sites: dict[str, int] = {}
        self._saved = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing CUDA operation" not in str(message):
            return
        site = sync_site(traceback.extract_stack()[:-1])
        self.sites[site] = self.sites.get(site, 0) + 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= self.skip:
            self._saved = warnings.catch_warnings()
            self._saved.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._saved is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._saved.__exit__(None, None, None)
            self._saved = None


def sync_site(stack: list[traceback.FrameSummary]) -> str:
    """``path:function`` of the innermost frame of this project, else of the innermost frame (the op's caller),
    with paths from the package root (``fcos_lightning/...``, ``torch/...``, ``pytorch_lightning/...``)."""
    frames = [f for f in stack if Path(f.filename).name != "warnings.py"]
    ours = [f for f in frames if "fcos_lightning" in Path(f.filename).parts]
    frame = (ours or frames)[-1]
    parts = Path(frame.filename).parts
    for anchor, skip in (("fcos_lightning", 0), ("site-packages", 1), ("dist-packages", 1)):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + skip :]) + f":{frame.name}"
    return f"{frame.filename}:{frame.name}"


@pytest.fixture(scope="module")
def small_demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_train=24, num_val=2, image_size=(192, 224), seed=3)
    return root


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_training_step_syncs_only_where_documented(compose_cfg, small_demo_data, tmp_path, precision):
    root = small_demo_data
    cfg = compose_cfg(
        "train",
        ["experiment=demo", f"data.root={root}", "data.generate_demo=false", "data.batch_size=4", "data.num_workers=0"],
        tmp_path,
    )
    datamodule = instantiate(cfg.data.datamodule)
    module = build_module(cfg, datamodule.num_classes, datamodule.category_map, None)
    probe = SyncProbe(skip=2)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 5
    print(f"host syncs per 3 training steps ({precision}): {probe.sites}")
    undocumented = {s: n for s, n in probe.sites.items() if not any(fnmatch(s, p) for p in DOCUMENTED_SYNCS)}
    assert not undocumented, f"undocumented host synchronizations in the training step: {undocumented}"
    for pattern, (per_step, why) in DOCUMENTED_SYNCS.items():
        count = sum(n for site, n in probe.sites.items() if fnmatch(site, pattern))
        assert per_step is None or count <= per_step * 3, f"{pattern} ({why}): {count} in 3 steps"
