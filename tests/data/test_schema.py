"""The one COCO schema check: the dataset stops at the first error it finds, validate_data reports the same
error with every id, and a well-formed file's columns come out the same through the fast and the per-entry path."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fcos_lightning.data.coco import CocoDetection
from fcos_lightning.data.schema import check_coco
from fcos_lightning.data.validate import no_batch_reason, validate_split


@pytest.mark.parametrize(
    ("change", "code", "ids"),
    [
        (lambda d: d["annotations"][4].update(category_id=99), "unknown_category_id", [5]),
        (lambda d: d["annotations"][0].update(image_id=12345), "unknown_image_id", [1]),
        (lambda d: d["annotations"][2].update(id=1), "duplicate_annotation_id", [1]),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate_image_id", [11]),
        (lambda d: d["images"][1].update(width=0), "image_size_invalid", [22]),
    ],
)
def test_dataset_stops_at_the_error_validate_data_reports(small_coco, change, code, ids):
    data = copy.deepcopy(small_coco.data)
    change(data)
    ann_file = small_coco.write(data)
    report = validate_split("train", ann_file, small_coco.img_dir, image_check="none")
    issue = next(i for i in report.errors if i.code == code)
    assert issue.ids == ids
    with pytest.raises(ValueError) as raised:
        CocoDetection(ann_file, small_coco.img_dir)
    assert issue.first() in str(raised.value) and ann_file in str(raised.value)


def test_ids_must_be_integers_not_booleans_or_fractions(small_coco):
    data = copy.deepcopy(small_coco.data)
    data["annotations"][1]["id"] = 2.5
    data["annotations"][3]["category_id"] = True
    data["annotations"][5]["image_id"] = 22.0  # an integral float is an integer
    tables = check_coco(data)
    (issue,) = tables.errors
    assert issue.code == "malformed_annotation" and issue.count == 2
    assert issue.details[0].startswith("annotation #1 (id=2.5)") and issue.details[1].startswith("annotation #3 (id=4)")
    assert 6 in tables.ann_ids.tolist()


def test_fast_and_per_entry_paths_give_the_same_columns(small_coco):
    data = copy.deepcopy(small_coco.data)
    fast = check_coco(data)
    data["annotations"].append({"id": 99, "image_id": 11, "category_id": 3, "bbox": "not a box"})  # per-entry path
    slow = check_coco(data)
    assert [i.code for i in slow.issues] == ["malformed_annotation"] and not fast.issues
    for column in ("ann_ids", "ann_image_ids", "ann_category_ids", "bboxes", "iscrowd"):
        np.testing.assert_array_equal(getattr(slow, column), getattr(fast, column), err_msg=column)
    assert fast.ann_ids.tolist() == list(range(1, 11)) and fast.iscrowd.sum() == 2


def test_no_batch_reason_counts_per_process_and_names_the_fixes():
    assert no_batch_reason("t.json", 10, 7, True, 4, num_replicas=2) is None  # 4 images per process
    assert no_batch_reason("t.json", 10, 5, True, 4, num_replicas=2) == (
        "t.json: 5 usable training images (3 per process) make no full batch of data.batch_size=4 (partial "
        "batches are dropped); set data.batch_size=3 or smaller, or data.filter_empty=false to keep the 5 images "
        "without boxes"
    )
    assert no_batch_reason("t.json", 3, 3, False, 4).endswith("set data.batch_size=3 or smaller")


def test_unknown_category_report_names_the_unknown_ids(small_coco):
    data = copy.deepcopy(small_coco.data)
    data["annotations"][4]["category_id"] = 99
    data["annotations"][6]["category_id"] = 42
    report = validate_split("train", small_coco.write(data), small_coco.img_dir, image_check="none")
    (issue,) = report.errors
    assert issue.message == "annotations with category_id [42, 99], not in 'categories' [3, 7, 11]"
    assert issue.ids == [5, 7] and "[42, 99]" in report.format()
