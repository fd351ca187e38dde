"""Scoring detections: COCO AP with pycocotools, and pictures of detections."""
