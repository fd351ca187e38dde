"""``train.py init_from=PATH``: start a run from another checkpoint's weights (fine-tuning), not a resume.

Every tensor whose name and shape match is loaded. The classifier (``head.cls_logits``) keeps its fresh
prior-probability initialisation (bias ``-log((1 - p) / p)``, -log(99) for p = 0.01) when the checkpoint's
class set differs from the run's; other tensors the checkpoint lacks or has in another shape keep their
initialisation and are reported, as are the checkpoint's unused tensors. The input convention
(``pixel_mean``/``pixel_std``) comes with the weights. Optimizer, schedule and step start fresh
(``ckpt_path=`` resumes those).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fcos_lightning.checkpoint import load_checkpoint, model_state
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.modeling.build import model_description
from fcos_lightning.modeling.detector import FCOS

log = logging.getLogger("fcos_lightning.init_from")

CLASSIFIER = "head.cls_logits."
#: model description fields the weights were trained for; a difference is legal but worth a warning.
TRAINED_FOR = ("point_offset", "backbone.name", "backbone.stride_in_1x1", "head.use_scale", "head.norm")


@dataclass
class InitReport:
    """Keys of the model (loaded / re-initialized, with the reason) and of the checkpoint (unused)."""

    loaded: list[str] = field(default_factory=list)
    reinitialized: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    def table(self) -> str:
        """Counts per module group, then every re-initialized and unused key."""

        def group(key: str) -> str:
            parts = key.split(".")
            return ".".join(parts[:2]) if len(parts) > 2 else parts[0]

        rows = {"loaded": Counter(map(group, self.loaded)), "re-initialized": Counter(map(group, self.reinitialized))}
        rows["unused (checkpoint)"] = Counter(map(group, self.unused))
        groups = sorted({g for c in rows.values() for g in c})
        width = max([len(g) for g in groups] + [5])
        lines = [f"{'group':<{width}}  {'loaded':>7}  {'re-initialized':>14}  {'unused (checkpoint)':>19}"]
        for g in groups:
            counts = [rows[r][g] for r in rows]
            lines.append(f"{g:<{width}}  {counts[0]:>7}  {counts[1]:>14}  {counts[2]:>19}")
        lines.append(
            f"{'total':<{width}}  {len(self.loaded):>7}  {len(self.reinitialized):>14}  {len(self.unused):>19}"
        )
        for key, why in self.reinitialized.items():
            lines.append(f"re-initialized {key}: {why}")
        lines.extend(f"unused {key}" for key in self.unused)
        return "\n".join(lines)


def _get(description: dict, dotted: str):
    for part in dotted.split("."):
        description = description.get(part) if isinstance(description, dict) else None
    return description


def init_from_checkpoint(model: FCOS, path: str | Path, category_map: CategoryMap) -> InitReport:
    """Load ``path``'s matching weights into ``model`` (built for ``category_map``); logs and returns the report.

    The two networks' descriptions are compared to warn about settings the weights were not trained for (point
    offset, stride placement, head norm, ...).
    """
    ckpt = load_checkpoint(path)
    source = model_state(ckpt)
    source_map = CategoryMap.from_dict(ckpt["classes"])
    same_classes = source_map == category_map
    own = model.state_dict()
    report = InitReport()
    state = {}
    for key, value in own.items():
        if key.startswith(CLASSIFIER) and not same_classes:
            report.reinitialized[key] = (
                f"class set differs ({source_map.num_classes} classes {list(source_map.names)[:5]}... -> "
                f"{category_map.num_classes} {list(category_map.names)[:5]}...): prior-probability init"
            )
        elif key not in source:
            report.reinitialized[key] = "not in the checkpoint"
        elif source[key].shape != value.shape:
            report.reinitialized[key] = f"shape {tuple(source[key].shape)} in the checkpoint, {tuple(value.shape)} here"
        else:
            state[key] = source[key].to(value.dtype)
            report.loaded.append(key)
    report.unused = sorted(k for k in source if k not in own)
    with torch.no_grad():
        model.load_state_dict(state, strict=False)

    own_description = model_description(model)
    for name in TRAINED_FOR:
        theirs, ours = _get(ckpt["model"], name), _get(own_description, name)
        if theirs is not None and theirs != ours:
            log.warning("init_from: %s was trained with model.%s=%s, this run uses %s", path, name, theirs, ours)
    unexpected = {k: v for k, v in report.reinitialized.items() if not k.startswith(CLASSIFIER)}
    if unexpected:
        log.warning("init_from: %d tensors besides the classifier keep their initialisation", len(unexpected))
    log.info("init_from %s:\n%s", path, report.table())
    return report
