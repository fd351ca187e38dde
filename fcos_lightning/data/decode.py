"""Image decoding for real-world files: every common mode to uint8 RGB, EXIF orientation applied.

torchvision's ``decode_image`` (libjpeg/libpng) is tried first: it handles gray, RGBA, palette and 16-bit PNGs,
CMYK JPEGs and EXIF orientation. Formats it does not read (BMP, TIFF, ...) fall back to PIL with the same
conversions. A file neither can decode (missing, truncated, corrupt) raises :class:`BadImageError`, naming the
file and the image id; callers decide whether that stops the run or skips the image (``on_bad_image``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image, read_file

__all__ = [
    "BadImageError",
    "ImageSizeMismatchError",
    "MissingImageError",
    "decode_image_file",
    "exif_orientation",
    "stored_size",
    "transposes",
]

# EXIF orientations 5-8 transpose the image (swap height and width).
_TRANSPOSING = {5, 6, 7, 8}


class BadImageError(OSError):
    """An image file that cannot be used: missing, undecodable, or not the size the json says."""

    def __init__(self, message: str, path: str = "", image_id: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.image_id = image_id

    def __reduce__(self):  # re-raised from DataLoader workers: keep path and image id
        return (type(self), (str(self), self.path, self.image_id))


class MissingImageError(BadImageError, FileNotFoundError):
    """The image file does not exist."""


class ImageSizeMismatchError(BadImageError, ValueError):
    """The decoded image is not the size the annotation file gives (boxes would land in the wrong place)."""


@contextlib.contextmanager
def quiet_tv_io() -> Iterator[None]:
    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        yield


def _describe(path: str, image_id: int | None) -> str:
    return path if image_id is None else f"{path} (image id {image_id})"


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    if img.dtype == torch.uint8:
        return img
    top = 65535.0 if img.dtype in (torch.uint16, torch.int32, torch.int64) else 1.0
    return (img.to(torch.float32) * (255.0 / top) + 0.5).clamp(0, 255).to(torch.uint8)


def _decode_pil(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            arr = (arr * (255.0 / 65535.0) + 0.5).clip(0, 255).astype(np.uint8)
            im = Image.fromarray(arr)
        elif im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_image_file(path: str, image_id: int | None = None) -> torch.Tensor:
    """Decode ``path`` to uint8 RGB ``[3,H,W]`` with EXIF orientation applied; :class:`BadImageError` if it
    cannot be read or decoded."""
    what = _describe(path, image_id)
    if not os.path.isfile(path):
        raise MissingImageError(f"image file not found: {what}", path, image_id)
    with quiet_tv_io():
        try:
            data = read_file(path)
        except RuntimeError as e:
            raise BadImageError(f"cannot read image file {what}: {e}", path, image_id) from e
        try:
            return _to_uint8(decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True))
        except RuntimeError as tv_error:
            try:
                return _decode_pil(path)
            except (OSError, ValueError, SyntaxError) as pil_error:
                reason = str(tv_error).splitlines()[-1].strip() or repr(tv_error)
                raise BadImageError(
                    f"cannot decode image file {what}: torchvision: {reason}; PIL: {pil_error}", path, image_id
                ) from pil_error


def exif_orientation(path: str) -> int:
    """The file's EXIF orientation tag (1 = as stored, also when absent or unreadable)."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1))
    except (OSError, ValueError, SyntaxError):
        return 1


def stored_size(path: str) -> tuple[int, int] | None:
    """``(h, w)`` of the pixels as stored, before EXIF orientation, from the header only (None if unreadable)."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError, SyntaxError):
        return None


def transposes(orientation: int) -> bool:
    """Whether EXIF ``orientation`` swaps height and width."""
    return orientation in _TRANSPOSING


def size_mismatch_message(path: str, image_id: int, decoded: tuple[int, int], expected: tuple[int, int]) -> str:
    """Why a decoded size differs from the json's, with the EXIF orientation when that is the cause."""
    msg = f"image id {image_id} ({path}): decoded size (h, w) = {decoded} differs from the json's {expected}"
    orientation = exif_orientation(path)
    if orientation != 1:
        raw = stored_size(path)
        msg += f" (EXIF orientation {orientation} applied; stored pixels are {raw}"
        if raw == expected and transposes(orientation):
            msg += ": the json gives the size before EXIF rotation; annotate the rotated image or fix its EXIF tag"
        msg += ")"
    elif tuple(decoded) == tuple(expected)[::-1]:
        msg += " (width and height swapped in the json?)"
    return msg
