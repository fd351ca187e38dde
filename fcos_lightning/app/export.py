"""``export(cfg)``: write a checkpoint as ONNX, verify it against PyTorch, compare CPU speed (``export.py``)."""

from __future__ import annotations

import json
import logging
import time

import torch
from omegaconf import DictConfig

from fcos_lightning.checkpoint import load_model
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.runtime.onnx import OnnxFCOS, check_against_pytorch, export_onnx, output_names, sample_batch

log = logging.getLogger("fcos_lightning.export")


def time_runs(fn, runs: int) -> float:
    """Median seconds of ``runs`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def export(cfg: DictConfig) -> dict:
    """``export.py``: write ``cfg.output``, verify it against PyTorch, compare CPU speed; returns the report
    (also written next to the model as ``<name>.json``)."""
    if cfg.format != "onnx":
        raise ValueError(f"format={cfg.format!r}: only onnx is supported")
    model, category_map, postprocessor, ckpt = load_model(cfg.ckpt_path, cfg.weights)
    model = model.float().cpu()
    path = export_onnx(model, cfg.output, cfg.opset)
    log.info("wrote %s (opset %d) from %s", path, cfg.opset, cfg.ckpt_path)
    runner = OnnxFCOS(path, FCOSDecoder.for_model(model, postprocessor))
    checks = check_against_pytorch(model, runner, cfg.check_sizes, cfg.rtol, cfg.box_tol)

    short = (ckpt["test_resize"] or {}).get("min_size", 800)
    h, w = cfg.bench_size if cfg.bench_size is not None else (short, short * 4 // 3)
    images, image_sizes = sample_batch(int(h), int(w), model.size_divisibility)
    with torch.no_grad():
        torch_s = time_runs(lambda: model(images, image_sizes), cfg.bench_runs)
    onnx_s = time_runs(lambda: runner.raw(images, image_sizes), cfg.bench_runs)
    speed = {
        "size": [int(h), int(w)],
        "torch_threads": torch.get_num_threads(),
        "pytorch_ms": torch_s * 1e3,
        "onnxruntime_ms": onnx_s * 1e3,
        "pytorch_over_onnxruntime": torch_s / onnx_s,
    }
    log.info(
        "CPU network time at %dx%d (median of %d): PyTorch %.1f ms, onnxruntime %.1f ms (onnxruntime %.2fx faster)",
        h, w, cfg.bench_runs, speed["pytorch_ms"], speed["onnxruntime_ms"], speed["pytorch_over_onnxruntime"],
    )  # fmt: skip
    report = {
        "onnx": str(path),
        "checkpoint": str(cfg.ckpt_path),
        "opset": cfg.opset,
        "inputs": {
            "images": "float32 [B,3,H,W] RGB 0-255, padded to a multiple of the coarsest stride",
            "image_sizes": "int64 [B,2] (h, w) of the valid region",
        },  # fmt: skip
        "outputs": output_names(model.strides),
        "strides": model.strides,
        "point_offset": model.point_offset,
        "size_divisibility": model.size_divisibility,
        "category_map": category_map.to_dict(),
        "postprocessor": postprocessor.settings(),
        "checks": checks,
        "speed": speed,
    }
    path.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return report
