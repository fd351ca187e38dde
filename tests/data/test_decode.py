"""Real-world image files decode to uint8 RGB of the right size, orientation and colour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcos_lightning.data.coco import CocoDetection
from fcos_lightning.data.decode import BadImageError, ImageSizeMismatchError, decode_image_file

H, W = 20, 30
RED = (200, 30, 40)


def _rgb(h: int = H, w: int = W) -> np.ndarray:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = RED
    arr[:4, :4] = (0, 0, 255)  # a blue marker in the stored top-left corner
    return arr


def _check(path: Path, hw=(H, W), colour=RED, tol=12):
    img = decode_image_file(str(path), 7)
    assert img.dtype.is_floating_point is False and img.dtype.itemsize == 1
    assert tuple(img.shape) == (3, *hw)
    centre = img[:, hw[0] // 2, hw[1] // 2].tolist()
    assert all(abs(a - b) <= tol for a, b in zip(centre, colour)), centre
    return img


def test_grayscale_png_and_jpeg(tmp_path):
    Image.fromarray(np.full((H, W), 90, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((H, W), 90, np.uint8)).save(tmp_path / "g.jpg", quality=95)
    _check(tmp_path / "g.png", colour=(90, 90, 90), tol=0)
    _check(tmp_path / "g.jpg", colour=(90, 90, 90), tol=3)


def test_rgba_and_palette_png(tmp_path):
    rgba = np.dstack([_rgb(), np.full((H, W), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    _check(tmp_path / "a.png", tol=0)
    Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    _check(tmp_path / "p.png", tol=4)


def test_cmyk_jpeg(tmp_path):
    Image.fromarray(_rgb()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    _check(tmp_path / "c.jpg", tol=12)


def test_16bit_png(tmp_path):
    Image.fromarray(np.full((H, W), 40000, np.uint16)).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I;16")
    v = round(40000 * 255 / 65535)
    _check(tmp_path / "d.png", colour=(v, v, v), tol=1)


@pytest.mark.parametrize("ext", ["bmp", "tiff"])
def test_formats_torchvision_does_not_read_fall_back_to_pil(tmp_path, ext):
    Image.fromarray(_rgb()).save(tmp_path / f"x.{ext}")
    _check(tmp_path / f"x.{ext}", tol=0)


def _exif_rotated_jpeg(path: Path) -> None:
    img = Image.fromarray(_rgb())
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(path, quality=95, exif=exif)


def test_exif_rotated_jpeg_is_displayed_upright(tmp_path):
    _exif_rotated_jpeg(tmp_path / "r.jpg")
    img = _check(tmp_path / "r.jpg", hw=(W, H))
    # 90 degrees clockwise: the stored top-left marker is now top-right
    assert img[:, 1, -2].tolist()[2] > 200 and img[:, 1, 1].tolist()[0] > 150


def _one_image_coco(tmp_path: Path, file_name: str, h: int, w: int) -> str:
    data = {
        "images": [{"id": 5, "file_name": file_name, "height": h, "width": w}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 1, 8, 8], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / f"{file_name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_annotations_follow_the_rotated_size_and_stored_size_is_an_error(tmp_path):
    _exif_rotated_jpeg(tmp_path / "r.jpg")
    ok = CocoDetection(_one_image_coco(tmp_path, "r.jpg", W, H), str(tmp_path))
    assert ok[0]["orig_size"] == (W, H)
    with pytest.raises(ValueError, match=r"image id 5 .*r\.jpg.*EXIF orientation 6.*before EXIF rotation"):
        CocoDetection(_one_image_coco(tmp_path, "r.jpg", H, W), str(tmp_path))


def test_corrupt_files_raise_naming_file_and_image_id(tmp_path):
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "t.png")
    raw = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for name in ("t.png", "c.jpg"):
        with pytest.raises(BadImageError, match=rf"{name}.*image id 7") as e:
            decode_image_file(str(tmp_path / name), 7)
        assert e.value.image_id == 7 and e.value.path.endswith(name)
