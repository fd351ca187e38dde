"""AdelaiDet -> ours: every zoo architecture of the key contract converts with nothing unused or missing, and a
converted R-50 computes what AdelaiDet's layout computes (a functional reference over the AdelaiDet keys).

Measured (2-core CPU, torch 2.14.1): R-50 at 96x128, max relative difference 8.8e-7 (backbone res3-res5),
1.1e-6 (FPN), 1.3e-6 / 1.6e-6 / 1.9e-6 (class logits / boxes / centerness); tolerance 1e-4.
"""

from __future__ import annotations

import logging
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fcos_lightning.app.config import build
from fcos_lightning.app.convert import compose_config, convert_checkpoint
from fcos_lightning.checkpoint import load_checkpoint, load_model, model_state
from fcos_lightning.convert.adelaidet import adelaidet_to_fcos, detect_architecture
from fcos_lightning.convert.checkpoint import convert_state_dict, load_state_dict_file, match_to_model
from fcos_lightning.data.coco import CategoryMap
from fcos_lightning.files import UnsafeCheckpointError

KEYS_FILE = Path(__file__).resolve().parents[3] / "shared" / "spec" / "adelaidet_fcos_keys.txt"  # ../shared/spec
if not KEYS_FILE.is_file():  # the contract ships with the spec; a copy next to the tests is used otherwise
    KEYS_FILE = Path(__file__).with_name("adelaidet_fcos_keys.txt")

PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
PIXEL_STD_BGR = (10.0, 20.0, 40.0)  # distinct per channel: a channel-order error cannot cancel out


def contract() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """``{architecture title: [(key, shape), ...]}`` parsed from the key contract file."""
    blocks = re.split(r"^#### ", KEYS_FILE.read_text(), flags=re.M)[1:]
    out = {}
    for block in blocks:
        title, *lines = block.strip().splitlines()
        entries = []
        for line in lines:
            key, shape = line.split(" ", 1)
            entries.append((key, tuple(int(d) for d in re.findall(r"\d+", shape))))
        out[title.split(":")[0].removeprefix("AdelaiDet ")] = entries
    return out


CONTRACT = contract()
TRANSFORMED = {"backbone.body.conv1.weight", "backbone.body.base_layer.0.weight", "pixel_mean", "pixel_std"}


class NotATensor:
    """An object ``torch.load(weights_only=True)`` must refuse to unpickle."""


def synthetic_state(entries, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the contract's shapes, scaled so a deep network stays numerically tame."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in entries:
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            t = torch.tensor(7)
        elif key == "pixel_mean":
            t = torch.tensor(PIXEL_MEAN_BGR).view(3, 1, 1)
        elif key == "pixel_std":
            t = torch.tensor(PIXEL_STD_BGR).view(3, 1, 1)
        elif leaf in ("running_var", "scale"):
            t = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            t = torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)
        elif leaf == "weight":  # norm scales
            t = torch.rand(shape, generator=g) * 0.5 + 0.5
        else:  # biases, running means
            t = torch.randn(shape, generator=g) * 0.1
        state[key] = t
    return state


@pytest.mark.parametrize("title", list(CONTRACT))
def test_every_contract_architecture_converts_strictly(title, tmp_path):
    entries = CONTRACT[title]
    state = synthetic_state(entries)
    src = tmp_path / "src.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, src)  # wrapped and DDP-prefixed
    ckpt = convert_checkpoint("adelaidet", src, tmp_path / "ours.ckpt")
    dropped = ckpt["source"]["dropped_keys"]
    if "DLA" in title:
        assert sorted(dropped) == sorted(k for k, _ in entries if re.search(r"bottom_up\.level[34]\.project\.", k))
        assert len(dropped) == 12
    else:
        assert not dropped
    assert not ckpt["source"]["filled_keys"]

    # convert_checkpoint loaded the converted dict strictly into the model built from the run config; the file:
    written = load_checkpoint(tmp_path / "ours.ckpt")
    category_map = CategoryMap.from_dict(written["classes"])
    assert category_map.num_classes == 80 and category_map.names[0] == "person" and category_map.cat_ids[-1] == 90
    description = OmegaConf.create(written["model"])  # the network's constructor arguments
    own = model_state(written)
    used = len(entries) - len(dropped)
    assert len(own) == used  # nothing unused, nothing missing
    arch = detect_architecture(state)
    conversion = adelaidet_to_fcos(state, arch)
    assert set(conversion.source_keys.values()) | set(dropped) == {k for k, _ in entries}
    for new, old in conversion.source_keys.items():
        if new not in TRANSFORMED:
            assert torch.equal(own[new], state[old]), (old, new)
    first = "backbone.body.base_layer.0.weight" if "DLA" in title else "backbone.body.conv1.weight"
    assert torch.equal(own[first], state[conversion.source_keys[first]].flip(1))  # BGR -> RGB input channels
    torch.testing.assert_close(own["pixel_mean"].flatten(), torch.tensor(PIXEL_MEAN_BGR[::-1]))

    expected = {  # first match wins
        "RT_MS_R_50": ("resnet50", True, 3),
        "DLA_34": ("dla34", False, 3),
        "X_101_32x8d": ("resnext101_32x8d", False, 5),
        "R_50": ("resnet50", True, 5),
    }
    name, stride_in_1x1, levels = next(v for k, v in expected.items() if k in title)
    assert description.backbone.name == name
    assert description.backbone.stride_in_1x1 == stride_in_1x1
    assert 3 + description.top_levels == levels and description.point_offset == 0.5
    if "dcnv2" in title:
        assert list(description.backbone.dcn_stages) == [4, 5] and description.head.use_deformable
    if "shared_towers" in title:
        assert description.head.num_share_convs == 4 and description.head.num_cls_convs == 0
    if "bn_head" in title:
        assert description.head.norm == "SyncBN"


