"""Checkpoints of ours from other frameworks' files, and loading any checkpoint of ours for inference.

A converted checkpoint has the layout ``train.py`` writes (what ``evaluate.py``, ``predict.py``, ``export.py``
and ``train.py init_from=`` read): ``state_dict`` (the network under ``model.``), ``category_map`` and
``fcos_config`` (a complete resolved run config, plain containers), plus ``converted_from`` (source format,
file, dropped keys). The run config is composed from ``conf/train.yaml`` with the overrides that rebuild the
source network, so the checkpoint alone rebuilds it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fcos_lightning.checkpointing import safe_load
from fcos_lightning.convert.adelaidet import Conversion, adelaidet_to_fcos, detect_architecture
from fcos_lightning.convert.torchvision import TORCHVISION_GEOMETRY, torchvision_to_fcos
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.data.coco_categories import coco_category_map

log = logging.getLogger("fcos_lightning.convert")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
FORMATS = ("adelaidet", "torchvision")


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path``: bare, or under ``model``/``state_dict``; a leading ``module.`` is stripped.

    Loads with ``torch.load(weights_only=True)`` only: a file that needs arbitrary unpickling (e.g. a
    detectron2 ``.pkl``) is refused with the reason.
    """
    path = Path(path)
    obj = safe_load(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: expected a (non-empty) state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def compose_run_config(overrides: list[str]) -> dict:
    """``conf/train.yaml`` composed with ``overrides`` and resolved to plain containers (no Hydra run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "output_dir=."])
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)


@dataclass
class MatchReport:
    """What happened to each key when a converted dict met the model it is for."""

    filled: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


def match_to_model(conversion: Conversion, model_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], MatchReport]:
    """Strictly fit a conversion to a model's state dict.

    Only BatchNorm ``num_batches_tracked`` counters may differ (FrozenBN has none; a trainable BN without one
    in the file starts at 0). Any other key missing either side, or any shape mismatch, raises one
    ``ValueError`` naming every offending key (source and ours).
    """
    report = MatchReport(dropped=dict(conversion.dropped))
    state: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, value in conversion.state_dict.items():
        source = conversion.source_keys.get(key, key)
        if key not in model_state:
            if key.endswith("num_batches_tracked"):
                report.dropped[source] = "BatchNorm counter of a layer that is FrozenBN here"
            else:
                problems.append(f"{source} -> {key}: not in the model")
        elif value.shape != model_state[key].shape:
            problems.append(
                f"shape mismatch for {source} -> {key}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(model_state[key].shape)}"
            )
        else:
            state[key] = value.to(model_state[key].dtype)
    for key in model_state.keys() - conversion.state_dict.keys():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(model_state[key])
            report.filled.append(key)
        else:
            problems.append(f"{key}: in the model but nothing in the checkpoint maps to it")
    if problems:
        raise ValueError(f"{len(problems)} key problems: " + "; ".join(sorted(problems)))
    return state, report


def _category_map(num_classes: int) -> CategoryMap:
    if num_classes == 80:
        return coco_category_map()
    log.warning(
        "%d classes (not COCO's 80): names class0..class%d, ids 1..%d", num_classes, num_classes - 1, num_classes
    )
    return CategoryMap(cat_ids=tuple(range(1, num_classes + 1)), names=tuple(f"class{k}" for k in range(num_classes)))


def torchvision_overrides() -> list[str]:
    """Run-config overrides reproducing torchvision's ``fcos_resnet50_fpn`` (:data:`TORCHVISION_GEOMETRY`)."""
    g = TORCHVISION_GEOMETRY
    return [
        "model=r50",
        "data=coco",
        "model.backbone.pretrained=false",
        "model.backbone.weights=null",
        "model.backbone.stride_in_1x1=false",
        f"model.point_offset={g.point_offset}",
        f"model.sizes_of_interest={list(g.sizes_of_interest)}",
        f"model.head.use_scale={str(g.use_scale).lower()}",
        f"++model.pixel_mean={list(g.pixel_mean)}",
        f"++model.pixel_std={list(g.pixel_std)}",
        f"module.center_sampling_radius={g.center_sampling_radius}",
        *(f"module.postprocessor.{k}={str(v).lower() if isinstance(v, bool) else v}"
          for k, v in g.postprocessor_kwargs().items()),
    ]  # fmt: skip


def convert_state_dict(
    source_format: str, state: Mapping[str, Tensor], stride_in_1x1: bool | None = None
) -> tuple[Conversion, list[str], int]:
    """``(conversion, run-config overrides, num_classes)`` for a source state dict."""
    if source_format == "adelaidet":
        arch = detect_architecture(state, stride_in_1x1)
        log.info("AdelaiDet architecture: %s", arch)
        conversion = adelaidet_to_fcos(state, arch)
        # the buffers carry the input convention; the run config records it too (RGB order, 0-255 input)
        convention = [f"++model.{k}={conversion.state_dict[k].flatten().tolist()}" for k in ("pixel_mean", "pixel_std")]
        return conversion, [*arch.overrides(), *convention], arch.num_classes
    if source_format == "torchvision":
        if stride_in_1x1:
            raise ValueError("stride_in_1x1 does not apply to torchvision weights (3x3 stride placement)")
        converted = torchvision_to_fcos(state, num_classes=80)
        dropped = {k: "BatchNorm counter; the backbone is FrozenBN" for k in state if k.endswith("num_batches_tracked")}
        return Conversion(converted, {}, dropped), torchvision_overrides(), 80
    raise ValueError(f"unknown source format {source_format!r}; expected one of {FORMATS}")


def convert_checkpoint(
    source_format: str, input_path: str | Path, output_path: str | Path, stride_in_1x1: bool | None = None
) -> dict:
    """Convert ``input_path`` (an AdelaiDet or torchvision FCOS file) into a checkpoint of ours at ``output_path``.

    The target network is built from the composed run config (random init, no download) and the converted
    weights are loaded into it strictly, so the written checkpoint is known to load. Returns the checkpoint.
    """
    from fcos_lightning.app import build

    state = load_state_dict_file(input_path)
    conversion, overrides, num_classes = convert_state_dict(source_format, state, stride_in_1x1)
    run_config = compose_run_config(overrides)
    model: nn.Module = build(OmegaConf.create(run_config["model"]), num_classes=num_classes)
    matched, report = match_to_model(conversion, model.state_dict())
    model.load_state_dict(matched, strict=True)
    category_map = _category_map(num_classes)
    ckpt = {
        "state_dict": {f"model.{k}": v.contiguous() for k, v in matched.items()},
        "category_map": category_map.to_dict(),
        "fcos_config": run_config,
        "converted_from": {
            "format": source_format,
            "file": str(Path(input_path).resolve()),
            "dropped_keys": report.dropped,
            "filled_keys": report.filled,
        },
    }
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, output_path)
    log.info(
        "%s -> %s: %d source tensors, %d model tensors loaded strictly (%s)",
        input_path,
        output_path,
        len(state),
        len(matched),
        " ".join(o for o in overrides if o.startswith(("model=", "data="))),
    )
    for why in sorted(set(report.dropped.values())):
        keys = [k for k, w in report.dropped.items() if w == why]
        shown = keys if len(keys) <= 12 else [*keys[:12], "..."]  # all of them under converted_from.dropped_keys
        log.info("dropped %d source keys (%s): %s", len(keys), why, shown)
    if report.filled:
        log.info("%d BatchNorm counters not in the file start at 0: %s", len(report.filled), report.filled)
    return ckpt


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of ours (trained or converted), loaded with ``weights_only=True`` (:func:`safe_load`)."""
    ckpt = safe_load(path)
    for key in ("state_dict", "category_map", "fcos_config"):
        if not isinstance(ckpt, Mapping) or key not in ckpt:
            raise ValueError(
                f"{path} is not an fcos_lightning checkpoint: no {key!r} entry (convert other files with convert.py)"
            )
    return ckpt


def model_state(ckpt: Mapping) -> dict[str, Tensor]:
    """The network's weights of a checkpoint of ours (its ``model.`` entries, prefix removed)."""
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def load_model(path: str | Path) -> tuple[nn.Module, CategoryMap, DictConfig]:
    """``(network in eval mode, class map, run config)`` of a checkpoint of ours."""
    from fcos_lightning.app import build

    ckpt = load_checkpoint(path)
    run_cfg = OmegaConf.create(ckpt["fcos_config"])
    category_map = CategoryMap.from_dict(ckpt["category_map"])
    model = build(run_cfg.model, num_classes=category_map.num_classes)
    model.load_state_dict(model_state(ckpt))
    return model.eval(), category_map, run_cfg
