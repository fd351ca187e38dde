"""The GPU check (``make gpu-check``): everything that must hold on a CUDA device, in one run.

Steps, each a subprocess with its own log and time limit, so one failure does not hide the others:

- ``env``: versions of Python, torch, torchvision, Lightning, timm and the device (``nvidia-smi``).
- ``tests``: the tests marked ``gpu`` (``tests/gpu/``): CUDA against CPU for the network (fp32, TF32 off), target
  assignment and post-processing; a training step of every model preset under ``16-mixed`` and ``bf16-mixed``,
  channels-last and not; the training step's host synchronizations against the documented list.
- ``demo``: the demo training on the device (``trainer.precision=16-mixed`` on CUDA) and, at the same time, the
  demo on the CPU for the reference AP (CUDA mode only); ``evaluate.py`` of the device's checkpoint on the device
  and on the CPU.
- ``ddp``: two processes through the DDP path with the gloo backend (on a GPU both share the one device), the demo
  model with SyncBN in backbone and head, launched as a cluster launcher would (``LOCAL_RANK``/``NODE_RANK``).
- ``bench``: ``python -m benchmarks.speed`` with torchvision's FCOS beside ours in the same run (inference R-50
  batch 1 and 8, DLA-34 RT batch 1, training with AMP at batch 8) and the speed targets.

``--device cpu`` is the smoke run CI keeps working: tiny models and schedules, the ``gpu`` tests skipped. Writes
``summary.json`` and one log per step into ``$GPU_CHECK_DIR`` (default ``gpu_check/``) and prints a table.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--out DIR] [--steps env tests demo ddp bench]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout that is not installed (the GPU machine)
    sys.path.insert(0, str(REPO))
STEPS = ("env", "tests", "demo", "ddp", "bench")
# Tolerances of the check (the GPU issue): AP of the device demo against the CPU demo, and of one checkpoint
# evaluated on the device against the CPU.
DEMO_AP_TOLERANCE = 3.0
EVAL_AP_TOLERANCE = 0.3
# The smoke run's demo: a tiny network and schedule (the plumbing, not the accuracy).
TINY = [
    "data.batch_size=4",
    "schedule.reference_batch_size=4",
    "schedule.max_iter=6",
    "schedule.val_interval=6",
    "schedule.warmup_iters=2",
    "schedule.milestones=[4]",
    "data.datamodule.train_min_sizes=[160]",
    "data.datamodule.test_min_size=160",
    "data.datamodule.val_batch_size=4",
    "model.fpn_channels=32",
    "model.head.num_cls_convs=1",
    "model.head.num_box_convs=1",
    "model.backbone.model_kwargs={channels:[8,16,32,64],stem_width:8}",
    "module.num_vis_images=1",
]


class Check:
    """Runs the steps' commands, keeps their logs, and collects results and pass/fail criteria."""

    def __init__(self, out: Path, device: str, deadline: float) -> None:
        self.out, self.device, self.deadline = out, device, deadline
        self.steps: dict[str, dict] = {}
        self.criteria: list[dict] = []
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.env.update(HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
        if device == "cuda":  # 4 threads a process: the CPU demo trains on the other cores meanwhile
            self.env["OMP_NUM_THREADS"] = "4"

    @property
    def smoke(self) -> bool:
        return self.device == "cpu"

    def start(self, name: str, args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path, float]:
        log = self.out / f"{name}.log"
        handle = log.open("w")
        handle.write("$ " + " ".join(args) + "\n")
        handle.flush()
        proc = subprocess.Popen(
            args, cwd=REPO, env={**self.env, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT
        )
        return proc, log, time.perf_counter()

    def wait(self, name: str, started: tuple[subprocess.Popen, Path, float], timeout: float) -> dict:
        proc, log, t0 = started
        limit = max(5.0, min(timeout, self.deadline - time.monotonic()))
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = f"killed after {limit:.0f} s"
        result = {"ok": rc == 0, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "log": log.name}
        if rc != 0:
            result["log_tail"] = log.read_text(errors="replace")[-2500:]
        self.steps[name] = result
        print(f"[{name}] {'ok' if rc == 0 else 'FAILED'} ({result['seconds']} s, {log.name})", flush=True)
        return result

    def run(self, name: str, args: list[str], timeout: float, env: dict | None = None) -> dict:
        return self.wait(name, self.start(name, args, env), timeout)

    def criterion(self, what: str, value, target: str, met: bool | None, kind: str = "function") -> None:
        """``met`` None: not judged (the smoke run's tiny models have no meaningful AP). ``kind`` ``speed``: a
        speed target, reported with its distance; only ``function`` criteria decide whether the check passed."""
        self.criteria.append({"what": what, "value": value, "target": target, "met": met, "kind": kind})

    def judged(self, condition: bool) -> bool | None:
        return None if self.smoke else bool(condition)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_env(check: Check) -> None:
    """Versions and the device, read in this process (the steps' subprocesses run the same Python)."""
    import hydra
    import pytorch_lightning
    import timm
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "timm": timm.__version__,
        "hydra": hydra.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "capability": torch.cuda.get_device_capability() if cuda else None,
        "cpu_count": os.cpu_count(),
    }
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        (check.out / "nvidia-smi.log").write_text(smi.stdout + smi.stderr)
    check.steps["env"] = {"ok": True, "info": info}
    print(f"[env] {json.dumps(info)}", flush=True)
    if check.device == "cuda":
        check.criterion("CUDA device", info["device"], "a CUDA device", cuda)


def step_tests(check: Check, timeout: float) -> None:
    junit = check.out / "tests.xml"
    args = python(
        "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}"
    )
    result = check.run("tests", args, timeout)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            key = {"failure": "failed", "error": "failed"}.get(outcome, outcome)
            counts[key] += 1
            if key == "failed":
                message = next(c for c in case if c.tag in ("failure", "error")).get("message", "")
                failures.append(f"{case.get('name')}: {message[:300]}")
    result.update(counts=counts, failures=failures)
    # pytest exits 5 when every test was deselected; the smoke run expects them all skipped (no CUDA)
    if check.smoke:
        result["ok"] = result["returncode"] == 0 and counts["failed"] == 0 and counts["passed"] == 0
        check.criterion("gpu tests without CUDA", f"{counts['skipped']} skipped", "all skipped", counts["skipped"] > 0)
    else:
        total = sum(counts.values())
        check.criterion("gpu tests", f"{counts['passed']}/{total} passed", "all pass", counts["passed"] == total > 0)
    syncs = re.findall(r"host syncs per 3 training steps \(([\w-]+)\): (\{.*\})", (check.out / "tests.log").read_text())
    if syncs:
        result["host_syncs_per_3_steps"] = {precision: ast.literal_eval(sites) for precision, sites in syncs}


def demo_args(check: Check, run_dir: Path, data_root: Path, accelerator: str, precision: str) -> list[str]:
    args = [
        "train.py",
        "experiment=demo",
        f"data.root={data_root}",
        "data.generate_demo=false",
        f"hydra.run.dir={run_dir}",
        f"trainer.accelerator={accelerator}",
        f"trainer.precision={precision}",
        "trainer.enable_progress_bar=false",
    ]
    return python(*args, *(TINY if check.smoke else ["data.num_workers=4"]))


def final_ap(run_dir: Path) -> float | None:
    metrics = run_dir / "metrics.json"
    return float(json.loads(metrics.read_text())["AP"]) if metrics.is_file() else None


def make_data(check: Check) -> Path:
    """The demo dataset, generated once for every step (the smoke run's is smaller)."""
    from fcos_lightning.data.demo import make_demo_dataset

    root = check.out / "data" / "demo"
    make_demo_dataset(root, **({"num_train": 24, "num_val": 4} if check.smoke else {}))
    return root


def start_cpu_demo(check: Check) -> tuple | None:
    """The CPU demo, the device demo's reference, trains beside the other steps on all but 4 cores."""
    if check.smoke:
        return None
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 8) - 4)), "CUDA_VISIBLE_DEVICES": ""}
    return check.start("demo_cpu", demo_args(check, check.out / "demo_cpu", make_data(check), "cpu", "auto"), env)


