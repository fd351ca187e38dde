import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from fcos_lightning.data import DEMO_CATEGORIES, make_demo_dataset
from fcos_lightning.lightning.datamodule import COCODataModule


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory) -> dict:
    return make_demo_dataset(tmp_path_factory.mktemp("demo_dm"), num_train=16, num_val=6, image_size=(192, 240))


def _dm(paths: dict, **kw) -> COCODataModule:
    args = {
        "train_min_sizes": (160, 192),
        "train_max_size": 320,
        "test_min_size": 192,
        "test_max_size": 320,
        "batch_size": 2,
        "num_workers": 0,
    }
    return COCODataModule(**paths, **{**args, **kw})


def _check_batch(batch: dict, batch_size: int) -> None:
    assert set(batch) == {"images", "image_sizes", "orig_sizes", "image_ids", "targets"}
    images = batch["images"]
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[:2] == (batch_size, 3)
    assert images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    for key in ("image_sizes", "orig_sizes"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (batch_size, 2)
    assert (batch["image_sizes"] <= torch.tensor(images.shape[2:])).all()
    assert batch["image_ids"].dtype == torch.int64 and batch["image_ids"].shape == (batch_size,)
    assert len(batch["targets"]) == batch_size
    for t, (h, w) in zip(batch["targets"], batch["image_sizes"].tolist()):
        assert t["boxes"].dtype == torch.float32 and t["boxes"].ndim == 2 and t["boxes"].shape[1] == 4
        assert t["labels"].dtype == torch.int64 and t["labels"].shape == (t["boxes"].shape[0],)
        assert ((t["labels"] >= 0) & (t["labels"] < 3)).all()
        if len(t["boxes"]):
            assert (t["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (t["boxes"] >= 0).all()


def test_classes_known_before_setup(demo_paths):
    dm = _dm(demo_paths)
    assert dm.num_classes == 3
    assert dm.class_names == ["square", "disc", "ring"]
    assert dm.category_map == DEMO_CATEGORIES
    assert dm.train_dataset is None and dm.val_dataset is None


def test_one_train_and_one_val_batch(demo_paths):
    dm = _dm(demo_paths)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == len(train.batch_sampler) > 0
    batch = next(iter(train))
    _check_batch(batch, 2)
    assert int(batch["image_sizes"].min()) in (160, 192)  # short side drawn from train_min_sizes

    val = dm.val_dataloader()
    assert len(val) == 6  # every val image (empty ones too), batch 1
    batch = next(iter(val))
    _check_batch(batch, 1)
    assert int(batch["image_sizes"].min()) == 192
    assert dm.val_dataset.coco.getAnnIds(iscrowd=True)  # the crowd annotation is there for COCOeval


def test_plain_shuffle_and_worker_processes(demo_paths):
    dm = _dm(demo_paths, aspect_ratio_grouping=False, num_workers=1, val_batch_size=3)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert train.persistent_workers and not train.pin_memory  # no CUDA here
    _check_batch(next(iter(train)), 2)
    _check_batch(next(iter(dm.val_dataloader())), 3)


def test_missing_files_and_mismatched_categories(demo_paths, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        COCODataModule(str(tmp_path / "missing.json"), "x", "y", "z")
    data = json.loads(Path(demo_paths["val_ann_file"]).read_text())
    data["categories"][0]["name"] = "box"
    other = tmp_path / "val_other.json"
    other.write_text(json.dumps(data))
    dm = _dm({**demo_paths, "val_ann_file": str(other)})
    with pytest.raises(ValueError, match=r"instances_train\.json.*val_other\.json"):
        dm.setup("validate")


def test_lightning_fit_uses_our_sampler_and_reshuffles_each_epoch(demo_paths):
    """With use_distributed_sampler=False Lightning keeps our batch sampler and calls set_epoch on it."""
    seen: list[tuple[int, list[int]]] = []

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            seen.append((self.current_epoch, batch["image_ids"].tolist()))
            return self.w * batch["images"].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(demo_paths)
    trainer = pl.Trainer(
        max_epochs=2,
        use_distributed_sampler=False,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Probe(), train_dataloaders=dm.train_dataloader())
    n_train = len(dm.train_dataset)
    assert trainer.num_training_batches == n_train // 2
    epochs = [[ids for e, ids in seen if e == epoch] for epoch in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) == n_train // 2
    assert epochs[0] != epochs[1]
    assert {i for b in epochs[0] for i in b} <= set(dm.train_dataset.image_ids)
