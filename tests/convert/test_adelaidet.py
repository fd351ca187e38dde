"""AdelaiDet -> ours: every zoo architecture of the key contract, and the rows it does not list (VoVNet, R-18 and
RT R-50 with full SyncBN, X-101-64x4d-DCNv2; their key layouts written out below from AdelaiDet's module
definitions), converts with nothing unused or missing; converted R-50, V-39 and R-18 full-SyncBN networks compute
what AdelaiDet's layouts compute (functional references over the AdelaiDet keys).

Measured (2-core CPU, torch 2.14.1): R-50 at 96x128, max relative difference 8.8e-7 (backbone res3-res5),
1.1e-6 (FPN), 1.3e-6 / 1.6e-6 / 1.9e-6 (class logits / boxes / centerness); V-39 stage3-5 1.1e-6; R-18 full
SyncBN 5.4e-7 (backbone), 8.6e-7 (FPN with norm and ReLU); tolerance 1e-4.
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


def convert_and_load(source: dict[str, torch.Tensor]):
    """``convert_checkpoint`` without the file round trip (100M-parameter models): ``(model config, model with
    the converted weights loaded strictly, converted state)``; nothing dropped, nothing filled."""
    conversion, overrides, num_classes = convert_state_dict("adelaidet", source)
    model_cfg = compose_config(overrides)["model"]
    model = build(OmegaConf.create(model_cfg), num_classes=num_classes)
    state, report = match_to_model(conversion, model.state_dict())
    assert not report.dropped and not report.filled
    model.load_state_dict(state, strict=True)
    assert set(conversion.source_keys.values()) >= set(source)  # every source key has its place
    return model_cfg, model, state


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
    model_cfg, _, state = convert_and_load(synthetic_state(entries))
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


# ---- architectures the key contract does not list, written out from AdelaiDet's module definitions ---------
# AdelaiDet adet/modeling/backbone/vovnet.py (= vovnet-detectron2's): stem.stem_{1,2,3}/{conv,norm},
# stage{s}.OSA{s}_{b}.layers.{i}.OSA{s}_{b}_{i}/{conv,norm}, .concat.OSA{s}_{b}_concat/{conv,norm}, .ese.fc;
# detectron2's BasicBlock (conv1, conv2, shortcut, each with .norm) and FPN with a norm (fpn_lateral3.norm, no
# conv bias); AdelaiDet's LastLevelP6P7 with a norm (top_block.p6.norm); per-level BN head (cls_tower.1.{lvl}).
Entries = list[tuple[str, tuple[int, ...]]]


def norm_entries(prefix: str, channels: int, trainable: bool) -> Entries:
    """FrozenBN: four buffers; (Sync)BN: the same and ``num_batches_tracked``."""
    leaves = ["weight", "bias", "running_mean", "running_var"]
    return [(f"{prefix}.{leaf}", (channels,)) for leaf in leaves] + (
        [(f"{prefix}.num_batches_tracked", ())] if trainable else []
    )


def head_entries(levels: int, norm: str) -> Entries:
    head, out = "proposal_generator.fcos_head.", []
    for tower in ("cls_tower", "bbox_tower"):
        for j in range(4):
            out += [(f"{head}{tower}.{3 * j}.weight", (256, 256, 3, 3)), (f"{head}{tower}.{3 * j}.bias", (256,))]
            if norm == "GN":
                out += [(f"{head}{tower}.{3 * j + 1}.{leaf}", (256,)) for leaf in ("weight", "bias")]
            else:
                out += [e for lvl in range(levels) for e in norm_entries(f"{head}{tower}.{3 * j + 1}.{lvl}", 256, True)]
    for name, c in (("cls_logits", 80), ("bbox_pred", 4), ("ctrness", 1)):
        out += [(f"{head}{name}.weight", (c, 256, 3, 3)), (f"{head}{name}.bias", (c,))]
    return out + [(f"{head}scales.{lvl}.scale", (1,)) for lvl in range(levels)]


def fpn_entries(in_channels: list[int], top_levels: int, norm: bool) -> Entries:
    out = []
    convs = [(f"fpn_lateral{3 + i}", (256, c, 1, 1)) for i, c in enumerate(in_channels)]
    convs += [(f"fpn_output{3 + i}", (256, 256, 3, 3)) for i in range(len(in_channels))]
    convs += [(f"top_block.p{6 + k}", (256, 256, 3, 3)) for k in range(top_levels)]
    for name, shape in convs:
        out.append((f"backbone.{name}.weight", shape))
        out += norm_entries(f"backbone.{name}.norm", 256, True) if norm else [(f"backbone.{name}.bias", (256,))]
    return out


PIXEL_ENTRIES = [("pixel_mean", (3, 1, 1)), ("pixel_std", (3, 1, 1))]
VOVNET_LAYOUTS = {"V_39": [1, 1, 2, 2], "V_57": [1, 1, 4, 3], "V_99": [1, 3, 9, 3]}


def vovnet_entries(blocks: list[int]) -> Entries:
    """AdelaiDet FCOS V-xx-eSE (vovnet/MS_V_xx_3x): FrozenBN VoVNet, plain FPN on stage3-5, GN head, P3-P7."""
    out, p = [], BOTTOM_UP_PREFIX
    for k, (cin, cout) in enumerate(((3, 64), (64, 64), (64, 128)), start=1):
        out += [
            (f"{p}stem.stem_{k}/conv.weight", (cout, cin, 3, 3)),
            *norm_entries(f"{p}stem.stem_{k}/norm", cout, False),
        ]
    cin = 128
    for stage, n, mid, cout in zip((2, 3, 4, 5), blocks, (128, 160, 192, 224), (256, 512, 768, 1024), strict=True):
        for b in range(1, n + 1):
            block_in, name = (cin if b == 1 else cout), f"{p}stage{stage}.OSA{stage}_{b}"
            for i in range(5):
                layer = f"{name}.layers.{i}.OSA{stage}_{b}_{i}"
                out += [(f"{layer}/conv.weight", (mid, block_in if i == 0 else mid, 3, 3))]
                out += norm_entries(f"{layer}/norm", mid, False)
            concat = f"{name}.concat.OSA{stage}_{b}_concat"
            out += [
                (f"{concat}/conv.weight", (cout, block_in + 5 * mid, 1, 1)),
                *norm_entries(f"{concat}/norm", cout, False),
            ]
            out += [(f"{name}.ese.fc.weight", (cout, cout, 1, 1)), (f"{name}.ese.fc.bias", (cout,))]
        cin = cout
    return PIXEL_ENTRIES + out + fpn_entries([512, 768, 1024], 2, norm=False) + head_entries(5, "GN")


def r18_full_syncbn_entries() -> Entries:
    """AdelaiDet R_18_1x-Full-SyncBN: detectron2 BasicBlock ResNet-18, SyncBN in backbone (stem included), FPN
    and per-level head, P3-P7."""
    p = BOTTOM_UP_PREFIX
    out = [(f"{p}stem.conv1.weight", (64, 3, 7, 7)), *norm_entries(f"{p}stem.conv1.norm", 64, True)]
    cin = 64
    for stage, c in ((2, 64), (3, 128), (4, 256), (5, 512)):
        for b in range(2):
            block_in, name = (cin if b == 0 else c), f"{p}res{stage}.{b}"
            if block_in != c:
                out += [
                    (f"{name}.shortcut.weight", (c, block_in, 1, 1)),
                    *norm_entries(f"{name}.shortcut.norm", c, True),
                ]
            out += [(f"{name}.conv1.weight", (c, block_in, 3, 3)), *norm_entries(f"{name}.conv1.norm", c, True)]
            out += [(f"{name}.conv2.weight", (c, c, 3, 3)), *norm_entries(f"{name}.conv2.norm", c, True)]
        cin = c
    return PIXEL_ENTRIES + out + fpn_entries([128, 256, 512], 2, norm=True) + head_entries(5, "SyncBN")


def rt_r50_full_syncbn_entries() -> Entries:
    """FCOS_RT/MS_R_50_4x_full-syncbn from the contract's RT R-50 SyncBN-head row: the stem and res2 norms train
    too (FREEZE_AT 0: ``num_batches_tracked``), and the FPN convs lose their bias for a SyncBN."""
    out = []
    for key, shape in CONTRACT["FCOS_RT_MS_R_50_4x_syncbn_bn_head (SyncBN head)"]:
        if key.startswith("backbone.fpn_"):
            continue
        out.append((key, shape))
        if key.startswith(BOTTOM_UP_PREFIX) and key.endswith("norm.running_var"):
            counter = key.replace("running_var", "num_batches_tracked")
            if (counter, ()) not in CONTRACT["FCOS_RT_MS_R_50_4x_syncbn_bn_head (SyncBN head)"]:
                out.append((counter, ()))
    return out + fpn_entries([512, 1024, 2048], 0, norm=True)


def x101_64x4d_dcnv2_entries() -> Entries:
    """MS_X_101_64x4d_2x_dcnv2: the contract's X-101-32x8d-DCNv2 row with 64 groups of 4: every grouped 3x3
    conv2 has half the input channels per group; offsets (27 channels over the same widths) are unchanged."""
    out = []
    for key, shape in CONTRACT["FCOS_MS_X_101_32x8d_2x_dcnv2 (head USE_DEFORMABLE)"]:
        if re.search(r"res\d\.\d+\.conv2\.weight", key):
            shape = (shape[0], shape[1] // 2, *shape[2:])
        out.append((key, shape))
    return out


BOTTOM_UP_PREFIX = "backbone.bottom_up."
NEW_ROWS = {
    **{f"MS_{k}_3x": (vovnet_entries, (v,)) for k, v in VOVNET_LAYOUTS.items()},
    "R_18_1x-Full-SyncBN": (r18_full_syncbn_entries, ()),
    "FCOS_RT/MS_R_50_4x_full-syncbn": (rt_r50_full_syncbn_entries, ()),
    "MS_X_101_64x4d_2x_dcnv2": (x101_64x4d_dcnv2_entries, ()),
}
# what the converter must rebuild: backbone, its norm, FREEZE_AT, FPN norm and ReLU, head norm, P6/P7 levels
EXPECTED_ARCH = {
    "MS_V_39_3x": ("ese_vovnet39b", "FrozenBN", 0, "none", False, "GN", 2),
    "MS_V_57_3x": ("ese_vovnet57b", "FrozenBN", 0, "none", False, "GN", 2),
    "MS_V_99_3x": ("ese_vovnet99b", "FrozenBN", 0, "none", False, "GN", 2),
    "R_18_1x-Full-SyncBN": ("resnet18", "SyncBN", 0, "SyncBN", True, "SyncBN", 2),
    "FCOS_RT/MS_R_50_4x_full-syncbn": ("resnet50", "SyncBN", 0, "SyncBN", True, "SyncBN", 0),
    "MS_X_101_64x4d_2x_dcnv2": ("resnext101_64x4d", "FrozenBN", 2, "none", False, "GN", 2),
}
# the same rows' parameter counts as tests/app/test_configs.py checks the presets against
NEW_ROW_PARAMS = {
    "MS_V_39_3x": 33_625_370,
    "MS_V_57_3x": 49_884_954,
    "MS_V_99_3x": 77_931_034,
    "R_18_1x-Full-SyncBN": 19_296_154,
    "FCOS_RT/MS_R_50_4x_full-syncbn": 31_126_936,
    "MS_X_101_64x4d_2x_dcnv2": 97_334_030,
}


def test_head_entry_writer_reproduces_the_contract():
    """The hand-written layouts above share their head with the contract's RT SyncBN-head row."""
    contract = [e for e in CONTRACT["FCOS_RT_MS_R_50_4x_syncbn_bn_head (SyncBN head)"] if ".fcos_head." in e[0]]
    assert sorted(head_entries(3, "SyncBN")) == sorted(contract)
    gn = [e for e in CONTRACT["FCOS_R_50 (R_50_1x / MS_R_50_2x)"] if ".fcos_head." in e[0]]
    assert sorted(head_entries(5, "GN")) == sorted(gn)
    assert sorted(fpn_entries([512, 1024, 2048], 2, norm=False)) == sorted(
        e for e in CONTRACT["FCOS_R_50 (R_50_1x / MS_R_50_2x)"] if e[0].startswith(("backbone.fpn", "backbone.top"))
    )


