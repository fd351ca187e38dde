"""End to end on generated data: train, evaluate, check the numbers against pycocotools, resume, errors."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcos_lightning.analysis.complexity import model_complexity
from fcos_lightning.analysis.plots import PLOTS
from fcos_lightning.app.evaluate import evaluate
from fcos_lightning.app.train import train
from fcos_lightning.checkpoint import load_network
from fcos_lightning.lightning.optim import WarmupMultiStep
from fcos_lightning.modeling.detector import FCOS

NAMES = ["square", "disc", "ring"]


def pycocotools_metrics(ann_file: Path, detections: list[dict]) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), (max(float(s), 0.0) * 100 for s in ev.stats[:6])))


def test_train_then_evaluate_matches_pycocotools(tiny_demo, tiny_cfg, compose_cfg, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_demo,
        run,
        "schedule.max_iter=24",
        "schedule.val_interval=12",
        "schedule.warmup_iters=4",
        "schedule.milestones=[20]",
        "logger=many_loggers",
    )
    ap = train(cfg)

    # everything the run writes is in its run dir
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("best-") for p in (run / "checkpoints").iterdir())
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    assert list((run / "detections").glob("*.png"))
    train_metrics = json.loads((run / "metrics.json").read_text())
    assert train_metrics["step"] == 24 and train_metrics["AP"] == pytest.approx(ap)
    assert train_metrics["num_images"] == 5  # every val image once
    assert_explained(run, train_metrics)
    # the pictures reached both loggers of many_loggers, at both validations (steps 12 and 24)
    csv_images = {p.name for p in (run / "csv" / "images").glob("*.png")}
    for name in (*PLOTS, "detections"):
        stem = f"val_plots_{name}" if name != "detections" else "val_detections"
        assert {f"{stem}-step0000012.png", f"{stem}-step0000024.png"} <= csv_images, name
    tags = EventAccumulator(str(run / "tensorboard")).Reload().Tags()["images"]
    assert set(tags) == {"val/detections", *(f"val/plots/{name}" for name in PLOTS)}

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["classes"] == {"cat_ids": [2, 5, 9], "names": ["square", "disc", "ring"]}
    # predict.py score_thresh=auto reads the last validation's F1-best thresholds from the checkpoint
    f1 = train_metrics["analysis"]["f1"]
    assert ckpt["score_thresholds"]["global"] == f1["best_threshold"] and ckpt["score_thresholds"]["step"] == 24
    per_class = [f1["best_per_class"][n]["threshold"] if f1["best_per_class"][n]["f1"] else None for n in NAMES]
    assert ckpt["score_thresholds"]["per_class"] == per_class

    out = tmp_path / "eval"
    ecfg = compose_cfg(
        "evaluate",
        [
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "trainer.precision=32-true",
            "trainer.enable_progress_bar=false",
        ],
        out,
    )
    network_batches = []
    forward_features = FCOS.forward_features
    monkeypatch.setattr(
        FCOS, "forward_features", lambda self, x: network_batches.append(len(x)) or forward_features(self, x)
    )
    start = time.perf_counter()
    metrics = evaluate(ecfg)
    wall = time.perf_counter() - start
    assert network_batches and set(network_batches) == {1}  # cpu_micro_batch=1: val batches of 2, image by image
    written = json.loads((out / "metrics.json").read_text())
    assert_explained(out, written)
    # parameters and FLOPs at the test resize's largest input (192 x 400 here), printed and in metrics.json
    network = load_network(ckpt)
    complexity = model_complexity(network, 192, 400)
    assert written["model"]["parameters"] == complexity.parameters == sum(p.numel() for p in network.parameters())
    assert written["model"]["flops"] == complexity.flops > 0
    assert written["model"]["input_size"] == list(complexity.input_size)  # padded to the stride multiple
    assert complexity.summary() in capsys.readouterr().out
    detections = json.loads((out / "detections.json").read_text())
    assert detections, "score_thresh=0.001 must leave detections to score"
    ann_file = tiny_demo / "annotations" / "instances_val.json"
    gt = json.loads(ann_file.read_text())
    assert {d["category_id"] for d in detections} <= {2, 5, 9}  # original, non-contiguous ids
    assert {d["image_id"] for d in detections} <= {im["id"] for im in gt["images"]}

    expected = pycocotools_metrics(ann_file, detections)
    for key, value in expected.items():
        assert written[key] == pytest.approx(value, abs=1e-9), key
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert set(written["per_class_AP"]) == {"square", "disc", "ring"}
    # the time the speed implies for the 5 images fits in the evaluate() call that measured it
    assert written["num_images"] == 5 and written["images_per_second"] == metrics["images_per_second"]
    assert 0 < written["num_images"] / written["images_per_second"] <= wall
    # the same checkpoint scored during training and by evaluate.py gives the same AP
    assert written["AP"] == pytest.approx(train_metrics["AP"], abs=1e-6)


def assert_explained(run_dir: Path, metrics: dict) -> None:
    """The evaluation pictures are in ``run_dir/plots`` and their numbers in ``metrics["analysis"]``, for the
    same detections as the COCO metrics."""
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(f"{name}.png" for name in PLOTS)
    for name in PLOTS:
        width, height = Image.open(run_dir / "plots" / f"{name}.png").size
        assert width >= 600 and height >= 400, name
    analysis = metrics["analysis"]
    assert set(analysis) == {"coco", "precision_recall", "f1", "confusion_matrix", "error_breakdown"}
    assert analysis["coco"]["AP"] == pytest.approx(metrics["AP"])
    assert analysis["confusion_matrix"]["labels"] == [*NAMES, "background"]
    assert set(analysis["f1"]["best_per_class"]) == set(NAMES)
    assert analysis["error_breakdown"]["ap50"] == pytest.approx(metrics["AP50"], abs=1e-6)


def test_resume_continues_at_same_step_and_lr(tiny_demo, tiny_cfg, tmp_path):
    run = tmp_path / "run"
    schedule = [
        "schedule.max_iter=12",
        "schedule.base_lr=0.01",
        "schedule.val_interval=4",
        "schedule.warmup_iters=6",
        "schedule.milestones=[10]",
        "callbacks.checkpoint.save_top_k=-1",
        "callbacks.checkpoint.monitor=step",
        "callbacks.checkpoint.filename='step{step:03d}'",
    ]
    train(tiny_cfg(tiny_demo, run, *schedule))
    ckpt8 = run / "checkpoints" / "step008.ckpt"
    assert ckpt8.is_file(), sorted(p.name for p in (run / "checkpoints").iterdir())

    resumed = tmp_path / "resumed"
    probe = tmp_path / "probe.json"
    train(
        tiny_cfg(
            tiny_demo,
            resumed,
            *schedule,
            f"ckpt_path={ckpt8}",
            f"+callbacks.probe={{_target_:tests.app.conftest.StepProbe,path:'{probe}'}}",
        )
    )
    first = json.loads(probe.read_text())
    assert first["step"] == 8
    # step 8 of the schedule: past the 6-step warmup, before the milestone at 10
    assert first["lr"] == pytest.approx(0.01 * WarmupMultiStep([10], 0.1, 6, 0.001)(8))
    assert WarmupMultiStep([10], 0.1, 6, 0.001)(0) < 0.01  # a restart from scratch would be in warmup
    final = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 12


def test_last_checkpoint_holds_the_final_step(tiny_demo, tiny_cfg, tmp_path):
    """The steps after the last validation are checkpointed too: 6 steps, validation every 4."""
    run = tmp_path / "run"
    train(tiny_cfg(tiny_demo, run, "schedule.max_iter=6", "schedule.val_interval=4", "schedule.warmup_iters=2"))
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    assert json.loads((run / "metrics.json").read_text())["step"] == 6


def test_missing_annotation_file_fails_at_start_naming_it(tiny_demo, tiny_cfg, tmp_path):
    missing = tmp_path / "nope" / "instances_train.json"
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        train(tiny_cfg(tiny_demo, tmp_path / "run", f"data.train.ann_file={missing}"))


def test_unknown_category_fails_naming_the_annotation(tiny_demo, tiny_cfg, tmp_path):
    ann = json.loads((tiny_demo / "annotations" / "instances_train.json").read_text())
    bad = ann["annotations"][3]
    bad["category_id"] = 77
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=rf"annotation id {bad['id']}\b.*77|77.*annotation id {bad['id']}\b"):
        train(tiny_cfg(tiny_demo, tmp_path / "run", f"data.train.ann_file={path}"))


def test_demo_recipe_trains_on_ones_own_data_paths(tiny_demo, compose_cfg, tiny_overrides, tmp_path):
    """``experiment=demo`` with data.train.*/data.val.* pointing at one's own files: the demo is not generated
    (it used to be, then refused as not where the config expects) and the run trains on those files."""
    own = [
        f"data.train.ann_file={tiny_demo / 'annotations' / 'instances_train.json'}",
        f"data.train.img_dir={tiny_demo / 'train'}",
        f"data.val.ann_file={tiny_demo / 'annotations' / 'instances_val.json'}",
        f"data.val.img_dir={tiny_demo / 'val'}",
    ]
    short = ["schedule.max_iter=2", "schedule.val_interval=2", "schedule.warmup_iters=1", "schedule.milestones=[1]"]
    root = tmp_path / "demo_root"
    cfg = compose_cfg("train", [*tiny_overrides, f"data.root={root}", *own, *short], tmp_path / "run")
    assert cfg.data.generate_demo
    train(cfg)
    assert not root.exists()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
