"""Loading a model by path: a bad model_path gets an error naming the file and what is wrong with it."""

from __future__ import annotations

import json

import pytest

from fcos_lightning.runtime.exported import load_predictor


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model_path not found: {tmp_path / 'nope.onnx'}"):
        load_predictor(tmp_path / "nope.onnx")


def test_unknown_format_is_named(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match=rf"model_path={path}: unknown model format '.tflite'"):
        load_predictor(path)


def test_export_without_its_sidecar_is_named(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match=rf"{path}: its sidecar {tmp_path / 'model.json'} is missing"):
        load_predictor(path)


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ("{not json", "not a JSON sidecar"),
        ({"format": "onnx"}, "not an export.py sidecar, missing"),
        (
            {
                "format": "onnx",
                "precision": "fp32",
                "strides": [8],
                "point_offset": 0.5,
                "size_divisibility": 32,
                "classes": {},
                "postprocess": {},
            },  # fmt: skip
            "describes a onnx model, but .*model.xml is openvino",
        ),
    ],
)
def test_a_wrong_sidecar_is_named(tmp_path, sidecar, message):
    path = tmp_path / "model.xml"
    path.write_text("<net/>")
    (tmp_path / "model.json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    with pytest.raises(ValueError, match=message) as info:
        load_predictor(path)
    assert str(tmp_path / "model") in str(info.value)