@pytest.mark.parametrize("row", list(NEW_ROWS))
def test_new_rows_convert_strictly(row):
    make, args = NEW_ROWS[row]
    entries = make(*args)
    assert len({k for k, _ in entries}) == len(entries)
    source = synthetic_state(entries)
    model_cfg, model, state = convert_and_load(source)
    backbone, norm, freeze_at, fpn_norm, fpn_relu, head_norm, top_levels = EXPECTED_ARCH[row]
    assert model_cfg["backbone"]["name"] == backbone and model_cfg["backbone"]["norm"] == norm
    assert model_cfg["backbone"]["freeze_at"] == freeze_at and model_cfg["top_levels"] == top_levels
    assert (model_cfg["fpn_norm"], model_cfg["fpn_relu"], model_cfg["head"]["norm"]) == (fpn_norm, fpn_relu, head_norm)
    assert model_cfg["backbone"].get("ese_every_block", False) == backbone.startswith("ese_vovnet")
    dcn = row.endswith("dcnv2")
    assert bool(model_cfg["backbone"]["dcn_stages"]) == dcn and model_cfg["head"]["use_deformable"] == dcn
    assert len(state) == len(entries)  # one model tensor per source tensor
    assert sum(p.numel() for p in model.parameters()) == NEW_ROW_PARAMS[row]
    torch.testing.assert_close(state["pixel_std"].flatten(), torch.tensor(PIXEL_STD_BGR[::-1]))


