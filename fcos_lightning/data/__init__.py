"""Data: COCO-format datasets, v2 transforms, collation, self-sharding samplers, demo set (plain PyTorch)."""

from .coco import CategoryMap, CocoDetection, load_coco_json, read_coco_categories, read_image
from .collate import Collator
from .demo import DEMO_CATEGORIES, make_demo_dataset
from .samplers import AspectRatioGroupedBatchSampler, InferenceSampler, dist_info
from .transforms import ResizeShortestEdge, build_test_transforms, build_train_transforms

__all__ = [
    "DEMO_CATEGORIES",
    "AspectRatioGroupedBatchSampler",
    "CategoryMap",
    "CocoDetection",
    "Collator",
    "InferenceSampler",
    "ResizeShortestEdge",
    "build_test_transforms",
    "build_train_transforms",
    "dist_info",
    "load_coco_json",
    "make_demo_dataset",
    "read_coco_categories",
    "read_image",
]
