"""The network call of each inference runtime, behind one interface: a padded batch in, raw head outputs out.

A backend is what differs between PyTorch eager, onnxruntime and OpenVINO; everything around it (resize,
padding, decoding, NMS, test-time augmentation) is the :class:`~fcos_lightning.runtime.predictor.Predictor`'s
and the same for all. Each backend takes ``images`` ``[B, 3, H, W]`` (uint8 or float, RGB 0-255, padded
bottom/right to a multiple of ``size_divisibility``) and ``image_sizes`` int64 ``[B, 2]`` (h, w) of the valid
regions, and returns :class:`~fcos_lightning.modeling.head.HeadOutputs` (torch tensors, on ``device``).
Exported graphs normalize inside (padding masked to the mean pixel, as :meth:`FCOS.normalize`). The one
exception, :class:`OnnxRuntimeDetector`, runs a graph that decodes as well and returns detections.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fcos_lightning.fcos.postprocess import PaddedDetections
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import HeadOutputs
from fcos_lightning.runtime.optimize import autocast, autocast_dtype
from fcos_lightning.runtime.precision import resolve_precision

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeDetector", "OpenVINOBackend", "TorchBackend", "head_outputs"]


def head_outputs(flat: Sequence[Tensor]) -> HeadOutputs:
    """The exported graphs' flat ``(cls_logits_p3, box_reg_p3, centerness_p3, cls_logits_p4, ...)`` regrouped."""
    return HeadOutputs(list(flat[0::3]), list(flat[1::3]), list(flat[2::3]))


class TorchBackend:
    """PyTorch eager: the network under the precision's autocast.

    Args:
        model: the network (prepare it with :func:`~fcos_lightning.runtime.optimize.optimize_for_inference`).
        precision: a Lightning precision or ``auto`` (:func:`~fcos_lightning.runtime.precision.resolve_precision`).
        compile: wrap the network in ``torch.compile`` (the first calls compile; slower on the CPU measured);
            a string picks its ``mode`` (``reduce-overhead``: CUDA graphs, one launch per network call on a GPU).
    """

    name = "pytorch"

    def __init__(self, model: FCOS, precision: str = "auto", compile: bool | str = False) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, "cpu" if self.device.type == "cpu" else "gpu")
        stray = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Conv2d)}
        stray -= {torch.float32, autocast_dtype(self.precision)}
        if stray:
            raise ValueError(
                f"the model's convolution weights are {sorted(map(str, stray))} but precision {self.precision!r} "
                "computes in another dtype; pass the same precision to optimize_for_inference(precision=...)"
            )
        mode = compile if isinstance(compile, str) else None
        self.network = torch.compile(model, dynamic=False, mode=mode) if compile else model
        self.size_divisibility = model.size_divisibility

    def __call__(self, images: Tensor, image_sizes: Tensor) -> HeadOutputs:
        with autocast(self.precision, self.device):
            return self.network(images.to(self.device, non_blocking=True), image_sizes.to(self.device))


class OnnxRuntimeBackend:
    """onnxruntime (CPU) on an ``.onnx`` file written by :func:`~fcos_lightning.runtime.onnx.export_onnx`.

    Args:
        path: the ``.onnx`` file.
        size_divisibility: the padding multiple the graph needs (the sidecar's).
        threads: intra-op threads (0: onnxruntime's default, one per core).
    """

    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, path: str | os.PathLike, size_divisibility: int, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        self.size_divisibility = int(size_divisibility)

    def run(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor | None = None) -> list[Tensor]:
        """The graph's outputs, in its order, as torch tensors (``orig_sizes``: an ``nms=true`` graph's input)."""
        feed = {"images": images.float().cpu().numpy(), "image_sizes": image_sizes.to(torch.int64).cpu().numpy()}
        if orig_sizes is not None:
            feed["orig_sizes"] = orig_sizes.to(torch.int64).cpu().numpy()
        return [torch.from_numpy(a) for a in self.session.run(None, feed)]

    def __call__(self, images: Tensor, image_sizes: Tensor) -> HeadOutputs:
        return head_outputs(self.run(images, image_sizes))


class OnnxRuntimeDetector(OnnxRuntimeBackend):
    """onnxruntime on an ``export.py nms=true`` graph, which decodes too: :meth:`detections` replaces the
    network call and the decoder (the :class:`~fcos_lightning.runtime.predictor.Predictor` calls it)."""

    name = "onnxruntime (decoding in the graph)"

    def detections(
        self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor | None = None
    ) -> list[dict[str, Tensor]]:
        """Detections per image, boxes in ``orig_sizes`` pixels (None: the network input's)."""
        outputs = self.run(images, image_sizes, image_sizes if orig_sizes is None else orig_sizes)
        return PaddedDetections(*outputs).unpad()

    def __call__(self, images: Tensor, image_sizes: Tensor) -> HeadOutputs:
        raise TypeError(f"{self.name}: the graph returns detections, not head outputs; call detections()")


#: OpenVINO ``INFERENCE_PRECISION_HINT`` of each export precision; int8 graphs compute their non-quantized
#: layers in bf16 where the CPU has it (``None``: OpenVINO's own choice).
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": None}


class OpenVINOBackend:
    """OpenVINO (CPU) on an IR (``.xml`` + ``.bin``) written by ``export.py format=openvino``.

    Args:
        path: the ``.xml`` file.
        size_divisibility: the padding multiple the graph needs (the sidecar's).
        inference_precision: ``f32``, ``bf16`` (OpenVINO's ``INFERENCE_PRECISION_HINT``) or None (its default).
        threads: inference threads (0: OpenVINO's default, one per core).
        hint: ``LATENCY`` (one request uses every core) or ``THROUGHPUT``.
        num_streams: parallel streams (None: what ``hint`` implies).
        static_shape: ``(B, H, W)`` to compile the graph for that padded input shape only (OpenVINO can then
            plan memory and kernels ahead); None keeps batch, height and width dynamic.
    """

    name = "openvino"
    device = torch.device("cpu")

    def __init__(
        self,
        path: str | os.PathLike,
        size_divisibility: int,
        inference_precision: str | None = None,
        threads: int = 0,
        hint: str = "LATENCY",
        num_streams: int | None = None,
        static_shape: tuple[int, int, int] | None = None,
    ) -> None:
        import openvino as ov

        config = {"PERFORMANCE_HINT": hint}
        if inference_precision:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if num_streams is not None:
            config["NUM_STREAMS"] = str(num_streams)
        core = ov.Core()
        model = core.read_model(os.fspath(path))
        if static_shape is not None:
            b, h, w = (int(v) for v in static_shape)
            model.reshape({"images": [b, 3, h, w], "image_sizes": [b, 2]})
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.size_divisibility = int(size_divisibility)

    def run(self, images: Tensor, image_sizes: Tensor) -> list[Tensor]:
        """The graph's outputs, in its order, as torch tensors (copies: the request reuses its buffers)."""
        feed = {"images": images.float().cpu().numpy(), "image_sizes": image_sizes.to(torch.int64).cpu().numpy()}
        result = self.request.infer(feed)
        return [torch.from_numpy(result[out].copy()) for out in self.compiled.outputs]

    def __call__(self, images: Tensor, image_sizes: Tensor) -> HeadOutputs:
        return head_outputs(self.run(images, image_sizes))
