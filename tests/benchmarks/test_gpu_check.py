"""``make gpu-check`` stays working without a GPU: its CPU smoke run (tiny sizes) runs every step, the ``gpu``
tests are skipped rather than failed, and a failing step is reported, not hidden."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import Check

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = out / "summary.json"
    assert summary.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(summary.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU-only path")
def test_smoke_run_runs_every_step(smoke):
    proc, summary = smoke
    assert proc.returncode == 0 and summary["ok"], proc.stdout[-4000:]
    steps = summary["steps"]
    assert {"env", "tests", "demo_train", "evaluate_cpu", "ddp_rank0", "ddp_rank1", "ddp", "bench"} <= set(steps)
    counts = steps["tests"]["counts"]
    assert counts["skipped"] >= 10 and counts["passed"] == counts["failed"] == 0, counts
    assert steps["evaluate_cpu"]["AP"] is not None
    rows = [r["what"] for r in steps["bench"]["table"]]
    assert any(r.startswith("inference DLA34-RT") for r in rows), rows
    assert all(c["met"] is not False for c in summary["criteria"])
    assert "all passed" in proc.stdout


def test_cuda_mode_without_cuda_says_how_to_smoke_test():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cpu" in proc.stderr


def test_a_failing_step_is_reported_with_its_log(tmp_path):
    check = Check(tmp_path, "cpu", deadline=float("inf"))
    result = check.run("broken", [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], 60)
    assert not result["ok"] and result["returncode"] == 3
    assert "about to fail" in result["log_tail"] and (tmp_path / "broken.log").is_file()
    slow = check.run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert not slow["ok"] and "killed" in str(slow["returncode"])