def test_loader_accepts_centerness_spelling_and_rejects_bad_files(tmp_path):
    state = synthetic_state(CONTRACT["FCOS_R_50 (R_50_1x / MS_R_50_2x)"])
    head = "proposal_generator.fcos_head."
    old = {(k.replace(".ctrness.", ".centerness.") if k.startswith(head) else k): v for k, v in state.items()}
    assert f"{head}centerness.weight" in old
    arch = detect_architecture(old)
    assert adelaidet_to_fcos(old, arch).state_dict.keys() == adelaidet_to_fcos(state, arch).state_dict.keys()

    with pytest.raises(ValueError, match=r"backbone\.bottom_up\.res2\.0\.extra\.weight"):
        adelaidet_to_fcos({**state, "backbone.bottom_up.res2.0.extra.weight": torch.zeros(1)}, arch)
    bad = {**state, "backbone.fpn_output4.weight": torch.zeros(256, 256, 1, 1)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"shape mismatch for backbone\.fpn_output4\.weight -> fpn\.output_convs\.1"):
        convert_checkpoint("adelaidet", tmp_path / "bad.pth", tmp_path / "out.ckpt")
    missing = {k: v for k, v in state.items() if k != f"{head}bbox_tower.4.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"head\.box_tower\.1\.norm\.weight: in the model but nothing"):
        convert_checkpoint("adelaidet", tmp_path / "missing.pth", tmp_path / "out.ckpt")

    torch.save({"model": state, "extra": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*pickled\.pth"):
        load_state_dict_file(tmp_path / "pickled.pth")


# ---- a functional forward of AdelaiDet's R-50 FCOS, written over its own keys ----------------------------
def frozen_bn(x, s, p):
    scale = s[f"{p}.weight"] / torch.sqrt(s[f"{p}.running_var"] + 1e-5)
    return (x - s[f"{p}.running_mean"][:, None, None]) * scale[:, None, None] + s[f"{p}.bias"][:, None, None]


def reference_backbone(s, x):
    """detectron2 ResNet-50 (MSRA: stride on the 1x1 conv1), FrozenBN; returns res3, res4, res5."""
    p = "backbone.bottom_up."
    x = F.relu(frozen_bn(F.conv2d(x, s[f"{p}stem.conv1.weight"], stride=2, padding=3), s, f"{p}stem.conv1.norm"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for stage, blocks in ((2, 3), (3, 4), (4, 6), (5, 3)):
        for i in range(blocks):
            b = f"{p}res{stage}.{i}"
            stride = 2 if i == 0 and stage > 2 else 1
            y = F.relu(frozen_bn(F.conv2d(x, s[f"{b}.conv1.weight"], stride=stride), s, f"{b}.conv1.norm"))
            y = F.relu(frozen_bn(F.conv2d(y, s[f"{b}.conv2.weight"], padding=1), s, f"{b}.conv2.norm"))
            y = frozen_bn(F.conv2d(y, s[f"{b}.conv3.weight"]), s, f"{b}.conv3.norm")
            if f"{b}.shortcut.weight" in s:
                x = frozen_bn(F.conv2d(x, s[f"{b}.shortcut.weight"], stride=stride), s, f"{b}.shortcut.norm")
            x = F.relu(y + x)
        if stage >= 3:
            outs.append(x)
    return outs


def reference_fpn(s, feats):
    conv = lambda x, n, **kw: F.conv2d(x, s[f"backbone.{n}.weight"], s[f"backbone.{n}.bias"], **kw)  # noqa: E731
    prev = conv(feats[2], "fpn_lateral5")
    outs = [conv(prev, "fpn_output5", padding=1)]
    for level, f in ((4, feats[1]), (3, feats[0])):
        prev = conv(f, f"fpn_lateral{level}") + F.interpolate(prev, scale_factor=2.0, mode="nearest")
        outs.insert(0, conv(prev, f"fpn_output{level}", padding=1))
    p6 = conv(outs[-1], "top_block.p6", stride=2, padding=1)
    return [*outs, p6, conv(F.relu(p6), "top_block.p7", stride=2, padding=1)]


def reference_head(s, features):
    h = "proposal_generator.fcos_head."
    conv = lambda x, n: F.conv2d(x, s[f"{h}{n}.weight"], s[f"{h}{n}.bias"], padding=1)  # noqa: E731
    cls_out, box_out, ctr_out = [], [], []
    for level, x in enumerate(features):
        towers = {}
        for tower in ("cls_tower", "bbox_tower"):
            t = x
            for i in (0, 3, 6, 9):
                t = conv(t, f"{tower}.{i}")
                t = F.relu(F.group_norm(t, 32, s[f"{h}{tower}.{i + 1}.weight"], s[f"{h}{tower}.{i + 1}.bias"]))
            towers[tower] = t
        cls_out.append(conv(towers["cls_tower"], "cls_logits"))
        box_out.append(F.relu(conv(towers["bbox_tower"], "bbox_pred") * s[f"{h}scales.{level}.scale"]))
        ctr_out.append(conv(towers["bbox_tower"], "ctrness"))
    return cls_out, box_out, ctr_out


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    state = synthetic_state(CONTRACT["FCOS_R_50 (R_50_1x / MS_R_50_2x)"], seed=3)
    tmp = tmp_path_factory.mktemp("r50")
    torch.save(state, tmp / "src.pth")
    convert_checkpoint("adelaidet", tmp / "src.pth", tmp / "ours.ckpt")
    model = load_model(tmp / "ours.ckpt").network
    g = torch.Generator().manual_seed(4)
    rgb = (torch.rand(1, 3, 96, 128, generator=g) * 255).round()
    # AdelaiDet's input: the same picture as BGR 0-255, minus its mean, over its std
    bgr = rgb.flip(1)
    d2_input = (bgr - state["pixel_mean"][None]) / state["pixel_std"][None]
    return state, model, rgb, d2_input


def assert_rel_close(ours, theirs, what, rtol=1e-4):
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert scale > 1e-3, f"{what}: vacuous comparison"
    assert diff <= rtol * scale, f"{what}: max abs diff {diff} > {rtol} x {scale}"
    return diff / scale


@torch.no_grad()
def test_colour_convention_gives_the_same_backbone_features(r50):
    state, model, rgb, d2_input = r50
    ref = reference_backbone(state, d2_input)
    ours = model.backbone(model.normalize(rgb))
    worst = max(assert_rel_close(a, b, f"res{i + 3}") for i, (a, b) in enumerate(zip(ours, ref, strict=True)))
    print(f"\nbackbone res3-res5: max relative difference {worst:.1e}")
    # the test can fail: feeding AdelaiDet's layout RGB instead of BGR changes the features
    wrong = reference_backbone(state, (rgb - state["pixel_mean"][None]) / state["pixel_std"][None])
    assert (wrong[0] - ref[0]).abs().max() > 1e-2 * ref[0].abs().max()


@torch.no_grad()
def test_converted_r50_matches_reference_fpn_and_head(r50):
    state, model, rgb, d2_input = r50
    pyramid = reference_fpn(state, reference_backbone(state, d2_input))
    ours_pyramid = model.fpn(model.backbone(model.normalize(rgb)))
    worst = {"fpn": max(assert_rel_close(a, b, f"P{i + 3}") for i, (a, b) in enumerate(zip(ours_pyramid, pyramid)))}
    ref_head = reference_head(state, pyramid)
    ours_head = model(rgb.to(torch.uint8))
    for name, ours_levels, ref_levels in zip(("cls", "box", "ctr"), ours_head, ref_head, strict=True):
        pairs = enumerate(zip(ours_levels, ref_levels, strict=True))
        worst[name] = max(assert_rel_close(a, b, f"{name} P{level + 3}") for level, (a, b) in pairs)
    print(f"\nmax relative differences: { {k: f'{v:.1e}' for k, v in worst.items()} }")


def test_convert_cli_logs_dropped_dla_keys(tmp_path, monkeypatch, caplog):
    state = synthetic_state(CONTRACT["FCOS_RT_MS_DLA_34_4x_syncbn (GN head, P3-P5)"])
    torch.save(state, tmp_path / "dla.pth")
    script = Path(__file__).resolve().parents[2] / "convert.py"
    monkeypatch.setattr(
        sys, "argv", [str(script), "--from", "adelaidet", str(tmp_path / "dla.pth"), str(tmp_path / "o.ckpt")]
    )
    with caplog.at_level(logging.INFO, logger="fcos_lightning"):
        runpy.run_path(str(script), run_name="__main__")
    assert "dropped 12 source keys (unused by AdelaiDet's DLA-34 forward" in caplog.text
    assert "backbone.bottom_up.level4.project.0.weight" in caplog.text
    ckpt = torch.load(tmp_path / "o.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["model"]["backbone"]["name"] == "dla34"
    assert ckpt["state_dict"]["model.pixel_std"].flatten().tolist() == list(PIXEL_STD_BGR[::-1])


def derived_entries(kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """Zoo rows the contract file does not list, derived from its R-50 and X-101-32x8d-DCNv2 entries:
    R-101 (23 res4 blocks), X-101-32x8d and X-101-64x4d without DCN (no offsets, plain head convs; 64x4d
    halves the per-group width of every grouped conv2), the latter two without pixel_mean/pixel_std."""
    if kind == "R_101":
        out = []
        for key, shape in CONTRACT["FCOS_R_50 (R_50_1x / MS_R_50_2x)"]:
            out.append((key, shape))
            if key.startswith("backbone.bottom_up.res4.5."):
                out.extend((key.replace("res4.5.", f"res4.{i}."), shape) for i in range(6, 23))
        return out
    out = []
    for key, shape in CONTRACT["FCOS_MS_X_101_32x8d_2x_dcnv2 (head USE_DEFORMABLE)"]:
        if "offset" in key or key in ("pixel_mean", "pixel_std"):
            continue
        key = key.replace("tower.9.conv.", "tower.9.")
        if kind == "X_101_64x4d" and re.search(r"res\d\.\d+\.conv2\.weight", key):
            shape = (shape[0], shape[1] // 2, *shape[2:])
        out.append((key, shape))
    return out


@pytest.mark.parametrize(
    ("kind", "backbone", "stride_in_1x1", "pixel_std_rgb"),
    [
        ("R_101", "resnet101", True, PIXEL_STD_BGR[::-1]),
        ("X_101_32x8d", "resnext101_32x8d", False, (58.395, 57.12, 57.375)),
        ("X_101_64x4d", "resnext101_64x4d", False, (1.0, 1.0, 1.0)),
    ],
)
def test_derived_zoo_rows_convert_strictly(kind, backbone, stride_in_1x1, pixel_std_rgb):
    entries = derived_entries(kind)
    # convert_checkpoint without the file round trip (100M-parameter models)
    conversion, overrides, num_classes = convert_state_dict("adelaidet", synthetic_state(entries))
    model_cfg = compose_config(overrides)["model"]
    model = build(OmegaConf.create(model_cfg), num_classes=num_classes)
    state, report = match_to_model(conversion, model.state_dict())
    assert not report.dropped and not report.filled
    model.load_state_dict(state, strict=True)
    assert model_cfg["backbone"]["name"] == backbone and model_cfg["backbone"]["stride_in_1x1"] == stride_in_1x1
    assert not model_cfg["backbone"]["dcn_stages"] and not model_cfg["head"]["use_deformable"]
    has_pixel_keys = kind == "R_101"
    assert len(state) == len(entries) + (0 if has_pixel_keys else 2)
    torch.testing.assert_close(state["pixel_std"].flatten(), torch.tensor(pixel_std_rgb))


def test_key_contract_copy_matches_the_spec():
    spec = Path(__file__).resolve().parents[3] / "shared" / "spec" / "adelaidet_fcos_keys.txt"
    if not spec.is_file():
        pytest.skip("../shared/spec is not beside this checkout")
    assert Path(__file__).with_name("adelaidet_fcos_keys.txt").read_text() == spec.read_text()
