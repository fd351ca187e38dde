"""The checkpoint's own format: what the network is, what it detects and how to run it, next to its weights.

A checkpoint of ours (written by training or by ``convert.py``) is a dict of plain values and tensors, loaded
with ``torch.load(weights_only=True)``:

- ``format_version``: :data:`FORMAT_VERSION`;
- ``model``: the network's constructor arguments
  (:func:`~fcos_lightning.modeling.build.model_description`);
- ``classes``: the class map, ``{"cat_ids": [...], "names": [...]}`` (label ``k`` is ``cat_ids[k]``);
- ``postprocess``: :class:`~fcos_lightning.fcos.postprocess.FCOSPostProcessor` arguments;
- ``criterion``: the loss and assignment settings it was trained with
  (:meth:`~fcos_lightning.fcos.criterion.FCOSCriterion.settings`);
- ``test_resize``: ``{"min_size", "max_size", "style"}`` of the evaluation resize (None when unknown); ``style``
  (:class:`~fcos_lightning.data.transforms.ResizeShortestEdge`): ``detectron2``, or ``torchvision`` for
  converted torchvision files; added later, so :func:`migrate` fills in ``detectron2`` where a file lacks it;
- ``source``: where the weights came from: ``{"kind": "trained", "output_dir", "init_from", "data"}`` or
  ``{"kind": "converted", "format", "file", "dropped_keys", "filled_keys", "data"}``; ``data`` names the val
  split (``val_ann_file``, ``val_img_dir``) and its loader settings (``val_batch_size``, ``num_workers``);
- ``score_thresholds``: the F1-maximizing score thresholds of the validation the checkpoint was saved at
  (``{"global", "per_class", "iou", "step"}``, per class in label order, None where the global one applies;
  :meth:`~fcos_lightning.analysis.report.Analysis.score_thresholds`), which ``predict.py score_thresh=auto``
  uses; None when no validation was analysed (converted files, files written before the entry existed);
- ``state_dict``: the network's tensors under ``model.`` (Lightning adds its own entries beside these);
- ``ema`` (only in checkpoints of a run with ``ema=true``): ``{"decay", "tau", "updates"}``; then ``state_dict``
  holds the averaged weights, which inference uses, and ``current_model_state`` the trained ones
  (:mod:`fcos_lightning.lightning.ema`).

Rebuilding the network needs only this module and the model code, no config system. Files in an older layout
load through :func:`migrate`. An entry added to the format later without changing how the others read
(:data:`OPTIONAL_KEYS`) does not change :data:`FORMAT_VERSION`: older readers ignore it, and :func:`migrate` fills
in its default where a file lacks it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from torch import Tensor

from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.fcos.postprocess import FCOSPostProcessor
from fcos_lightning.files import safe_load
from fcos_lightning.modeling.build import build_model, model_description
from fcos_lightning.modeling.detector import FCOS

__all__ = [
    "FORMAT_VERSION",
    "LoadedModel",
    "Weights",
    "checkpoint_header",
    "describe_weights",
    "load_checkpoint",
    "load_model",
    "load_network",
    "migrate",
    "model_state",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: which weight set of a checkpoint of an ``ema=true`` run: the averaged or the trained one
Weights = Literal["averaged", "trained"]
WEIGHTS: tuple[Weights, ...] = ("averaged", "trained")
HEADER_KEYS = ("format_version", "model", "classes", "postprocess", "criterion", "test_resize", "source")
#: entries added to format 1 later, with the value a file without them gets
OPTIONAL_KEYS: dict[str, Any] = {"score_thresholds": None}


def checkpoint_header(
    model: FCOS,
    classes: CategoryMap,
    postprocessor: FCOSPostProcessor,
    criterion: Mapping[str, Any],
    test_resize: Mapping[str, Any] | None,
    source: Mapping[str, Any],
    score_thresholds: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything of a checkpoint but its tensors, for the network ``model``."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model_description(model),
        "classes": classes.to_dict(),
        "postprocess": postprocessor.settings(),
        "criterion": dict(criterion),
        "test_resize": None if test_resize is None else _test_resize(test_resize),
        "source": dict(source),
        "score_thresholds": None if score_thresholds is None else dict(score_thresholds),
    }


def _test_resize(test_resize: Mapping[str, Any]) -> dict[str, Any]:
    """``test_resize`` with integer sizes and its ``style`` (``detectron2`` when absent)."""
    sizes = {k: int(v) for k, v in test_resize.items() if k != "style"}
    return {**sizes, "style": str(test_resize.get("style", "detectron2"))}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint of ours (trained or converted, any format version) in the current format."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(
            f"{os.fspath(path)} is not an fcos_lightning checkpoint: no 'state_dict' entry "
            "(convert other frameworks' files with convert.py)"
        )
    return migrate(ckpt, os.fspath(path))


def model_state(ckpt: Mapping[str, Any], weights: Weights = "averaged") -> dict[str, Tensor]:
    """The network's weights of a checkpoint of ours (its ``model.`` entries, prefix removed): for a checkpoint of
    an ``ema=true`` run, the averaged ones, or with ``weights="trained"`` the trained ones."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    state = ckpt["state_dict"]
    if weights == "trained" and ckpt.get("ema"):
        state = ckpt["current_model_state"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def describe_weights(ckpt: Mapping[str, Any], weights: Weights = "averaged") -> str:
    """Which weights :func:`model_state` takes from ``ckpt``, for the log."""
    ema = ckpt.get("ema")
    if not ema:
        return "its trained weights (no EMA)"
    settings = f"decay {ema['decay']:g}, tau {ema['tau']:g} steps, {ema['updates']} updates"
    if weights == "trained":
        return f"its trained weights, not the EMA of them ({settings})"
    return f"the EMA of its weights ({settings}; weights=trained for the trained ones)"


def load_network(ckpt: Mapping[str, Any], weights: Weights = "averaged") -> FCOS:
    """The checkpoint's network with its weights (:func:`model_state`), in eval mode; logs which weights."""
    model = build_model(ckpt["model"])
    model.load_state_dict(model_state(ckpt, weights))
    log.info("checkpoint: using %s", describe_weights(ckpt, weights))
    return model.eval()


class LoadedModel(NamedTuple):
    """What inference needs from a checkpoint: the network (eval mode, weights loaded), its class map, its
    post-processing, and the whole checkpoint (``test_resize``, ``source``, ...)."""

    network: FCOS
    classes: CategoryMap
    postprocessor: FCOSPostProcessor
    checkpoint: dict[str, Any]


def load_model(path: str | os.PathLike, weights: Weights = "averaged") -> LoadedModel:
    """:class:`LoadedModel` of the checkpoint at ``path`` (``weights``: :func:`model_state`)."""
    ckpt = load_checkpoint(path)
    classes = CategoryMap.from_dict(ckpt["classes"])
    return LoadedModel(load_network(ckpt, weights), classes, FCOSPostProcessor(**ckpt["postprocess"]), ckpt)


def migrate(ckpt: Mapping[str, Any], path: str = "checkpoint") -> dict[str, Any]:
    """``ckpt`` in the current format. Version 0 is the layout before the format had a version: the whole
    resolved config under ``fcos_config``, the class map under ``category_map`` and, for converted files,
    ``converted_from``. Entries that are not part of the format (Lightning's) are kept as they are."""
    version = ckpt.get("format_version", 0)
    if version == FORMAT_VERSION:
        missing = [k for k in HEADER_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"{path}: format {FORMAT_VERSION} checkpoint without {missing}")
        resize = ckpt["test_resize"]
        return {**OPTIONAL_KEYS, **ckpt, "test_resize": None if resize is None else _test_resize(resize)}
    if version == 0:
        return _from_version_0(ckpt, path)
    raise ValueError(
        f"{path}: checkpoint format {version!r}; this fcos_lightning reads formats 0..{FORMAT_VERSION} "
        "(a newer fcos_lightning wrote it?)"
    )


#: version 0 spelled the backbone norms in lower case.
_V0_BACKBONE_NORMS = {"frozen_bn": "FrozenBN", "bn": "BN", "syncbn": "SyncBN"}
_V0_MODEL_KEYS = ("fpn_channels", "top_levels", "sizes_of_interest", "point_offset", "channels_last")
_V0_CRITERION_KEYS = ("center_sampling_radius", "box_loss_type", "focal_alpha", "focal_gamma")


def _from_version_0(ckpt: Mapping[str, Any], path: str) -> dict[str, Any]:
    missing = [k for k in ("fcos_config", "category_map") if k not in ckpt]
    if missing:
        raise ValueError(
            f"{path} is not an fcos_lightning checkpoint: no {missing[0]!r} entry (convert other frameworks' "
            "files with convert.py)"
        )
    config, classes = ckpt["fcos_config"], CategoryMap.from_dict(ckpt["category_map"])
    model_cfg, module_cfg = config["model"], config["module"]
    backbone = dict(model_cfg["backbone"])
    target = backbone.pop("_target_", None)
    if target != "fcos_lightning.modeling.backbones.TimmBackbone":
        raise ValueError(f"{path}: version 0 checkpoint with backbone {target!r}; only TimmBackbone existed")
    for key in ("pretrained", "weights"):  # weight initialisation only: the checkpoint has the weights
        backbone.pop(key, None)
    backbone["norm"] = _V0_BACKBONE_NORMS[backbone["norm"]]
    state = model_state(ckpt)
    model = {
        "backbone": {"type": "timm", **backbone},
        "head": {k: v for k, v in model_cfg["head"].items() if not k.startswith("_")},
        "num_classes": classes.num_classes,
        **{k: model_cfg[k] for k in _V0_MODEL_KEYS if k in model_cfg},
        "pixel_mean": state["pixel_mean"].flatten().tolist(),
        "pixel_std": state["pixel_std"].flatten().tolist(),
    }
    datamodule = config["data"]["datamodule"]
    data = {k: datamodule[k] for k in ("val_ann_file", "val_img_dir", "val_batch_size", "num_workers")}
    if "converted_from" in ckpt:
        source = {"kind": "converted", **ckpt["converted_from"], "data": data}
    else:
        source = {"kind": "trained", "output_dir": config.get("output_dir"), "init_from": config.get("init_from")}
        source["data"] = data
    source["migrated_from_format"] = 0
    header = {
        "format_version": FORMAT_VERSION,
        "model": model_description(build_model(model)),  # with the arguments version 0 left at their defaults
        "classes": classes.to_dict(),
        "postprocess": {k: v for k, v in module_cfg["postprocessor"].items() if not k.startswith("_")},
        # version 0 predates the IoU quality branch: its networks learned centerness
        "criterion": {
            **{k: module_cfg[k] for k in _V0_CRITERION_KEYS if k in module_cfg},
            "inclusive_ranges": True,
            "box_quality": "ctrness",
        },
        "test_resize": _test_resize({"min_size": datamodule["test_min_size"], "max_size": datamodule["test_max_size"]}),
        "source": source,
        **OPTIONAL_KEYS,
    }
    rest = {k: v for k, v in ckpt.items() if k not in ("fcos_config", "category_map", "converted_from")}
    return {**rest, **header}