def finish_cpu_demo(check: Check, started: tuple, timeout: float) -> None:
    result = check.wait("demo_cpu", started, timeout)
    result["AP"] = cpu_ap = final_ap(check.out / "demo_cpu")
    device_ap = check.steps.get("demo_train", {}).get("AP")
    met = None not in (device_ap, cpu_ap) and abs(device_ap - cpu_ap) <= DEMO_AP_TOLERANCE
    check.criterion("demo AP: CUDA 16-mixed vs CPU", [device_ap, cpu_ap], f"within {DEMO_AP_TOLERANCE}", bool(met))


def step_demo(check: Check, timeout: float) -> None:
    """The demo trained on the device, then its checkpoint evaluated on the device and on the CPU."""
    data_root = make_data(check)
    run_dir = check.out / "demo_device"
    accelerator, precision = ("gpu", "16-mixed") if check.device == "cuda" else ("cpu", "32-true")
    train = check.run("demo_train", demo_args(check, run_dir, data_root, accelerator, precision), timeout)
    train["AP"] = final_ap(run_dir)
    aps = {}
    for where in ["gpu", "cpu"] if check.device == "cuda" else ["cpu"]:
        out = check.out / f"eval_{where}"
        args = python(
            "evaluate.py",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={out}",
            f"trainer.accelerator={where}",
            "trainer.enable_progress_bar=false",
        )
        check.run(f"evaluate_{where}", args, timeout / 2, {"CUDA_VISIBLE_DEVICES": ""} if where == "cpu" else None)
        check.steps[f"evaluate_{where}"]["AP"] = aps[where] = final_ap(out)
    if check.device == "cuda":
        pair = [aps["gpu"], aps["cpu"]]
        met = None not in pair and abs(pair[0] - pair[1]) <= EVAL_AP_TOLERANCE
        check.criterion("evaluate.py AP, one checkpoint: CUDA vs CPU", pair, f"within {EVAL_AP_TOLERANCE}", bool(met))
    else:
        check.criterion("evaluate.py AP (smoke: tiny model)", aps["cpu"], "a number", aps["cpu"] is not None)


