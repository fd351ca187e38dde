"""Point grids: AdelaiDet's ``i * s + s // 2`` (offset 0.5), torchvision's ``i * s`` (offset 0), row-major."""

from __future__ import annotations

import pytest
import torch

from fcos_lightning.fcos.points import flatten_level, level_points, make_points


@pytest.mark.parametrize("stride", [8, 16, 32, 64, 128])
def test_adelaidet_locations(stride):
    height, width = 3, 5
    points = level_points(height, width, stride, 0.5, torch.device("cpu"))
    assert points.shape == (height * width, 2) and points.dtype == torch.float32
    # AdelaiDet compute_locations_per_level, literally
    shifts_x = torch.arange(0, width * stride, step=stride, dtype=torch.float32)
    shifts_y = torch.arange(0, height * stride, step=stride, dtype=torch.float32)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    expected = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)), dim=1) + stride // 2
    assert torch.equal(points, expected)
    assert points[0].tolist() == [stride // 2, stride // 2]
    assert points[1].tolist() == [stride + stride // 2, stride // 2]  # x moves fastest: row-major
    assert points[width].tolist() == [stride // 2, stride + stride // 2]


def test_half_stride_is_floored_like_adelaidet():
    assert level_points(1, 2, 3, 0.5, torch.device("cpu")).tolist() == [[1.0, 1.0], [4.0, 1.0]]


@pytest.mark.parametrize("stride", [8, 128])
def test_torchvision_locations(stride):
    points = level_points(2, 3, stride, 0.0, torch.device("cpu"))
    expected = [[j * stride, i * stride] for i in range(2) for j in range(3)]
    assert points.tolist() == expected


def test_order_matches_flattened_feature_maps():
    height, width, stride = 4, 6, 16
    points = level_points(height, width, stride, 0.5, torch.device("cpu"))
    # a feature map whose channels are the (x, y) location of each cell, flattened like the head outputs
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    feature = torch.stack((xs * stride + 8, ys * stride + 8)).float()[None]  # [1, 2, H, W]
    assert torch.equal(flatten_level(feature)[0], points)


def test_make_points_levels_and_cache():
    sizes, strides = [(8, 10), (4, 5), (2, 3)], [8, 16, 32]
    points = make_points(sizes, strides, 0.5, "cpu")
    assert [p.shape[0] for p in points] == [80, 20, 6]
    for p, (h, w), s in zip(points, sizes, strides, strict=True):
        assert torch.equal(p, level_points(h, w, s, 0.5, torch.device("cpu")))
    again = make_points([torch.Size([8, 10]), (4, 5), (2, 3)], (8, 16, 32), 0.5, torch.device("cpu"))
    assert all(a is b for a, b in zip(points, again, strict=True))  # the very same tensors
    other = make_points(sizes, strides, 0.0, "cpu")
    assert not torch.equal(other[0], points[0])
    assert torch.equal(other[0] + 4, points[0])
    bigger = make_points([(9, 10), (5, 5), (3, 3)], strides, 0.5, "cpu")
    assert bigger[0].shape[0] == 90
