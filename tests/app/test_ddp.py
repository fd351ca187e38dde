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
        "train.py", [*tiny_overrides, f"data.root={tiny_demo}", "data.generate_demo=false", *DDP, *schedule, probe], cwd
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


def test_evaluate_on_two_processes_matches_one(ddp_run, tiny_demo, tmp_path):
    (run,) = (ddp_run / "outputs" / "train").iterdir()
    common = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.precision=32-true", "num_pictures=0"]
    # batch 1: every image sees the same padding however the split falls (eval batch size is not under test)
    common += ["data.val_batch_size=1", "trainer.enable_progress_bar=false"]
    out = {}
    for n, extra in ((1, ["trainer.accelerator=cpu", "trainer.devices=1"]), (2, DDP)):
        out[n] = tmp_path / f"eval{n}"
        run_script("evaluate.py", [*common, *extra, f"hydra.run.dir={out[n]}"], tmp_path)
    m1, m2 = (json.loads((out[n] / "metrics.json").read_text()) for n in (1, 2))
    print(f"AP 1 process {m1['AP']:.6f}, 2 processes {m2['AP']:.6f}")
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-4), key
    assert m1["num_images"] == m2["num_images"] == 5  # 5 images on 2 ranks: the sampler padded one
    # the analysis behind the pictures (rank 0, on the gathered detections) does not depend on the split either
    a1, a2 = m1["analysis"], m2["analysis"]
    assert a2["confusion_matrix"] == a1["confusion_matrix"] and a1["confusion_matrix"]["matrix"]
    assert a2["error_breakdown"]["counts"] == a1["error_breakdown"]["counts"]
    assert a2["f1"]["best_threshold"] == a1["f1"]["best_threshold"]
    d1, d2 = (json.loads((out[n] / "detections.json").read_text()) for n in (1, 2))
    assert d1 and m1["AP"] > 0, "nothing to compare"

    def key(d):
        return (d["image_id"], d["category_id"], d["score"], *d["bbox"])

    assert sorted(map(key, d2)) == sorted(map(key, d1))  # the padded image's detections are not doubled
    assert {d["image_id"] for d in d2} <= {
        im["id"] for im in json.loads((tiny_demo / "annotations" / "instances_val.json").read_text())["images"]
    }


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
