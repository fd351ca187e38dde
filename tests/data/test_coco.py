import copy
import json
import logging
import os
import pickle

import pytest
import torch
from torchvision import tv_tensors

from fcos_lightning.data import CategoryMap, CocoDetection, read_coco_categories


def _sample(ds: CocoDetection, image_id: int) -> dict:
    return ds[ds.image_ids.index(image_id)]


# ---------------------------------------------------------------- CategoryMap
def test_category_map_from_json_sorts_noncontiguous_ids(small_coco):
    cm = CategoryMap.from_coco_json(small_coco.ann_file)
    assert cm.cat_ids == (3, 7, 11)
    assert cm.names == ("cat", "dog", "bird")
    assert cm.num_classes == 3
    assert [cm.to_contiguous(c) for c in (3, 7, 11)] == [0, 1, 2]
    assert [cm.to_cat_id(k) for k in range(3)] == [3, 7, 11]
    labels = torch.tensor([[2, 0], [1, 1]])
    out = cm.labels_to_cat_ids(labels)
    assert out.dtype == torch.int64 and out.tolist() == [[11, 3], [7, 7]]
    assert cm.labels_to_cat_ids(torch.zeros(0, dtype=torch.int64)).shape == (0,)
    with pytest.raises(KeyError, match="5"):
        cm.to_contiguous(5)
    with pytest.raises(IndexError):
        cm.to_cat_id(3)


def test_category_map_dict_round_trip_through_weights_only_load(tmp_path):
    cm = CategoryMap(cat_ids=(2, 5, 9), names=("square", "disc", "ring"))
    d = cm.to_dict()
    assert d == {"cat_ids": [2, 5, 9], "names": ["square", "disc", "ring"]}
    torch.save({"category_map": d}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["category_map"]
    back = CategoryMap.from_dict(loaded)
    assert back == cm
    assert back.to_contiguous(9) == 2


def test_category_map_rejects_bad_input():
    with pytest.raises(ValueError, match="sorted"):
        CategoryMap(cat_ids=(5, 2), names=("a", "b"))
    with pytest.raises(ValueError, match="names"):
        CategoryMap(cat_ids=(1, 2), names=("a",))
    with pytest.raises(ValueError, match="duplicate"):
        CategoryMap.from_categories([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])


# ---------------------------------------------------------------- dataset policy
def test_train_mode_drops_crowd_degenerate_and_empty_images(small_coco, caplog):
    with caplog.at_level(logging.INFO, logger="fcos_lightning.data"):
        ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=True)
    assert ds.image_ids == [11, 22, 33, 44, 55]
    assert len(ds) == 5
    assert ds.num_crowd_boxes == 2
    assert ds.num_dropped_boxes == 2  # annotation 4 (0.5 px wide) and 6 (outside the image)
    assert ds.num_removed_images == 2
    logged = [r.getMessage() for r in caplog.records if r.name == "fcos_lightning.data"]
    assert len(logged) == 1 and "2 boxes under 1 px" in logged[0]

    s = _sample(ds, 11)
    assert isinstance(s["image"], tv_tensors.Image) and s["image"].dtype == torch.uint8
    assert s["image"].shape == (3, 40, 60)
    assert isinstance(s["boxes"], tv_tensors.BoundingBoxes)
    assert s["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert s["boxes"].canvas_size == (40, 60)
    assert s["boxes"].dtype == torch.float32
    assert s["boxes"].tolist() == [[5, 6, 25, 16], [50, 30, 60, 40]]  # crowd gone, last one clipped
    assert s["labels"].dtype == torch.int64 and s["labels"].tolist() == [1, 2]
    assert s["image_id"] == 11 and s["orig_size"] == (40, 60)

    s = _sample(ds, 22)
    assert s["boxes"].tolist() == [[0, 50, 5, 60]]
    assert s["labels"].tolist() == [0]


def test_train_mode_keeps_negatives_without_filter_empty(small_coco):
    ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=True, filter_empty=False)
    assert ds.image_ids == [11, 22, 33, 44, 55, 66, 77]
    for image_id in (66, 77):
        s = _sample(ds, image_id)
        assert s["boxes"].shape == (0, 4) and s["labels"].shape == (0,)
        assert s["labels"].dtype == torch.int64


