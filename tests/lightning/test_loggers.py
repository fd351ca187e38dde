"""Logger presets: each composes, runs with no account or network, and receives pictures through its image API."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image
from pytorch_lightning.loggers import Logger

from fcos_lightning.lightning import loggers
from fcos_lightning.lightning.loggers import csv_image_path, log_image, log_images

IMAGE = np.random.default_rng(0).integers(0, 256, size=(3, 24, 40), dtype=np.uint8)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and no account: wandb offline and quiet, MLflow only where the preset points."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB")).transpose(2, 0, 1)


def _tensorboard_image(run_dir) -> np.ndarray:
    import io

    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    (event,) = events.Images("val/precision_recall")
    assert event.step == 7
    return _pixels(io.BytesIO(event.encoded_image_string))


def _wandb_image(run_dir) -> np.ndarray:
    # wandb numbers media by its own step; Lightning logs the trainer step as the "trainer/global_step" value
    (path,) = run_dir.glob("wandb/offline-run-*/files/media/images/val/precision_recall_*.png")
    return _pixels(path)


def _mlflow_image(run_dir) -> np.ndarray:
    (path,) = [p for p in run_dir.glob("mlartifacts/*/artifacts/images/*.png") if "compressed" not in p.name]
    assert path.name.startswith("val~precision_recall+step+7+")
    return _pixels(path)


def _csv_image(run_dir) -> np.ndarray:
    return _pixels(run_dir / "csv" / "images" / "val_precision_recall-step0000007.png")


READ_BACK = {"tensorboard": _tensorboard_image, "csv": _csv_image, "wandb": _wandb_image, "mlflow": _mlflow_image}


def _finish(logger: Logger) -> None:
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        logger.experiment.finish()


@pytest.mark.parametrize("preset", list(READ_BACK))
def test_preset_logs_metrics_and_pictures_offline(preset, compose_cfg, tmp_path):
    cfg = compose_cfg("train", [f"logger={preset}"], tmp_path)
    logger = instantiate(cfg.logger)
    logger.log_hyperparams({"module/focal_alpha": 0.25})
    logger.log_metrics({"val/AP": 12.5}, step=7)
    assert log_image(logger, "val/precision_recall", IMAGE, step=7)
    _finish(logger)
    np.testing.assert_array_equal(READ_BACK[preset](tmp_path), IMAGE)  # lossless, pixel for pixel
    if preset == "mlflow":  # the run's database lives in the run dir too
        assert (tmp_path / "mlflow.db").is_file()
        assert logger.experiment.get_run(logger.run_id).data.metrics == {"val/AP": 12.5}


def test_many_loggers_is_a_list_of_presets(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["logger=many_loggers"], tmp_path)
    assert sorted(cfg.logger) == ["csv", "tensorboard"]
    several = [instantiate(c) for c in cfg.logger.values()]
    assert log_images(several, {"val/precision_recall": IMAGE, "val/f1": IMAGE}, step=7) == 4
    for logger in several:
        _finish(logger)
    np.testing.assert_array_equal(_csv_image(tmp_path), IMAGE)
    np.testing.assert_array_equal(_tensorboard_image(tmp_path), IMAGE)
    cfg = compose_cfg("train", ["logger=many_loggers", "+logger@logger.wandb=wandb", "~logger.csv"], tmp_path)
    assert sorted(cfg.logger) == ["tensorboard", "wandb"] and cfg.logger.wandb.offline is True


class _NoImages(Logger):
    name = "no_images"
    version = 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_logger_without_an_image_api_is_named_once(caplog, monkeypatch):
    monkeypatch.setattr(loggers, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="fcos_lightning.lightning.loggers"):
        assert not log_image(_NoImages(), "val/f1", IMAGE, step=1)
        assert not log_image(_NoImages(), "val/f1", IMAGE, step=2)
    assert [r.getMessage() for r in caplog.records] == [
        "_NoImages has no image API known to fcos_lightning: pictures are not sent to it"
    ]


def test_only_rank_zero_writes_and_bad_images_are_refused(compose_cfg, tmp_path, monkeypatch):
    logger = instantiate(compose_cfg("train", ["logger=csv"], tmp_path).logger)
    with pytest.raises(ValueError, match=r"expected a \[3, H, W\].*uint8 image, got float32 \[24, 40, 3\]"):
        log_image(logger, "val/f1", IMAGE.transpose(1, 2, 0).astype(np.float32), step=1)
    monkeypatch.setattr(loggers.rank_zero_only, "rank", 1)
    assert not log_image(logger, "val/f1", IMAGE, step=1)
    assert not csv_image_path(logger, "val/f1", 1).exists()
