"""Every runtime behind the Predictor computes PyTorch's network: raw outputs within each precision's
tolerance, and the same confident detections (same label, IoU >= 0.9) through the one decoder."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import box_iou

from fcos_lightning.data.collate import pad_images
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.runtime.backends import OnnxRuntimeBackend, OpenVINOBackend
from fcos_lightning.runtime.onnx import export_onnx
from fcos_lightning.runtime.optimize import optimize_for_inference
from fcos_lightning.runtime.predictor import Predictor

pytestmark = [pytest.mark.openvino, pytest.mark.usefixtures("single_thread")]

#: raw outputs: max |runtime - torch| / max(1, max |torch|) per output; int8 is what NNCF's 8-bit grid allows
RAW_TOLERANCE = {"onnxruntime": 1e-4, "openvino fp32": 1e-4, "openvino bf16": 0.05, "openvino int8": 0.35}


@pytest.fixture(scope="module")
def runtimes(trained, tmp_path_factory):
    """The trained tiny model exported to ONNX and OpenVINO (fp32 weights; bf16 at inference; int8 by NNCF
    calibrated on the two training images), each as a backend; and the PyTorch reference."""
    import nncf
    import openvino as ov

    model, images, _, _ = trained
    tmp = tmp_path_factory.mktemp("runtimes")
    onnx_path = export_onnx(model, tmp / "tiny.onnx")
    ov_model = ov.convert_model(str(onnx_path))
    ov.save_model(ov_model, str(tmp / "tiny.xml"), compress_to_fp16=False)
    batch, sizes = pad_images(list(images), model.size_divisibility)
    feed = [{"images": batch[i : i + 1].float().numpy(), "image_sizes": sizes[i : i + 1].numpy()} for i in range(2)]
    quantized = nncf.quantize(ov.convert_model(str(onnx_path)), nncf.Dataset(feed), subset_size=2)
    ov.save_model(quantized, str(tmp / "tiny_int8.xml"), compress_to_fp16=False)
    d = model.size_divisibility
    return {
        "onnxruntime": OnnxRuntimeBackend(onnx_path, d, threads=1),
        "openvino fp32": OpenVINOBackend(tmp / "tiny.xml", d, "f32", threads=1),
        "openvino bf16": OpenVINOBackend(tmp / "tiny.xml", d, "bf16", threads=1),
        "openvino int8": OpenVINOBackend(tmp / "tiny_int8.xml", d, None, threads=1),
    }


@pytest.mark.parametrize("name", list(RAW_TOLERANCE))
def test_raw_outputs_equal_pytorch(runtimes, trained, name):
    model, images, _, _ = trained
    batch, sizes = pad_images(list(images), model.size_divisibility)
    with torch.no_grad():
        expected = model(batch, sizes)
    got = runtimes[name](batch, sizes)
    for field, a_levels, b_levels in zip(("cls_logits", "box_reg", "centerness"), got, expected, strict=True):
        for level, (a, b) in enumerate(zip(a_levels, b_levels, strict=True)):
            assert a.shape == b.shape, (name, field, level)
            err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
            assert err <= RAW_TOLERANCE[name], (name, field, level, err)


@pytest.mark.parametrize("name", list(RAW_TOLERANCE))
def test_detections_match_pytorch(runtimes, trained, name):
    """The Predictor over each backend finds PyTorch's confident detections: same label, IoU >= 0.9."""
    model, images, gt_boxes, _ = trained
    decoder = FCOSDecoder.for_model(model)
    reference = Predictor(optimize_for_inference(copy.deepcopy(model)), precision="32-true")(list(images))
    got = Predictor(runtimes[name], decoder=decoder)(list(images))
    for ref, det, gt in zip(reference, got, gt_boxes, strict=True):
        confident = ref["scores"] > 0.5
        assert confident.sum() == len(gt)  # one confident detection per object: a meaningful comparison
        iou = box_iou(ref["boxes"][confident], det["boxes"])
        iou[ref["labels"][confident][:, None] != det["labels"][None, :]] = 0
        assert (iou.max(dim=1).values >= 0.9).all(), (name, iou.max(dim=1).values)


def test_a_backend_needs_the_decoder(runtimes):
    with pytest.raises(ValueError, match="needs its decoder"):
        Predictor(runtimes["onnxruntime"])