def test_eval_mode_keeps_every_image_and_crowd_in_coco(small_coco):
    ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False)
    assert ds.image_ids == [11, 22, 33, 44, 55, 66, 77]
    assert sorted(ds.coco.getAnnIds(iscrowd=True)) == [2, 10]
    assert len(ds.coco.getAnnIds()) == 10
    assert sorted(ds.coco.getImgIds()) == [11, 22, 33, 44, 55, 66, 77]
    assert sorted(ds.coco.getCatIds()) == [3, 7, 11]
    # crowd boxes are never targets, in eval mode either
    assert _sample(ds, 77)["boxes"].shape == (0, 4)
    assert _sample(ds, 11)["labels"].tolist() == [1, 2]


def test_metadata_attributes(small_coco):
    ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False)
    assert ds.aspect_ratios[:2] == [60 / 40, 40 / 60]
    assert ds.img_info(1) == {"id": 22, "file_name": "img_22.jpg", "width": 40, "height": 60}
    assert ds.category_map.cat_ids == (3, 7, 11)


def test_pickles_without_coco_index_and_rebuilds_it(small_coco):
    ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._coco is None
    assert sorted(clone.coco.getAnnIds(iscrowd=True)) == [2, 10]
    assert torch.equal(clone[0]["image"], ds[0]["image"])


def test_transforms_are_applied_to_the_sample(small_coco):
    calls = []

    def tf(sample):
        calls.append(sorted(sample))
        return {**sample, "image": sample["image"][:, :10, :10]}

    ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, transforms=tf, train=True)
    assert ds[0]["image"].shape == (3, 10, 10)
    assert calls == [["boxes", "image", "image_id", "labels", "orig_size"]]


# ---------------------------------------------------------------- decoding
@pytest.mark.parametrize(("image_id", "size"), [(33, (32, 32)), (44, (24, 36)), (55, (30, 30)), (22, (60, 40))])
def test_gray_rgba_palette_and_jpeg_decode_to_rgb(small_coco, image_id, size):
    ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False)
    img = _sample(ds, image_id)["image"]
    assert img.dtype == torch.uint8 and img.shape == (3, *size)
    if image_id == 33:  # grayscale: three equal channels
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    if image_id == 55:  # palette entries are pure black/red/green/blue
        colours = set(map(tuple, img.flatten(1).T.tolist()))
        assert colours <= {(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)} and len(colours) > 1


# ---------------------------------------------------------------- errors
def test_missing_ann_file_and_img_dir(small_coco, tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(missing, small_coco.img_dir)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        CocoDetection(small_coco.ann_file, str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CategoryMap.from_coco_json(missing)


def test_unknown_category_names_annotation_image_and_category(small_coco):
    data = copy.deepcopy(small_coco.data)
    data["annotations"][4]["category_id"] = 99  # annotation id 5 on image 22
    ann_file = small_coco.write(data)
    with pytest.raises(ValueError, match=r"annotation id 5 \(image id 22\) has category_id 99"):
        CocoDetection(ann_file, small_coco.img_dir)


def test_annotation_of_unknown_image_is_an_error(small_coco):
    data = copy.deepcopy(small_coco.data)
    data["annotations"][0]["image_id"] = 12345
    with pytest.raises(ValueError, match="annotation id 1 refers to image id 12345"):
        CocoDetection(small_coco.write(data), small_coco.img_dir)


def test_missing_image_file_names_file_and_image_id(small_coco):
    ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False)
    os.remove(small_coco.file_of(33))
    with pytest.raises(FileNotFoundError, match=r"img_33\.png.*image id 33"):
        _sample(ds, 33)


def test_corrupt_image_names_file_and_image_id(small_coco):
    ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False)
    small_coco.file_of(22).write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(OSError, match=r"img_22\.jpg.*image id 22"):
        _sample(ds, 22)


