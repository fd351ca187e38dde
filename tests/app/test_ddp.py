"""The applications under 2-process DDP on CPU (gloo), launched as users launch them: ``python train.py``
and ``python evaluate.py`` with ``trainer.devices=2 trainer.strategy=ddp``, and a Hydra multirun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
# iterations at the reference batch 4: the global batch 8 halves them to 4 steps
SHORT = ["schedule.max_iter=8", "schedule.val_interval=8", "schedule.warmup_iters=4", "schedule.milestones=[6]"]


def run_script(
    script: str, args: list[str], cwd: Path, timeout: float = 240, launcher: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *launcher, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"{script} {' '.join(a for a in args if 'trainer' in a or a == '-m')}: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tiny_overrides, tiny_demo, tmp_path_factory) -> Path:
    """``python train.py`` with 2 DDP processes and Hydra's default run dir, from an empty working dir."""
    cwd = tmp_path_factory.mktemp("ddp_train")
    # 24 steps of 2 x 4 images: enough for a non-zero AP to compare between 1 and 2 evaluation processes
    schedule = [
        "schedule.max_iter=48",
        "schedule.val_interval=48",
        "schedule.warmup_iters=8",
        "schedule.milestones=[40]",
    ]
    probe_dir = cwd.parent / (cwd.name + "_probe")
    probe = f"+callbacks.probe={{_target_:tests.app.conftest.RankMetricsProbe,dir:'{probe_dir}'}}"
    run_script(
        "train.py",
        [*tiny_overrides, f"data.root={tiny_demo}", "data.generate_demo=false", *DDP, *schedule, probe],
        cwd,
        timeout=480,  # 24 steps on 2 processes: past 240 s when other jobs share the 2 cores
    )
    return cwd


