"""Shared builders, as fixtures: Hydra composition, the tests' tiny demo run, small datasets and models, a
format-0 checkpoint.

``small_coco`` is a tiny hand-made COCO dataset whose every quirk has a known expected outcome.

Categories are listed unsorted with non-contiguous ids: 3 "cat" -> label 0, 7 "dog" -> 1, 11 "bird" -> 2.

==========  =======  ==========  ===============================================================
image id    (h, w)   file        annotations (id: category, COCO xywh) -> expected target
==========  =======  ==========  ===============================================================
11          40x60    RGB PNG     1: 7 [5,6,20,10] -> [5,6,25,16]; 2: crowd; 3: 11 [50,30,20,20]
                                 -> clipped [50,30,60,40]
22          60x40    RGB JPEG    4: 3 w=0.5 -> dropped; 5: 3 [-5,50,10,10] -> [0,50,5,60];
                                 6: 11 [45,5,10,10] -> outside, dropped
33          32x32    gray PNG    7: 7 [4,4,8,8]
44          24x36    RGBA PNG    8: 11 [1,1,10,10]
55          30x30    palette     9: 7 [2,2,5,5]
66          20x20    RGB PNG     none (negative)
77          20x30    RGB PNG     10: crowd only (negative in training)
==========  =======  ==========  ===============================================================
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image
from torchvision.models.detection import fcos_resnet50_fpn

from fcos_lightning.data.demo import make_demo_dataset
from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

torch.set_num_threads(max(1, os.cpu_count() or 1))

# A tiny, fast variant of the demo experiment (the point of the runs that use it is the plumbing, not accuracy).
TINY = [
    "experiment=demo",
    "data.batch_size=4",
    "schedule.reference_batch_size=4",
    "data.num_workers=0",
    "data.datamodule.train_min_sizes=[192]",
    "data.datamodule.test_min_size=192",
    "data.datamodule.val_batch_size=2",
    "model.fpn_channels=32",
    "model.head.num_cls_convs=1",
    "model.head.num_box_convs=1",
    "model.backbone.model_kwargs={channels:[16,32,64,128],stem_width:16}",
    "module.postprocessor.score_thresh=0.001",
    "module.num_vis_images=2",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
]


def compose_config(config_name: str, overrides: list[str], output_dir: str | os.PathLike = "unused"):
    """Compose ``conf/<config_name>.yaml`` as ``@hydra.main`` hands it to the task (no ``hydra`` node), with
    ``output_dir`` standing for the Hydra run dir."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.output_dir = str(output_dir)
    return cfg


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are skipped (``make gpu-check`` runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def compose_cfg() -> Callable:
    """:func:`compose_config`: ``compose_cfg(config_name, overrides, output_dir)``."""
    return compose_config


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """The overrides of the tests' tiny demo run (:data:`TINY`)."""
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_cfg() -> Callable:
    """``tiny_cfg(data_root, output_dir, *overrides)``: the tiny demo run's train config on a generated dataset."""

    def make(root: Path, out: Path, *extra: str):
        return compose_config("train", [*TINY, f"data.root={root}", "data.generate_demo=false", *extra], out)

    return make


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The demo dataset at the tests' size (16 train and 5 val images of 192x224, seed 1), shared: read only."""
    root = tmp_path_factory.mktemp("tiny_demo")
    make_demo_dataset(root, num_train=16, num_val=5, image_size=(192, 224), seed=1)
    return root


@pytest.fixture
def tiny_demo_copy(tiny_demo, tmp_path) -> Path:
    """A private copy of :func:`tiny_demo`, for tests that damage files."""
    return Path(shutil.copytree(tiny_demo, tmp_path / "tiny_demo"))


@pytest.fixture
def single_thread():
    """Small tensor ops: one intra-op thread is as fast and immune to a busy CPU, where spinning OpenMP workers
    slowed such tests tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


V0_CONFIG = Path(__file__).with_name("checkpoint_v0_config.yaml")


@pytest.fixture(scope="session")
def v0_checkpoint(tmp_path_factory) -> tuple[Path, FCOS]:
    """A checkpoint in format 0 (before the format had a version) as train.py wrote it at step 24: Lightning's
    entries, the weights under ``model.``, ``category_map`` and the resolved config as ``fcos_config``
    (``checkpoint_v0_config.yaml``); and the network that wrote it (random weights, the classifier made to fire).
    The network is built as that config's ``model`` node built it, spelled out: resnet18 (16-128 channels, BN,
    nothing frozen), 32-channel FPN on P3-P5, one GN conv per tower."""
    fcos_config = OmegaConf.to_container(OmegaConf.load(V0_CONFIG))
    torch.manual_seed(0)
    backbone = TimmBackbone(
        "resnet18", (2, 3, 4), norm="BN", freeze_at=0, model_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16}
    )
    head = functools.partial(FCOSHead, num_cls_convs=1, num_box_convs=1, norm="GN")
    network = FCOS(backbone, head, 3, fpn_channels=32, top_levels=0, sizes_of_interest=(64, 128)).eval()
    with torch.no_grad():
        network.head.cls_logits.bias.fill_(-4.0)
        network.head.cls_logits.weight.normal_(std=0.2)
    path = tmp_path_factory.mktemp("v0") / "last.ckpt"
    torch.save(
        {
            "epoch": 5,
            "global_step": 24,
            "pytorch-lightning_version": "2.5.0",
            "state_dict": {f"model.{k}": v for k, v in network.state_dict().items()},
            "category_map": {"cat_ids": [2, 5, 9], "names": ["square", "disc", "ring"]},
            "fcos_config": fcos_config,
        },
        path,
    )
    return path, network


# ---- two images with coloured boxes (what a tiny FCOS learns in seconds) ---------------------------------


def make_two_images():
    """Two 128 x 160 images with coloured rectangles on a noisy background, and their boxes."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 128, 160, generator=g) * 60).to(torch.uint8)
    boxes = [
        torch.tensor([[10.0, 12.0, 70.0, 60.0], [90.0, 30.0, 150.0, 120.0]]),
        torch.tensor([[20.0, 20.0, 44.0, 52.0], [60.0, 10.0, 150.0, 100.0], [5.0, 80.0, 60.0, 125.0]]),
    ]
    labels = [torch.tensor([0, 1]), torch.tensor([2, 0, 1])]
    colours = torch.tensor([[220, 40, 40], [40, 220, 40], [40, 40, 220]], dtype=torch.uint8)
    for i in range(2):
        for (x0, y0, x1, y1), lab in zip(boxes[i].int().tolist(), labels[i].tolist(), strict=True):
            images[i, :, y0:y1, x0:x1] = colours[lab][:, None, None]
    return images, boxes, labels


