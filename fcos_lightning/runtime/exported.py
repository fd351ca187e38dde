"""Exported models and their sidecar; one loader for checkpoints and exports alike.

``export.py`` writes the model (``.onnx`` for onnxruntime, ``.xml`` + ``.bin`` for OpenVINO) and, next to it,
``<name>.json``: the sidecar, with everything needed to run the graph without the checkpoint: format and
precision, input and output names, strides, point offset, size divisibility, normalization, classes and
category ids, post-processing settings, test resize, the val split the checkpoint recorded, and the export's
own checks. :func:`load_predictor` turns a checkpoint or an exported model into a
:class:`~fcos_lightning.runtime.predictor.Predictor`, so ``evaluate.py`` and ``predict.py`` run either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fcos_lightning.checkpoint import load_model
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.data.transforms import RESIZE_STYLES, ResizeStyle
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.runtime.backends import (
    OPENVINO_PRECISIONS,
    OnnxRuntimeBackend,
    OnnxRuntimeDetector,
    OpenVINOBackend,
)
from fcos_lightning.runtime.optimize import optimize_for_inference
from fcos_lightning.runtime.precision import resolve_precision
from fcos_lightning.runtime.predictor import Predictor

SIDECAR_VERSION = 1
EXPORT_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
SIDECAR_KEYS = ("format", "precision", "strides", "point_offset", "size_divisibility", "classes", "postprocess")


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """The sidecar of an exported model: ``model.onnx`` -> ``model.json``."""
    return Path(model_path).with_suffix(".json")


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of ``model_path``, checked against the model file's format; errors name the files."""
    path = Path(model_path)
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(
            f"{path}: its sidecar {side} is missing (export.py writes <name>.json next to the model: classes, "
            "strides, test resize, post-processing); re-export, or copy the sidecar along with the model"
        )
    try:
        info = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{side}: not a JSON sidecar ({e})") from None
    missing = [k for k in SIDECAR_KEYS if k not in info]
    if missing:
        raise ValueError(f"{side}: not an export.py sidecar, missing {missing}")
    fmt = EXPORT_SUFFIXES[path.suffix.lower()]
    if info["format"] != fmt:
        raise ValueError(f"{side} describes a {info['format']} model, but {path} is {fmt}")
    return info


class LoadedPredictor(NamedTuple):
    """A :class:`Predictor` (its ``test_resize`` set) and what evaluation and output need around it: the class
    map, and the description (``test_resize``, ``source``) of the checkpoint or sidecar."""

    predictor: Predictor
    classes: CategoryMap
    description: dict[str, Any]


def load_predictor(
    model_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    threads: int = 0,
    cpu_micro_batch: int | None = 1,
    openvino: dict[str, Any] | None = None,
    weights: str = "averaged",
) -> LoadedPredictor:
    """A checkpoint of ours (``.ckpt``/``.pt``/``.pth``; run by PyTorch on ``device`` under ``precision``) or an
    exported model (``.onnx``: onnxruntime, ``.xml``: OpenVINO, both on the CPU with ``threads``; ``openvino``:
    extra :class:`OpenVINOBackend` arguments such as ``hint``, ``num_streams``). ``weights``: of a checkpoint of an
    ``ema=true`` run, ``averaged`` or ``trained`` (:func:`~fcos_lightning.checkpoint.load_network`)."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"model_path not found: {path}")
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        model, classes, postprocessor, ckpt = load_model(path, weights)
        device = torch.device(device)
        precision = resolve_precision(precision, "cpu" if device.type == "cpu" else "gpu")
        model = optimize_for_inference(model.to(device), precision=precision, cpu_micro_batch=cpu_micro_batch)
        return LoadedPredictor(
            Predictor(
                model,
                postprocessor,
                precision=precision,
                test_resize=test_resize_of(ckpt),
                resize_style=resize_style_of(ckpt),
            ),
            classes,
            ckpt,
        )
    if suffix not in EXPORT_SUFFIXES:
        raise ValueError(
            f"model_path={path}: unknown model format {path.suffix!r}: expected a checkpoint "
            f"({'/'.join(CHECKPOINT_SUFFIXES)}) or an export.py model (.onnx, OpenVINO .xml)"
        )
    info = read_sidecar(path)
    d = int(info["size_divisibility"])
    if info["format"] == "onnx":
        backend = (OnnxRuntimeDetector if info.get("nms") else OnnxRuntimeBackend)(path, d, threads)
    else:
        backend = OpenVINOBackend(path, d, OPENVINO_PRECISIONS[info["precision"]], threads, **(openvino or {}))
    decoder = FCOSDecoder(info["strides"], info["point_offset"], FCOSPostProcessor(**info["postprocess"]))
    predictor = Predictor(
        backend, decoder=decoder, test_resize=test_resize_of(info), resize_style=resize_style_of(info)
    )
    return LoadedPredictor(predictor, CategoryMap.from_dict(info["classes"]), info)


def test_resize_of(description: dict[str, Any]) -> tuple[int, int] | None:
    """``(min_size, max_size)`` a checkpoint or sidecar records (None when unknown)."""
    resize = description.get("test_resize") or {}
    if resize.get("min_size") is None or resize.get("max_size") is None:
        return None
    return int(resize["min_size"]), int(resize["max_size"])


def resize_style_of(description: dict[str, Any]) -> ResizeStyle:
    """How a checkpoint or sidecar resizes (``test_resize.style``; ``detectron2`` for files without it)."""
    style = (description.get("test_resize") or {}).get("style", "detectron2")
    if style not in RESIZE_STYLES:
        raise ValueError(f"test_resize.style must be one of {list(RESIZE_STYLES)}, got {style!r}")
    return style