def test_size_mismatch_with_json_is_an_error_when_the_dataset_is_built(small_coco):
    data = copy.deepcopy(small_coco.data)
    data["images"][2]["width"] = 33  # image 33 is really 32x32
    with pytest.raises(ValueError, match=r"image id 33 .*img_33\.png.*\(32, 32\).*\(32, 33\)"):
        CocoDetection(small_coco.write(data), small_coco.img_dir, train=False)
    data = copy.deepcopy(small_coco.data)
    data["images"][0].update(width=40, height=60)  # image 11 is 40 high, 60 wide: swapped, not sampled yet
    with pytest.raises(ValueError, match=r"image id 11 .*\(40, 60\).*\(60, 40\) \(width and height swapped"):
        CocoDetection(small_coco.write(data), small_coco.img_dir, train=True)
    ds = CocoDetection(small_coco.write(data), small_coco.img_dir, train=True, on_bad_image="skip")
    with pytest.raises(ValueError, match=r"image id 11 .*img_11\.png.*\(40, 60\).*\(60, 40\)"):
        ds.load(ds.image_ids.index(11))  # skip: logged at construction, skipped when drawn


def test_unreadable_image_header_is_an_error_when_the_dataset_is_built(small_coco):
    small_coco.file_of(22).write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"image id 22: .*img_22\.jpg: unreadable.*validation scores every image"):
        CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False)


def test_iscrowd_is_read_as_coco_means_it(small_coco):
    data = copy.deepcopy(small_coco.data)
    data["annotations"][0]["iscrowd"] = "0"  # annotation 1 (image 11): not crowd
    data["annotations"][1]["iscrowd"] = "1"  # annotation 2: crowd, as before
    ds = CocoDetection(small_coco.write(data), small_coco.img_dir, train=False)
    assert ds.num_crowd_boxes == 2 and len(_sample(ds, 11)["boxes"]) == 2
    # COCOeval reads iscrowd as a truth value: the string "0" must not make annotation 1 an ignored region
    assert [a["iscrowd"] for a in ds.coco.loadAnns([1, 2])] == [0, 1]
    data["annotations"][0]["iscrowd"] = "no"
    with pytest.raises(ValueError, match=r"annotation #0 \(id=1\): iscrowd 'no' is not 0 or 1"):
        CocoDetection(small_coco.write(data), small_coco.img_dir)


def test_fractional_image_id_is_an_error_naming_it(small_coco):
    data = copy.deepcopy(small_coco.data)
    data["images"][2]["id"] = 3.5
    with pytest.raises(ValueError, match=r"image entry #2 \(id=3\.5\): id 3\.5"):
        CocoDetection(small_coco.write(data), small_coco.img_dir)


def test_malformed_annotation_names_its_id(small_coco):
    data = copy.deepcopy(small_coco.data)
    data["annotations"][6]["bbox"] = [1, 2, 3]  # annotation id 7
    with pytest.raises(ValueError, match=r"annotation #6 \(id=7\).*bbox"):
        CocoDetection(small_coco.write(data), small_coco.img_dir)


def test_read_coco_categories_fast_path_and_fallbacks(tmp_path):
    cats = [{"id": 4, "name": "b"}, {"id": 1, "name": "a"}]
    tricky = {
        "info": {"description": 'a string with "categories": [{"id": 99, "name": "fake"}] inside'},
        "images": [],
        "annotations": [],
        "categories": cats,
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(tricky, indent=2))
    assert read_coco_categories(path) == cats
    assert CategoryMap.from_coco_json(path).cat_ids == (1, 4)
    # a second "categories" key (nested) forces a full parse, which picks the top-level one
    nested = {"info": {"categories": [{"id": 99, "name": "fake"}]}, "images": [], "categories": cats}
    path.write_text(json.dumps(nested))
    assert read_coco_categories(path) == cats
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="no 'categories'"):
        read_coco_categories(path)


def test_missing_image_files_fail_at_construction_or_are_logged_under_skip(small_coco, caplog):
    os.remove(small_coco.file_of(33))
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ image files not found.*img_33\.png \(image id 33\)"):
        CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False)
    with caplog.at_level(logging.WARNING, logger="fcos_lightning.data"):
        ds = CocoDetection(small_coco.ann_file, small_coco.img_dir, train=False, on_bad_image="skip")
    assert "img_33.png (image id 33)" in caplog.text and "skipped" in caplog.text
    assert 33 in [ds.img_info(i)["id"] for i in range(len(ds))]  # still evaluated (skipped when drawn)
