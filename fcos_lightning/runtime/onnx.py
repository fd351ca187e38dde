"""The ONNX backend: export the network, run it with onnxruntime, and check it against PyTorch.

The split: the ONNX graph is the network (normalization with padding masked to the mean pixel, backbone, FPN,
head) with dynamic batch, height and width; its outputs are the raw per-level head outputs. Decoding, the
score threshold, NMS and the rescale to original pixels run outside the graph, in the same
:class:`~fcos_lightning.fcos.decoder.FCOSDecoder` (torch) as PyTorch inference (:class:`OnnxFCOS`), so
exported and PyTorch detections come from the same post-processing code. Inputs: ``images`` float32
``[B, 3, H, W]`` RGB 0-255 padded bottom/right to a multiple of the coarsest stride, ``image_sizes`` int64
``[B, 2]`` (h, w) of the valid region.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.modeling.head import HeadOutputs

log = logging.getLogger(__name__)


class ExportableFCOS(nn.Module):
    """The network with a flat output tuple ``(cls_logits_p3, box_reg_p3, centerness_p3, cls_logits_p4, ...)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(images, image_sizes)
        return tuple(t for level in zip(*outputs, strict=True) for t in level)


def output_names(strides: Sequence[int]) -> list[str]:
    levels = [f"p{s.bit_length() - 1}" for s in strides]
    return [f"{kind}_{lvl}" for lvl in levels for kind in ("cls_logits", "box_reg", "centerness")]


def export_onnx(model: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` (an :class:`FCOS`) to ``path`` with dynamic batch/height/width; the model is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableFCOS(copy.deepcopy(model).float().cpu()).eval()  # tracing must not update BN statistics
    d = model.size_divisibility
    images = torch.zeros(1, 3, 4 * d, 5 * d)
    sizes = torch.tensor([[4 * d, 5 * d]])
    names = output_names(model.strides)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"}}
    for i, name in enumerate(names):
        axes[name] = {0: "batch", 2: f"height_{i // 3}", 3: f"width_{i // 3}"}
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (images, sizes),
            str(path),
            input_names=["images", "image_sizes"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            training=torch.onnx.TrainingMode.EVAL,
        )
    return path


class OnnxFCOS:
    """Detections from an exported model: onnxruntime runs the network, :class:`FCOSDecoder` the rest.

    Args:
        path: the ``.onnx`` file.
        decoder: the model's decoder (``FCOSDecoder.for_model(model, postprocessor)``).
        threads: onnxruntime intra-op threads (0: its default).
    """

    def __init__(self, path: str | Path, decoder: FCOSDecoder, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.decoder = decoder

    def raw(self, images: Tensor, image_sizes: Tensor) -> HeadOutputs:
        """Per-level head outputs for a padded float ``[B, 3, H, W]`` batch and its valid sizes."""
        flat = self.session.run(
            None, {"images": images.float().numpy(), "image_sizes": image_sizes.to(torch.int64).numpy()}
        )
        tensors = [torch.from_numpy(a) for a in flat]
        return HeadOutputs(tensors[0::3], tensors[1::3], tensors[2::3])

    def __call__(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor | None = None) -> list[dict]:
        return self.decoder(self.raw(images, image_sizes), image_sizes, orig_sizes)


def sample_batch(height: int, width: int, divisibility: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A padded batch of one synthetic image (noise with flat blocks) of size ``height x width``."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 255
    image[:, height // 4 : height // 2, width // 3 : width // 2] = 60.0
    image[:, height // 2 :, : width // 4] = 200.0
    hp, wp = -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility
    batch = torch.zeros(1, 3, hp, wp)
    batch[0, :, :height, :width] = image.round()
    return batch, torch.tensor([[height, width]])


@torch.no_grad()
def check_against_pytorch(
    model: nn.Module,
    runner: OnnxFCOS,
    sizes: Sequence[Sequence[int]],
    rtol: float = 1e-4,
    box_tol: float = 0.01,
) -> list[dict]:
    """Compare raw outputs and detections of the ONNX model and ``model`` on images of each ``(h, w)``.

    Raises ``RuntimeError`` describing the first mismatch: a raw output off by more than ``rtol`` times its
    scale, a different number of detections or labels, or a box off by more than ``box_tol`` pixels.
    """
    results = []
    for h, w in sizes:
        images, image_sizes = sample_batch(int(h), int(w), model.size_divisibility)
        ours = model(images, image_sizes)
        theirs = runner.raw(images, image_sizes)
        raw_err = 0.0
        for name, a_levels, b_levels in zip(("cls_logits", "box_reg", "centerness"), theirs, ours, strict=True):
            for level, (a, b) in enumerate(zip(a_levels, b_levels, strict=True)):
                err = (a - b).abs().max().item()
                bound = rtol * max(1.0, b.abs().max().item())
                if a.shape != b.shape or err > bound:
                    raise RuntimeError(
                        f"ONNX mismatch at {h}x{w}: {name} level {level}: shape {tuple(a.shape)} vs "
                        f"{tuple(b.shape)}, max abs diff {err:.3g} > {bound:.3g}"
                    )
                raw_err = max(raw_err, err)
        det_torch = runner.decoder(ours, image_sizes)[0]
        det_onnx = runner(images, image_sizes)[0]
        n = len(det_torch["boxes"])
        if len(det_onnx["boxes"]) != n:
            raise RuntimeError(f"ONNX mismatch at {h}x{w}: {len(det_onnx['boxes'])} detections, PyTorch {n}")
        box_err = match_detections(det_onnx, det_torch)
        if box_err > box_tol:
            raise RuntimeError(
                f"ONNX mismatch at {h}x{w}: a detection has no same-label counterpart within {box_tol} px "
                f"(closest {box_err:.3g} px)"
            )
        results.append({"size": [int(h), int(w)], "detections": n, "max_raw_diff": raw_err, "max_box_diff": box_err})
        log.info("ONNX = PyTorch at %dx%d: %d detections, raw outputs within %.2g, boxes within %.2g px",
                 h, w, n, raw_err, box_err)  # fmt: skip
    return results


def match_detections(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest distance (px, max over coordinates) from a detection of either set to the nearest same-label
    detection of the other: order-free, so near-equal scores swapping places do not count as a mismatch."""
    if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
        return 0.0 if len(a["boxes"]) == len(b["boxes"]) else float("inf")
    dist = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(dim=2)
    dist = torch.where(a["labels"][:, None] == b["labels"][None, :], dist, torch.inf)
    return max(dist.amin(dim=1).max().item(), dist.amin(dim=0).max().item())