def bn_eval(x, s, p):
    """Eval-mode BN (and FrozenBN) over AdelaiDet's ``{p}.weight/bias/running_mean/running_var``."""
    return frozen_bn(x, s, p)


def reference_vovnet(s, x, blocks):
    """AdelaiDet's VoVNet forward over its own keys: conv-FrozenBN-ReLU everywhere, 3x3/2 ceil-mode max pool
    before stages 3-5, OSA = five 3x3 convs concatenated with the input, 1x1 conv, eSE (hard sigmoid of a 1x1
    conv over the global mean), identity shortcut on every block but a stage's first; returns stage3-5."""
    p = BOTTOM_UP_PREFIX

    def cbr(y, name, stride=1):
        w = s[f"{p}{name}/conv.weight"]
        return F.relu(bn_eval(F.conv2d(y, w, stride=stride, padding=w.shape[-1] // 2), s, f"{p}{name}/norm"))

    x = cbr(cbr(cbr(x, "stem.stem_1", 2), "stem.stem_2"), "stem.stem_3", 2)
    outs = []
    for stage, n in zip((2, 3, 4, 5), blocks, strict=True):
        if stage > 2:
            x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        for b in range(1, n + 1):
            name, feats = f"stage{stage}.OSA{stage}_{b}", [x]
            for i in range(5):
                feats.append(cbr(feats[-1], f"{name}.layers.{i}.OSA{stage}_{b}_{i}"))
            y = cbr(torch.cat(feats, 1), f"{name}.concat.OSA{stage}_{b}_concat")
            gate = F.conv2d(y.mean((2, 3), keepdim=True), s[f"{p}{name}.ese.fc.weight"], s[f"{p}{name}.ese.fc.bias"])
            y = y * F.relu6(gate + 3.0) / 6.0
            x = y + x if b > 1 else y
        if stage > 2:
            outs.append(x)
    return outs


def reference_r18(s, x):
    """detectron2's BasicBlock ResNet-18 with BN in eval mode; returns res3-res5."""
    p = BOTTOM_UP_PREFIX

    def conv_bn(y, name, stride=1):
        w = s[f"{p}{name}.weight"]
        return bn_eval(F.conv2d(y, w, stride=stride, padding=w.shape[-1] // 2), s, f"{p}{name}.norm")

    x = F.max_pool2d(F.relu(conv_bn(x, "stem.conv1", 2)), 3, 2, 1)
    outs = []
    for stage in (2, 3, 4, 5):
        for b in range(2):
            name, stride = f"res{stage}.{b}", 2 if b == 0 and stage > 2 else 1
            y = conv_bn(F.relu(conv_bn(x, f"{name}.conv1", stride)), f"{name}.conv2")
            shortcut = conv_bn(x, f"{name}.shortcut", stride) if f"{p}{name}.shortcut.weight" in s else x
            x = F.relu(y + shortcut)
        if stage > 2:
            outs.append(x)
    return outs


def reference_fpn_norm_relu(s, feats):
    """The full-SyncBN FPN (``FPN.NORM SyncBN``, ``FPN.USE_RELU``) as the detectron2 fork AdelaiDet ran those
    configs on computes it: BN after every conv; the coarsest level's lateral and output without ReLU, every
    finer top-down sum and output ReLU'd; P6 = ReLU(BN(conv(P5))), P7 = ReLU(BN(conv(P6)))."""

    def conv_bn(x, name, **kw):
        return bn_eval(F.conv2d(x, s[f"backbone.{name}.weight"], **kw), s, f"backbone.{name}.norm")

    prev = conv_bn(feats[2], "fpn_lateral5")
    outs = [conv_bn(prev, "fpn_output5", padding=1)]
    for level, f in ((4, feats[1]), (3, feats[0])):
        prev = F.relu(conv_bn(f, f"fpn_lateral{level}") + F.interpolate(prev, scale_factor=2.0, mode="nearest"))
        outs.insert(0, F.relu(conv_bn(prev, f"fpn_output{level}", padding=1)))
    p6 = F.relu(conv_bn(outs[-1], "top_block.p6", stride=2, padding=1))
    return [*outs, p6, F.relu(conv_bn(p6, "top_block.p7", stride=2, padding=1))]


def d2_and_rgb_inputs(source, seed=5):
    g = torch.Generator().manual_seed(seed)
    rgb = (torch.rand(1, 3, 96, 128, generator=g) * 255).round()
    return rgb, (rgb.flip(1) - source["pixel_mean"][None]) / source["pixel_std"][None]


@torch.no_grad()
def test_converted_vovnet_computes_adelaidets_function():
    blocks = VOVNET_LAYOUTS["V_39"]
    source = synthetic_state(vovnet_entries(blocks), seed=6)
    _, model, _ = convert_and_load(source)
    model.eval()
    rgb, d2_input = d2_and_rgb_inputs(source)
    ref = reference_vovnet(source, d2_input, blocks)
    ours = model.backbone(model.normalize(rgb))
    worst = max(assert_rel_close(a, b, f"stage{i + 3}") for i, (a, b) in enumerate(zip(ours, ref, strict=True)))
    print(f"\nV-39 stage3-5: max relative difference {worst:.1e}")
    # every block's eSE matters: without the ones timm leaves out, the function differs
    stage4 = model.backbone.body.stages_2.blocks
    stage4[0].attn, kept = None, stage4[0].attn
    assert (model.backbone(model.normalize(rgb))[1] - ref[1]).abs().max() > 1e-2 * ref[1].abs().max()
    stage4[0].attn = kept


@torch.no_grad()
def test_converted_r18_full_syncbn_computes_adelaidets_backbone_and_fpn():
    source = synthetic_state(r18_full_syncbn_entries(), seed=7)
    _, model, _ = convert_and_load(source)
    model.eval()
    rgb, d2_input = d2_and_rgb_inputs(source)
    ref_feats = reference_r18(source, d2_input)
    ours_feats = model.backbone(model.normalize(rgb))
    worst = {"backbone": max(assert_rel_close(a, b, "res") for a, b in zip(ours_feats, ref_feats, strict=True))}
    ref = reference_fpn_norm_relu(source, ref_feats)
    ours = model.fpn(ours_feats)
    worst["fpn"] = max(assert_rel_close(a, b, f"P{i + 3}") for i, (a, b) in enumerate(zip(ours, ref, strict=True)))
    print(f"\nR-18 full SyncBN: max relative differences { {k: f'{v:.1e}' for k, v in worst.items()} }")
    assert (ref[2] < 0).any() and (ref[0] >= 0).all()  # the ReLU layout mattered (P5 has none)