@pytest.fixture(scope="session")
def two_images() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Two 128 x 160 uint8 images with coloured rectangles of 3 classes, their boxes and labels."""
    return make_two_images()


# ---- torchvision's FCOS with perturbed weights ---------------------------------------------------------------


def perturbed_torchvision_fcos(
    height: int = 512, width: int = 640, selected_classes: tuple[int, ...] = (1, 3, 17, 44, 62)
) -> torch.nn.Module:
    """torchvision's ``fcos_resnet50_fpn`` with every weight and BN statistic perturbed, ``selected_classes``
    made likely (so NMS has same-class overlaps), resizing nothing of ``height x width`` images."""
    torch.manual_seed(0)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # every parameter: conv, BN, GN, biases
            spread = p.std().item() if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * (spread if spread > 0 else 1.0))
        for name, b in model.named_buffers():  # BN statistics, so FrozenBN is not an identity
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        cls = model.head.classification_head.cls_logits
        cls.weight.mul_(3.0)
        cls.bias.copy_(torch.randn(91, generator=g) * 0.3 - 8.0)
        cls.bias[list(selected_classes)] = -4.55
        model.head.regression_head.bbox_reg.bias.add_(4.0)  # boxes of ~8 strides: neighbours overlap
    model.transform.min_size = (height,)  # no resizing: the scale is exactly 1.0
    model.transform.max_size = width
    return model


@pytest.fixture(scope="session")
def perturbed_tv_fcos() -> Callable[..., torch.nn.Module]:
    """:func:`perturbed_torchvision_fcos`: ``perturbed_tv_fcos(height, width)``."""
    return perturbed_torchvision_fcos


# ---- the hand-made COCO set (module docstring) ---------------------------------------------------------------


CATEGORIES = [{"id": 11, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
# id, (h, w), PIL mode, extension
IMAGES = [
    (11, (40, 60), "RGB", "png"),
    (22, (60, 40), "RGB", "jpg"),
    (33, (32, 32), "L", "png"),
    (44, (24, 36), "RGBA", "png"),
    (55, (30, 30), "P", "png"),
    (66, (20, 20), "RGB", "png"),
    (77, (20, 30), "RGB", "png"),
]
# id, image id, category id, bbox, iscrowd
ANNOTATIONS = [
    (1, 11, 7, [5, 6, 20, 10], 0),
    (2, 11, 3, [0, 0, 30, 30], 1),
    (3, 11, 11, [50, 30, 20, 20], 0),
    (4, 22, 3, [10, 10, 0.5, 20], 0),
    (5, 22, 3, [-5, 50, 10, 10], 0),
    (6, 22, 11, [45, 5, 10, 10], 0),
    (7, 33, 7, [4, 4, 8, 8], 0),
    (8, 44, 11, [1, 1, 10, 10], 0),
    (9, 55, 7, [2, 2, 5, 5], 0),
    (10, 77, 3, [0, 0, 10, 10], 1),
]


@dataclass
class SmallCoco:
    root: Path
    ann_file: str
    img_dir: str
    data: dict

    def write(self, data: dict, name: str = "modified.json") -> str:
        """Write another annotation file (e.g. a changed ``copy.deepcopy(self.data)``); return its path."""
        path = self.root / name
        path.write_text(json.dumps(data))
        return str(path)

    def file_of(self, image_id: int) -> Path:
        name = next(im["file_name"] for im in self.data["images"] if im["id"] == image_id)
        return Path(self.img_dir) / name


def _write_image(path: Path, h: int, w: int, mode: str, rng: np.random.Generator) -> None:
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8)).convert("P")
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    else:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr)  # mode inferred: L, RGB, RGBA
        assert img.mode == mode
    img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)


@pytest.fixture
def small_coco(tmp_path: Path) -> SmallCoco:
    """The dataset in the module docstring, written under ``tmp_path``."""
    rng = np.random.default_rng(0)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images = []
    for image_id, (h, w), mode, ext in IMAGES:
        name = f"img_{image_id}.{ext}"
        _write_image(img_dir / name, h, w, mode, rng)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    annotations = [
        {
            "id": ann_id,
            "image_id": image_id,
            "category_id": cat,
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": crowd,
        }
        for ann_id, image_id, cat, bbox, crowd in ANNOTATIONS
    ]
    data = {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    return SmallCoco(root=tmp_path, ann_file=str(ann_file), img_dir=str(img_dir), data=data)
