"""The pictures: files and arrays, and the numbers drawn are the analysis's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fcos_lightning.analysis.errors import ERROR_TYPES
from fcos_lightning.analysis.plots import (
    PLOTS,
    plot_confusion_matrix,
    plot_error_breakdown,
    plot_f1,
    plot_images,
    plot_precision_recall,
    write_plots,
)
from fcos_lightning.analysis.report import analyze
from fcos_lightning.analysis.scoring import score


def test_files_and_arrays(analysis_of, tmp_path):
    analysis = analysis_of("wrong_class")
    paths = write_plots(analysis, tmp_path / "plots")
    assert [p.name for p in paths] == [f"{name}.png" for name in PLOTS]
    images = plot_images(analysis)
    for path, (name, array) in zip(paths, images.items(), strict=True):
        assert array.dtype == np.uint8 and array.shape[0] == 3
        with Image.open(path) as png:
            np.testing.assert_array_equal(np.asarray(png.convert("RGB")).transpose(2, 0, 1), array, err_msg=name)
        assert 0.02 < (array < 250).mean() < 0.9, name  # drawn on, not blank


def test_precision_recall_lines_are_the_curves(analysis_of):
    analysis = analysis_of("duplicate")
    left, right = plot_precision_recall(analysis).axes
    lines = {line.get_label(): line.get_ydata() for line in left.get_lines()}
    np.testing.assert_allclose(lines["cat (AP50 83.5)"], analysis.pr.precision50[0])
    np.testing.assert_allclose(lines["dog (AP50 100.0)"], analysis.pr.precision50[1])
    np.testing.assert_allclose(lines["all classes (AP50 91.7)"], analysis.pr.mean_curves()[0])
    assert "IoU 0.50:0.95" in right.get_title() and right.get_xlabel().startswith("recall")


def test_f1_lines_and_best_threshold_marker(analysis_of):
    analysis = analysis_of("perfect")
    (ax,) = plot_f1(analysis).axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["cat (best 1.00 at 0.35)"].get_ydata(), analysis.f1.f1[0])
    np.testing.assert_allclose(lines["mean over classes (best 1.00)"].get_ydata(), analysis.f1.mean_f1())
    marker = [line for line in ax.get_lines() if line.get_marker() == "o"][0]
    assert marker.get_xdata()[0] == pytest.approx(0.352)
    assert any("at score 0.352" in t.get_text() for t in ax.texts)


def test_confusion_cells_carry_the_counts(analysis_of):
    analysis = analysis_of("wrong_class", confusion_score=0.5)
    (ax, _colorbar) = plot_confusion_matrix(analysis).axes
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text()) for t in ax.texts}
    assert cells == {(0, 0): 2, (1, 0): 1}  # zeros are left blank
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "background\n(missed)"]
    assert "score >= 0.500" in ax.get_title()


def test_error_bars_are_the_delta_ap(analysis_of):
    analysis = analysis_of("wrong_class")
    (ax,) = plot_error_breakdown(analysis).axes
    widths = [bar.get_width() for bar in ax.patches]
    expected = [analysis.errors.delta_ap[k] for k in (*ERROR_TYPES, "false_positive", "false_negative")]
    np.testing.assert_allclose(widths, expected)
    assert any(t.get_text() == f"+{expected[0]:.2f} (1 error)" for t in ax.texts)


def test_many_classes_highlight_the_lowest(generated_coco, monkeypatch):
    from fcos_lightning.analysis import plots

    gt, results, image_ids, category_map = generated_coco
    analysis = analyze(gt, results, image_ids, category_map, score(gt, results, image_ids, category_map))
    monkeypatch.setattr(plots, "MAX_LEGEND_CLASSES", 4)  # 8 classes count as many
    labels = [t.get_text() for t in plot_precision_recall(analysis).axes[0].get_legend().get_texts()]
    worst = np.argsort(analysis.pr.ap50)[: plots.HIGHLIGHT]
    assert labels[: plots.HIGHLIGHT] == [
        f"lowest: {category_map.names[k]} (AP50 {analysis.pr.ap50[k]:.1f})" for k in worst
    ]
    assert labels[plots.HIGHLIGHT :] == ["the other 3 classes", f"all classes (AP50 {analysis.metrics['AP50']:.1f})"]
