"""``export(cfg)``: write a checkpoint as ONNX or OpenVINO (fp32, bf16, int8), check it against PyTorch,
compare CPU speed, and write the sidecar that runs it (``export.py``)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fcos_lightning.checkpoint import load_model
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.files import write_json_atomic
from fcos_lightning.runtime.backends import (
    OPENVINO_PRECISIONS,
    OnnxRuntimeBackend,
    OnnxRuntimeDetector,
    OpenVINOBackend,
)
from fcos_lightning.runtime.check import Tolerance, check_against_pytorch, check_graph_detections
from fcos_lightning.runtime.exported import SIDECAR_VERSION, sidecar_path
from fcos_lightning.runtime.onnx import DETECTION_OUTPUTS, export_onnx, output_names, sample_batch
from fcos_lightning.runtime.quantize import calibration_images, quantize_openvino

log = logging.getLogger("fcos_lightning.export")

FORMATS = {"onnx": (".onnx", ("fp32",)), "openvino": (".xml", ("fp32", "bf16", "int8"))}


def time_runs(fn, runs: int) -> float:
    """Median seconds of ``runs`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def output_path(cfg: DictConfig) -> Path:
    """``cfg.output``, or ``<output_dir>/model`` with the format's suffix; a wrong suffix is an error."""
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}: expected one of {list(FORMATS)}")
    suffix, precisions = FORMATS[cfg.format]
    if cfg.precision not in precisions:
        raise ValueError(f"precision={cfg.precision!r}: format={cfg.format} exports {list(precisions)}")
    path = Path(cfg.output) if cfg.output else Path(cfg.output_dir) / f"model{suffix}"
    if path.suffix.lower() != suffix:
        raise ValueError(f"output={path}: format={cfg.format} writes a {suffix} file")
    return path


def export(cfg: DictConfig) -> dict:
    """``export.py``: write the model and its sidecar ``<name>.json``, check it against PyTorch, compare CPU
    speed; returns the sidecar."""
    path = output_path(cfg)
    model, category_map, postprocessor, ckpt = load_model(cfg.ckpt_path, cfg.weights)
    model = model.float().cpu().eval()
    decoder = FCOSDecoder.for_model(model, postprocessor)
    d = model.size_divisibility
    path.parent.mkdir(parents=True, exist_ok=True)
    nms = bool(cfg.get("nms", False))
    if nms and (cfg.format, cfg.precision) != ("onnx", "fp32"):
        raise ValueError(
            f"nms=true (decoding and NMS in the graph) exports format=onnx precision=fp32, not "
            f"format={cfg.format} precision={cfg.precision}"
        )
    if cfg.format == "onnx":
        export_onnx(model, path, cfg.opset, decoder if nms else None)
        network = (OnnxRuntimeDetector if nms else OnnxRuntimeBackend)(path, d)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(model, Path(tmp) / "model.onnx", cfg.opset)
            write_openvino(onnx_path, path, cfg, ckpt, model)
        network = OpenVINOBackend(path, d, OPENVINO_PRECISIONS[cfg.precision])
    log.info("wrote %s (%s %s) from %s", path, cfg.format, cfg.precision, cfg.ckpt_path)
    tolerance = Tolerance(**OmegaConf.to_container(cfg.tolerance[cfg.precision]))
    name = f"{cfg.format} {cfg.precision}"
    if nms:
        checks = check_graph_detections(model, network.detections, decoder, cfg.check_sizes, tolerance.box_tol, name)
    else:
        samples = check_samples(model, cfg, ckpt) if not tolerance.exact else []
        checks = check_against_pytorch(model, network, decoder, cfg.check_sizes, tolerance, name, samples)
    speed = compare_speed(model, network.detections if nms else network, cfg, ckpt)
    sidecar = {
        "sidecar_version": SIDECAR_VERSION,
        "model_file": path.name,
        "format": cfg.format,
        "precision": cfg.precision,
        "checkpoint": str(cfg.ckpt_path),
        "opset": cfg.opset,
        "nms": nms,
        "inputs": {
            "images": "float32 [B,3,H,W] RGB 0-255, resized by test_resize, zero-padded bottom/right to a multiple "
            "of size_divisibility (normalization is inside the graph)",
            "image_sizes": "int64 [B,2] (h, w) of the valid region",
            **(
                {"orig_sizes": "int64 [B,2] (h, w) of the images before resizing: boxes come out in their pixels"}
                if nms
                else {}
            ),
        },
        "outputs": DETECTION_OUTPUTS if nms else output_names(model.strides),
        **(
            {
                "outputs_doc": "boxes float32 [B,D,4] xyxy, scores float32 [B,D], labels int64 [B,D] (0-based class "
                "index into classes, -1 past the end), num_detections int64 [B]; each image's detections first, in "
                "score order"
            }
            if nms
            else {}
        ),
        "strides": model.strides,
        "point_offset": model.point_offset,
        "size_divisibility": d,
        "normalization": {k: getattr(model, k).flatten().tolist() for k in ("pixel_mean", "pixel_std")},
        "classes": category_map.to_dict(),
        "postprocess": postprocessor.settings(),
        "test_resize": ckpt["test_resize"],
        "score_thresholds": ckpt.get("score_thresholds"),  # predict.py score_thresh=auto
        "source": {"kind": "exported", "checkpoint": str(cfg.ckpt_path), "data": ckpt["source"].get("data", {})},
        "checks": checks,
        "speed": speed,
    }
    if cfg.precision == "int8":
        sidecar["calibration"] = OmegaConf.to_container(cfg.calibration)
    write_json_atomic(sidecar_path(path), sidecar, indent=2)
    print(f"wrote {path} and {sidecar_path(path)}")
    return sidecar


def check_samples(model, cfg: DictConfig, ckpt: dict) -> list:
    """Up to ``cfg.check_images`` real images for the bf16/int8 check (the calibration split), or none when the
    checkpoint records no training set that exists here (the check then uses the synthetic images alone)."""
    count = int(cfg.get("check_images", 0))
    if count <= 0:
        return []
    try:
        _, indices, load = calibration_images(model, ckpt, cfg.calibration, str(cfg.ckpt_path), count)
    except (ValueError, FileNotFoundError) as e:
        log.warning("checking against PyTorch on synthetic images only: %s", e)
        return []
    return [load(i) for i in indices]


def write_openvino(onnx_path: Path, path: Path, cfg: DictConfig, ckpt: dict, model) -> None:
    """The ONNX graph converted to an OpenVINO IR at ``path``: fp32 weights for fp32 and bf16 (bf16 is
    OpenVINO's inference precision, set when it compiles), NNCF post-training quantization for int8."""
    import openvino as ov

    ov_model = ov.convert_model(str(onnx_path))
    if cfg.precision == "int8":
        ov_model = quantize_openvino(ov_model, model, ckpt, cfg.calibration, str(cfg.ckpt_path))
    ov.save_model(ov_model, str(path), compress_to_fp16=False)


def compare_speed(model, network, cfg: DictConfig, ckpt: dict) -> dict:
    """Median network time of PyTorch fp32 and the export at ``cfg.bench_size`` (batch 1)."""
    short = (ckpt["test_resize"] or {}).get("min_size", 800)
    h, w = cfg.bench_size if cfg.bench_size is not None else (short, short * 4 // 3)
    images, image_sizes = sample_batch(int(h), int(w), model.size_divisibility)
    with torch.no_grad():
        torch_s = time_runs(lambda: model(images, image_sizes), cfg.bench_runs)
    export_s = time_runs(lambda: network(images, image_sizes), cfg.bench_runs)
    speed = {
        "size": [int(h), int(w)],
        "torch_threads": torch.get_num_threads(),
        "pytorch_fp32_ms": torch_s * 1e3,
        "export_ms": export_s * 1e3,
        "pytorch_over_export": torch_s / export_s,
    }
    log.info(
        "CPU network time at %dx%d (median of %d): PyTorch fp32 %.1f ms, %s %s %.1f ms (%.2fx)",
        h, w, cfg.bench_runs, speed["pytorch_fp32_ms"], cfg.format, cfg.precision, speed["export_ms"],
        speed["pytorch_over_export"],
    )  # fmt: skip
    return speed
