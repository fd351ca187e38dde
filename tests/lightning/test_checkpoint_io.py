"""Checkpoints: atomic writes survive a kill mid-save, unpickling code is refused, non-finite models are never
saved, and a run killed with SIGKILL (or stopped by SIGTERM) resumes to the same result."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from fcos_lightning.app.train import train
from fcos_lightning.checkpoint import load_checkpoint
from fcos_lightning.files import UnsafeCheckpointError, safe_load
from fcos_lightning.lightning.callbacks import SaveLast
from fcos_lightning.lightning.checkpoint_io import AtomicCheckpointIO, NonFiniteModelError, remove_stale_temp_files

REPO = Path(__file__).resolve().parents[2]


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for arbitrary code in a malicious file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "category_map": {}, "fcos_config": _RunsCode(marker)}, evil)
    for load in (safe_load, load_checkpoint, lambda p: AtomicCheckpointIO().load_checkpoint(p)):
        with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.ckpt.*arbitrary code"):
            load(evil)
    assert not marker.exists()


def test_training_refuses_to_resume_from_an_unsafe_checkpoint(tmp_path, tiny_demo, tiny_cfg):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        train(tiny_cfg(tiny_demo, tmp_path / "run", "schedule.max_iter=2", f"ckpt_path={evil}"))
    assert not marker.exists()


def test_non_finite_model_is_not_saved(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(NonFiniteModelError, match=r"'model\.w'.*step 2"):
        io.save_checkpoint({"state_dict": {"model.w": torch.tensor([1.0, float("inf")])}, "global_step": 2}, path)
    assert safe_load(path)["global_step"] == 1


def test_truncated_checkpoint_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ValueError, match=r"last\.ckpt: not a readable torch checkpoint"):
        safe_load(path)


def _killed_while_saving(path: str) -> None:
    """Child process: start overwriting ``path`` and die by SIGKILL halfway through the write."""

    def half_then_die(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = half_then_die
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)


def test_kill_during_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    child = multiprocessing.get_context("fork").Process(target=_killed_while_saving, args=(str(path),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    ckpt = safe_load(path)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))


# 16 images, batch 4, aspect-ratio grouping: 3 steps per epoch; validation (and last.ckpt) at each epoch end
RESUME = ["schedule.max_iter=9", "schedule.val_interval=3", "schedule.warmup_iters=2", "schedule.milestones=[7]"]


def _train_subprocess(tiny_overrides: list[str], root: Path, run: Path, *extra: str) -> subprocess.Popen:
    args = [*tiny_overrides, f"data.root={root}", "data.generate_demo=false", *RESUME, f"hydra.run.dir={run}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def _final(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_demo, tiny_cfg, tiny_overrides, tmp_path):
    reference = tmp_path / "reference"
    train(tiny_cfg(tiny_demo, reference, *RESUME))

    run = tmp_path / "killed"
    proc = _train_subprocess(
        tiny_overrides, tiny_demo, run, "+callbacks.sleep={_target_:tests.lightning.conftest.SleepPerBatch,seconds:0.5}"
    )
    _wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(str(run / "checkpoints" / "last.ckpt"))["global_step"] == 3

    train(tiny_cfg(tiny_demo, run, *RESUME, "ckpt_path=last"))
    ref, res = _final(reference), _final(run)
    assert res["global_step"] == ref["global_step"] == 9
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, res["state_dict"][key]), key
    ref_opt, res_opt = ref["optimizer_states"][0], res["optimizer_states"][0]
    assert ref_opt["param_groups"][0]["lr"] == res_opt["param_groups"][0]["lr"]
    for k, state in ref_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], res_opt["state"][k]["momentum_buffer"])


@pytest.mark.slow  # a second training subprocess: ~45 s on 2 busy cores
def test_sigterm_saves_last_checkpoint_and_auto_resumes(tiny_demo, tiny_cfg, tiny_overrides, tmp_path):
    run = tmp_path / "preempted"
    proc = _train_subprocess(
        tiny_overrides, tiny_demo, run, "+callbacks.sleep={_target_:tests.lightning.conftest.SleepPerBatch,seconds:0.5}"
    )
    _wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert "SIGTERM: saved" in out, out[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM  # a scheduler must not take it for a finished run
    step = load_checkpoint(str(run / "checkpoints" / "last.ckpt"))["global_step"]
    assert 3 <= step < 9
    train(tiny_cfg(tiny_demo, run, *RESUME, "ckpt_path=auto"))
    assert _final(run)["global_step"] == 9


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b'{"state_dict": {}}', "it is JSON"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "it is a JPEG image"),
        (b"", "it is empty"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_called_so(tmp_path, content, kind):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    for load in (safe_load, load_checkpoint):
        with pytest.raises(ValueError, match=rf"model\.ckpt: not a checkpoint: {kind}, not a torch\.save file"):
            load(path)


def _save_over_a_file_size_limit(path: str, checkpoint: dict, queue) -> None:
    """Child process: save ``checkpoint`` under a 64 KB file-size limit; report what was raised."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
        queue.put("saved")
    except Exception as e:  # noqa: BLE001 (the test checks the type and message)
        queue.put(f"{type(e).__name__}: {e}")


def test_a_save_over_the_file_size_limit_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    # 1 MB in tensors small enough that no op forks torch's thread pool (a forked child would deadlock in it)
    big = {"state_dict": {f"w{i}": torch.zeros(4096) for i in range(64)}, "global_step": 2}
    child = ctx.Process(target=_save_over_a_file_size_limit, args=(str(path), big, queue))
    child.start()
    child.join(60)
    message = queue.get(timeout=5)
    assert message.startswith("CheckpointWriteError: could not write checkpoint ") and "last.ckpt" in message
    assert "(disk full or over a file-size limit?); the previous checkpoint is kept" in message
    assert safe_load(path)["global_step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_sigterm_saves_last_and_makes_the_exit_code_non_zero(tmp_path):
    saved = []
    trainer = SimpleNamespace(
        checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)), global_step=7, save_checkpoint=saved.append
    )
    exception = SIGTERMException()
    SaveLast().on_exception(trainer, None, exception)
    assert saved == [str(tmp_path / "last.ckpt")] and exception.code == 143
    with pytest.raises(SystemExit) as raised:
        raise exception
    assert raised.value.code == 143


def test_stale_temp_files_of_killed_saves_are_removed_at_the_next_start(tmp_path, tiny_cfg):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = checkpoints / f"last.ckpt.tmp{int(dead.stdout)}"  # a process that no longer runs
    live = checkpoints / f"last.ckpt.tmp{os.getpid()}"  # a running process: may be saving right now
    stale.write_bytes(b"")
    live.write_bytes(b"")
    assert remove_stale_temp_files(checkpoints) == [str(stale)]
    assert live.exists()
    stale.write_bytes(b"")
    with pytest.raises(FileNotFoundError):  # train.py cleans up before it reads the data
        train(tiny_cfg(tmp_path / "no_data", tmp_path / "run"))
    assert not stale.exists() and live.exists()