def test_ddp_training_writes_one_run_dir(ddp_run):
    runs = list((ddp_run / "outputs" / "train").iterdir())
    assert [p.name for p in ddp_run.iterdir()] == ["outputs"] and len(runs) == 1, runs
    run = runs[0]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[1] == "last.ckpt" and ckpts[0].startswith("best-step0000024"), ckpts
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert not [p for p in run.rglob("*") if p.is_dir() and p.name.startswith("version_")]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 24 and metrics["num_images"] == 5
    # every rank holds the same validation metrics (ModelCheckpoint(monitor=val/AP) needs them on all ranks)
    ranks = [json.loads((ddp_run.parent / (ddp_run.name + "_probe") / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["val/AP"] == ranks[1]["val/AP"] == pytest.approx(metrics["AP"])
    assert ranks[0] == ranks[1]
    # the learning rate was scaled for the global batch of 2 processes x 4 images
    log = (run / "train.log").read_text()
    assert "global batch 8 | lr 0.04 " in log, log


@pytest.fixture(scope="module")
def varied_sizes(tiny_demo, tmp_path_factory) -> Path:
    """11 of the tiny demo's training images cropped to different sizes (landscape and portrait), boxes
    clipped: an odd number of images of many padded sizes, for evaluations that must not depend on batching."""
    root = tmp_path_factory.mktemp("varied")
    data = json.loads((tiny_demo / "annotations" / "instances_train.json").read_text())
    images, annotations = [], []
    for k, im in enumerate(data["images"][:11]):
        w, h = im["width"] - 13 * (k % 4), im["height"] - 37 * (k % 3)
        Image.open(tiny_demo / "train" / im["file_name"]).convert("RGB").crop((0, 0, w, h)).save(
            root / f"{im['id']}.png"
        )
        images.append({**im, "file_name": f"{im['id']}.png", "width": w, "height": h})
        for ann in data["annotations"]:
            x, y, bw, bh = ann["bbox"]
            bw, bh = min(x + bw, w) - x, min(y + bh, h) - y
            if ann["image_id"] == im["id"] and min(bw, bh) >= 4:
                annotations.append({**ann, "bbox": [x, y, bw, bh], "area": bw * bh})
    (root / "val.json").write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return root


def test_evaluation_does_not_depend_on_batch_or_processes(ddp_run, varied_sizes, tmp_path):
    """Batch 1, batch 8 and 2 processes at batch 8 find identical detections and AP on images of different
    sizes; the image the 2-process sampler repeats to even the shards is scored once."""
    (run,) = (ddp_run / "outputs" / "train").iterdir()
    common = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.precision=32-true", "num_pictures=0"]
    common += [f"data.val.ann_file={varied_sizes / 'val.json'}", f"data.val.img_dir={varied_sizes}"]
    common += ["trainer.enable_progress_bar=false"]
    one = ["trainer.accelerator=cpu", "trainer.devices=1"]
    out = {}
    for name, extra in (("b1", [*one, "data.val_batch_size=1"]), ("b8", [*one, "data.val_batch_size=8"])):
        out[name] = tmp_path / name
        run_script("evaluate.py", [*common, *extra, f"hydra.run.dir={out[name]}"], tmp_path)
    out["ddp"] = tmp_path / "ddp"
    run_script("evaluate.py", [*common, *DDP, "data.val_batch_size=8", f"hydra.run.dir={out['ddp']}"], tmp_path)
    metrics = {n: json.loads((d / "metrics.json").read_text()) for n, d in out.items()}
    detections = {n: json.loads((d / "detections.json").read_text()) for n, d in out.items()}
    print({n: round(m["AP"], 6) for n, m in metrics.items()}, {n: len(d) for n, d in detections.items()})
    assert metrics["b1"]["AP"] > 0 and len(detections["b1"]) > 50, "nothing to compare"
    for name in ("b8", "ddp"):
        assert metrics[name]["num_images"] == 11  # the repeated image is not counted twice
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert metrics[name][key] == pytest.approx(metrics["b1"][key], abs=1e-4), (name, key)
        assert len(detections[name]) == len(detections["b1"])  # nor are its detections doubled
        ref = sorted(detections["b1"], key=lambda d: (d["image_id"], -d["score"], d["category_id"], *d["bbox"]))
        got = sorted(detections[name], key=lambda d: (d["image_id"], -d["score"], d["category_id"], *d["bbox"]))
        for a, b in zip(ref, got, strict=True):
            assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"]), name
            assert b["score"] == pytest.approx(a["score"], abs=1e-4)
            assert b["bbox"] == pytest.approx(a["bbox"], abs=1e-2)
    # the analysis behind the pictures (rank 0, on the gathered detections) does not depend on the split either
    for name in ("b8", "ddp"):
        a, b = metrics["b1"]["analysis"], metrics[name]["analysis"]
        assert b["confusion_matrix"] == a["confusion_matrix"] and a["confusion_matrix"]["matrix"], name
        assert b["error_breakdown"]["counts"] == a["error_breakdown"]["counts"], name
        assert b["f1"]["best_threshold"] == pytest.approx(a["f1"]["best_threshold"], abs=1e-4), name


def test_multirun_over_head_norms_with_ddp(tiny_overrides, tiny_demo, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny_overrides, f"data.root={tiny_demo}", "data.generate_demo=false", *DDP, *SHORT]
    proc = run_script("train.py", [*args, "model/head=gn,bn", f"hydra.sweep.dir={sweep}"], tmp_path, timeout=400)
    # rank 1 of each job runs that job, not the whole sweep again (Lightning re-runs sys.argv, "-m" included)
    assert (proc.stdout + proc.stderr).count("Launching 2 jobs") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no stray run dirs
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, norm in zip(jobs, ("GN", "BN"), strict=True):
        config = (job / "config.yaml").read_text()
        assert f"norm: {norm}" in config
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["step"] == 4 and "AP" in metrics
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert len(list((job / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_torchrun_launch_writes_one_run_dir(tiny_overrides, tiny_demo, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = ("-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", f"--master_port={port}")
    run = tmp_path / "run"
    args = [*tiny_overrides, f"data.root={tiny_demo}", "data.generate_demo=false", *DDP, *SHORT, f"hydra.run.dir={run}"]
    run_script("train.py", args, tmp_path, launcher=torchrun)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[1:] == ["last.ckpt"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert json.loads((run / "metrics.json").read_text())["step"] == 4
    assert "global batch 8 | lr 0.04 " in (run / "train.log").read_text()


@pytest.mark.slow
def test_slurm_environment_launch_writes_one_run_dir(tiny_overrides, tiny_demo, tmp_path):
    """Two processes with the environment ``srun --ntasks=2`` gives them (no SLURM needed): Lightning takes
    ranks and the master address from SLURM and starts no processes itself."""
    run = tmp_path / "run"
    args = [*tiny_overrides, f"data.root={tiny_demo}", "data.generate_demo=false", *DDP, *SHORT, f"hydra.run.dir={run}"]
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0"}
    slurm |= {"SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_ID": str(os.getpid()), "SLURM_JOB_NAME": "fcos"}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **slurm}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args],
            cwd=tmp_path,
            env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[1:] == ["last.ckpt"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert "global batch 8 | lr 0.04 " in (run / "train.log").read_text()
