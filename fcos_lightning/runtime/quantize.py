"""int8 post-training quantization of the OpenVINO graph with NNCF, calibrated on the run's training images.

Calibration images go through the Predictor's own preprocessing (test resize, zero padding to the stride
multiple, batch of one), so the activation ranges NNCF measures are those inference sees. NNCF shows a
progress bar while it collects statistics. ``ignored_scope=head_outputs`` keeps the head's three prediction
convolutions (``cls_logits``, ``bbox_pred``, ``centerness``) in floating point: their outputs are the scores
and box distances themselves, where an 8-bit grid costs AP most directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fcos_lightning.data.coco import CocoDetection
from fcos_lightning.data.collate import pad_images
from fcos_lightning.runtime.exported import resize_style_of
from fcos_lightning.runtime.predictor import resized

log = logging.getLogger(__name__)

#: regular expressions on OpenVINO node names (ONNX scopes ``/model/head/<conv>/...``) of each ignored scope.
IGNORED_SCOPES = {
    "none": [],
    "head_outputs": [r".*head/(cls_logits|bbox_pred|centerness)/.*"],
}


def calibration_split(calibration: Mapping[str, Any], ckpt: Mapping[str, Any], ckpt_path: str) -> tuple[str, str]:
    """The annotation file and image folder to calibrate on: ``calibration.ann_file/img_dir``, else the training
    set the checkpoint records."""
    recorded = ckpt["source"].get("data", {})
    ann_file = calibration.get("ann_file") or recorded.get("train_ann_file")
    img_dir = calibration.get("img_dir") or recorded.get("train_img_dir")
    if not ann_file or not img_dir:
        raise ValueError(
            f"{ckpt_path} records no training set to calibrate int8 on: set calibration.ann_file=... and "
            "calibration.img_dir=..."
        )
    return str(ann_file), str(img_dir)


def calibration_images(
    model, ckpt: Mapping[str, Any], calibration: Mapping[str, Any], ckpt_path: str, count: int
) -> tuple[str, list[int], Callable[[int], tuple[Tensor, Tensor]]]:
    """``(ann_file, indices, load)``: ``count`` images of the calibration split (at most the set's size; a random
    subset with ``calibration.seed``) and ``load(index)``, each image as the Predictor feeds the network: test
    resize, zero padding to the stride multiple, batch of one ``([1, 3, H, W] float, [1, 2] sizes)``."""
    ann_file, img_dir = calibration_split(calibration, ckpt, ckpt_path)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"calibration.ann_file not found: {ann_file}")
    dataset = CocoDetection(ann_file, img_dir, train=False)
    if len(dataset) == 0:
        raise ValueError(f"{ann_file}: no images to calibrate on")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(calibration["seed"])))
    resize = ckpt["test_resize"] or {}
    min_size, max_size = int(resize.get("min_size", 800)), int(resize.get("max_size", 1333))
    style = resize_style_of(ckpt)

    def load(index: int) -> tuple[Tensor, Tensor]:
        image = dataset.load(index)["image"].as_subclass(Tensor)
        batch, sizes = pad_images(resized([image], min_size, max_size, style), model.size_divisibility)
        return batch.float(), sizes

    return ann_file, order[: int(count)].tolist(), load


def quantize_openvino(ov_model, model, ckpt: Mapping[str, Any], calibration: Mapping[str, Any], ckpt_path: str):
    """``ov_model`` quantized to int8 by ``nncf.quantize`` on ``calibration.num_images`` training images
    (:func:`calibration_images`)."""
    import nncf

    if int(calibration["num_images"]) <= 0:
        raise ValueError(f"calibration.num_images={calibration['num_images']}: need at least one image")
    ann_file, indices, load = calibration_images(model, ckpt, calibration, ckpt_path, calibration["num_images"])
    scope = calibration["ignored_scope"]
    if scope not in IGNORED_SCOPES:
        raise ValueError(f"calibration.ignored_scope={scope!r}: expected one of {list(IGNORED_SCOPES)}")
    patterns = IGNORED_SCOPES[scope]
    log.info("int8: calibrating on %d images of %s (ignored scope %s)", len(indices), ann_file, scope)

    def feed(index: int) -> dict[str, np.ndarray]:
        images, image_sizes = load(index)
        return {"images": images.numpy(), "image_sizes": image_sizes.numpy()}

    return nncf.quantize(
        ov_model,
        nncf.Dataset(indices, feed),
        preset=nncf.QuantizationPreset(calibration["preset"]),
        subset_size=len(indices),
        fast_bias_correction=bool(calibration["fast_bias_correction"]),
        ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=False) if patterns else None,
    )
