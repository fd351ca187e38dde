"""export.py: the ONNX model (dynamic H/W) gives PyTorch's detections at several image sizes, the export
checks itself and fails loudly on a mismatch, and the log compares onnxruntime with PyTorch speed."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time

import pytest
import torch

from fcos_lightning.app.export import export
from fcos_lightning.checkpoint import load_model
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.runtime.onnx import OnnxFCOS, check_against_pytorch, sample_batch

SIZES = [[192, 256], [256, 160], [150, 211]]


def export_cfg(compose_cfg, tmp_path, ckpt, *extra):
    out = tmp_path / "export"
    cfg = compose_cfg(
        "export",
        [f"ckpt_path={ckpt}", f"check_sizes={SIZES}", "bench_size=[192,256]", "bench_runs=3", *extra],
        out,
    )
    cfg.output = str(out / "tiny.onnx")
    return cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_ckpt, compose_cfg):
    """The tiny checkpoint exported, with the report, the log and the wall time of the export() call."""
    tmp_path = tmp_path_factory.mktemp("onnx")
    handler = logging.handlers.BufferingHandler(1000)
    logger = logging.getLogger("fcos_lightning")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        report = export(export_cfg(compose_cfg, tmp_path, tiny_ckpt))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    wall = time.perf_counter() - start
    return report, tmp_path, "\n".join(r.getMessage() for r in handler.buffer), wall


def test_onnx_detections_equal_pytorch_at_several_sizes(exported, tiny_ckpt):
    report, tmp_path, log_text, wall = exported
    assert [c["size"] for c in report["checks"]] == SIZES
    assert json.loads((tmp_path / "export" / "tiny.json").read_text())["outputs"] == report["outputs"]
    speed = report["speed"]
    assert "PyTorch" in log_text and "onnxruntime" in log_text and speed["size"] == [192, 256]
    assert speed["pytorch_over_onnxruntime"] == pytest.approx(speed["pytorch_ms"] / speed["onnxruntime_ms"])
    # the medians are of 3 timed runs (plus a warm-up) each, all inside the export() call: in milliseconds
    assert 0 < 3 * (speed["pytorch_ms"] + speed["onnxruntime_ms"]) / 1e3 < wall
    print(f"\nspeed: {report['speed']}")

    # independently of export()'s own check: detections through onnxruntime vs the PyTorch pipeline
    model, _, postprocessor, _ = load_model(tiny_ckpt)
    decoder = FCOSDecoder.for_model(model, postprocessor)
    runner = OnnxFCOS(report["onnx"], decoder)
    for h, w in SIZES:
        images, image_sizes = sample_batch(h, w, model.size_divisibility, seed=h)
        with torch.no_grad():
            out = model(images, image_sizes)
        ref = decoder(out, image_sizes)[0]
        got = runner(images, image_sizes)[0]
        assert 5 < len(ref["boxes"]) < 100, "the check needs detections, below the cap"
        assert len(got["boxes"]) == len(ref["boxes"])
        assert torch.equal(got["labels"].sort().values, ref["labels"].sort().values)
        # one to one: each PyTorch detection has an ONNX one of the same label, box within 0.01 px
        dist = (got["boxes"][:, None] - ref["boxes"][None]).abs().amax(dim=2)
        dist = torch.where(got["labels"][:, None] == ref["labels"][None], dist, torch.inf)
        close = dist <= 0.01
        assert close.any(dim=0).all() and close.any(dim=1).all()
        torch.testing.assert_close(got["scores"].sort().values, ref["scores"].sort().values, rtol=0, atol=1e-5)
        print(f"{h}x{w}: {len(ref['boxes'])} detections, max box diff {dist.amin(dim=1).max():.2e} px")


def test_export_check_fails_loudly_on_a_mismatch(exported, tiny_ckpt):
    report = exported[0]
    model, _, postprocessor, _ = load_model(tiny_ckpt)
    with torch.no_grad():
        model.head.bbox_pred.bias.add_(0.5)  # PyTorch model now differs from the exported one
    runner = OnnxFCOS(report["onnx"], FCOSDecoder.for_model(model, postprocessor))
    with pytest.raises(RuntimeError, match=r"ONNX mismatch at 128x128: box_reg"):
        check_against_pytorch(model, runner, [[128, 128]])
