"""Benchmark: FCOS target assignment time and peak memory on one 800 x 1333 image, ours vs torchvision.

Ours: :class:`~fcos_lightning.fcos.targets.TargetAssigner` with AdelaiDet settings (P3-P7, points at
``i * s + s // 2``, radius 1.5, inclusive ranges). torchvision: the matching inside ``FCOS.compute_loss``
(its own conventions), captured by replacing the head's loss. Time: median of ``--repeats`` runs after one
warm-up. Peak memory: every (implementation, box count) runs in a fresh subprocess; the figure is the growth
of the process's peak RSS (``ru_maxrss``) during one assignment over a baseline assignment of the same inputs
with no boxes (tracemalloc does not see torch's allocations).

    .venv/bin/python benchmarks/assign_targets.py [--repeats 5] [--output bench_results/assign_targets.json]

Not a test; numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fcos_lightning.fcos.points import make_points
from fcos_lightning.fcos.targets import TargetAssigner

HEIGHT, WIDTH = 800, 1333
PADDED = (800, 1344)  # padded to the FPN's divisor 32, as AdelaiDet does
STRIDES = (8, 16, 32, 64, 128)
BOX_COUNTS = (10, 100, 1000, 2000)
NUM_CLASSES = 80
ONE_GB = 1 << 30


def feature_sizes() -> list[tuple[int, int]]:
    """P3-P5 from the padded input, P6/P7 from stride-2 3x3 convs (padding 1): ceil halving."""
    h, w = PADDED[0] // 8, PADDED[1] // 8
    sizes = [(h, w), (h // 2, w // 2), (h // 4, w // 4)]
    for _ in range(2):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def random_boxes(num: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` boxes inside the image, sides log-uniform in [4, 800] px, and their labels."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.exp(torch.empty(num, 2).uniform_(float(torch.log(torch.tensor(4.0))), 6.68, generator=g))
    wh = torch.minimum(wh, torch.tensor([WIDTH - 1.0, HEIGHT - 1.0]))
    xy = torch.rand(num, 2, generator=g) * (torch.tensor([WIDTH, HEIGHT]) - wh)
    return torch.cat((xy, xy + wh), dim=1), torch.randint(0, NUM_CLASSES, (num,), generator=g)


class Ours:
    name = "ours"

    def __init__(self, chunk_elements: int | None = None) -> None:
        kwargs = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
        self.assigner = TargetAssigner(STRIDES, (64, 128, 256, 512), 1.5, inclusive_ranges=True, **kwargs)
        self.points = make_points(feature_sizes(), STRIDES, 0.5, "cpu")

    def __call__(self, boxes: torch.Tensor, labels: torch.Tensor) -> int:
        return int((self.assigner(self.points, [boxes], [labels], NUM_CLASSES).matched_idx >= 0).sum())


class _NoBackbone(nn.Module):
    out_channels = 32


class Torchvision:
    name = "torchvision"

    def __init__(self) -> None:
        from torchvision.models.detection.fcos import FCOS
        from torchvision.models.detection.image_list import ImageList

        self.model = FCOS(_NoBackbone(), num_classes=NUM_CLASSES)
        sizes = feature_sizes()
        images = ImageList(torch.zeros(1, 3, *PADDED), [(HEIGHT, WIDTH)])
        features = [torch.zeros(1, 1, h, w) for h, w in sizes]
        self.anchors = self.model.anchor_generator(images, features)
        self.num_per_level = [h * w for h, w in sizes]
        self.captured: list = []
        self.model.head.compute_loss = lambda targets, outputs, anchors, matched: self.captured.append(matched) or {}

    def __call__(self, boxes: torch.Tensor, labels: torch.Tensor) -> int:
        self.captured.clear()
        self.model.compute_loss([{"boxes": boxes, "labels": labels}], {}, self.anchors, self.num_per_level)
        return int((self.captured[0][0] >= 0).sum())


def make_impl(name: str, chunk_elements: int | None):
    return Ours(chunk_elements) if name == "ours" else Torchvision()


def median_time(fn, *args, repeats: int) -> tuple[float, list[float]]:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def max_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``); False if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(name: str, num_boxes: int, chunk_elements: int | None) -> None:
    """Print the peak-RSS growth of one assignment over a no-box baseline (run in a fresh process)."""
    impl = make_impl(name, chunk_elements)
    boxes, labels = random_boxes(num_boxes)
    impl(boxes[:0], labels[:0])
    impl(boxes[:1], labels[:1])  # first-call allocations of the code path itself
    if reset_peak_rss():  # peak = high-water mark since the reset, baseline = resident set at the reset
        baseline, method = _status_bytes("VmRSS"), "VmHWM after clear_refs 5, minus VmRSS before"
        impl(boxes, labels)
        peak = _status_bytes("VmHWM")
    else:  # ru_maxrss never resets: it only sees growth beyond the process's earlier peak
        baseline, method = max_rss_bytes(), "ru_maxrss growth"
        impl(boxes, labels)
        peak = max_rss_bytes()
    print(json.dumps({"peak_delta_bytes": peak - baseline, "baseline_bytes": baseline, "method": method}))


def peak_memory(name: str, num_boxes: int, chunk_elements: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", name, str(num_boxes)]
    if chunk_elements is not None:
        cmd += ["--chunk-elements", str(chunk_elements)]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="bench_results/assign_targets.json")
    parser.add_argument("--chunk-elements", type=int, default=None, help="TargetAssigner chunk_elements")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "NUM_BOXES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]), args.chunk_elements)
        return

    rows = []
    impls = [make_impl("ours", args.chunk_elements), make_impl("torchvision", None)]
    num_points = sum(h * w for h, w in feature_sizes())
    for num_boxes in BOX_COUNTS:
        boxes, labels = random_boxes(num_boxes)
        for impl in impls:
            median, times = median_time(impl, boxes, labels, repeats=args.repeats)
            memory = peak_memory(impl.name, num_boxes, args.chunk_elements)
            rows.append(
                {
                    "impl": impl.name,
                    "num_boxes": num_boxes,
                    "positives": impl(boxes, labels),
                    "median_ms": 1000 * median,
                    "times_ms": [1000 * t for t in times],
                    "peak_delta_mb": memory["peak_delta_bytes"] / 2**20,
                    "baseline_rss_mb": memory["baseline_bytes"] / 2**20,
                    "memory_method": memory["method"],
                }
            )
            r = rows[-1]
            print(
                f"{r['impl']:>11} {num_boxes:>5} boxes: {r['median_ms']:9.1f} ms  "
                f"peak +{r['peak_delta_mb']:8.1f} MB  positives {r['positives']}",
                flush=True,
            )

    print(f"\n{HEIGHT}x{WIDTH} image (padded {PADDED[0]}x{PADDED[1]}), {num_points} points P3-P7")
    print(f"{'boxes':>6} | {'ours ms':>9} | {'ours peak MB':>12} | {'tv ms':>9} | {'tv peak MB':>10}")
    print("-" * 59)
    for num_boxes in BOX_COUNTS:
        ours = next(r for r in rows if r["impl"] == "ours" and r["num_boxes"] == num_boxes)
        tv = next(r for r in rows if r["impl"] == "torchvision" and r["num_boxes"] == num_boxes)
        print(
            f"{num_boxes:>6} | {ours['median_ms']:9.1f} | {ours['peak_delta_mb']:12.1f} | "
            f"{tv['median_ms']:9.1f} | {tv['peak_delta_mb']:10.1f}"
        )
    ours_2000 = next(r for r in rows if r["impl"] == "ours" and r["num_boxes"] == 2000)
    under = ours_2000["peak_delta_mb"] * 2**20 < ONE_GB
    print(f"\nours, 2000 boxes: peak +{ours_2000['peak_delta_mb']:.0f} MB ({'under' if under else 'OVER'} 1 GB)")

    chunk = impls[0].assigner.chunk_elements
    result = {
        "image": [HEIGHT, WIDTH],
        "padded": list(PADDED),
        "num_points": num_points,
        "strides": list(STRIDES),
        "chunk_elements": chunk,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.machine(),
        "memory_note": "peak RSS growth during one assignment over the no-box baseline, one subprocess each",
        "rows": rows,
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
