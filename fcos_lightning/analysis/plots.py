"""The evaluation pictures: precision-recall curves, F1 against the score threshold, the confusion matrix and the
error breakdown, drawn with matplotlib off-screen (Agg canvas, no pyplot state), as PNG files or image arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from fcos_lightning.analysis.errors import ERROR_TYPES
from fcos_lightning.analysis.report import Analysis

#: With more classes than this, per-class lines are thin and grey, except the ``HIGHLIGHT`` worst ones.
MAX_LEGEND_CLASSES = 20
HIGHLIGHT = 5
#: With more classes than this, confusion matrix cells carry no numbers.
MAX_ANNOTATED_CLASSES = 30
_DPI = 100

_ERROR_LABELS = {
    "classification": "classification: right box, wrong class",
    "localization": "localization: right class, IoU 0.1-0.5",
    "both": "both: wrong class and IoU 0.1-0.5",
    "duplicate": "duplicate: its box already matched",
    "background": "background: IoU <= 0.1 with every box",
    "missed": "missed: a box no detection found",
    "false_positive": "false positives: all ranked below true ones",
    "false_negative": "false negatives: all unmatched boxes dropped",
}
_ERROR_COLORS = ("#d62728", "#ff7f0e", "#8c564b", "#9467bd", "#1f77b4", "#2ca02c")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('x') else 's'}"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _class_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(n)]


def _has_gt(values: np.ndarray) -> np.ndarray:
    return ~np.isnan(values)


def _class_styles(quality: np.ndarray, names: tuple[str, ...], colors: list, describe: list[str]):
    """(class, colour, legend label or None) for each class with ground truth: every class in its own colour, or,
    with many classes, the ``HIGHLIGHT`` lowest by ``quality`` in colour (drawn last) and the others grey."""
    classes = np.flatnonzero(_has_gt(quality))
    if len(names) <= MAX_LEGEND_CLASSES:
        return [(k, colors[k], f"{names[k]} ({describe[k]})") for k in classes]
    worst = classes[np.argsort(quality[classes], kind="stable")[:HIGHLIGHT]]
    grey = [(k, "0.75", None) for k in classes if k not in set(worst)]
    tab10 = _class_colors(10)
    return grey + [(k, tab10[i], f"lowest: {names[k]} ({describe[k]})") for i, k in enumerate(worst)]


def plot_precision_recall(analysis: Analysis) -> Figure:
    """Per-class interpolated precision against recall at IoU 0.5 and averaged over IoU 0.5:0.95."""
    pr, names = analysis.pr, analysis.class_names
    mean50, mean = pr.mean_curves()
    fig = _figure(13, 6)
    fig.suptitle("Precision-recall per class (COCOeval: all areas, up to 100 detections per image)", fontsize=14)
    many = len(names) > MAX_LEGEND_CLASSES
    colors = _class_colors(len(names))
    panels = [
        ("IoU 0.50", "AP50", pr.precision50, pr.ap50, mean50, analysis.metrics.get("AP50", 0.0)),
        ("IoU 0.50:0.95 (mean over 10 thresholds)", "AP", pr.precision, pr.ap, mean, analysis.metrics.get("AP", 0.0)),
    ]
    for ax, (title, metric, curves, ap, mean_curve, overall) in zip(fig.subplots(1, 2), panels, strict=True):
        for k, color, label in _class_styles(ap, names, colors, [f"{metric} {v:.1f}" for v in ap]):
            ax.plot(pr.recall, curves[k], color=color, lw=0.8 if label is None else 1.6, label=label)
        if many:
            ax.plot([], [], color="0.75", lw=0.8, label=f"the other {int(_has_gt(ap).sum()) - HIGHLIGHT} classes")
        ax.plot(pr.recall, mean_curve, color="black", lw=3, label=f"all classes ({metric} {overall:.1f})")
        ax.set_title(f"{title}: {metric} {overall:.1f}", fontsize=12)
        ax.set_xlabel("recall (fraction of ground-truth boxes found)")
        ax.set_ylabel("precision (fraction of detections that are right)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=9)
    return fig


def plot_f1(analysis: Analysis) -> Figure:
    """F1 at IoU 0.5 against the score threshold, per class and averaged, with the best threshold marked."""
    f1, names = analysis.f1, analysis.class_names
    fig = _figure(12, 6)
    ax = fig.subplots()
    many = len(names) > MAX_LEGEND_CLASSES
    colors = _class_colors(len(names))
    best = f1.best_per_class()
    best_f1 = np.where(best >= 0, f1.f1[np.arange(len(best)), best], np.nan)
    describe = [
        f"best {v:.2f} at {f1.thresholds[i]:.2f}" if v > 0 else "never found: F1 0"
        for v, i in zip(best_f1, best, strict=True)
    ]
    for k, color, label in _class_styles(best_f1, names, colors, describe):
        ax.plot(f1.thresholds, f1.f1[k], color=color, lw=0.8 if label is None else 1.6, label=label)
    if many:
        ax.plot([], [], color="0.75", lw=0.8, label=f"the other {int((best >= 0).sum()) - HIGHLIGHT} classes")
    mean = f1.mean_f1()
    i = f1.best_index()
    ax.plot(f1.thresholds, mean, color="black", lw=3, label=f"mean over classes (best {mean[i]:.2f})")
    ax.axvline(f1.thresholds[i], color="black", ls="--", lw=1)
    ax.plot([f1.thresholds[i]], [mean[i]], "o", color="black", ms=8)
    ax.annotate(
        f"best mean F1 {mean[i]:.2f}\nat score {f1.thresholds[i]:.3f}",
        (f1.thresholds[i], mean[i]),
        xytext=(10, 10 if mean[i] < 0.8 else -45),  # below the point when above would reach the title
        textcoords="offset points",
        fontsize=10,
        bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8},
    )
    ax.set_title("F1 against the score threshold (IoU 0.5): where to cut detections", fontsize=13)
    ax.set_xlabel("score threshold (detections kept if score >= threshold)")
    ax.set_ylabel("F1 = 2 precision recall / (precision + recall)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    return fig


def plot_confusion_matrix(analysis: Analysis) -> Figure:
    """Counts of (true class, predicted class) with a background row (false positives) and column (missed);
    colour is the fraction of the row."""
    cm = analysis.confusion
    matrix = cm.matrix.astype(np.float64)
    n = len(matrix)
    labels = list(analysis.class_names)
    row_sums = matrix.sum(1, keepdims=True)
    fraction = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    side = max(7.0, (0.45 if n <= MAX_ANNOTATED_CLASSES + 1 else 0.22) * n + 4)
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    # square-root colour scale: a 2% confusion stays visible next to a 90% diagonal
    image = ax.imshow(fraction, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0, vmax=1))
    cbar = fig.colorbar(image, ax=ax, shrink=0.8)
    cbar.set_label("fraction of the row (true class's boxes; false positives for the last row)")
    if n <= MAX_ANNOTATED_CLASSES + 1:
        for (r, c), count in np.ndenumerate(cm.matrix):
            if count:
                color = "white" if fraction[r, c] > 0.35 else "black"
                ax.text(c, r, str(count), ha="center", va="center", color=color, fontsize=11 if n <= 12 else 7)
    tick_size = 10 if n <= MAX_ANNOTATED_CLASSES + 1 else 8
    rotated = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"} if n > 6 else {}
    ax.set_xticks(range(n), [*labels, "background\n(missed)"], fontsize=tick_size, **rotated)
    ax.set_yticks(range(n), [*labels, "background\n(false positive)"], fontsize=tick_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(
        f"Confusion matrix at IoU >= {cm.iou_threshold:.2f}, score >= {cm.score_threshold:.3f} (counts)\n"
        "diagonal: found with the right class; last column: missed; last row: false positives",
        fontsize=12 if n <= MAX_ANNOTATED_CLASSES + 1 else 16,
    )
    return fig


def plot_error_breakdown(analysis: Analysis) -> Figure:
    """AP50 points each TIDE error type costs (dAP), with how many errors of each type there are."""
    errors = analysis.errors
    fig = _figure(12, 6)
    ax = fig.subplots()
    names = [*ERROR_TYPES, "false_positive", "false_negative"]
    values = [errors.delta_ap[k] for k in names]
    y = np.arange(len(names))[::-1].astype(float)
    y[-2:] -= 0.5  # a gap before the two summary bars
    ax.barh(y, values, color=[*_ERROR_COLORS, "0.55", "0.55"], height=0.7)
    top = max(*values, 1.0)  # AP points; a sensible axis when nothing is lost
    for yi, name, value in zip(y, names, values, strict=True):
        count = ""
        if name in errors.counts:
            n = errors.counts[name]
            count = f" ({_plural(n, 'box' if name == 'missed' else 'error')})"
        ax.text(value + top * 0.01, yi, f"+{value:.2f}{count}", va="center", fontsize=10)
    ax.set_yticks(y, [_ERROR_LABELS[k] for k in names])
    ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("AP50 gained if these errors were fixed (AP points, TIDE's dAP)")
    fig.suptitle(
        f"Where AP50 is lost: TIDE error breakdown at IoU {errors.pos_threshold:.2f} "
        f"(AP50 {errors.ap50:.1f}, {errors.counts['true_positive']} true positives)",
        fontsize=13,
    )
    ax.set_title(
        "each bar: fixing that error type alone; grey: upper bounds from perfect ranking or perfect recall",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    return fig


#: The pictures, by file stem.
PLOTS: dict[str, Callable[[Analysis], Figure]] = {
    "precision_recall": plot_precision_recall,
    "f1_score_threshold": plot_f1,
    "confusion_matrix": plot_confusion_matrix,
    "error_breakdown": plot_error_breakdown,
}


def write_plots(analysis: Analysis, out_dir: str | Path) -> list[Path]:
    """Write every picture as ``<out_dir>/<name>.png``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, plot in PLOTS.items():
        path = out / f"{name}.png"
        plot(analysis).savefig(path, dpi=_DPI)
        paths.append(path)
    return paths


def plot_images(analysis: Analysis) -> dict[str, np.ndarray]:
    """Every picture as a ``[3, H, W]`` uint8 array (CHW, as loggers take them), by name."""
    images = {}
    for name, plot in PLOTS.items():
        fig = plot(analysis)
        fig.canvas.draw()
        images[name] = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].transpose(2, 0, 1))
    return images
