"""Debug presets: debug=fast runs one batch through everything, debug=profile writes a trace, debug=overfit
drives the training loss down on a few batches."""

from __future__ import annotations

import csv
import json

import pytest

from fcos_lightning.app.train import train


def test_fast_runs_one_batch_and_writes_no_checkpoint(tiny_demo, tiny_cfg, tmp_path):
    ap = train(tiny_cfg(tiny_demo, tmp_path, "debug=fast"))
    assert ap == ap  # a number: validation ran through the decoder and the evaluator
    assert not (tmp_path / "checkpoints").exists()


def test_profile_writes_a_chrome_trace_of_the_training_steps(tiny_demo, tiny_cfg, tmp_path):
    train(tiny_cfg(tiny_demo, tmp_path, "debug=profile"))
    traces = sorted((tmp_path / "profile").glob("*.pt.trace.json"))
    assert traces, sorted(p.name for p in (tmp_path / "profile").iterdir())
    names = {event.get("name", "") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert any("conv" in n for n in names), sorted(names)[:20]


@pytest.mark.slow  # 60 tiny steps
def test_overfit_drives_the_loss_down(tiny_demo, tiny_cfg, tmp_path):
    train(
        tiny_cfg(
            tiny_demo, tmp_path, "debug=overfit", "schedule.max_iter=60", "logger=csv", "trainer.log_every_n_steps=1"
        )
    )
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 50 and sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses
