"""Benchmark: COCO scoring with pycocotools against faster-coco-eval, and the analysis behind the pictures.

Two generated result sets (:func:`~fcos_lightning.analysis.synthetic.make_synthetic_coco`): COCO-val-sized (5000
images x 100 detections, 80 classes, ~7 boxes per image) and demo-sized (the demo's val split: 40 images, 3 classes,
up to 100 detections per image). For each, in one run: the wall time of a validation round's scoring (load the
results, evaluate, accumulate, summarize) with each scorer, median of ``--repeats`` after one warm-up, the largest
difference between their twelve stats and per-class AP, and the time of :func:`~fcos_lightning.analysis.report.analyze`
(matching, F1, confusion matrix, error breakdown) and of drawing the four pictures.

    .venv/bin/python benchmarks/coco_eval.py [--repeats 3] [--output bench_results/coco_eval.json]

Not a test; numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from fcos_lightning.analysis.plots import write_plots
from fcos_lightning.analysis.report import analyze
from fcos_lightning.analysis.scoring import CocoScorer
from fcos_lightning.analysis.synthetic import make_synthetic_coco

SETS = {
    "coco_val_sized": {"num_images": 5000, "dets_per_image": 100, "num_classes": 80},
    "demo_sized": {"num_images": 40, "dets_per_image": 100, "num_classes": 3, "objects_per_image": 3.0},
}


def _median_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and the result)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench(name: str, repeats: int) -> dict:
    gt, results, category_map = make_synthetic_coco(seed=0, **SETS[name])
    image_ids = [img["id"] for img in gt["images"]]
    row = {"set": name, **SETS[name], "boxes": len(gt["annotations"]), "detections": len(results)}
    scores = {}
    for backend in ("pycocotools", "faster"):
        scorer = CocoScorer(gt, category_map, backend)  # the ground-truth index is built once per run
        seconds, scores[backend] = _median_time(lambda s=scorer: s.score(results, image_ids), repeats)
        row[f"{backend}_s"] = seconds
    row["speedup"] = row["pycocotools_s"] / row["faster_s"]
    a, b = scores["faster"].metrics, scores["pycocotools"].metrics
    row["max_metric_diff"] = max(abs(a[k] - b[k]) for k in b)
    row["AP"] = a["AP"]
    row["analyze_s"], analysis = _median_time(
        lambda: analyze(gt, results, image_ids, category_map, scores["faster"]), repeats
    )
    with tempfile.TemporaryDirectory() as tmp:
        row["plots_s"], _ = _median_time(lambda: write_plots(analysis, tmp), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; median of {args.repeats} runs")
    header = f"{'set':<16}{'dets':>8}{'pycocotools s':>15}{'faster s':>10}{'speedup':>9}{'max diff':>10}"
    print(header + f"{'analyze s':>11}{'plots s':>9}")
    for name in args.sets:
        row = bench(name, args.repeats)
        rows.append(row)
        print(
            f"{name:<16}{row['detections']:>8}{row['pycocotools_s']:>15.2f}{row['faster_s']:>10.2f}"
            f"{row['speedup']:>8.1f}x{row['max_metric_diff']:>10.1e}{row['analyze_s']:>11.2f}{row['plots_s']:>9.2f}"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