def step_ddp(check: Check, timeout: float) -> None:
    """Two ranks as a cluster launcher starts them (one node each, one device each: on a GPU the same one)."""
    data_root = make_data(check)
    run_dir = check.out / "ddp"
    accelerator = "gpu" if check.device == "cuda" else "cpu"
    args = [
        *demo_args(check, run_dir, data_root, accelerator, "16-mixed" if check.device == "cuda" else "32-true"),
        "model/head=syncbn",
        "model.backbone.norm=SyncBN",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "+trainer.strategy._target_=pytorch_lightning.strategies.DDPStrategy",
        "+trainer.strategy.process_group_backend=gloo",
    ]
    if not check.smoke:
        args += [
            "schedule.max_iter=64",
            "schedule.val_interval=64",
            "schedule.warmup_iters=8",
            "schedule.milestones=[48]",
        ]
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    ranks = [check.start(f"ddp_rank{r}", args, {**base, "NODE_RANK": str(r)}) for r in (0, 1)]
    results = [check.wait(f"ddp_rank{r}", started, timeout) for r, started in enumerate(ranks)]
    log = (check.out / "ddp_rank0.log").read_text(errors="replace")
    synced = re.search(r"SyncBN: (.*) converted", log)
    ok = all(r["ok"] for r in results)
    check.steps["ddp"] = {"ok": ok, "syncbn": synced.group(0) if synced else None, "AP": final_ap(run_dir)}
    if check.device == "cuda":
        check.criterion("DDP, 2 processes on one GPU (gloo), SyncBN", check.steps["ddp"]["syncbn"],
                        "both ranks finish, SyncBN converted", ok and synced is not None)  # fmt: skip
    else:
        check.criterion("DDP, 2 CPU processes (gloo)", "both ranks finished" if ok else "failed", "both finish", ok)


