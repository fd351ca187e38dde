"""Detection on image files with a checkpoint of ours or an exported model: one JSON of detections and one
picture per image.

``predict(cfg)`` is the application behind ``predict.py`` (configs meet code here and in ``app.py`` only).
Images are decoded as RGB with their EXIF orientation applied (JPEG/PNG/WebP; grayscale, palette and RGBA
become RGB), resized as the checkpoint's (or sidecar's) test pipeline does (overridable; ``tta=true``: every test
size and its mirror), padded to the network's stride multiple, and the detections are mapped back to original
pixels, all by the :class:`~fcos_lightning.runtime.predictor.Predictor`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor
from torchvision.io import write_png

from fcos_lightning.app.evaluate import model_path_of, tta_of
from fcos_lightning.data.coco import CategoryMap, read_image
from fcos_lightning.data.decode import BadImageError, quiet_tv_io
from fcos_lightning.evaluation.visualize import draw_detections
from fcos_lightning.runtime.exported import load_predictor

log = logging.getLogger("fcos_lightning.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself, or the image files (by suffix, case-insensitive) directly in the folder ``path``."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {path}")
    return files


def detections_record(file: Path, image: Tensor, det: dict[str, Tensor], category_map: CategoryMap) -> dict:
    """The JSON written for one image (columnar: one entry per detection in each list)."""
    labels = det["labels"].cpu()
    return {
        "file": str(file),
        "height": int(image.shape[-2]),
        "width": int(image.shape[-1]),
        "boxes_xyxy": det["boxes"].cpu().tolist(),
        "scores": det["scores"].cpu().tolist(),
        "labels": labels.tolist(),
        "class_names": [category_map.names[k] for k in labels.tolist()],
        "category_ids": category_map.labels_to_cat_ids(labels).tolist(),
    }


def class_score_thresholds(
    score_thresh: float | str | None, ckpt: dict, category_map: CategoryMap, ckpt_path: str
) -> Tensor | None:
    """``[C]`` score threshold per class label: ``score_thresh`` for every class, or for ``auto`` the F1-best
    thresholds of the validation the checkpoint (or the export's sidecar, ``ckpt``) was saved at (a class's own
    where the analysis gives one, the global one otherwise); None keeps every detection the post-processing
    keeps."""
    if score_thresh is None:
        return None
    if score_thresh != "auto":
        if isinstance(score_thresh, str):
            raise ValueError(f"score_thresh must be a number, auto or null, got {score_thresh!r}")
        return torch.full((category_map.num_classes,), float(score_thresh))
    recorded = ckpt.get("score_thresholds")
    if not recorded:
        raise ValueError(
            f"score_thresh=auto: {ckpt_path} records no F1-best score thresholds (they are saved by train.py's "
            "validation with evaluator.analyze=true; converted and older checkpoints have none): set score_thresh=0.3"
        )
    per_class = recorded["per_class"]
    if len(per_class) != category_map.num_classes:
        raise ValueError(
            f"{ckpt_path}: score_thresholds has {len(per_class)} classes, the checkpoint {category_map.num_classes}"
        )
    return torch.tensor([recorded["global"] if t is None else t for t in per_class], dtype=torch.float32)


def describe_thresholds(thresh: Tensor, category_map: CategoryMap) -> str:
    """``0.3`` when every class has the same threshold, else ``square 0.412, disc 0.380, ...``."""
    if bool((thresh == thresh[0]).all()):
        return f"{float(thresh[0]):g}"
    return ", ".join(f"{name} {float(t):.3f}" for name, t in zip(category_map.names, thresh, strict=True))


def predict(cfg: DictConfig) -> list[dict]:
    """Run ``cfg.model_path`` on ``cfg.input`` (file or folder); writes ``<name>.json`` and ``<name>.png`` per
    image into ``cfg.output`` and returns the JSON records."""
    files = list_images(cfg.input)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    model_path = model_path_of(cfg)
    # checkpoints run the fast path evaluate.py runs: BN folded, channels-last, conv weights in the autocast dtype
    predictor, category_map, description = load_predictor(model_path, device, cfg.precision, weights=cfg.weights)
    test = predictor.test_resize or (None, None)
    min_size = cfg.test_min_size if cfg.test_min_size is not None else test[0]
    max_size = cfg.test_max_size if cfg.test_max_size is not None else test[1]
    if min_size is None or max_size is None:
        raise ValueError(f"{model_path} records no test resize: set test_min_size= and test_max_size=")
    predictor.test_resize = (int(min_size), int(max_size))
    tta = tta_of(cfg, predictor.test_resize)
    thresh = class_score_thresholds(cfg.score_thresh, description, category_map, model_path)
    described = "all" if thresh is None else describe_thresholds(thresh, category_map)
    log.info("%s: %d images, test resize %d/%d, score >= %s%s", model_path, len(files), min_size, max_size, described,
             f", TTA {tta}" if tta else "")  # fmt: skip
    records, failed = [], []
    for file in files:
        try:
            image = read_image(str(file))
            det = predictor.detect([image], tta)[0]
        except (BadImageError, ValueError) as e:  # one bad file does not lose the folder
            log.error("%s: skipped: %s", file, e)
            failed.append(f"{file}: {e}")
            continue
        if thresh is not None:
            keep = det["scores"] >= thresh.to(det["scores"].device)[det["labels"]]
            det = {k: v[keep] for k, v in det.items()}
        record = detections_record(file, image, det, category_map)
        (out_dir / f"{file.name}.json").write_text(json.dumps(record, indent=1))
        if cfg.draw:
            picture = draw_detections(image, {k: v.cpu() for k, v in det.items()}, category_map.names)
            with quiet_tv_io():
                write_png(picture, str(out_dir / f"{file.name}.png"))
        records.append(record)
        log.info("%s: %d detections", file.name, len(record["scores"]))
    print(f"wrote {len(records)} x (.json{', .png' if cfg.draw else ''}) to {out_dir}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(files)} images could not be processed: " + "; ".join(failed[:5]))
    return records
