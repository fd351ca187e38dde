"""Configuration mistakes fail at start with the key named: typos inside instantiated nodes, wrong types, bad
choices, an unusable output dir, presets that do not exist."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from fcos_lightning.app.config import ConfigError
from fcos_lightning.app.evaluate import evaluate
from fcos_lightning.app.train import resolve_ckpt_path, train
from fcos_lightning.app.validate_data import validate_data


@pytest.fixture
def demo_cfg(compose_cfg, tmp_path):
    """``demo_cfg(*overrides)``: the demo experiment's train config, run dir ``tmp_path / "run"``."""
    return lambda *overrides: compose_cfg("train", ["experiment=demo", *overrides], tmp_path / "run")


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("+data.datamodule.batchsize=3", r"data\.datamodule\.batchsize: .*COCODataModule has no parameter.*batch_size"),
        ("+module.postprocessor.score_threshold=0.1", r"module\.postprocessor\.score_threshold: .*no parameter"),
        ("+callbacks.checkpoint.monitr=x", r"callbacks\.checkpoint\.monitr: .*ModelCheckpoint"),
        ("data.datamodule.hflip_prob=yes", r"data\.datamodule\.hflip_prob: expected float.*'yes'"),
        ("data.batch_size=abc", r"data\.datamodule\.batch_size: expected int.*'abc'"),
        ("module.focal_gamma=[2]", r"module\.focal_gamma: expected float"),
        ("data.on_bad_image=sometimes", r"data\.datamodule\.on_bad_image: expected .*'error', 'skip'.*'sometimes'"),
        ("module.on_nonfinite_loss=ignore", r"module\.on_nonfinite_loss: expected .*'stop', 'skip'"),
        ("module.box_quality=centerness", r"module\.box_quality: expected .*'ctrness', 'iou'.*'centerness'"),
        ("schedule.base_lr=abc", r"schedule\.base_lr: expected a number, got 'abc'"),
        ("schedule.max_iter=ten", r"schedule\.max_iter: expected a positive number, got 'ten'"),
        ("schedule.milestones=[100,x]", r"schedule\.milestones\[1\]: expected a number, got 'x'"),
        ("+trainer.max_steps=3", r"trainer\.max_steps=3 would be ignored: train\.py sets it from schedule\.max_iter"),
        ("trainer.devices=abc", r"trainer\.devices: expected a count, a list of device ids or 'auto', got 'abc'"),
    ],
)
def test_bad_keys_and_values_fail_at_start_naming_the_key(demo_cfg, tmp_path, override, pattern):
    cfg = demo_cfg(override, f"data.root={tmp_path / 'no_data'}", "data.generate_demo=false")
    with pytest.raises(ConfigError, match=pattern):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_top_level_key_is_rejected_by_hydra(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="foo"):
        compose_cfg("train", ["experiment=demo", "foo=1"])


@pytest.mark.parametrize(("group", "valid"), [("experiment", "MS_R_50_2x"), ("model", "r50"), ("data", "coco")])
def test_missing_preset_lists_the_valid_ones(compose_cfg, group, valid):
    with pytest.raises(MissingConfigException, match=rf"(?s)Could not find '{group}/nope'.*Available options.*{valid}"):
        compose_cfg("train", [f"{group}=nope"])


def test_output_dir_missing_or_not_writable(demo_cfg, compose_cfg, tmp_path):
    cfg = demo_cfg()
    cfg.output_dir = ""
    with pytest.raises(ConfigError, match="output_dir is not set"):
        train(cfg)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg.output_dir = str(blocker / "run")
    with pytest.raises(ConfigError, match=r"output_dir=.*a_file/run: cannot create or write"):
        train(cfg)
    vcfg = compose_cfg("validate_data", ["experiment=demo"], blocker / "v")
    with pytest.raises(ConfigError, match="output_dir="):
        validate_data(vcfg)
    ecfg = compose_cfg("evaluate", ["ckpt_path=x.ckpt"], blocker / "e")
    with pytest.raises(ConfigError, match="output_dir="):
        evaluate(ecfg)


def test_ckpt_path_auto_and_last(tmp_path):
    assert resolve_ckpt_path("auto", str(tmp_path)) is None  # fresh start
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        resolve_ckpt_path("last", str(tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(last)
    assert resolve_ckpt_path("last", str(tmp_path)) == str(last)