def step_bench(check: Check, timeout: float) -> None:
    output = check.out / "speed.json"
    if check.smoke:
        extra = ["--quick", "--sections", "inference", "--image-scale", "0.2", "--models", "DLA34-RT"]
    else:
        extra = ["--sections", "inference", "training", "--train-batch", "8", "--repeats", "10"]
    args = python("-m", "benchmarks.speed", "--device", check.device, "--output", str(output), *extra)
    result = check.run("bench", args, timeout, {"OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    if not output.is_file():
        return
    rows = json.loads(output.read_text())["rows"]
    result["table"] = [{k: r[k] for k in ("what", "unit", "ours", "torchvision", "speedup", "absolute_target")}
                       for r in rows]  # fmt: skip
    for r in rows:
        if r.get("absolute_target"):
            gap = r["ours"] / r["absolute_target"]
            value = f"{r['ours']:.4g} {r['unit']} ({gap:.2f}x the target)"
            target = f">= {r['absolute_target']:.4g} {r['unit']}"
            check.criterion(r["what"], value, target, r["ours"] >= r["absolute_target"], kind="speed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the smoke run (tiny sizes)")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_DIR", "gpu_check"), help="summary and logs")
    parser.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS)
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole check (steps are cut off)")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; use --device cpu for the smoke run", file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.device, time.monotonic() + args.budget)
    started = time.perf_counter()
    limits = {"tests": 200, "demo": 180, "ddp": 120, "bench": 200} if args.device == "cuda" else {}
    cpu_demo = None

    def cpu_demo_done(timeout: float, kill: bool = True) -> None:
        """Collect the CPU demo; with ``kill=False`` leave it running if it needs more than ``timeout``."""
        nonlocal cpu_demo
        if cpu_demo is None:
            return
        if not kill:
            try:
                cpu_demo[0].wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return  # the benchmark runs beside it (both sides of each ratio share the load)
        finish_cpu_demo(check, cpu_demo, timeout)
        cpu_demo = None

    runners = {
        "env": step_env,
        "tests": lambda: step_tests(check, limits.get("tests", 240)),
        "demo": lambda: step_demo(check, limits.get("demo", 240)),
        "ddp": lambda: step_ddp(check, limits.get("ddp", 240)),
        "bench": lambda: (
            cpu_demo_done(60, kill=False),
            step_bench(check, limits.get("bench", 240)),
            check.steps["bench"].update(beside_cpu_demo=cpu_demo is not None),
        ),
    }
    for step in args.steps:
        try:
            if step == "env":
                step_env(check)
                if "demo" in args.steps:  # the CPU reference trains while the GPU steps run
                    cpu_demo = start_cpu_demo(check)
            else:
                runners[step]()
        except Exception as e:  # a broken step is reported, the others still run
            check.steps[step] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"[{step}] FAILED: {type(e).__name__}: {e}", flush=True)
    cpu_demo_done(240)
    summary = {
        "device": args.device,
        "host": platform.node(),
        "seconds": round(time.perf_counter() - started, 1),
        "ok": all(s.get("ok") for s in check.steps.values())
        and all(c["met"] is not False for c in check.criteria if c["kind"] == "function"),
        "speed_targets_met": [c["met"] for c in check.criteria if c["kind"] == "speed"].count(True),
        "speed_targets": sum(c["kind"] == "speed" for c in check.criteria),
        "steps": check.steps,
        "criteria": check.criteria,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{'criterion':<58} {'value':<40} {'target':<34} met (speed targets do not fail the check)")
    for c in check.criteria:
        met = {True: "yes", False: "NO", None: "-"}[c["met"]]
        print(f"{c['what'][:58]:<58} {str(c['value'])[:40]:<40} {c['target'][:34]:<34} {met}")
    for name, s in check.steps.items():
        if not s.get("ok"):
            print(f"step {name} failed: {s.get('error') or s.get('log')}")
    verdict = "all passed" if summary["ok"] else "FAILED"
    speed = f"{summary['speed_targets_met']} of {summary['speed_targets']} speed targets met"
    print(f"\n{verdict} ({speed}) in {summary['seconds']} s; wrote {out / 'summary.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
