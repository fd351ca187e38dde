"""export.py: the ONNX model (dynamic H/W) gives PyTorch's detections at several image sizes, the export
checks itself and fails loudly on a mismatch, and the log compares onnxruntime with PyTorch speed."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time

import pytest
import torch

from fcos_lightning.app.evaluate import evaluate
from fcos_lightning.app.export import export
from fcos_lightning.checkpoint import load_model
from fcos_lightning.fcos.decoder import FCOSDecoder
from fcos_lightning.runtime.backends import OnnxRuntimeBackend
from fcos_lightning.runtime.check import check_against_pytorch
from fcos_lightning.runtime.onnx import sample_batch
from fcos_lightning.runtime.predictor import Predictor

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
    assert "PyTorch" in log_text and "onnx fp32" in log_text and speed["size"] == [192, 256]
    assert speed["pytorch_over_export"] == pytest.approx(speed["pytorch_fp32_ms"] / speed["export_ms"])
    # the medians are of 3 timed runs (plus a warm-up) each, all inside the export() call: in milliseconds
    assert 0 < 3 * (speed["pytorch_fp32_ms"] + speed["export_ms"]) / 1e3 < wall
    print(f"\nspeed: {report['speed']}")

    # independently of export()'s own check: detections through onnxruntime vs the PyTorch pipeline
    model, _, postprocessor, _ = load_model(tiny_ckpt)
    decoder = FCOSDecoder.for_model(model, postprocessor)
    runner = Predictor(OnnxRuntimeBackend(tmp_path / "export" / "tiny.onnx", 32), decoder=decoder)
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
    model, _, postprocessor, _ = load_model(tiny_ckpt)
    with torch.no_grad():
        model.head.bbox_pred.bias.add_(0.5)  # PyTorch model now differs from the exported one
    backend = OnnxRuntimeBackend(exported[1] / "export" / "tiny.onnx", model.size_divisibility)
    decoder = FCOSDecoder.for_model(model, postprocessor)
    with pytest.raises(RuntimeError, match=r"onnx fp32 mismatch at a synthetic 128x128 image: box_reg"):
        check_against_pytorch(model, backend, decoder, [[128, 128]], name="onnx fp32")


def test_nms_graph_detects_as_pytorch_and_runs_through_evaluate(exported, tiny_ckpt, tiny_demo, compose_cfg, tmp_path):
    """``nms=true``: decoding, NMS and the rescale in the graph; onnxruntime alone (no code of ours) gives
    PyTorch's detections in original pixels for a batch of two sizes, and evaluate.py scores the AP of the
    plain ONNX export."""
    import onnxruntime as ort

    sidecar = export(export_cfg(compose_cfg, tmp_path, tiny_ckpt, "nms=true"))
    assert sidecar["nms"] and sidecar["outputs"] == ["boxes", "scores", "labels", "num_detections"]
    assert [c["size"] for c in sidecar["checks"]] == SIZES and "orig_sizes" in sidecar["inputs"]
    path = tmp_path / "export" / "tiny.onnx"

    model, _, postprocessor, _ = load_model(tiny_ckpt)
    decoder = FCOSDecoder.for_model(model, postprocessor)
    big, sizes = sample_batch(256, 320, model.size_divisibility, seed=1)
    small, _ = sample_batch(200, 250, model.size_divisibility, seed=2)
    images = torch.cat((big, torch.nn.functional.pad(small, (0, 320 - small.shape[-1], 0, 256 - small.shape[-2]))))
    image_sizes = torch.tensor([[256, 320], [200, 250]])
    orig_sizes = torch.tensor([[512, 640], [150, 188]])
    with torch.no_grad():
        ref = decoder(model(images, image_sizes), image_sizes, orig_sizes)
    feed = {"images": images.numpy(), "image_sizes": image_sizes.numpy(), "orig_sizes": orig_sizes.numpy()}
    boxes, scores, labels, counts = ort.InferenceSession(str(path)).run(None, feed)
    assert boxes.shape == (2, postprocessor.max_detections, 4) and counts.tolist() == [len(r["boxes"]) for r in ref]
    for i, r in enumerate(ref):
        n = int(counts[i])
        assert n > 5 and (labels[i, n:] == -1).all() and not boxes[i, n:].any()
        assert torch.equal(torch.from_numpy(labels[i, :n]), r["labels"])
        torch.testing.assert_close(torch.from_numpy(boxes[i, :n]), r["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(scores[i, :n]), r["scores"], rtol=0, atol=1e-5)
        assert (r["boxes"][:, 2:] <= orig_sizes[i].flip(0)).all(), "clipped to the original image"

    val = [
        f"data.val.ann_file={tiny_demo / 'annotations' / 'instances_val.json'}",
        f"data.val.img_dir={tiny_demo / 'val'}",
        "trainer.enable_progress_bar=false",
        "num_pictures=0",
    ]
    aps = {
        name: evaluate(compose_cfg("evaluate", [f"model_path={model_path}", *val], tmp_path / name))["AP"]
        for name, model_path in [("nms", path), ("plain", exported[1] / "export" / "tiny.onnx")]
    }
    assert aps["nms"] == pytest.approx(aps["plain"], abs=0.01)


def test_nms_graph_is_for_onnx_fp32(tiny_ckpt, compose_cfg, tmp_path):
    cfg = export_cfg(compose_cfg, tmp_path, tiny_ckpt, "nms=true", "format=openvino", "precision=bf16")
    cfg.output = None
    with pytest.raises(ValueError, match="nms=true .* exports format=onnx precision=fp32, not format=openvino"):
        export(cfg)


@pytest.mark.openvino
def test_int8_export_runs_through_evaluate(tiny_ckpt, tiny_demo, compose_cfg, tmp_path):
    """int8 (NNCF, calibrated on the tiny demo's training images, as the sidecar records) through evaluate.py."""
    out = tmp_path / "int8"
    cfg = compose_cfg(
        "export",
        [
            f"ckpt_path={tiny_ckpt}",
            "format=openvino",
            "precision=int8",
            "check_sizes=[[192,224]]",
            "bench_size=[192,224]",
            "bench_runs=1",
            "calibration.num_images=4",
            f"calibration.ann_file={tiny_demo / 'annotations' / 'instances_train.json'}",
            f"calibration.img_dir={tiny_demo / 'train'}",
            "tolerance.int8.min_match=0.3",  # random weights: many detections near a tie, which 8 bits reorder
        ],  # fmt: skip
        out,
    )
    sidecar = export(cfg)
    assert (out / "model.xml").is_file() and (out / "model.bin").is_file()
    assert sidecar["precision"] == "int8" and sidecar["calibration"]["num_images"] == 4
    kinds = [c["image"] for c in sidecar["checks"]]
    assert kinds[0] == "synthetic" and kinds.count("real") == 8, "checked on the calibration split's images too"
    val = [
        f"data.val.ann_file={tiny_demo / 'annotations' / 'instances_val.json'}",
        f"data.val.img_dir={tiny_demo / 'val'}",
    ]
    ecfg = compose_cfg(
        "evaluate", [f"model_path={out / 'model.xml'}", "trainer.enable_progress_bar=false", *val], tmp_path / "eval"
    )
    metrics = evaluate(ecfg)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == written["num_images"] == 5 and 0 <= written["AP"] <= 100


def test_a_bad_model_path_fails_naming_it(compose_cfg, tmp_path):
    missing = tmp_path / "model.xml"
    with pytest.raises(FileNotFoundError, match=f"model_path not found: {missing}"):
        evaluate(compose_cfg("evaluate", [f"model_path={missing}"], tmp_path / "eval"))


@pytest.mark.slow
@pytest.mark.openvino
def test_openvino_exports_run_through_evaluate(tiny_trained_ckpt, tiny_demo, compose_cfg, tmp_path):
    """fp32 ONNX scores the AP the checkpoint scores (same resize, padding and decoding); OpenVINO bf16 and an
    int8 export calibrated on the run's own training images give an AP through evaluate.py too."""
    scored = {}
    for fmt, precision in [("onnx", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]:
        out = tmp_path / f"{fmt}_{precision}"
        cfg = compose_cfg(
            "export",
            [
                f"ckpt_path={tiny_trained_ckpt}",
                f"format={fmt}",
                f"precision={precision}",
                "check_sizes=[[192,224]]",
                "bench_size=[192,224]",
                "bench_runs=1",
                "calibration.num_images=6",
            ],  # fmt: skip
            out,
        )
        sidecar = export(cfg)
        model_path = out / sidecar["model_file"]
        assert sidecar["test_resize"] == {"min_size": 192, "max_size": 400, "style": "detectron2"}
        assert sidecar["strides"] == [8, 16, 32]
        if precision == "int8":
            assert sidecar["calibration"]["num_images"] == 6
        ecfg = compose_cfg(
            "evaluate", [f"model_path={model_path}", "trainer.enable_progress_bar=false"], tmp_path / f"eval_{fmt}"
        )
        metrics = evaluate(ecfg)
        assert metrics["num_images"] == 5
        detections = json.loads((tmp_path / f"eval_{fmt}" / "detections.json").read_text())
        assert detections and {d["category_id"] for d in detections} <= {2, 5, 9}
        scored[precision] = metrics["AP"]
    reference = evaluate(
        compose_cfg(
            "evaluate",
            [f"ckpt_path={tiny_trained_ckpt}", "trainer.precision=32-true", "trainer.enable_progress_bar=false"],
            tmp_path / "eval_ckpt",
        )
    )
    print(f"\nAP: checkpoint {reference['AP']:.2f}, exports {scored}")
    assert scored["fp32"] == pytest.approx(reference["AP"], abs=0.05)
    assert 0 <= scored["int8"] <= 100 and 0 <= scored["bf16"] <= 100
