"""A generated COCO-format set with photographic content: natural-looking textures instead of flat shapes.

Backgrounds are 1/f ("pink", the power spectrum of natural images) fractal noise mapped through earthy colour
palettes, lit by a smooth gradient, with sensor grain. Objects of three classes are composited on top with
soft alpha edges, a drop shadow and their own shading; each class is a texture family rather than a colour:

- ``bark`` (id 1): anisotropic noise, long along a random direction, in browns, with dark fissures;
- ``foliage`` (id 4): multi-scale green blotches with bright specular speckles;
- ``stone`` (id 7): grey-ochre Voronoi cells with dark cracks along the cell borders.

Shapes are irregular blobs (an ellipse whose radius is perturbed by low-frequency noise); each box is the
tight box of the alpha > 0.5 region. Images are JPEG (quality 88), so compression artefacts are present too.
Layout as :func:`~fcos_lightning.data.demo.make_demo_dataset`: ``root/annotations/instances_{train,val}.json``
and ``root/{train,val}/*.jpg``, so ``train.py experiment=demo data.root=ROOT data.generate_demo=false`` trains
on it. Deterministic in ``seed``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import encode_jpeg

from fcos_lightning.files import write_json_atomic

from .coco import CategoryMap
from .decode import quiet_tv_io

__all__ = ["TEXTURE_CATEGORIES", "make_texture_dataset"]

TEXTURE_CATEGORIES = CategoryMap(cat_ids=(1, 4, 7), names=("bark", "foliage", "stone"))
_MIN_OBJ, _MAX_OBJ = 20, 170


def fractal_noise(g: torch.Generator, h: int, w: int, beta: float = 2.0, stretch: float = 1.0) -> Tensor:
    """``[h, w]`` noise with power spectrum ``1 / f**beta``, zero mean, unit std; ``stretch`` > 1 makes it
    elongated along x (frequencies along x damped)."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :] * stretch
    f = (fx**2 + fy**2).sqrt().clamp(min=1.0 / max(h, w))
    spectrum = torch.complex(torch.randn(h, w // 2 + 1, generator=g), torch.randn(h, w // 2 + 1, generator=g))
    noise = torch.fft.irfft2(spectrum / f ** (beta / 2), s=(h, w))
    return (noise - noise.mean()) / noise.std().clamp(min=1e-6)


def _palette(values: Tensor, colours: Tensor) -> Tensor:
    """Map ``[h, w]`` values (about N(0, 1)) through a ``[K, 3]`` colour ramp -> float ``[3, h, w]``."""
    t = (values.clamp(-2.5, 2.5) + 2.5) / 5 * (len(colours) - 1)
    lo = t.floor().long().clamp(max=len(colours) - 2)
    frac = (t - lo)[None]
    return colours[lo].permute(2, 0, 1) * (1 - frac) + colours[lo + 1].permute(2, 0, 1) * frac


def _jitter(g: torch.Generator, colours: list[list[int]], amount: float = 18.0) -> Tensor:
    return torch.tensor(colours, dtype=torch.float32) + torch.randn(3, generator=g) * amount


def _rotate_noise(g: torch.Generator, d: int, beta: float, stretch: float) -> Tensor:
    """Elongated noise at a random multiple of 90 degrees plus a transpose (cheap orientation variety)."""
    n = fractal_noise(g, d, d, beta, stretch)
    return torch.rot90(n, int(torch.randint(4, (1,), generator=g)), (0, 1))


def _texture(g: torch.Generator, cat_id: int, d: int) -> Tensor:
    """Float ``[3, d, d]`` 0-255 texture of the class."""
    if cat_id == 1:  # bark
        n = _rotate_noise(g, d, 2.2, 6.0)
        fissures = (_rotate_noise(g, d, 1.2, 8.0) > 1.3).float()
        rgb = _palette(n, _jitter(g, [[40, 25, 15], [90, 60, 35], [140, 100, 60], [175, 135, 90]]))
        return rgb * (1 - 0.6 * fissures)
    if cat_id == 4:  # foliage
        n = 0.7 * fractal_noise(g, d, d, 1.6) + 0.3 * fractal_noise(g, d, d, 0.8)
        rgb = _palette(n, _jitter(g, [[15, 40, 10], [40, 90, 25], [80, 140, 40], [150, 190, 70]]))
        speckle = (torch.rand(d, d, generator=g) > 0.985).float()
        return rgb + 90 * speckle
    # stone: Voronoi cells, each its own tone, dark along the borders
    k = max(4, d * d // 900)
    seeds = torch.rand(k, 2, generator=g) * d
    yy, xx = torch.meshgrid(torch.arange(d, dtype=torch.float32), torch.arange(d, dtype=torch.float32), indexing="ij")
    dist = torch.cdist(torch.stack((yy, xx), -1).view(-1, 2), seeds).view(d, d, k)
    two = dist.topk(2, dim=-1, largest=False)
    tone = torch.randn(k, generator=g)[two.indices[..., 0]] * 0.8 + 0.4 * fractal_noise(g, d, d, 1.5)
    rgb = _palette(tone, _jitter(g, [[70, 68, 62], [120, 115, 100], [165, 155, 130], [205, 195, 170]], 10))
    crack = ((two.values[..., 1] - two.values[..., 0]) < 1.5).float()
    return rgb * (1 - 0.55 * crack)


def _blob(g: torch.Generator, d: int) -> Tensor:
    """Soft ``[d, d]`` alpha in [0, 1] of an irregular blob filling most of its square."""
    c = torch.arange(d, dtype=torch.float32) + 0.5 - d / 2
    yy, xx = c[:, None], c[None, :]
    angle = torch.atan2(yy, xx)
    wobble = sum(
        0.08 * torch.randn(1, generator=g) * torch.cos(k * angle + 6.28 * torch.rand(1, generator=g))
        for k in range(2, 6)
    )
    aspect = 0.75 + 0.25 * torch.rand(2, generator=g)
    radius = ((xx / aspect[0]) ** 2 + (yy / aspect[1]) ** 2).sqrt() / (d / 2)
    edge = max(1.0, d / 40)
    return ((1 + wobble - radius) * (d / 2) / edge).clamp(0, 1)


def _background(g: torch.Generator, h: int, w: int) -> Tensor:
    ramps = [
        [[60, 70, 40], [105, 110, 70], [150, 140, 100], [190, 180, 150]],  # meadow / dry grass
        [[50, 45, 40], [95, 85, 75], [140, 130, 115], [185, 175, 160]],  # gravel
        [[40, 55, 70], [85, 105, 120], [140, 160, 170], [200, 210, 215]],  # water / sky
    ]
    ramp = ramps[int(torch.randint(len(ramps), (1,), generator=g))]
    n = 0.8 * fractal_noise(g, h, w, 2.0) + 0.2 * fractal_noise(g, h, w, 1.0)
    img = _palette(n, _jitter(g, ramp, 12))
    light = torch.linspace(-1, 1, w)[None, :] * torch.randn(1, generator=g) * 0.15
    light = light + torch.linspace(-1, 1, h)[:, None] * torch.randn(1, generator=g) * 0.15
    return img * (1 + light)[None]


def _make_image(g: torch.Generator, h: int, w: int, num_obj: int) -> tuple[Tensor, list[tuple[int, list[float]]]]:
    img = _background(g, h, w)
    cat_ids = list(TEXTURE_CATEGORIES.cat_ids)
    log_lo, log_hi = math.log(_MIN_OBJ), math.log(min(_MAX_OBJ, min(h, w) - 8))
    placed: list[tuple[int, list[float]]] = []
    occupied = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(num_obj):
        cat = cat_ids[int(torch.randint(3, (1,), generator=g))]
        d = int(round(math.exp(log_lo + (log_hi - log_lo) * torch.rand(1, generator=g).item())))
        for _try in range(30):
            x0, y0 = (
                int(torch.randint(0, w - d + 1, (1,), generator=g)),
                int(torch.randint(0, h - d + 1, (1,), generator=g)),
            )
            if not occupied[max(0, y0 - 3) : y0 + d + 3, max(0, x0 - 3) : x0 + d + 3].any():
                break
        else:
            continue
        alpha = _blob(g, d)
        ys, xs = torch.nonzero(alpha > 0.5, as_tuple=True)
        if len(ys) == 0:
            continue
        # drop shadow, offset down-right, then the object shaded by its own light gradient
        s = max(2, d // 12)
        shadow = torch.zeros(h, w)
        shadow[y0 + s : y0 + d + s, x0 + s : x0 + d + s] = alpha[: h - y0 - s, : w - x0 - s] * 0.45
        img = img * (1 - shadow)[None]
        shade = 1 + 0.25 * torch.linspace(0.5, -0.5, d)[None, :] + 0.25 * torch.linspace(0.5, -0.5, d)[:, None]
        tex = _texture(g, cat, d) * shade[None]
        region = img[:, y0 : y0 + d, x0 : x0 + d]
        img[:, y0 : y0 + d, x0 : x0 + d] = region * (1 - alpha) + tex * alpha
        occupied[y0 : y0 + d, x0 : x0 + d] = True
        bx0, by0, bx1, by1 = x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1
        placed.append((cat, [float(bx0), float(by0), float(bx1 - bx0), float(by1 - by0)]))
    img = img + torch.randn(3, h, w, generator=g) * 4.0  # sensor grain
    return img.clamp(0, 255).round().to(torch.uint8), placed


def make_texture_dataset(
    root: str | Path, num_train: int = 240, num_val: int = 40, image_size: tuple[int, int] = (256, 320), seed: int = 0
) -> dict[str, str]:
    """Write the set under ``root`` and return ``{"train_ann_file", "train_img_dir", "val_ann_file",
    "val_img_dir"}``. About 8% of the images have no object; a quarter are portrait."""
    root = Path(root).absolute()
    paths = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small images: extra threads only add contention
    try:
        for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
            g = torch.Generator().manual_seed(split_seed)
            img_dir = root / split
            img_dir.mkdir(parents=True, exist_ok=True)
            images, annotations = [], []
            for i in range(n):
                h, w = image_size[::-1] if torch.rand(1, generator=g).item() < 0.25 else image_size
                num_obj = 0 if torch.rand(1, generator=g).item() < 0.08 else int(torch.randint(1, 5, (1,), generator=g))
                img, placed = _make_image(g, h, w, num_obj)
                name = f"tex_{i:05d}.jpg"
                with quiet_tv_io():
                    (img_dir / name).write_bytes(encode_jpeg(img, quality=88).numpy().tobytes())
                images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
                for cat, bbox in placed:
                    annotations.append(
                        {"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0}
                    )  # fmt: skip
            categories = [{"id": c, "name": nm} for c, nm in zip(TEXTURE_CATEGORIES.cat_ids, TEXTURE_CATEGORIES.names)]
            ann_file = root / "annotations" / f"instances_{split}.json"
            ann_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(ann_file, {"images": images, "annotations": annotations, "categories": categories})
            paths[f"{split}_ann_file"], paths[f"{split}_img_dir"] = str(ann_file), str(img_dir)
    finally:
        torch.set_num_threads(threads)
    return paths
