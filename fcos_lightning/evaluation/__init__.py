"""Evaluating during training: the COCOEvaluator (gather across ranks, score, analyse), COCO results, FPN-level
coverage of a dataset, and pictures of detections."""
