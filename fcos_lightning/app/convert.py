"""``convert_checkpoint``: another framework's FCOS file -> a checkpoint of ours (``convert.py``).

The target network is composed from ``conf/train.yaml`` with the overrides that rebuild the source network
(``fcos_lightning.convert``), built with random weights, and the converted weights are loaded into it strictly,
so the written checkpoint is known to load. The checkpoint has the format training writes
(:mod:`fcos_lightning.checkpoint`), with ``source.kind = "converted"``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fcos_lightning.app.train import build_module
from fcos_lightning.convert.checkpoint import (
    convert_state_dict,
    converted_category_map,
    load_state_dict_file,
    match_to_model,
)

log = logging.getLogger("fcos_lightning.convert")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str]) -> dict:
    """``conf/train.yaml`` composed with ``overrides`` and resolved to plain containers (no Hydra run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "output_dir=."])
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)


def convert_checkpoint(
    source_format: str, input_path: str | Path, output_path: str | Path, stride_in_1x1: bool | None = None
) -> dict:
    """Convert ``input_path`` (an AdelaiDet or torchvision FCOS file) into a checkpoint of ours at ``output_path``.

    The target network is built from the composed config (random init, no download) and the converted
    weights are loaded into it strictly, so the written checkpoint is known to load. Returns the checkpoint.
    """
    state = load_state_dict_file(input_path)
    conversion, overrides, num_classes = convert_state_dict(source_format, state, stride_in_1x1)
    cfg = OmegaConf.create(compose_config(overrides))
    category_map = converted_category_map(num_classes)
    module = build_module(cfg, num_classes, category_map, None, source={"kind": "converted"})
    matched, report = match_to_model(conversion, module.model.state_dict())
    module.model.load_state_dict(matched, strict=True)
    module.source.update(
        format=source_format,
        file=str(Path(input_path).resolve()),
        dropped_keys=report.dropped,
        filled_keys=report.filled,
    )
    ckpt = {**module.checkpoint_header(), "state_dict": {f"model.{k}": v.contiguous() for k, v in matched.items()}}
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
        shown = keys if len(keys) <= 12 else [*keys[:12], "..."]  # all of them under source.dropped_keys
        log.info("dropped %d source keys (%s): %s", len(keys), why, shown)
    if report.filled:
        log.info("%d BatchNorm counters not in the file start at 0: %s", len(report.filled), report.filled)
    return ckpt
