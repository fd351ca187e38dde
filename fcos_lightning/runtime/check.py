"""An exported model checked against the PyTorch network it came from: raw outputs and detections.

``export.py`` runs :func:`check_against_pytorch` on every model it writes and fails on a mismatch. fp32
graphs must match closely (raw outputs within ``rtol`` of their scale, the same detections within ``box_tol``
px); bf16 and int8 graphs compute differently by design, so they are held to a looser raw tolerance and to
``min_match``: the share of PyTorch's confident detections that the export finds with the same label at
IoU >= 0.9.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.modeling.head import HeadOutputs
from fcos_lightning.runtime.onnx import sample_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """How close an export must be to PyTorch.

    Args:
        rtol: raw outputs: max ``|export - torch|`` <= ``rtol * max(1, max |torch|)`` per output.
        box_tol: detections (``exact`` only): same count and labels, boxes within this many px.
        exact: compare every detection (fp32); otherwise only ``min_match`` of the confident ones.
        min_match: share of PyTorch detections scoring >= ``confident`` matched at IoU >= 0.9, same label.
        confident: the score of a confident detection.
    """

    rtol: float = 1e-4
    box_tol: float = 0.01
    exact: bool = True
    min_match: float = 1.0
    confident: float = 0.3


@torch.no_grad()
def check_against_pytorch(
    model: nn.Module,
    network: Callable[[Tensor, Tensor], HeadOutputs],
    decoder: FCOSDecoder,
    sizes: Sequence[Sequence[int]],
    tolerance: Tolerance | None = None,
    name: str = "export",
    samples: Sequence[tuple[Tensor, Tensor]] = (),
) -> list[dict]:
    """Compare ``network`` (a backend) with ``model`` on a synthetic image of each ``(h, w)`` and on
    ``samples`` (real images, ``(batch, image_sizes)`` as the Predictor feeds them). ``min_match`` holds for
    the confident detections of all images together.

    Raises ``RuntimeError`` describing the first mismatch (``name`` says which export)."""
    tolerance = tolerance or Tolerance()
    inputs = [("synthetic", *sample_batch(int(h), int(w), model.size_divisibility)) for h, w in sizes]
    inputs += [("real", images, image_sizes) for images, image_sizes in samples]
    results, matched_all, total_all = [], 0, 0
    for kind, images, image_sizes in inputs:
        h, w = image_sizes[0].tolist()
        where = f"{name} mismatch at a {kind} {h}x{w} image"
        ours = model(images, image_sizes)
        theirs = network(images, image_sizes)
        raw_err = 0.0
        for field, a_levels, b_levels in zip(("cls_logits", "box_reg", "centerness"), theirs, ours, strict=True):
            for level, (a, b) in enumerate(zip(a_levels, b_levels, strict=True)):
                err = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("inf")
                bound = tolerance.rtol * max(1.0, b.abs().max().item())
                if err > bound:
                    raise RuntimeError(
                        f"{where}: {field} level {level}: shape {tuple(a.shape)} vs "
                        f"{tuple(b.shape)}, max abs diff {err:.3g} > {bound:.3g}"
                    )
                raw_err = max(raw_err, err / max(1.0, b.abs().max().item()))
        det_torch = decoder(ours, image_sizes)[0]
        det_export = decoder(theirs, image_sizes)[0]
        result = {"image": kind, "size": [h, w], "detections": len(det_torch["boxes"]), "max_raw_rel_diff": raw_err}
        if tolerance.exact:
            result["max_box_diff"] = compare_exact(det_export, det_torch, tolerance.box_tol, where)
        else:
            matched, total = matched_share(det_torch, det_export, tolerance.confident)
            matched_all, total_all = matched_all + matched, total_all + total
            result["confident_matched"] = [matched, total]
        results.append(result)
        log.info("%s = PyTorch on a %s %dx%d image: %s", name, kind, h, w, result)
    if not tolerance.exact and total_all and matched_all / total_all < tolerance.min_match:
        raise RuntimeError(
            f"{name} mismatch: {matched_all} of PyTorch's {total_all} detections scoring >= {tolerance.confident} "
            f"on {len(inputs)} images found (same label, IoU >= 0.9); at least {tolerance.min_match:.0%} needed"
        )
    return results


@torch.no_grad()
def check_graph_detections(
    model: nn.Module,
    graph: Callable[[Tensor, Tensor, Tensor], list[dict[str, Tensor]]],
    decoder: FCOSDecoder,
    sizes: Sequence[Sequence[int]],
    box_tol: float = 0.01,
    name: str = "export",
) -> list[dict]:
    """Compare a graph that decodes (``export.py nms=true``: ``graph(images, image_sizes, orig_sizes)`` ->
    detections per image) with ``model`` + ``decoder`` on a synthetic image of each ``(h, w)``, its boxes
    rescaled to 1.5x that size: the same detections, boxes within ``box_tol`` px, scores within 1e-4."""
    results = []
    for h, w in sizes:
        images, image_sizes = sample_batch(int(h), int(w), model.size_divisibility)
        orig_sizes = (image_sizes * 3) // 2
        where = f"{name} mismatch at {h}x{w}"
        ours = decoder(model(images, image_sizes), image_sizes, orig_sizes)[0]
        theirs = graph(images, image_sizes, orig_sizes)[0]
        box_err = compare_exact(theirs, ours, box_tol, where)
        score_err = (
            (theirs["scores"].sort().values - ours["scores"].sort().values).abs().max().item()
            if len(ours["scores"])
            else 0.0
        )
        if score_err > 1e-4:
            raise RuntimeError(f"{where}: scores differ by up to {score_err:.3g}")
        result = {"size": [int(h), int(w)], "detections": len(ours["boxes"]), "max_box_diff": box_err}
        results.append(result)
        log.info("%s = PyTorch at %dx%d: %s", name, h, w, result)
    return results


def compare_exact(export: dict[str, Tensor], torch_det: dict[str, Tensor], box_tol: float, where: str) -> float:
    """The largest box distance between two detection sets that must agree one to one (same count, every box
    with a same-label counterpart within ``box_tol`` px); raises ``RuntimeError`` starting with ``where``."""
    n = len(torch_det["boxes"])
    if len(export["boxes"]) != n:
        raise RuntimeError(f"{where}: {len(export['boxes'])} detections, PyTorch {n}")
    box_err = match_detections(export, torch_det)
    if box_err > box_tol:
        raise RuntimeError(
            f"{where}: a detection has no same-label counterpart within {box_tol} px (closest {box_err:.3g} px)"
        )
    return box_err


def match_detections(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest distance (px, max over coordinates) from a detection of either set to the nearest same-label
    detection of the other: order-free, so near-equal scores swapping places do not count as a mismatch."""
    if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
        return 0.0 if len(a["boxes"]) == len(b["boxes"]) else float("inf")
    dist = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(dim=2)
    dist = torch.where(a["labels"][:, None] == b["labels"][None, :], dist, torch.inf)
    return max(dist.amin(dim=1).max().item(), dist.amin(dim=0).max().item())


def matched_share(ref: dict[str, Tensor], other: dict[str, Tensor], confident: float) -> tuple[int, int]:
    """(how many of ``ref``'s detections scoring >= ``confident`` have a same-label detection in ``other`` at
    IoU >= 0.9, how many there are)."""
    keep = ref["scores"] >= confident
    boxes, labels = ref["boxes"][keep], ref["labels"][keep]
    if len(boxes) == 0 or len(other["boxes"]) == 0:
        return 0, len(boxes)
    iou = box_iou(boxes, other["boxes"])
    iou[labels[:, None] != other["labels"][None, :]] = 0
    return int((iou.max(dim=1).values >= 0.9).sum()), len(boxes)
